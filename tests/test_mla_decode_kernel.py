"""The compiled MLA decode kernel (`_C.mla_decode`) against fp64 references, on every ISA path
this CPU supports, and against the model's own absorbed attention.

Tolerance: the kernel computes in fp32 (576-term dot products, online softmax and weighted sums
over up to thousands of tokens, a log-sum-exp merge of the context splits) from the exact cache
values (bf16 widens to fp32 exactly), so it is a few fp32 ulps from the fp64 reference on the same
values, ~2e-7 here; we allow 1e-5 of the largest output.
"""

import pytest
import torch

from kimivl_local.checkpoint.config import TextConfig
from kimivl_local.kernels.extension import extension
from kimivl_local.model.mla import MLAttention
from kimivl_local.ops import mla_decode, mla_decode_reference

from kernel_support import ISAS, force_isa

# avx512_vnni dispatches to the AVX2 kernels (there is no AVX-512 attention code); an AVX-512
# machine still runs it to cover that dispatch.


def _require_kernel():
    if extension() is None or not hasattr(extension(), "mla_decode"):
        pytest.skip("the compiled extension with the attention kernels is not built")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    return force_isa(monkeypatch, request.param, "mla_decode")


def inputs(lens, heads=16, rank=512, rope=64, capacity=None, cache_dtype=torch.bfloat16, seed=0):
    """Unit-variance latents (the cache holds RMS-normalised c_kv) and queries whose scores after
    the 192^-0.5 scale spread over several units, so the softmax is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    capacity = capacity or max(lens) + 5
    cache = torch.randn(len(lens), capacity, rank + rope, generator=g).to(cache_dtype)
    q_lat = torch.randn(len(lens), heads, rank, generator=g) * 0.5
    q_pe = torch.randn(len(lens), heads, rope, generator=g) * 0.5
    return q_lat, q_pe, cache, torch.tensor(lens, dtype=torch.int32)


def check_against_reference(q_lat, q_pe, cache, lens, scale=192 ** -0.5):
    out = mla_decode(q_lat, q_pe, cache, lens, scale=scale)
    ref = mla_decode_reference(q_lat.double(), q_pe.double(), cache.double(), lens, scale=scale)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err
    return out


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_kimi_vl_shape_matches_fp64(isa, cache_dtype):
    # Contexts of 1, 7 (inside one chunk) and 1037 (several splits, ragged last chunk).
    check_against_reference(*inputs([1, 7, 1037], cache_dtype=cache_dtype))


@pytest.mark.parametrize("threads", ["1", "2", "5"])
def test_long_context_split_plans_match_fp64(isa, threads, monkeypatch):
    """One sequence of 5000 tokens cut into 4 to 20 splits, merged by log-sum-exp."""
    monkeypatch.setenv("KIMIVL_NUM_THREADS", threads)
    q_lat, q_pe, cache, lens = inputs([5000], seed=1)
    check_against_reference(q_lat * 2, q_pe * 2, cache, lens)  # peaked: max moves between splits


def test_late_dominant_token_rescales_the_accumulated_output(isa):
    """Token 700 outscores the rest by far more than the rescaling slack (2^8): the running
    max of its split jumps mid-split and the split's partial output must be rescaled."""
    q_lat, q_pe, cache, lens = inputs([1000], cache_dtype=torch.float32, seed=9)
    cache[0, 700, :512] = 4 * q_lat[0, 0] / q_lat[0, 0].norm() * 512 ** 0.5
    check_against_reference(q_lat, q_pe, cache, lens)


def test_odd_sizes_have_no_vector_tail_bugs(isa):
    """Heads, rank and rope that are not multiples of the 4-row / 8-lane tiles."""
    check_against_reference(*inputs([3, 50, 301], heads=5, rank=21, rope=3, seed=2), scale=0.3)
    check_against_reference(*inputs([9], heads=1, rank=8, rope=0, seed=3), scale=0.3)


def test_views_of_a_concatenated_query_and_a_layer_cache(isa):
    """A concatenated q [B, H, rank + rope] passed as two views, and a cache that is one layer of
    a [layers, B, capacity, 576] buffer, give exactly what contiguous copies give."""
    q_lat, q_pe, cache, lens = inputs([40, 300], seed=4)
    q = torch.cat([q_lat, q_pe], -1)
    layers = torch.stack([torch.zeros_like(cache), cache, torch.ones_like(cache)])
    a = mla_decode(q[..., :512], q[..., 512:], layers[1], lens, scale=0.07)
    b = mla_decode(q_lat, q_pe, cache.clone(), lens, scale=0.07)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    strided = torch.zeros(2, 400, 2, 576, dtype=cache.dtype)  # token stride 1152
    strided[:, :cache.shape[1], 0] = cache
    torch.testing.assert_close(mla_decode(q_lat, q_pe, strided[:, :, 0], lens, scale=0.07), b,
                               rtol=0, atol=0)


def test_nan_in_the_cache_poisons_only_its_batch_entry(isa):
    q_lat, q_pe, cache, lens = inputs([600, 600], cache_dtype=torch.float32, seed=8)
    cache[1, 450, 3] = float("nan")  # inside the context, in a later split
    out = mla_decode(q_lat, q_pe, cache, lens, scale=0.07)
    assert not out[0].isnan().any() and out[1].isnan().all()


def test_bf16_query_is_widened_exactly(isa):
    q_lat, q_pe, cache, lens = inputs([64], seed=5)
    q_lat, q_pe = q_lat.bfloat16(), q_pe.bfloat16()
    torch.testing.assert_close(mla_decode(q_lat, q_pe, cache, lens, scale=0.07),
                               mla_decode(q_lat.float(), q_pe.float(), cache, lens, scale=0.07),
                               rtol=0, atol=0)


def test_replaces_the_models_absorbed_attention(isa):
    """W_uk into the query, mla_decode over the latents, W_uv out: the model's attend_absorbed
    (the torch einsum form) for one decode step."""
    cfg = TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                     qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    attn = MLAttention(cfg)
    s = 23
    q_nope, q_pe = torch.randn(1, 4, 16), torch.randn(1, 4, 8)
    latent = torch.randn(s, 32 + 8)
    w = attn.kv_b_proj.weight.view(4, 32, 32)
    w_uk, w_uv = w[:, :16], w[:, 16:]
    q_lat = torch.einsum("thd,hdr->thr", q_nope, w_uk)
    o_lat = mla_decode(q_lat, q_pe, latent[None], torch.tensor([s]), scale=attn.scale)
    out = torch.einsum("thr,hdr->thd", o_lat, w_uv)
    want = attn.attend_absorbed(q_nope, q_pe, latent, s - 1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_32k_context_matches_fp64(isa):
    check_against_reference(*inputs([32768, 3], seed=6))


def _bad_args():
    q_lat, q_pe, cache, lens = inputs([3, 5], heads=2, rank=8, rope=4, capacity=6)
    ok = dict(q_lat=q_lat, q_pe=q_pe, cache=cache, seq_lens=lens, scale=0.5)
    strided = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    yield ok | {"q_lat": q_lat[0]}, "q_lat must have 3 dimensions"
    yield ok | {"q_lat": q_lat.long(), "q_pe": q_pe.long()}, "q_lat must be one of"
    yield ok | {"q_pe": q_pe.bfloat16()}, "q_pe must have q_lat's dtype"
    yield ok | {"q_pe": q_pe[:, :1]}, r"q_pe must have shape \[B, H, rope\] = \[2, 2, rope\]"
    yield ok | {"cache": cache[..., :11]}, (r"cache must have shape \[B, capacity, rank \+ rope\] "
                                           r"= \[2, capacity, 12\]")
    yield ok | {"cache": cache[:1]}, "cache must have shape"
    yield ok | {"cache": cache.long()}, "cache must be one of"
    yield ok | {"cache": strided(cache)}, "cache must have a contiguous last"
    yield ok | {"q_lat": strided(q_lat)}, "q_lat must have a contiguous last"
    yield ok | {"cache": cache.to("meta")}, "cache is on meta"
    yield ok | {"seq_lens": lens.float()}, "seq_lens must be int32 or int64"
    yield ok | {"seq_lens": lens[:1]}, r"seq_lens must have shape \[B\] = \[2\]"
    yield ok | {"seq_lens": torch.tensor([3, 0])}, r"seq_lens\[1\] = 0 must be in \[1, capacity = 6"
    yield ok | {"seq_lens": torch.tensor([7, 1])}, r"seq_lens\[0\] = 7 must be in \[1, capacity = 6"
    yield ok | {"scale": float("inf")}, "scale must be a finite number"
    yield ok | {"q_pe": q_pe.numpy()}, "q_pe must be a torch.Tensor"


@pytest.mark.parametrize("fn", [mla_decode, mla_decode_reference])
def test_argument_errors_name_the_argument(fn):
    for kwargs, message in _bad_args():
        with pytest.raises((ValueError, TypeError), match=message):
            fn(**kwargs)


def test_kernel_dtypes_only():
    """The op takes the kernel's dtypes; the reference (the oracle) also takes fp16 and fp64."""
    q_lat, q_pe, cache, lens = inputs([3], heads=2, rank=8, rope=4)
    with pytest.raises(ValueError, match="cache must be one of float32, bfloat16, got .*float64"):
        mla_decode(q_lat, q_pe, cache.double(), lens, scale=0.5)
    with pytest.raises(ValueError, match="q_lat must be one of float32, bfloat16, got .*float16"):
        mla_decode(q_lat.half(), q_pe.half(), cache, lens, scale=0.5)
    ref = mla_decode_reference(q_lat.half(), q_pe.half(), cache, lens, scale=0.5)
    assert ref.dtype == torch.float32


def test_kernel_rejects_out_of_range_lengths_naming_them():
    """The C++ entry point re-checks seq_lens, whoever the caller is."""
    _require_kernel()
    q_lat, q_pe, cache, _ = inputs([4], heads=2, rank=8, rope=4, capacity=4)
    lens = torch.tensor([5])
    out = torch.empty(1, 2, 8)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 5 must be in \[1, capacity = 4\]"):
        extension().mla_decode(
            q_lat=q_lat.data_ptr(), q_pe=q_pe.data_ptr(), cache=cache.data_ptr(), cache_dtype=1,
            seq_lens=lens.data_ptr(), out=out.data_ptr(), batch=1, heads=2, rank=8, rope=4,
            capacity=4, q_lat_strides=(16, 8), q_pe_strides=(8, 4), cache_strides=(48, 12),
            out_strides=(16, 8), scale=0.5, num_threads=1)


def test_custom_op_registration():
    q_lat, q_pe, cache, lens = inputs([3, 70], heads=2, rank=16, rope=8, seed=7)
    torch.library.opcheck(torch.ops.kimivl.mla_decode.default, (q_lat, q_pe, cache, lens, 0.2))
