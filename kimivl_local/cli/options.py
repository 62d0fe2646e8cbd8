"""Runtime flags -> `kimivl_local.load` keyword arguments, shared by every command that loads."""

from __future__ import annotations


def load_options(args) -> dict:
    """kimivl_local.load keyword arguments from the runtime flags."""
    import torch

    return dict(device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                max_image_tokens=args.max_image_tokens, gpu_memory=args.gpu_memory,
                cpu_experts=args.cpu_experts, backend=args.backend)
