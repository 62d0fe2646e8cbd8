"""Variable-length (packed) attention: several independent sequences in one [T, H, D] tensor.

`varlen_attention` is the single entry point used by the model (MoonViT: one bidirectional
sequence per image; text prefill: causal). It runs
- on the CPU, the compiled kernel (`_C.varlen_attention`: online softmax over key blocks, fp32
  accumulation) for float32/bfloat16 tensors;
- on CUDA, the compiled FlashAttention-2-style kernel (`_C.cuda_varlen_attention`: tensor cores,
  fp32 online softmax) for float16 and bfloat16 (bfloat16 needs compute capability 8.0+) with
  head dims <= 256. It never reads device values on the host when `max_seqlen` is given, so it can
  be captured in a CUDA graph;
- one torch SDPA call per sequence otherwise (no extension, float32/float64 on CUDA, bfloat16 on
  pre-Ampere GPUs, other devices): that path reads cu_seqlens on the host.
It is the custom op ``kimivl::varlen_attention`` (forward only, no autograd) so torch.compile sees
one opaque call. `varlen_attention_reference` is the test oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.bridge import DTYPE_CODES, kernel, num_threads

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_MAX_HEAD_DIM = 256
_CUDA_MAX_GRID_YZ = 65535  # heads and sequences are grid dimensions y and z


def _check_args(q, k, v, cu_seqlens, causal, scale,
                read_values: bool = True) -> list[int] | None:
    """Validate the arguments (messages name the argument) and return cu_seqlens as a list.

    With read_values=False the values of cu_seqlens are not read (no host sync): only types,
    shapes, dtypes and devices are checked, and None is returned."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [T, H, D], got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.shape[-1] > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), "
                             f"got strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have shape [T, H, Dv] = [{q.shape[0]}, {q.shape[1]}, Dv], "
                         f"got {tuple(v.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [n + 1] with n >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not read_values:
        return None
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {q.shape[0]}, "
                         f"got {bounds[0]} .. {bounds[-1]}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return bounds


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     *, causal: bool, scale: float, max_seqlen: int | None = None) -> torch.Tensor:
    """Attention inside each packed sequence; no token attends across a sequence boundary.

    q:          [T, H, Dqk] float16/bfloat16/float32/float64, last dim contiguous (any token and
                head strides: views of a fused qkv need no copy); float32/bfloat16 on the CPU run
                the compiled kernel, with fp32 arithmetic; float16/bfloat16 on CUDA run the CUDA
                kernel (Dqk, Dv <= 256; bfloat16 on compute capability 8.0+)
    k:          [T, H, Dqk] same dtype and device as q
    v:          [T, H, Dv]  same dtype and device as q (Dv may differ from Dqk)
    cu_seqlens: [n + 1] int32/int64 on q's device; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]
                (0 first, T last, non-decreasing; empty sequences are allowed). On the CPU these
                are checked; on CUDA they are not read on the host (garbage in, garbage out)
    causal:     query j of a sequence sees keys 0..j of that sequence only
    scale:      multiplier of q·k before the softmax (usually Dqk ** -0.5)
    max_seqlen: CUDA only (ignored elsewhere): an upper bound of the sequence lengths, which sizes
                the kernel's grid; query rows past it are not computed, so it must be >= every
                length. Pass it (the model knows it from the image grids / prompt lengths) to avoid
                the one host sync that computes it from cu_seqlens when it is None, and to capture
                the call in a CUDA graph (a fixed bound; zero-length padding sequences are free)
    returns:    [T, H, Dv] in q's dtype
    """
    on_cuda = isinstance(q, torch.Tensor) and q.device.type == "cuda"
    _check_args(q, k, v, cu_seqlens, causal, scale, read_values=not on_cuda)
    if on_cuda and not _cuda_kernel_applies(q, v, cu_seqlens):
        _check_args(q, k, v, cu_seqlens, causal, scale)  # the fallback reads them anyway
    if max_seqlen is None:
        max_seqlen = -1
    elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be None or an int >= 0, got {max_seqlen!r}")
    return _varlen_attention_op(q, k, v, cu_seqlens, causal, float(scale), max_seqlen)


def _cuda_kernel_applies(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> bool:
    """Whether `_C.cuda_varlen_attention` takes these (host-side facts only, no sync)."""
    if q.device.type != "cuda" or q.dtype not in _CUDA_KERNEL_DTYPES:
        return False
    if not (1 <= q.shape[2] <= _CUDA_MAX_HEAD_DIM and 1 <= v.shape[2] <= _CUDA_MAX_HEAD_DIM):
        return False
    if q.shape[1] > _CUDA_MAX_GRID_YZ or cu_seqlens.numel() - 1 > _CUDA_MAX_GRID_YZ:
        return False
    if q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return False  # no bf16 tensor cores before Ampere: the SDPA path takes it
    return kernel("cuda_varlen_attention") is not None


def _cuda_varlen(q, k, v, cu_seqlens, causal, scale, max_seqlen) -> torch.Tensor:
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    cu = cu_seqlens.to(torch.int32).contiguous()  # no copy when already int32 and contiguous
    if max_seqlen < 0:  # the one host sync, only when the caller did not pass a bound
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    if out.numel() == 0 or max_seqlen == 0:
        return out
    with torch.cuda.device(q.device):
        kernel("cuda_varlen_attention")(
            q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
            dtype=DTYPE_CODES[q.dtype], cu_seqlens=cu.data_ptr(), num_seqs=cu.numel() - 1,
            max_seqlen=max_seqlen, heads=q.shape[1], head_dim=q.shape[2], v_dim=v.shape[2],
            q_strides=q.stride()[:2], k_strides=k.stride()[:2], v_strides=v.stride()[:2],
            out_strides=out.stride()[:2], causal=causal, scale=scale,
            stream=torch.cuda.current_stream(q.device).cuda_stream)
    return out


@torch.library.custom_op("kimivl::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens: torch.Tensor, causal: bool, scale: float,
                         max_seqlen: int = -1) -> torch.Tensor:
    if _cuda_kernel_applies(q, v, cu_seqlens):
        return _cuda_varlen(q, k, v, cu_seqlens, causal, scale, max_seqlen)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    run = kernel("varlen_attention")
    if (run is not None and q.device.type == "cpu" and q.dtype in _KERNEL_DTYPES
            and q.shape[-1] > 0 and out.numel() > 0):
        cu = cu_seqlens.to(torch.int64).contiguous()
        run(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(),
            dtype=DTYPE_CODES[q.dtype], cu_seqlens=cu.data_ptr(), num_seqs=cu.numel() - 1,
            total_tokens=q.shape[0], heads=q.shape[1], head_dim=q.shape[2], v_dim=v.shape[2],
            q_strides=q.stride()[:2], k_strides=k.stride()[:2], v_strides=v.stride()[:2],
            out_strides=out.stride()[:2], causal=causal, scale=scale, num_threads=num_threads())
        return out
    # One SDPA call per sequence: memory is O(max_len^2), never O(T^2) for a block-diagonal mask.
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, causal, scale, max_seqlen=-1):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    """The same math written out (scores, mask, softmax, weighted sum) per sequence.

    Computes in float64 when given float64 and in at least float32 otherwise; returns q's dtype.
    """
    bounds = _check_args(q, k, v, cu_seqlens, causal, scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=acc, device=q.device)
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].to(acc).transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        scores = (qs @ ks.transpose(1, 2)) * scale
        if causal:
            n = end - start
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        scores = scores - scores.amax(dim=-1, keepdim=True)
        weights = scores.exp()
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out[start:end] = (weights @ vs).transpose(0, 1)
    return out.to(q.dtype)
