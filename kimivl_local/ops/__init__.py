"""Operators with a torch reference (oracle and fallback); compiled kernels plug in here."""

from .attention import varlen_attention, varlen_attention_reference
from .mla import mla_decode, mla_decode_reference
from .moe import moe_block, moe_block_reference
from .quant_matmul import quant_matmul, quant_matmul_reference, quantize_activations_reference

__all__ = ["varlen_attention", "varlen_attention_reference", "mla_decode", "mla_decode_reference",
           "moe_block", "moe_block_reference", "quant_matmul", "quant_matmul_reference",
           "quantize_activations_reference"]
