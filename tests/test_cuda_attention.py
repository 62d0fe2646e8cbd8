"""The CUDA attention kernels (`_C.cuda_varlen_attention`, `_C.cuda_mla_decode`) against fp64
references, plus the host-side argument handling that runs without a GPU.

Tolerances (flash-attention test convention). The kernels take 16-bit inputs and accumulate in
fp32, but they round the softmax weights to the input dtype before the weighted sum (and, for
MLA on tensor cores, the query too), and round the output. So the bound is relative to torch doing
the same job in the same dtype on the same device: our max error against the fp64 reference on the
same (already rounded) inputs must be at most twice torch's, plus a few ulps of slack. fp32 caches
(MLA, CUDA-core path) are held to 2e-5 of the largest output: fp32 sums over up to 32K tokens.
"""

from __future__ import annotations

import pytest
import torch

import kimivl_local.ops.attention as attention_ops
import kimivl_local.ops.mla as mla_ops
from kimivl_local.kernels.extension import build_info, extension
from kimivl_local.ops import (mla_decode, mla_decode_reference, varlen_attention,
                              varlen_attention_reference)

SDPA = torch.nn.functional.scaled_dot_product_attention
LENGTHS = [0, 1, 3, 63, 64, 65, 1000]


def _has(name: str) -> bool:
    return extension() is not None and hasattr(extension(), name)


@pytest.fixture
def cuda_ops():
    """The CUDA kernels are what runs: skip without them, and make the fallbacks fail."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not (_has("cuda_varlen_attention") and _has("cuda_mla_decode")):
        pytest.skip("the extension was built without the CUDA attention kernels "
                    "(KIMIVL_CUDA=on and nvcc needed)")
    torch.manual_seed(0)


@pytest.fixture
def no_fallback(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a torch fallback ran instead of the CUDA kernel")

    monkeypatch.setattr(attention_ops.F, "scaled_dot_product_attention", fail)
    monkeypatch.setattr(mla_ops, "mla_decode_reference", fail)


def _needs_bf16(dtype):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 kernels need compute capability 8.0")


def packed(lengths, heads, dqk, dv, dtype, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k = (torch.randn(t, heads, dqk, generator=g) for _ in range(2))
    v = torch.randn(t, heads, dv, generator=g)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), cu.to(device)


def torch_same_dtype(q, k, v, cu, causal, scale):
    """torch's own answer in q's dtype: its SDPA (fused kernels where they apply) per sequence."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    bounds = cu.tolist()
    for s, e in zip(bounds, bounds[1:]):
        if e > s:
            o = SDPA(*(x[s:e].transpose(0, 1) for x in (q, k, v)), is_causal=causal, scale=scale)
            out[s:e] = o.transpose(0, 1)
    return out


def assert_close_to_reference(out, q, k, v, cu, causal, scale):
    ref = varlen_attention_reference(*(x.double() for x in (q, k, v)), cu, causal=causal,
                                     scale=scale)
    theirs = torch_same_dtype(q, k, v, cu, causal, scale)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    ours_err = (out.double() - ref).abs().max().item()
    torch_err = (theirs.double() - ref).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-3, (ours_err, torch_err)


# ----------------------------------------------------------------------------- varlen, GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dqk,dv", [(72, 72), (192, 128)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_matches_fp64(cuda_ops, no_fallback, dqk, dv, causal, dtype):
    _needs_bf16(dtype)
    q, k, v, cu = packed(LENGTHS, 4, dqk, dv, dtype)
    out = varlen_attention(q, k, v, cu, causal=causal, scale=dqk ** -0.5, max_seqlen=1000)
    assert_close_to_reference(out, q, k, v, cu, causal, dqk ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dqk,dv", [(13, 5), (64, 64), (100, 40), (128, 128), (256, 256),
                                    (200, 256)])
def test_varlen_any_head_dim_up_to_256(cuda_ops, no_fallback, dqk, dv):
    """Every padded instantiation, and dims that are not multiples of 8 (element-wise loads)."""
    q, k, v, cu = packed([5, 130, 0, 64], 2, dqk, dv, torch.float16, seed=1)
    for causal in (False, True):
        out = varlen_attention(q, k, v, cu, causal=causal, scale=0.3)
        assert_close_to_reference(out, q, k, v, cu, causal, 0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_views_of_a_fused_qkv(cuda_ops, no_fallback, dtype):
    """q/k/v as views of one projection output: aligned strides (16-byte cp.async path) and an
    odd head stride (element-wise path) give the contiguous answer."""
    _needs_bf16(dtype)
    lengths, heads, d = [65, 1, 200], 3, 72
    t = sum(lengths)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    qkv = torch.randn(t, 3, heads, d, device="cuda").to(dtype)
    q, k, v = qkv.unbind(1)
    contiguous = varlen_attention(*(x.contiguous() for x in (q, k, v)), cu, causal=True,
                                  scale=0.2)
    assert torch.equal(varlen_attention(q, k, v, cu, causal=True, scale=0.2), contiguous)
    odd = torch.randn(t, heads, 3 * d + 1, device="cuda").to(dtype)  # head stride 217
    q, k, v = odd[..., :d], odd[..., d:2 * d], odd[..., 2 * d:3 * d]
    out = varlen_attention(q, k, v, cu, causal=False, scale=0.2)
    assert_close_to_reference(out, q, k, v, cu, False, 0.2)


@pytest.mark.gpu
def test_varlen_max_seqlen_bound_and_default(cuda_ops, no_fallback):
    q, k, v, cu = packed([70, 3, 129], 2, 72, 72, torch.float16, seed=2)
    exact = varlen_attention(q, k, v, cu, causal=True, scale=0.1)  # computes max_seqlen
    assert torch.equal(varlen_attention(q, k, v, cu, causal=True, scale=0.1, max_seqlen=129), exact)
    assert torch.equal(varlen_attention(q, k, v, cu, causal=True, scale=0.1, max_seqlen=4096),
                       exact)
    assert_close_to_reference(exact, q, k, v, cu, True, 0.1)


@pytest.mark.gpu
def test_varlen_late_dominant_key_and_no_host_sync(cuda_ops, no_fallback):
    """A key far past the first tile that dominates every score forces the running max, sum and
    output to be rescaled; with max_seqlen given the call never synchronizes with the device."""
    q, k, v, cu = packed([300], 1, 72, 72, torch.float16, seed=3)
    k[250] = q.float().mean(0).sign().to(q.dtype) * 3
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = varlen_attention(q, k, v, cu, causal=False, scale=0.5, max_seqlen=300)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close_to_reference(out, q, k, v, cu, False, 0.5)


@pytest.mark.gpu
def test_varlen_cuda_graph_capture_and_replay(cuda_ops, no_fallback):
    q, k, v, cu = packed([1, 63, 64, 65, 0], 2, 72, 72, torch.float16, seed=4)
    varlen_attention(q, k, v, cu, causal=False, scale=0.25, max_seqlen=65)  # warm-up (lazy init)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = varlen_attention(q, k, v, cu, causal=False, scale=0.25, max_seqlen=65)
    for seed in (5, 6):
        q2, k2, v2, _ = packed([1, 63, 64, 65, 0], 2, 72, 72, torch.float16, seed=seed)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(out, q, k, v, cu, False, 0.25)
    # New sequence bounds in place (same total, same bound): the graph reads them on the device.
    cu.copy_(torch.tensor([0, 65, 65, 128, 192, 193], device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(out, q, k, v, cu, False, 0.25)


# ----------------------------------------------------------------------------- MLA, GPU


def mla_inputs(lens, heads=16, rank=512, rope=64, capacity=None, cache_dtype=torch.bfloat16,
               q_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    capacity = capacity or max(lens)
    cache = torch.randn(len(lens), capacity, rank + rope, generator=g).to("cuda", cache_dtype)
    q_lat = torch.randn(len(lens), heads, rank, generator=g).to("cuda", q_dtype)
    q_pe = torch.randn(len(lens), heads, rope, generator=g).to("cuda", q_dtype)
    return q_lat, q_pe, cache, torch.tensor(lens, device="cuda")


def torch_mla_same_dtype(q_lat, q_pe, cache, lens, scale):
    """torch's absorbed decode with 16-bit operands (fp32 softmax), as the model's einsums do."""
    rank, dt = q_lat.shape[-1], cache.dtype
    out = []
    for i, n in enumerate(lens.tolist()):
        rows = cache[i, :n]
        q = torch.cat([q_lat[i], q_pe[i]], -1).to(dt)
        w = ((q @ rows.T).float() * scale).softmax(-1)
        out.append((w.to(dt) @ rows[:, :rank]).float())
    return torch.stack(out)


def assert_mla_close(out, q_lat, q_pe, cache, lens, scale):
    ref = mla_decode_reference(q_lat.double(), q_pe.double(), cache.double(), lens, scale=scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    if cache.dtype == torch.float32:
        assert err <= 2e-5 * max(1.0, ref.abs().max().item()), err
    else:
        theirs = torch_mla_same_dtype(q_lat, q_pe, cache, lens, scale)
        torch_err = (theirs.double() - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-5, (err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_mla_mixed_lengths_match_fp64(cuda_ops, no_fallback, cache_dtype, q_dtype):
    _needs_bf16(cache_dtype)
    _needs_bf16(q_dtype)
    lens = [1, 17, 4095, 32768]
    q_lat, q_pe, cache, seq = mla_inputs(lens, cache_dtype=cache_dtype, q_dtype=q_dtype)
    out = mla_decode(q_lat, q_pe, cache, seq, scale=192 ** -0.5)
    assert_mla_close(out, q_lat, q_pe, cache, seq, 192 ** -0.5)


@pytest.mark.gpu
def test_mla_views_hint_and_small_heads(cuda_ops, no_fallback):
    """Views of a concatenated q and of one layer of a [layers, B, capacity, 576] cache; a tight
    max_seq_len hint; 5 heads (zero-padded to the MMA's 16 rows)."""
    layers = torch.randn(2, 3, 700, 576, device="cuda").bfloat16()
    q = torch.randn(3, 5, 576, device="cuda")
    lens = torch.tensor([700, 3, 257], device="cuda", dtype=torch.int32)
    out = mla_decode(q[..., :512], q[..., 512:], layers[1], lens, scale=0.07, max_seq_len=700)
    assert_mla_close(out, q[..., :512], q[..., 512:], layers[1], lens, 0.07)
    hinted = mla_decode(q[..., :512], q[..., 512:], layers[1, :, :650], lens.clamp(max=650),
                        scale=0.07, max_seq_len=650)
    assert_mla_close(hinted, q[..., :512], q[..., 512:], layers[1, :, :650], lens.clamp(max=650),
                     0.07)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_mla_other_shapes_take_the_cuda_core_path(cuda_ops, no_fallback, cache_dtype):
    _needs_bf16(cache_dtype)
    q_lat, q_pe, cache, lens = mla_inputs([9, 300, 1], heads=3, rank=40, rope=8,
                                          cache_dtype=cache_dtype, seed=5)
    out = mla_decode(q_lat, q_pe, cache, lens, scale=0.3)
    assert_mla_close(out, q_lat, q_pe, cache, lens, 0.3)


@pytest.mark.gpu
def test_mla_late_dominant_token_and_no_host_sync(cuda_ops, no_fallback):
    q_lat, q_pe, cache, lens = mla_inputs([5000], heads=16, seed=6)
    cache[0, 4321] = (torch.cat([q_lat[0, 0], q_pe[0, 0]]).sign() * 2).bfloat16()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mla_decode(q_lat, q_pe, cache, lens, scale=192 ** -0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_mla_close(out, q_lat, q_pe, cache, lens, 192 ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_mla_nan_in_the_cache_poisons_only_its_batch_entry(cuda_ops, no_fallback, cache_dtype):
    """As on the CPU: a NaN row (here inside one of many context splits) makes its entry NaN and
    leaves the others alone."""
    _needs_bf16(cache_dtype)
    q_lat, q_pe, cache, lens = mla_inputs([3000, 3000], cache_dtype=cache_dtype, seed=8)
    cache[1, 2500, 7] = float("nan")
    out = mla_decode(q_lat, q_pe, cache, lens, scale=0.05)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all()


@pytest.mark.gpu
def test_mla_cuda_graph_capture_and_replay(cuda_ops, no_fallback):
    """Captured once with a fixed bound; replays follow the seq_lens written on the device."""
    q_lat, q_pe, cache, lens = mla_inputs([100, 2000], capacity=4096, seed=7)
    mla_decode(q_lat, q_pe, cache, lens, scale=0.05, max_seq_len=4096)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode(q_lat, q_pe, cache, lens, scale=0.05, max_seq_len=4096)
    for new_lens in ([100, 2000], [101, 4096], [1, 3000]):
        lens.copy_(torch.tensor(new_lens, device="cuda"))
        q_lat.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert_mla_close(out, q_lat, q_pe, cache, lens, 0.05)


# ----------------------------------------------------------------------------- host side (CPU)


def test_varlen_max_seqlen_is_validated_and_ignored_on_cpu():
    q, k, v, cu = packed([3, 5], 2, 8, 8, torch.float32, device="cpu")
    ref = varlen_attention(q, k, v, cu, causal=True, scale=0.5)
    assert torch.equal(varlen_attention(q, k, v, cu, causal=True, scale=0.5, max_seqlen=5), ref)
    for bad in (-1, 2.0, True, "5"):
        with pytest.raises(ValueError, match="max_seqlen must be None or an int >= 0"):
            varlen_attention(q, k, v, cu, causal=True, scale=0.5, max_seqlen=bad)


def test_mla_max_seq_len_is_validated():
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(1, 4, 12, generator=g)
    q_lat, q_pe = torch.randn(1, 2, 8, generator=g), torch.randn(1, 2, 4, generator=g)
    lens = torch.tensor([3])
    ref = mla_decode(q_lat, q_pe, cache, lens, scale=0.5)
    assert torch.equal(mla_decode(q_lat, q_pe, cache, lens, scale=0.5, max_seq_len=4), ref)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_seq_len must be None or an int >= 1"):
            mla_decode(q_lat, q_pe, cache, lens, scale=0.5, max_seq_len=bad)


def test_device_checks_never_read_tensor_values(monkeypatch):
    """The checks used on CUDA (read_values=False) look at shapes and dtypes only: inputs whose
    values would fail the CPU checks pass, and no value is ever read."""
    q = torch.randn(5, 2, 8)
    bad_cu = torch.tensor([1, 9, 2])  # not starting at 0, decreasing, not ending at T
    bad_lens = torch.tensor([0, 99])  # outside [1, capacity]
    cache, q_lat, q_pe = torch.randn(2, 4, 12), torch.randn(2, 2, 8), torch.randn(2, 2, 4)

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("tolist", "item", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    assert attention_ops._check_args(q, q, q, bad_cu, True, 0.5, read_values=False) is None
    mla_ops._check_args(q_lat, q_pe, cache, bad_lens, 0.5, mla_ops._CUDA_KERNEL_DTYPES,
                        read_values=False)
    with pytest.raises(ValueError, match="cu_seqlens must have shape"):
        attention_ops._check_args(q, q, q, bad_cu[:1], True, 0.5, read_values=False)
    with pytest.raises(ValueError, match=r"seq_lens must have shape \[B\] = \[2\]"):
        mla_ops._check_args(q_lat, q_pe, cache, bad_lens[:1], 0.5, mla_ops._CUDA_KERNEL_DTYPES,
                            read_values=False)


def test_split_count_targets_two_ctas_per_sm(monkeypatch):
    monkeypatch.setattr(mla_ops, "_sm_count", lambda index: 132)
    dev = torch.device("cuda", 0)
    assert mla_ops.cuda_num_splits(dev, 1, 32768) == 128  # 256 tokens each
    assert mla_ops.cuda_num_splits(dev, 1, 1 << 20) == 264  # 2 x 132 SMs
    assert mla_ops.cuda_num_splits(dev, 4, 1 << 20) == 66
    assert mla_ops.cuda_num_splits(dev, 1, 1) == 1
    assert mla_ops.cuda_num_splits(dev, 1000, 8192) == 1


def test_custom_ops_keep_their_schemas():
    """The new trailing bounds default to -1, so existing positional calls still work."""
    q, k, v, cu = packed([3, 9], 2, 16, 8, torch.float32, device="cpu", seed=6)
    torch.library.opcheck(torch.ops.kimivl.varlen_attention.default, (q, k, v, cu, True, 0.25))
    torch.library.opcheck(torch.ops.kimivl.varlen_attention.default,
                          (q, k, v, cu, True, 0.25, 9))
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 2, 16, generator=g), torch.randn(2, 2, 8, generator=g),
            torch.randn(2, 70, 24, generator=g), torch.tensor([3, 70]), 0.2)
    torch.library.opcheck(torch.ops.kimivl.mla_decode.default, args)
    torch.library.opcheck(torch.ops.kimivl.mla_decode.default, args + (70,))


def _cuda_build():
    if not build_info().get("cuda"):
        pytest.skip("the extension was built without CUDA")
    assert _has("cuda_varlen_attention") and _has("cuda_mla_decode")
    return extension()


def test_cuda_varlen_entry_point_rejects_bad_arguments_before_touching_the_device():
    """The C++ launcher validates host-side arguments first (no CUDA call is made for these, so
    this runs on machines without a GPU)."""
    ext = _cuda_build()

    def call(**over):
        args = dict(q=16, k=16, v=16, out=16, dtype=2, cu_seqlens=16, num_seqs=2, max_seqlen=5,
                    heads=1, head_dim=8, v_dim=8, q_strides=(8, 8), k_strides=(8, 8),
                    v_strides=(8, 8), out_strides=(8, 8), causal=False, scale=0.5, stream=0)
        ext.cuda_varlen_attention(**(args | over))

    with pytest.raises(ValueError, match="dtype must be float16 or bfloat16"):
        call(dtype=0)
    with pytest.raises(ValueError, match="head_dim and v_dim must be in \\[1, 256\\], got 300"):
        call(head_dim=300)
    with pytest.raises(ValueError, match="num_seqs must be in \\[1, 65535\\], got 0"):
        call(num_seqs=0)
    with pytest.raises(ValueError, match="null data pointer"):
        call(out=0)
    with pytest.raises(ValueError, match="max_seqlen must be in"):
        call(max_seqlen=-1)


def test_cuda_mla_entry_point_rejects_bad_arguments_before_touching_the_device():
    ext = _cuda_build()

    def call(**over):
        args = dict(q_lat=16, q_pe=16, q_dtype=0, cache=16, cache_dtype=1, seq_lens=16, out=16,
                    ws_o=16, ws_ml=16, batch=1, heads=16, rank=512, rope=64, capacity=8,
                    max_seq_len=8, num_splits=1, q_lat_strides=(8192, 512),
                    q_pe_strides=(1024, 64), cache_strides=(4608, 576),
                    out_strides=(8192, 512), scale=0.1, stream=0)
        ext.cuda_mla_decode(**(args | over))

    with pytest.raises(ValueError, match="cache dtype must be float32, bfloat16 or float16"):
        call(cache_dtype=3)
    with pytest.raises(ValueError, match="heads \\* rank must be <= 16384, got 32768"):
        call(heads=64)
    with pytest.raises(ValueError, match="num_splits must be in \\[1, 4096\\], got 0"):
        call(num_splits=0)
    with pytest.raises(ValueError, match="null data pointer"):
        call(ws_o=0)
    with pytest.raises(ValueError, match="max_seq_len must be >= 1"):
        call(max_seq_len=0)


def test_fallbacks_stay_the_references_without_cuda_kernels(monkeypatch):
    """Without the CUDA ops the dispatch never picks them (CPU tensors never do)."""
    monkeypatch.setattr(attention_ops, "kernel", lambda name: None)
    q, k, v, cu = packed([2, 4], 1, 8, 8, torch.float16, device="cpu")
    assert not attention_ops._cuda_kernel_applies(q, v, cu)
    out = varlen_attention(q, k, v, cu, causal=False, scale=0.5)
    ref = varlen_attention_reference(q.double(), k.double(), v.double(), cu, causal=False,
                                     scale=0.5)
    assert (out.double() - ref).abs().max() < 2e-3
    assert not mla_ops._cuda_kernel_applies(torch.zeros(1, 2, 8), torch.zeros(1, 2, 4),
                                            torch.zeros(1, 4, 12))
