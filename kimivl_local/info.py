"""What `kimivl-local info` reports: versions, the extension's build, CPU and GPU, a model."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__
from .ext import build_info


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
        from .ext import extension

        info["extension_cuda_devices"] = extension().cuda_devices()
    if model:
        info["model"] = describe_model(model)
    return info


def describe_model(spec: str) -> dict:
    from .checkpoint import Checkpoint
    from .config import KimiVLConfig
    from .loader import resolve_model_path
    from .quant.cuda_layout import CudaQuantWeight
    from .quant.qconfig import QuantizationConfig

    path = resolve_model_path(spec)
    cfg = KimiVLConfig.from_dir(path)
    ckpt = Checkpoint.open(path)
    params = sum(_numel(t.shape) for t in ckpt.tensors.values())
    size = sum(t.dtype.itemsize * _numel(t.shape) for t in ckpt.tensors.values())
    t = cfg.text
    out = {
        "path": str(path),
        "tensors": len(ckpt.tensors),
        "parameters": params,
        "bytes": size,
        "text": f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.n_routed_experts} "
                f"experts top-{t.num_experts_per_tok} + {t.n_shared_experts} shared, vocab "
                f"{t.vocab_size}, context {t.max_position_embeddings}",
        "vision": f"{cfg.vision.num_hidden_layers} blocks, hidden {cfg.vision.hidden_size}",
        "dtype": cfg.torch_dtype,
    }
    qconfig = QuantizationConfig.from_model_config(cfg.raw)
    if qconfig is not None:
        bits = sorted({g.scheme.bits for g in qconfig.groups})
        out["quantized_bits"] = bits
        out["cuda_dequantized_bits"] = [b for b in bits if b not in CudaQuantWeight.BITS]
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
        if ext["cuda"]:
            lines.append(f"  cuda: compiled (CUDA {ext['cuda_compiler_version']}) for sm "
                         f"{', '.join(ext['cuda_archs'])}")
            devs = info.get("extension_cuda_devices") or []
            lines.append("  cuda devices: " + (", ".join(f"{d['name']} (sm_{d['sm']})" for d in devs)
                                               or "none visible"))
        else:
            lines.append("  cuda: not compiled")
    lines.append("torch cuda devices: " + (", ".join(info["torch_cuda_devices"]) or "none"))
    if "model" in info:
        m = info["model"]
        lines += [f"model: {m['path']}",
                  f"  {m['tensors']} tensors, {m['parameters'] / 1e9:.2f} B parameters, "
                  f"{m['bytes'] / 2**30:.2f} GiB ({m['dtype']})",
                  f"  text: {m['text']}", f"  vision: {m['vision']}"]
        if "quantized_bits" in m:
            widths = ", ".join(f"int{b}" for b in m["quantized_bits"])
            slow = m["cuda_dequantized_bits"]
            lines.append(f"  quantized: {widths}; CPU kernels for all; on CUDA "
                         + (f"{', '.join(f'int{b}' for b in slow)} have no kernel and are "
                            "dequantized to the compute dtype at load" if slow
                            else "all run in the kernels"))
    return "\n".join(lines)
