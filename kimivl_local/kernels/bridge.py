"""What every op needs at the border with ``_C``: dtype codes, argument checks, thread count."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from .extension import extension

# csrc/common.h `DType`; keep in sync.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3,
               torch.int32: 4, torch.uint8: 5}


_kernel_threads: int | None = None  # set while torch_single_threaded() is active


def num_threads() -> int:
    """Threads for one CPU kernel call: KIMIVL_NUM_THREADS if set, else torch's intra-op count
    (as it was outside torch_single_threaded())."""
    env = os.environ.get("KIMIVL_NUM_THREADS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"KIMIVL_NUM_THREADS must be >= 1, got {env!r}")
        return n
    return _kernel_threads or torch.get_num_threads()


@contextmanager
def torch_single_threaded():
    """torch's own ops on one thread while our kernels keep theirs. In a CPU decode step torch
    only runs small ops (norms, the router, MLA's absorbed products: ~0.1 ms each), where an
    OpenMP barrier costs more than the work, and 50x more when another process holds a core
    (measured: a [16,1,128]x[16,128,512] bmm took 7.9 ms on 2 threads, 0.15 ms on 1)."""
    global _kernel_threads
    saved = torch.get_num_threads()
    outer = _kernel_threads
    _kernel_threads = outer or saved
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        _kernel_threads = outer


BACKENDS = ("auto", "kernels", "reference")
_backend = "auto"


def set_backend(name: str) -> None:
    """Process-wide: "auto" runs the compiled kernels where they exist and torch elsewhere;
    "kernels" is the same but insists on the extension; "reference" runs every op's torch
    reference (for debugging and as the baseline the kernels are measured against)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "kernels" and extension() is None:
        raise RuntimeError("--backend kernels needs the compiled extension kimivl_local._C, which "
                           "is not installed (reinstall without KIMIVL_SKIP_EXT, or use --backend "
                           "auto or reference)")
    _backend = name


def backend() -> str:
    return _backend


def kernel(name: str) -> Callable | None:
    """``_C.<name>``, or None when the extension is missing, was built without it, or the
    reference backend is selected."""
    ext = extension()
    if ext is None or _backend == "reference":
        return None
    return getattr(ext, name, None)


def check_tensor(name: str, t, dtypes: Sequence[torch.dtype], shape: Sequence[int | None],
                 device: torch.device | None = None) -> None:
    """Raise naming `name` unless t is a contiguous tensor of one of `dtypes`, of `shape` (None
    matches any size) and on `device` (when given). Runs on every kernel call: messages are only
    built on failure."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {names}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape "
                         f"{list(t.shape)}")
