"""Layers of a quantized checkpoint: QuantLinear and QuantExperts.

`swap_modules` puts them, on the meta device, in place of the nn.Linear layers and routed-expert
blocks that the checkpoint's quantization_config quantizes; each says which packed tensors it
expects (`expected_checkpoint`, for the loader's strict check) and reads them once (`load`).

On the CPU, with the compiled extension, the weights are repacked once to the kernels' layout
and run through `ops.quant_matmul` / `ops.moe_block`. Otherwise they are dequantized to the
compute dtype at load: the same values, without the memory saving. That covers CUDA (until GPU
kernels exist), an install without `_C` (the ops' torch references would dequantize the whole
weight on every call), and schemes the kernels cannot take (a group size not a multiple of 32;
experts whose gate and up differ or that are only partly quantized).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._bridge import kernel
from ..config import TextConfig
from ..errors import CheckpointError, ConfigError
from ..model.moe import StackedExperts, experts_forward
from .cpu_layout import CHUNK, to_cpu_layout
from .packing import PackedWeight, QuantScheme, concat_out_features, dequantize, stack_experts
from .qconfig import QuantizationConfig

Reader = Callable[[str], torch.Tensor]  # checkpoint tensor name -> tensor
Expected = dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
# MLA's absorbed decode splits kv_b_proj's weight per head (model/mla.py), so it is dequantized
# at load, as SGLang does: 2 M parameters per layer.
_DENSE_AT_LOAD = re.compile(r"\.self_attn\.kv_b_proj$")


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


def read_packed(read: Reader, prefix: str, scheme: QuantScheme, shape: tuple[int, int]) -> PackedWeight:
    """One quantized weight from the checkpoint, checked against the module's [out, in]."""
    tensors = {f"{prefix}.{n}": read(f"{prefix}.{n}") for n in packed_shapes(*shape, scheme)}
    try:
        packed = PackedWeight.from_state_dict(tensors, scheme, prefix + ".")
    except ValueError as exc:
        raise CheckpointError(f"{prefix}: {exc}") from None
    if (packed.out_features, packed.in_features) != shape:
        raise CheckpointError(f"{prefix}.weight_shape is {[packed.out_features, packed.in_features]}, "
                              f"expected {list(shape)}")
    return packed


def kernel_supports(op: str, scheme: QuantScheme, device: torch.device) -> bool:
    """Whether the compiled CPU kernel `op` runs `scheme` on `device`."""
    return (device.type == "cpu" and (scheme.group_size is None or scheme.group_size % CHUNK == 0)
            and kernel(op) is not None)


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

    def load(self, read: Reader, prefix: str, device: torch.device, dtype: torch.dtype) -> None:
        packed = read_packed(read, prefix, self.scheme, (self.out_features, self.in_features))
        if kernel_supports("quant_matmul", self.scheme, device) and not self.dense_at_load:
            self.qweight = to_cpu_layout(packed)
        else:
            self.weight = dequantize(packed, dtype).to(device)

    @property
    def on_kernel(self) -> bool:
        return self.qweight is not None

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

    def _kernel_ok(self, device: torch.device) -> bool:
        gate, up, down = (self.schemes[p] for p in EXPERT_PROJS)
        return (gate is not None and down is not None and gate == up
                and kernel_supports("moe_block", gate, device)
                and kernel_supports("moe_block", down, device)
                and self.shapes["down_proj"][1] % CHUNK == 0)

    def load(self, read: Reader, prefix: str, device: torch.device, dtype: torch.dtype) -> None:
        weights = {}
        for proj, scheme in self.schemes.items():
            names = [f"{prefix}.{e}.{proj}" for e in range(self.num_experts)]
            if scheme is None:
                weights[proj] = torch.stack([read(f"{n}.weight") for n in names])
            else:
                weights[proj] = stack_experts([read_packed(read, n, scheme, self.shapes[proj])
                                               for n in names])
        gate, up, down = (weights[p] for p in EXPERT_PROJS)
        if self._kernel_ok(device):
            self.w13 = to_cpu_layout(concat_out_features([gate, up]))
            self.w2 = to_cpu_layout(down)
        else:
            self.dense = tuple((w if isinstance(w, torch.Tensor) else dequantize(w, dtype))
                               .to(device=device, dtype=dtype) for w in (gate, up, down))

    @property
    def on_kernel(self) -> bool:
        return self.w13 is not None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return experts_forward(x, weights, ids, *self.dense)
        return ops.moe_block(x.contiguous(), weights.float(), ids, self.w13, self.w2)


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
                                  module.bias is not None, bool(_DENSE_AT_LOAD.search(name)))
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
