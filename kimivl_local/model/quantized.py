"""Layers of a quantized checkpoint: QuantLinear and QuantExperts.

`swap_modules` puts them, on the meta device, in place of the nn.Linear layers and routed-expert
blocks that the checkpoint's quantization_config quantizes; each says which packed tensors it
expects (`expected_checkpoint`, for the loader's strict check) and reads them once (`load`).

With the compiled extension the weights are repacked once to the kernels' layout (CPU:
cpu_layout.py, straight from the bytes read; CUDA: cuda_layout.py, one layer at a time on the
host, bf16/fp16 models) and run through `ops.quant_matmul` / `ops.moe_block`. Otherwise they are
dequantized to the compute dtype at load: the same values, without the memory saving. That
covers an install without `_C` (the ops' torch references would dequantize the whole weight on
every call), --backend reference, fp32 models on CUDA, and schemes the kernels cannot take (a
group size not a multiple of 32; on CUDA in_features not a multiple of 8; experts whose gate and
up differ or are only partly quantized). Both kernel sets take every width, 2 to 8 bits.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checkpoint.config import TextConfig
from ..checkpoint.shards import Checkpoint
from ..errors import CheckpointError, ConfigError
from ..kernels.bridge import kernel
from ..quant import cpu_layout, cuda_layout
from ..quant.cpu_layout import CpuQuantWeight, to_cpu_layout
from ..quant.cuda_layout import CudaQuantWeight
from ..quant.layout import CHUNK, scale_dtype_for
from .moe import StackedExperts, experts_forward
from ..quant.packing import (PackedWeight,
    QuantScheme,
    concat_out_features,
    dequantize,
    stack_experts)
from ..quant.qconfig import QuantizationConfig

Expected = dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
# MLA's absorbed decode splits kv_b_proj's weight per head (model/mla.py), so it is dequantized
# at load, as SGLang does: 2 M parameters per layer.
DENSE_AT_LOAD = re.compile(r"\.self_attn\.kv_b_proj$")


def packed_shapes(out_features: int, in_features: int,
                  scheme: QuantScheme) -> dict[str, tuple[int, ...]]:
    """Suffix -> shape of one quantized weight's on-disk tensors (packing.py's layout), in the
    order compressed-tensors writes them; ValueError when the group does not divide in_features."""
    groups = scheme.num_groups(in_features)
    shapes = {"weight_packed": (out_features, _words(in_features, scheme)),
              "weight_scale": (out_features, groups), "weight_shape": (2,)}
    if not scheme.symmetric:
        shapes["weight_zero_point"] = (_words(out_features, scheme), groups)
    return shapes


def _words(n: int, scheme: QuantScheme) -> int:
    return -(-n * scheme.bits // 32)


_ALLOWED = {"weight_packed": (torch.int32,),
            "weight_scale": (torch.bfloat16, torch.float16, torch.float32),
            "weight_shape": (torch.int64, torch.int32), "weight_zero_point": (torch.int32,)}


def packed_expected(prefix: str, out_features: int, in_features: int,
                    scheme: QuantScheme) -> Expected:
    """name -> (shape, allowed dtypes) of one quantized weight's tensors."""
    return {f"{prefix}.{suffix}": (shape, _ALLOWED[suffix])
            for suffix, shape in packed_shapes(out_features, in_features, scheme).items()}


def read_packed(ckpt: Checkpoint, prefix: str, scheme: QuantScheme,
                shape: tuple[int, int]) -> PackedWeight:
    """One quantized weight read from the checkpoint, checked against the module's [out, in]."""
    tensors = {f"{prefix}.{n}": ckpt.load(f"{prefix}.{n}") for n in packed_shapes(*shape, scheme)}
    try:
        packed = PackedWeight.from_state_dict(tensors, scheme, prefix + ".")
    except ValueError as exc:
        raise CheckpointError(f"{prefix}: {exc}") from None
    if (packed.out_features, packed.in_features) != shape:
        raise CheckpointError(f"{prefix}.weight_shape is {[packed.out_features, packed.in_features]}, "
                              f"expected {list(shape)}")
    return packed


def quantized_bytes(out_features: int, in_features: int, scheme: QuantScheme) -> int:
    """Memory of one weight in the kernels' layout: values, 16-bit scales, 8-bit zeros."""
    groups = scheme.num_groups(in_features)
    per_row = in_features * scheme.bits // 8 + groups * (2 if scheme.symmetric else 3)
    return out_features * per_row


def kernel_supports(op: str, scheme: QuantScheme, device: torch.device, in_features: int,
                    dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a compiled kernel `op` (CPU: "quant_matmul"/"moe_block"; CUDA: the same names
    prefixed "cuda_", for bf16/fp16 activations) runs `scheme` on `device`."""
    if device.type == "cuda":
        return (dtype in (torch.bfloat16, torch.float16)
                and cuda_layout.kernel_supports(scheme, in_features)
                and kernel(f"cuda_{op}") is not None)
    return (device.type == "cpu" and (scheme.group_size is None or scheme.group_size % CHUNK == 0)
            and kernel(op) is not None)


def to_kernel_layout(packed: PackedWeight, device: torch.device) -> CpuQuantWeight | CudaQuantWeight:
    if device.type == "cuda":
        return cuda_layout.to_cuda_layout(packed, device)
    return to_cpu_layout(packed)


class QuantLinear(nn.Module):
    """y = x·Wᵀ (+ b) for a packed W [out, in] (checkpoint: weight_packed, weight_scale, ...)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool,
                 dense_at_load: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.dense_at_load = dense_at_load
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.qweight = None  # CpuQuantWeight on the kernel path
        self.weight = None  # dense fallback [out, in]

    def expected_checkpoint(self, prefix: str) -> Expected:
        return packed_expected(prefix, self.out_features, self.in_features, self.scheme)

    def load(self, ckpt: Checkpoint, prefix: str, device: torch.device, dtype: torch.dtype) -> None:
        packed = read_packed(ckpt, prefix, self.scheme, (self.out_features, self.in_features))
        if self._kernel_ok(device, dtype):
            self.qweight = to_kernel_layout(packed, device)
        else:
            self.weight = dequantize(packed, dtype).to(device)

    def resident_bytes(self, device: torch.device, dtype: torch.dtype) -> int:
        """Memory `load` will hold on `device` (the memory planner asks before loading)."""
        bias = self.out_features * dtype.itemsize if self.bias is not None else 0
        if self._kernel_ok(device, dtype):
            return quantized_bytes(self.out_features, self.in_features, self.scheme) + bias
        return self.out_features * self.in_features * dtype.itemsize + bias

    def _kernel_ok(self, device: torch.device, dtype: torch.dtype) -> bool:
        return (not self.dense_at_load
                and kernel_supports("quant_matmul", self.scheme, device, self.in_features, dtype))

    @property
    def on_kernel(self) -> bool:
        return self.qweight is not None

    def nbytes(self) -> int:
        """Bytes of the loaded weight (what one forward reads)."""
        w = self.qweight.nbytes() if self.qweight is not None else _tensor_bytes(self.weight)
        return w + _tensor_bytes(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            return F.linear(x, self.weight, self.bias)
        y = ops.quant_matmul(x.contiguous(), self.qweight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in={self.in_features}, out={self.out_features}, int{s.bits} "
                f"{'channel' if s.group_size is None else f'g{s.group_size}'}, "
                f"{'sym' if s.symmetric else 'asym'}")


class QuantExperts(nn.Module):
    """The routed experts of one MoE layer; each projection quantized (a scheme) or not (None).

    On disk every expert keeps its own name (experts.{e}.{proj}.weight_packed, ...); here they
    are stacked [E, ...], gate and up fused as w13 [E, 2I, H] for `ops.moe_block`.
    """

    def __init__(self, cfg: TextConfig, schemes: dict[str, QuantScheme | None]):
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.schemes = e, schemes
        self.shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        self.w13 = self.w2 = None  # CpuQuantWeight on the kernel path
        self.dense = None  # (gate, up, down) [E, out, in] on the fallback

    def expected_checkpoint(self, prefix: str, dtype: torch.dtype) -> Expected:
        expected = {}
        for e in range(self.num_experts):
            for proj, scheme in self.schemes.items():
                name = f"{prefix}.{e}.{proj}"
                if scheme is None:
                    expected[f"{name}.weight"] = (self.shapes[proj], (dtype,))
                else:
                    expected.update(packed_expected(name, *self.shapes[proj], scheme))
        return expected

    def _kernel_ok(self, device: torch.device, dtype: torch.dtype) -> bool:
        gate, up, down = (self.schemes[p] for p in EXPERT_PROJS)
        (i, h) = self.shapes["gate_proj"]
        return (gate is not None and down is not None and gate == up
                and kernel_supports("moe_block", gate, device, h, dtype)
                and kernel_supports("moe_block", down, device, i, dtype)
                and i % CHUNK == 0)

    def load(self, ckpt: Checkpoint, prefix: str, device: torch.device, dtype: torch.dtype) -> None:
        if self._kernel_ok(device, dtype) and device.type == "cpu":
            self._load_cpu_layout(ckpt, prefix)
            return
        if self._kernel_ok(device, dtype):  # CUDA: stacked on the host a layer at a time
            stacked = {proj: stack_experts([read_packed(ckpt, f"{prefix}.{e}.{proj}",
                                                        self.schemes[proj], self.shapes[proj])
                                            for e in range(self.num_experts)])
                       for proj in EXPERT_PROJS}
            gate_up = concat_out_features([stacked["gate_proj"], stacked["up_proj"]])
            self.w13 = cuda_layout.to_cuda_layout(gate_up, device)
            self.w2 = cuda_layout.to_cuda_layout(stacked["down_proj"], device)
            return
        dense = []
        for proj in EXPERT_PROJS:
            scheme, shape = self.schemes[proj], self.shapes[proj]
            w = torch.empty(self.num_experts, *shape, dtype=dtype, device=device)
            for e in range(self.num_experts):
                name = f"{prefix}.{e}.{proj}"
                if scheme is None:
                    w[e] = ckpt.load(f"{name}.weight")
                else:
                    w[e] = dequantize(read_packed(ckpt, name, scheme, shape), dtype)
            dense.append(w)
        self.dense = tuple(dense)

    def _load_cpu_layout(self, ckpt: Checkpoint, prefix: str) -> None:
        """Each expert's gate, up and down are read and repacked straight into place in the
        stacked layout (gate rows then up rows of w13), one expert's projection at a time."""
        gate, down = self.schemes["gate_proj"], self.schemes["down_proj"]
        (i, h), e_count = self.shapes["gate_proj"], self.num_experts
        names = {proj: [f"{prefix}.{e}.{proj}" for e in range(e_count)] for proj in EXPERT_PROJS}
        scale_dtypes = {proj: scale_dtype_for(
            *(ckpt.load(f"{n}.weight_scale") for n in names[proj])) for proj in EXPERT_PROJS}
        w13_scale = scale_dtypes["gate_proj"]
        if scale_dtypes["up_proj"] != w13_scale:
            w13_scale = torch.bfloat16  # fp16 and bf16 scales in one weight: bf16 holds both
        self.w13 = cpu_layout.allocate(2 * i, h, gate, w13_scale, e_count)
        self.w2 = cpu_layout.allocate(h, i, down, scale_dtypes["down_proj"], e_count)
        for e in range(e_count):
            for proj, dst, row0 in (("gate_proj", self.w13, 0), ("up_proj", self.w13, i),
                                    ("down_proj", self.w2, 0)):
                name, shape = names[proj][e], self.shapes[proj]
                cpu_layout.fill_rows(dst, read_packed(ckpt, name, self.schemes[proj], shape),
                                     row0, e)

    @property
    def device(self) -> torch.device:
        return self.w13.qweight.device if self.w13 is not None else self.dense[0].device

    def resident_bytes(self, device: torch.device, dtype: torch.dtype) -> int:
        """Memory `load` will hold on `device` (the memory planner asks before loading)."""
        total = 0
        for proj, (n, k) in self.shapes.items():
            scheme = self.schemes[proj]
            quantized = self._kernel_ok(device, dtype) and scheme is not None
            total += quantized_bytes(n, k, scheme) if quantized else n * k * dtype.itemsize
        return total * self.num_experts

    @property
    def on_kernel(self) -> bool:
        return self.w13 is not None

    def nbytes(self) -> int:
        """Bytes of all loaded experts."""
        if self.w13 is not None:
            return self.w13.nbytes() + self.w2.nbytes()
        return sum(_tensor_bytes(t) for t in self.dense)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return experts_forward(x, weights, ids, *self.dense)
        return ops.moe_block(x.contiguous(), weights.float(), ids, self.w13, self.w2)


def quant_schemes(module: nn.Module) -> list[QuantScheme]:
    """The schemes of a QuantLinear or QuantExperts (the experts' quantized projections)."""
    if isinstance(module, QuantExperts):
        return [s for s in module.schemes.values() if s is not None]
    return [module.scheme]


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def swap_modules(model: nn.Module, text: TextConfig,
                 qconfig: QuantizationConfig) -> dict[str, nn.Module]:
    """Replace, in the meta-device `model`, every nn.Linear and StackedExperts that `qconfig`
    quantizes (matched by checkpoint name); returns {module name: new module}."""
    swapped = {}
    for name, module in list(model.named_modules()):
        new = None
        if isinstance(module, nn.Linear):
            scheme = qconfig.scheme_for(name)
            if scheme is not None:
                _check_groups(name, scheme, module.in_features)
                new = QuantLinear(module.in_features, module.out_features, scheme,
                                  module.bias is not None, bool(DENSE_AT_LOAD.search(name)))
        elif isinstance(module, StackedExperts):
            schemes = {p: _expert_scheme(qconfig, name, p, text.n_routed_experts)
                       for p in EXPERT_PROJS}
            if any(s is not None for s in schemes.values()):
                new = QuantExperts(text, schemes)
                for proj, scheme in schemes.items():
                    if scheme is not None:
                        _check_groups(f"{name}.*.{proj}", scheme, new.shapes[proj][1])
        if new is not None:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, new)
            swapped[name] = new
    if not swapped:
        raise ConfigError("config.json has a quantization_config, but it quantizes none of the "
                          "model's linear layers (check its targets and ignore list)")
    return swapped


def _expert_scheme(qconfig: QuantizationConfig, prefix: str, proj: str, n: int) -> QuantScheme | None:
    schemes = {qconfig.scheme_for(f"{prefix}.{e}.{proj}") for e in range(n)}
    if len(schemes) > 1:
        raise ConfigError(f"quantization_config gives the experts of {prefix} different schemes "
                          f"for {proj}; kimivl-local needs one scheme per layer and projection")
    return schemes.pop()


def _check_groups(name: str, scheme: QuantScheme, in_features: int) -> None:
    try:
        scheme.num_groups(in_features)
    except ValueError as exc:
        raise ConfigError(f"quantization_config: {name}: {exc}") from None
