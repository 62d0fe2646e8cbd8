"""MLA decode attention over the latent cache, in absorbed form.

With W_uk folded into the query (q_lat = q_nope · W_uk, per head) and W_uv applied afterwards,
every head attends over the same cached rows [c_kv (rank) | k_pe (rope)]: keys are whole rows,
values their first `rank` columns. `mla_decode` runs the compiled CPU kernel (`_C.mla_decode`:
each cached token read once for all heads, the context split across threads and merged by
log-sum-exp) for CPU tensors, the CUDA kernel (`_C.cuda_mla_decode`: the same split across CTAs
plus a merge kernel, tensor cores for a bf16/fp16 cache of Kimi-VL's shape, no host sync, CUDA-graph
capturable) for CUDA tensors, and `mla_decode_reference` otherwise; the reference is also the
test oracle. `mla_decode` is the custom op ``kimivl::mla_decode`` (forward only, no autograd).
"""

from __future__ import annotations

import functools
import math

import torch

from ..kernels.bridge import DTYPE_CODES, kernel, num_threads

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_MAX_OUTPUTS = 16384  # heads * rank: per-thread accumulators of the CUDA SIMT path
_CUDA_MAX_QUERY_BYTES = 40 << 10  # (heads + 1) * (rank + rope) fp32 in shared memory
_CUDA_MIN_SPLIT_TOKENS = 256  # context per CTA: below it the merge costs more than it saves
_REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_args(q_lat, q_pe, cache, seq_lens, scale, dtypes, read_values: bool = True) -> None:
    """Validate the arguments; messages name the argument and the expected shape or dtype.

    With read_values=False the values of seq_lens are not read (no host sync)."""
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("cache", cache), ("seq_lens", seq_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("cache", cache)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions, got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must be one of {names}, got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), "
                             f"got strides {t.stride()}")
    for name, t in (("q_pe", q_pe), ("cache", cache), ("seq_lens", seq_lens)):
        if t.device != q_lat.device:
            raise ValueError(f"{name} is on {t.device} but q_lat is on {q_lat.device}")
    if q_pe.dtype != q_lat.dtype:
        raise ValueError(f"q_pe must have q_lat's dtype {q_lat.dtype}, got {q_pe.dtype}")
    b, h, rank = q_lat.shape
    rope = q_pe.shape[-1]
    if rank < 1:
        raise ValueError(f"q_lat must have shape [B, H, rank] with rank >= 1, "
                         f"got {tuple(q_lat.shape)}")
    if q_pe.shape[:2] != (b, h):
        raise ValueError(f"q_pe must have shape [B, H, rope] = [{b}, {h}, rope], "
                         f"got {tuple(q_pe.shape)}")
    if cache.shape[0] != b or cache.shape[2] != rank + rope:
        raise ValueError(f"cache must have shape [B, capacity, rank + rope] = [{b}, capacity, "
                         f"{rank + rope}], got {tuple(cache.shape)}")
    if seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be int32 or int64, got {seq_lens.dtype}")
    if seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must have shape [B] = [{b}], got {tuple(seq_lens.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not read_values:
        return
    capacity = cache.shape[1]
    for i, n in enumerate(seq_lens.tolist()):
        if not 1 <= n <= capacity:
            raise ValueError(f"seq_lens[{i}] = {n} must be in [1, capacity = {capacity}]")


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, seq_lens: torch.Tensor,
               *, scale: float, max_seq_len: int | None = None) -> torch.Tensor:
    """One decode step of absorbed MLA for B sequences.

    q_lat:    [B, H, rank] float32 or bfloat16 (CUDA: also float16), last dim contiguous: q_nope
              through W_uk per head
    q_pe:     [B, H, rope] q_lat's dtype, last dim contiguous: the roped query part. A concatenated
              q [B, H, rank + rope] is passed as the views q[..., :rank], q[..., rank:] (no copy)
    cache:    [B, capacity, rank + rope] float32 or bfloat16 (CUDA: also float16), last dim
              contiguous: per token [c_kv | k_pe] (any batch and token strides, e.g. one layer of
              the latent cache)
    seq_lens: [B] int32/int64, each in [1, capacity]: entry b attends over cache[b, :seq_lens[b]].
              Checked on the CPU; on CUDA never read on the host (no sync): values are clamped
              to [0, min(capacity, max_seq_len)] and an entry with 0 tokens gets zeros
    scale:    multiplier of the scores before the softmax (qk_head_dim ** -0.5 for Kimi-VL)
    max_seq_len: CUDA only (ignored elsewhere): a host-side bound >= every seq_lens[b] that sizes
              the context split (tokens past it are not attended to); None means capacity. A
              tight bound saves idle CTAs on short contexts; keep it fixed (e.g. the cache
              capacity) across steps captured in one CUDA graph
    returns:  o_lat [B, H, rank] float32:
              softmax(scale * [q_lat | q_pe] · cacheᵀ) · cache[..., :rank] (apply W_uv outside)

    On CUDA with a bfloat16/float16 cache of rank 512, rope 64 and <= 16 heads the kernel runs on
    tensor cores: q is rounded to the cache dtype and the softmax weights to it for the weighted
    sum (fp32 accumulation), as flash attention does for 16-bit inputs.
    """
    on_cuda = isinstance(cache, torch.Tensor) and cache.device.type == "cuda"
    dtypes = _CUDA_KERNEL_DTYPES if on_cuda else _KERNEL_DTYPES
    _check_args(q_lat, q_pe, cache, seq_lens, scale, dtypes, read_values=not on_cuda)
    if on_cuda and not _cuda_kernel_applies(q_lat, q_pe, cache):
        _check_args(q_lat, q_pe, cache, seq_lens, scale, dtypes)  # the fallback reads them anyway
    if max_seq_len is None:
        max_seq_len = -1
    elif isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be None or an int >= 1, got {max_seq_len!r}")
    if torch.compiler.is_compiling() or type(cache) is not torch.Tensor:  # compiled or traced
        return _mla_decode_op(q_lat, q_pe, cache, seq_lens, float(scale), max_seq_len)
    # Eagerly, skip the custom op's dispatch: it costs more than a short-context CPU decode.
    return _mla_decode_impl(q_lat, q_pe, cache, seq_lens, float(scale), max_seq_len)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cuda_num_splits(device: torch.device, batch: int, max_seq_len: int) -> int:
    """Context chunks per batch entry for the CUDA kernel: about two CTAs per SM in all, at least
    _CUDA_MIN_SPLIT_TOKENS tokens each (host-side facts only)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = -(-2 * _sm_count(index) // batch)
    return max(1, min(want, -(-max_seq_len // _CUDA_MIN_SPLIT_TOKENS), 4096))


def _cuda_kernel_applies(q_lat, q_pe, cache) -> bool:
    b, h, rank = q_lat.shape
    dim = rank + q_pe.shape[-1]
    return (cache.device.type == "cuda" and cache.shape[1] >= 1 and 1 <= b <= 65535
            and h * rank <= _CUDA_MAX_OUTPUTS and 4 * (h + 1) * dim <= _CUDA_MAX_QUERY_BYTES
            and kernel("cuda_mla_decode") is not None)


def _cuda_mla_decode(q_lat, q_pe, cache, seq_lens, scale, max_seq_len) -> torch.Tensor:
    b, h, rank = q_lat.shape
    capacity = cache.shape[1]
    bound = capacity if max_seq_len < 1 else min(max_seq_len, capacity)
    splits = cuda_num_splits(cache.device, b, bound)
    out = torch.empty(b, h, rank, dtype=torch.float32, device=cache.device)
    ws_o = torch.empty(b, splits, h, rank, dtype=torch.float32, device=cache.device)
    ws_ml = torch.empty(b, splits, h, 2, dtype=torch.float32, device=cache.device)
    lens = seq_lens.to(torch.int32).contiguous()  # no copy when already int32
    # With rope = 0, q_pe may have no storage; it is never read then.
    q_pe_ptr = q_pe.data_ptr() if q_pe.shape[-1] > 0 else q_lat.data_ptr()
    with torch.cuda.device(cache.device):
        kernel("cuda_mla_decode")(
            q_lat=q_lat.data_ptr(), q_pe=q_pe_ptr, q_dtype=DTYPE_CODES[q_lat.dtype],
            cache=cache.data_ptr(), cache_dtype=DTYPE_CODES[cache.dtype], seq_lens=lens.data_ptr(),
            out=out.data_ptr(), ws_o=ws_o.data_ptr(), ws_ml=ws_ml.data_ptr(), batch=b, heads=h,
            rank=rank, rope=q_pe.shape[-1], capacity=capacity, max_seq_len=bound,
            num_splits=splits, q_lat_strides=q_lat.stride()[:2], q_pe_strides=q_pe.stride()[:2],
            cache_strides=cache.stride()[:2], out_strides=out.stride()[:2], scale=scale,
            stream=torch.cuda.current_stream(cache.device).cuda_stream)
    return out


@torch.library.custom_op("kimivl::mla_decode", mutates_args=())
def _mla_decode_op(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float, max_seq_len: int = -1) -> torch.Tensor:
    return _mla_decode_impl(q_lat, q_pe, cache, seq_lens, scale, max_seq_len)


def _mla_decode_impl(q_lat, q_pe, cache, seq_lens, scale: float, max_seq_len: int) -> torch.Tensor:
    if _cuda_kernel_applies(q_lat, q_pe, cache):
        return _cuda_mla_decode(q_lat, q_pe, cache, seq_lens, scale, max_seq_len)
    run = kernel("mla_decode")
    if run is None or cache.device.type != "cpu":
        return mla_decode_reference(q_lat, q_pe, cache, seq_lens, scale=scale).float()
    b, h, rank = q_lat.shape
    out = torch.empty(b, h, rank, dtype=torch.float32)
    if out.numel() == 0:
        return out
    q_lat, q_pe = q_lat.float(), q_pe.float()  # no copy when already fp32; q is small anyway
    lens = seq_lens.to(torch.int64).contiguous()
    run(q_lat=q_lat.data_ptr(), q_pe=q_pe.data_ptr(), cache=cache.data_ptr(),
        cache_dtype=DTYPE_CODES[cache.dtype], seq_lens=lens.data_ptr(), out=out.data_ptr(),
        batch=b, heads=h, rank=rank, rope=q_pe.shape[-1], capacity=cache.shape[1],
        q_lat_strides=q_lat.stride()[:2], q_pe_strides=q_pe.stride()[:2],
        cache_strides=cache.stride()[:2], out_strides=out.stride()[:2], scale=scale,
        num_threads=num_threads())
    return out


@_mla_decode_op.register_fake
def _(q_lat, q_pe, cache, seq_lens, scale, max_seq_len=-1):
    return q_lat.new_empty(q_lat.shape, dtype=torch.float32)


def mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                         seq_lens: torch.Tensor, *, scale: float) -> torch.Tensor:
    """The same math written out per batch entry (scores, softmax, weighted sum of latents).

    Takes any float dtype; computes and returns in float64 when an input is float64, else float32.
    """
    _check_args(q_lat, q_pe, cache, seq_lens, scale, _REFERENCE_DTYPES)
    acc = torch.promote_types(torch.promote_types(q_lat.dtype, cache.dtype), torch.float32)
    rank = q_lat.shape[-1]
    out = []
    for i, n in enumerate(seq_lens.tolist()):
        rows = cache[i, :n].to(acc)  # [n, rank + rope]
        q = torch.cat([q_lat[i], q_pe[i]], -1).to(acc)  # [H, rank + rope]
        weights = ((q @ rows.T) * scale).softmax(-1)
        out.append(weights @ rows[:, :rank])
    return torch.stack(out)
