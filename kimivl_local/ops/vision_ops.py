"""Fused elementwise ops of the MoonViT block's CPU fast path (bf16 storage, fp32 math).

- `add_layer_norm`: the residual add (delta + its linear's bias) into the fp32 stream x, then
  LayerNorm of x, written in bf16 (the next bf16 matmul's input) or fp32;
- `bias_gelu_`: the first MLP linear's bias and tanh GELU, in place;
- `bias_rope_`: wqkv's bias and the 2D RoPE of q and k, in place on the fused qkv rows.

Each runs the compiled CPU kernel (`_C.<name>`: one pass over the rows, threads over rows) and
torch otherwise (no extension, reference backend, other devices), with the same rounding points.
The torch bodies (`*_reference`) are the semantics; the tests hold both to fp64 oracles.
"""

from __future__ import annotations

import torch

from ..kernels.bridge import DTYPE_CODES, kernel, num_threads

_STORAGE = (torch.float32, torch.bfloat16)


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check_rows(name: str, t: torch.Tensor, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.dtype not in _STORAGE:
        raise ValueError(f"{name} must be a 2-D float32 or bfloat16 tensor, got {tuple(t.shape)} "
                         f"{t.dtype}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns, got {tuple(t.shape)}")
    if t.shape[1] > 0 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def _check_vector(name: str, t: torch.Tensor | None, n: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (n,):
        got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"{name} must be a float32 tensor of shape ({n},), got {got}")
    if t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous on {device}")


def _use_kernel(name: str, *tensors: torch.Tensor) -> object | None:
    run = kernel(name)
    if run is None or torch.compiler.is_compiling():
        return None
    return run if all(t.device.type == "cpu" for t in tensors) else None


def add_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                   *, delta: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [N, C] float32 (updated in place to x + delta + delta_bias when delta [N, C]
    float32/bfloat16 is given) -> LayerNorm(x) * weight + bias in out_dtype (float32 or
    bfloat16); weight, bias, delta_bias float32 [C]."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise ValueError(f"x must be a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    _check_rows("x", x)
    n, c = x.shape
    if delta is not None:
        _check_rows("delta", delta, c)
        if delta.shape[0] != n or delta.device != x.device:
            raise ValueError(f"delta must be [{n}, {c}] on {x.device}, got {tuple(delta.shape)} "
                             f"on {delta.device}")
    elif delta_bias is not None:
        raise ValueError("delta_bias needs delta")
    if weight is None:
        raise ValueError("weight is required")
    for name, t in (("weight", weight), ("bias", bias), ("delta_bias", delta_bias)):
        _check_vector(name, t, c, x.device)
    if out_dtype not in _STORAGE:
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    out = torch.empty(n, c, dtype=out_dtype, device=x.device)
    run = _use_kernel("add_layer_norm", x)
    if run is None:
        return add_layer_norm_reference(x, weight, bias, eps, delta=delta, delta_bias=delta_bias,
                                        out=out)
    run(x=x.data_ptr(), delta=_addr(delta),
        delta_dtype=DTYPE_CODES[delta.dtype] if delta is not None else 0,
        delta_bias=_addr(delta_bias), gamma=weight.data_ptr(), beta=_addr(bias),
        out=out.data_ptr(), out_dtype=DTYPE_CODES[out_dtype], rows=n, dim=c, x_row=x.stride(0),
        delta_row=delta.stride(0) if delta is not None else 0, out_row=out.stride(0),
        eps=float(eps), num_threads=num_threads())
    return out


def add_layer_norm_reference(x, weight, bias, eps, *, delta=None, delta_bias=None,
                             out: torch.Tensor) -> torch.Tensor:
    """Torch body of add_layer_norm (fp32 math), writing `out`."""
    if delta is not None:
        d = delta.float()
        x += d if delta_bias is None else d + delta_bias
    out.copy_(torch.nn.functional.layer_norm(x, (x.shape[1],), weight, bias, eps))
    return out


def bias_gelu_(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [N, F] float32/bfloat16 = gelu_tanh(y + bias) in place (bias float32 [F] or None)."""
    _check_rows("y", y)
    _check_vector("bias", bias, y.shape[1], y.device)
    run = _use_kernel("bias_gelu", y)
    if run is None:
        u = y.float() if bias is None else y.float() + bias
        return y.copy_(torch.nn.functional.gelu(u, approximate="tanh"))
    run(y=y.data_ptr(), dtype=DTYPE_CODES[y.dtype], bias=_addr(bias), rows=y.shape[0],
        dim=y.shape[1], y_row=y.stride(0), num_threads=num_threads())
    return y


def rope_tables(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """complex64 rotations [N, D/2] -> the interleaved float32 tables bias_rope_ takes:
    cos [N, D] (each cos twice) and sin [N, D] (-sin, +sin per pair)."""
    cos, sin = freqs.real.float(), freqs.imag.float()
    return (cos.repeat_interleave(2, dim=-1).contiguous(),
            torch.stack([-sin, sin], dim=-1).flatten(-2).contiguous())


def bias_rope_(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
               sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """qkv [N, >= 3 * heads * head_dim] float32/bfloat16, rows [q heads | k heads | v heads]:
    add bias (float32 [3 * heads * head_dim] or None) to q, k, v, then rotate the pairs of every
    q and k head by the tables of rope_tables ([N, head_dim] float32), in place."""
    _check_rows("qkv", qkv)
    if head_dim < 2 or head_dim % 2 or heads < 1:
        raise ValueError(f"head_dim must be even and >= 2 and heads >= 1, got {head_dim}, {heads}")
    width = 3 * heads * head_dim
    if qkv.shape[1] < width:
        raise ValueError(f"qkv must have >= {width} columns, got {tuple(qkv.shape)}")
    _check_vector("bias", bias, width, qkv.device)
    for name, t in (("cos", cos), ("sin", sin)):
        if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32
                or tuple(t.shape) != (qkv.shape[0], head_dim) or not t.is_contiguous()
                or t.device != qkv.device):
            raise ValueError(f"{name} must be a contiguous float32 [{qkv.shape[0]}, {head_dim}] "
                             f"tensor on {qkv.device}")
    run = _use_kernel("bias_rope", qkv)
    if run is None:
        return bias_rope_reference(qkv, bias, cos, sin, heads, head_dim)
    run(qkv=qkv.data_ptr(), dtype=DTYPE_CODES[qkv.dtype], bias=_addr(bias),
        cos_table=cos.data_ptr(), sin_table=sin.data_ptr(), rows=qkv.shape[0], heads=heads,
        head_dim=head_dim, qkv_row=qkv.stride(0), num_threads=num_threads())
    return qkv


def bias_rope_reference(qkv, bias, cos, sin, heads, head_dim) -> torch.Tensor:
    """Torch body of bias_rope_ (fp32 math), in place."""
    n, width = qkv.shape[0], 3 * heads * head_dim
    u = qkv[:, :width].float()
    if bias is not None:
        u += bias
    qk = u[:, :2 * heads * head_dim].view(n, 2 * heads, head_dim // 2, 2)
    swapped = qk.flip(-1).reshape(n, 2 * heads, head_dim)
    rotated = qk.reshape(n, 2 * heads, head_dim) * cos[:, None] + swapped * sin[:, None]
    u[:, :2 * heads * head_dim] = rotated.reshape(n, -1)
    qkv[:, :width] = u
    return qkv
