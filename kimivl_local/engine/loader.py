"""Validate a checkpoint folder strictly and fill a model built on the meta device tensor by tensor
from the shards: one copy of the weights, all in memory the process owns (nothing stays mapped from
the files). Repo ids and the HF cache: hub.py."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.config import KimiVLConfig
from ..checkpoint.shards import Checkpoint
from ..model.kimivl import KimiVLForConditionalGeneration, checkpoint_names
from ..model.quantized import quant_schemes, swap_modules
from ..quant.qconfig import QuantizationConfig
from .memory_plan import Placement

log = logging.getLogger("kimivl_local")

# (meta-device model, config, dtype) -> where each part goes; raises when it cannot fit.
Planner = Callable[[nn.Module, KimiVLConfig, torch.dtype], Placement]


def load_model(path: Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
               planner: Planner | None = None) -> KimiVLForConditionalGeneration:
    """Validate the checkpoint at `path` against its config.json and load it.

    dtype: compute dtype (default: the checkpoint's, bf16); the router's correction bias stays fp32.
    A checkpoint with a quantization_config gets quantized layers (kimivl_local.model.quantized),
    swapped in before validation so the packed tensors are checked just as strictly.
    planner: given the validated meta-device model, its config and dtype, says where each part
    goes (memory_plan.py), or raises before any weight is read; default: all on `device`.
    """
    config = KimiVLConfig.from_dir(path)
    dtype = dtype or config.dtype
    device = torch.device(device)
    qconfig = QuantizationConfig.from_model_config(config.raw, str(Path(path) / "config.json"))
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    quantized = swap_modules(model, config.text, qconfig) if qconfig else {}
    ckpt = Checkpoint.open(path)
    ckpt.validate(model.expected_checkpoint())
    placement = planner(model, config, dtype) if planner else Placement(device)
    try:
        fill_parameters(model, ckpt, dtype, placement)
        for name, module in quantized.items():
            module.load(ckpt, name, placement.device_of(name), dtype)
    finally:
        ckpt.close()
    _return_freed_memory()
    if quantized:
        fast = sum(m.on_kernel for m in quantized.values())
        log.info("%d quantized layers: %d in a kernel layout, %d dequantized to %s at load",
                 len(quantized), fast, len(quantized) - fast, str(dtype).removeprefix("torch."))
        slow_bits = sorted({s.bits for n, m in quantized.items()
                            if placement.device_of(n).type == "cuda" and not m.on_kernel
                            and not getattr(m, "dense_at_load", False) for s in quant_schemes(m)})
        if slow_bits:
            log.warning("%s-bit layers on CUDA have no kernel here (an fp32 model, a group size "
                        "not a multiple of 32, in_features not a multiple of 8, or _C built "
                        "without CUDA) and are dequantized to %s at load (the memory of the "
                        "dense weight)", "/".join(map(str, slow_bits)),
                        str(dtype).removeprefix("torch."))
    model.eval()
    return model


def fill_parameters(module: nn.Module, ckpt: Checkpoint, dtype: torch.dtype,
                    placement: Placement | torch.device | str, prefix: str = "") -> None:
    """Fill every parameter of `module` (named `prefix` + its name in the checkpoint) from
    `ckpt`, in `dtype` except the router's fp32 correction bias, on its planned device (or
    all on one device)."""
    if not isinstance(placement, Placement):
        placement = Placement(torch.device(placement))
    for name, param in list(module.named_parameters()):
        device = placement.device_of(prefix + name)
        keep_fp32 = name.endswith("e_score_correction_bias")
        target = torch.float32 if keep_fp32 else placement.dtype_of(prefix + name, dtype)
        names = checkpoint_names(prefix + name, param.shape)
        if len(names) == 1:
            value = ckpt.load(names[0]).to(device=device, dtype=target)
        else:  # stacked experts: fill [E, ...] one expert at a time
            value = torch.empty(param.shape, dtype=target, device=device)
            direct = device.type == "cpu" and all(ckpt.tensors[n].dtype == target for n in names)
            for e, n in enumerate(names):
                if direct:
                    ckpt.read_into(n, value[e])
                else:
                    value[e].copy_(ckpt.load(n))
        _set_parameter(module, name, value)


def _return_freed_memory() -> None:
    """Hand the heap pages of the load's temporaries (reads converted to another dtype) back
    to the OS: glibc keeps freed blocks under 32 MB in its heap (measured: ~0.35 GB of a 3.7 GB
    load), which would otherwise stay in the server's resident set."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    model.get_submodule(owner)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
