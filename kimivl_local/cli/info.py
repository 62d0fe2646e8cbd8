"""What `kimivl-local info` reports: versions, the extension's build, CPU and GPU, a model."""

from __future__ import annotations

import os
import platform

import torch

from .. import __version__
from ..kernels.extension import build_info


def collect_info(model: str | None = None) -> dict:
    info = {
        "kimivl_local": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "extension": build_info(),
        "torch_cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    ext = info["extension"]
    if ext["available"] and ext.get("cuda"):
        from ..kernels.extension import extension

        info["extension_cuda_devices"] = extension().cuda_devices()
    if model:
        info["model"] = describe_model(model)
    return info


def describe_model(spec: str) -> dict:
    from ..checkpoint.config import KimiVLConfig
    from ..checkpoint.hub import resolve_model_path
    from ..checkpoint.shards import Checkpoint
    from ..quant.cuda_layout import CudaQuantWeight
    from ..quant.qconfig import QuantizationConfig

    path = resolve_model_path(spec)
    cfg = KimiVLConfig.from_dir(path)
    qconfig = QuantizationConfig.from_model_config(cfg.raw, str(path / "config.json"))
    ckpt = Checkpoint.open(path)
    t = cfg.text
    out = {
        "path": str(path),
        "tensors": len(ckpt.tensors),
        "parameters": sum(_weights_of(tensor, qconfig) for tensor in ckpt.tensors.values()),
        "bytes": sum(tensor.nbytes for tensor in ckpt.tensors.values()),
        "quantization": "compressed-tensors pack-quantized" if qconfig else None,
        "parts": weight_formats(ckpt.tensors.values(), qconfig),
        "text": f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.n_routed_experts} "
                f"experts top-{t.num_experts_per_tok} + {t.n_shared_experts} shared, vocab "
                f"{t.vocab_size}, context {t.max_position_embeddings}",
        "vision": f"{cfg.vision.num_hidden_layers} blocks, hidden {cfg.vision.hidden_size}",
        "dtype": cfg.torch_dtype,
    }
    if qconfig is not None:
        bits = sorted({g.scheme.bits for g in qconfig.groups})
        out["quantized_bits"] = bits
        out["cuda_dequantized_bits"] = [b for b in bits if b not in CudaQuantWeight.BITS]
    return out


# The tensors compressed-tensors' pack-quantized format writes in place of a linear's `.weight`.
_QUANT_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")


def _quantized_module(name: str) -> str | None:
    return next((name.removesuffix(s) for s in _QUANT_SUFFIXES if name.endswith(s)), None)


def _weights_of(tensor, qconfig) -> int:
    """Model parameters a checkpoint tensor holds: a packed tensor's int32 words hold 32 / bits
    weights each (a dense bit stream for 3, 5 and 6 bits); scales, zero points and shapes are not parameters."""
    module = _quantized_module(tensor.name)
    if module is None:
        return tensor.numel
    if not tensor.name.endswith(".weight_packed"):
        return 0
    scheme = qconfig.scheme_for(module) if qconfig else None
    return tensor.numel * 32 // scheme.bits if scheme else tensor.numel


def weight_formats(tensors, qconfig) -> list[dict]:
    """Bytes per (part of the model, storage format), largest first: a quantized linear counts
    under its scheme (INT4 g128, INT8 per-channel, ...) with its scales and zero points."""
    sizes: dict[tuple[str, str], int] = {}
    for t in tensors:
        module = _quantized_module(t.name)
        scheme = qconfig.scheme_for(module) if qconfig and module else None
        key = (model_part(t.name), scheme_label(scheme) if scheme else _dtype_label(t.dtype))
        sizes[key] = sizes.get(key, 0) + t.nbytes
    return [{"part": part, "format": fmt, "bytes": n}
            for (part, fmt), n in sorted(sizes.items(), key=lambda kv: -kv[1])]


# First match wins: (substring of a tensor name, the part of the model it belongs to).
_PARTS = (("vision_tower.", "vision tower"), ("multi_modal_projector.", "projector"),
          (".mlp.experts.", "routed experts"), (".mlp.shared_experts.", "shared experts"),
          (".mlp.gate.", "router"), ("embed_tokens", "embeddings"), ("lm_head", "lm_head"),
          ("norm", "norms"), (".self_attn.", "attention"), (".mlp.", "dense MLP"))


def model_part(tensor: str) -> str:
    return next((part for key, part in _PARTS if key in tensor), "other")


def scheme_label(scheme) -> str:
    group = "per-channel" if scheme.group_size is None else f"g{scheme.group_size}"
    return f"INT{scheme.bits} {group}{'' if scheme.symmetric else ' asym'}"


def _dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "BF16", torch.float16: "FP16", torch.float32: "FP32"}.get(
        dtype, str(dtype).removeprefix("torch.").upper())


def format_bytes(n: int) -> str:
    """Decimal units scaled to the size: 16.41 GB, 687.8 KB, 512 bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def format_info(info: dict) -> str:
    ext = info["extension"]
    lines = [f"kimivl-local {info['kimivl_local']}  (python {info['python']}, torch {info['torch']}, "
             f"{info['torch_threads']} threads of {info['cpu_count']} cpus)"]
    if not ext["available"]:
        lines.append(f"extension: not available, ops run on torch references ({ext['error']})")
    else:
        feats = [k for k, v in ext["cpu_features"].items() if v]
        lines.append(f"extension: built with {ext['compiler']}")
        lines.append(f"  cpu features: {' '.join(feats) or 'none'}; kernel path: "
                     f"{ext.get('cpu_isa_selected') or ext.get('cpu_isa_error')}")
        # Why CUDA is or is not compiled in (setup.py's decision, build_support/cuda_target.py).
        why = f" ({ext['cuda_note']})" if ext.get("cuda_note") else ""
        if ext["cuda"]:
            lines.append(f"  cuda: compiled (CUDA {ext['cuda_compiler_version']}) for sm "
                         f"{', '.join(ext['cuda_archs'])}{why}")
            devs = info.get("extension_cuda_devices") or []
            lines.append("  cuda devices: " + (", ".join(f"{d['name']} (sm_{d['sm']})" for d in devs)
                                               or "none visible"))
        else:
            lines.append(f"  cuda: not compiled{why}")
    lines.append("torch cuda devices: " + (", ".join(info["torch_cuda_devices"]) or "none"))
    if "model" in info:
        m = info["model"]
        stored = m["quantization"] or m["dtype"]
        lines += [f"model: {m['path']}",
                  f"  {m['tensors']} tensors, {format_count(m['parameters'])} parameters, "
                  f"{format_bytes(m['bytes'])} ({stored})"]
        width = max(len(p["part"]) for p in m["parts"])
        lines += [f"    {p['part']:<{width}}  {p['format']:<16} {format_bytes(p['bytes']):>10}"
                  for p in m["parts"]]
        lines += [f"  text: {m['text']}", f"  vision: {m['vision']}"]
        if "quantized_bits" in m:
            widths = ", ".join(f"int{b}" for b in m["quantized_bits"])
            slow = m["cuda_dequantized_bits"]
            fast = [b for b in m["quantized_bits"] if b not in slow]
            lines.append(f"  quantized: {widths}; CPU kernels for all; CUDA kernels for "
                         + (", ".join(f"int{b}" for b in fast) or "none")
                         + (f"; on CUDA {', '.join(f'int{b}' for b in slow)} have no kernel and "
                            "are dequantized to the compute dtype at load" if slow else ""))
    return "\n".join(lines)
