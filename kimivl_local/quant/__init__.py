"""Quantized weights: the on-disk packed format (packing) and the CPU kernel layout (cpu_layout)."""

from .cpu_layout import CpuQuantWeight, to_cpu_layout
from .packing import (PackedWeight, QuantScheme, concat_out_features, dequantize, pack_int32,
                      quantize_rtn, stack_experts, unpack, unpack_int32)

__all__ = ["CpuQuantWeight", "PackedWeight", "QuantScheme", "concat_out_features", "dequantize",
           "pack_int32", "quantize_rtn", "stack_experts", "to_cpu_layout", "unpack", "unpack_int32"]
