"""Per-head matrix-vector products for MLA's absorbed decode: y[h] = x[h] · W[h].

`head_gemv` runs the compiled CPU kernel (`_C.head_gemv`: bf16 or fp32 weights read once,
fp32 arithmetic, heads and column bands across threads) and torch.bmm otherwise (GPU, no
extension). `head_gemv_reference` is the test oracle.
"""

from __future__ import annotations

import torch

from ..kernels.bridge import DTYPE_CODES, kernel, num_threads

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def head_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [H, K] float32, w [H, K, N] float32/bfloat16 on x's device -> y [H, N] float32.
    On the CPU x's last dimension and all of w must be contiguous."""
    _check(x, w)
    run = kernel("head_gemv")
    if (run is None or x.device.type != "cpu" or w.dtype not in _KERNEL_DTYPES
            or torch.compiler.is_compiling()):
        return torch.bmm(x[:, None].float(), w.float())[:, 0]
    y = torch.empty(w.shape[0], w.shape[2], dtype=torch.float32)
    run(x=x.data_ptr(), w=w.data_ptr(), w_dtype=DTYPE_CODES[w.dtype], y=y.data_ptr(),
        heads=w.shape[0], k=w.shape[1], n=w.shape[2], x_head=x.stride(0), y_head=y.stride(0),
        num_threads=num_threads())
    return y


def head_gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same product in float64."""
    _check(x, w)
    return torch.einsum("hk,hkn->hn", x.double(), w.double())


def _check(x, w) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError("x and w must be torch.Tensors")
    if w.dim() != 3 or x.dim() != 2 or x.shape != w.shape[:2]:
        raise ValueError(f"x must be [H, K] and w [H, K, N] with the same H, K; got x "
                         f"{list(x.shape)}, w {list(w.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but w is on {w.device}")
    if x.device.type == "cpu" and (x.stride(-1) != 1 or not w.is_contiguous()):
        raise ValueError("on the CPU, x needs a contiguous last dimension and w must be "
                         "contiguous")
    if min(w.shape) < 1:
        raise ValueError(f"w must have no empty dimension, got {list(w.shape)}")
