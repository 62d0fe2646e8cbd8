"""The compiled varlen attention kernel (`_C.varlen_attention`) against fp64 references, on every
ISA path this CPU supports.

Tolerances. fp32: the kernel accumulates in fp32 (dot products of <= 192 terms, online softmax
over thousands of keys), so its error is a few fp32 ulps of the output, ~1e-6 here; we allow
1e-5 of the largest output. bf16 inputs: the reference runs in fp64 on the same bf16 values, so
the only unavoidable error is rounding the output to bf16; we allow twice the error of torch's own
bf16 SDPA against the same reference (the flash-attention test convention).
"""

import subprocess
import sys

import pytest
import torch

import kimivl_local.ops.attention as attention_ops
from kimivl_local.kernels.extension import build_info, extension
from kimivl_local.ops import varlen_attention, varlen_attention_reference

from kernel_support import ISAS, force_isa

SDPA = torch.nn.functional.scaled_dot_product_attention
# avx512_vnni dispatches to the AVX2 kernels (there is no AVX-512 attention code); an AVX-512
# machine still runs it to cover that dispatch.
# Length 1, an empty sequence, lengths below, at and above the 96-query block, several blocks.
LENGTHS = [1, 7, 0, 33, 96, 97, 200]


def _require_kernel():
    if extension() is None or not hasattr(extension(), "varlen_attention"):
        pytest.skip("the compiled extension with the attention kernels is not built")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Force one kernel path, and make the SDPA fallback fail so the kernel is what runs."""
    force_isa(monkeypatch, request.param, "varlen_attention")

    def no_fallback(*args, **kwargs):
        raise AssertionError("the SDPA fallback ran instead of the kernel")

    monkeypatch.setattr(attention_ops.F, "scaled_dot_product_attention", no_fallback)
    return request.param


def packed(lengths, heads, dqk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k = (torch.randn(t, heads, dqk, generator=g) for _ in range(2))
    v = torch.randn(t, heads, dv, generator=g)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return q.to(dtype), k.to(dtype), v.to(dtype), cu


def sdpa_per_sequence(q, k, v, cu, causal, scale):
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    bounds = cu.tolist()
    for s, e in zip(bounds, bounds[1:]):
        if e > s:
            o = SDPA(*(x[s:e].transpose(0, 1) for x in (q, k, v)), is_causal=causal, scale=scale)
            out[s:e] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("dqk,dv", [(72, 72), (192, 128), (13, 5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_reference(isa, dqk, dv, causal, dtype):
    q, k, v, cu = packed(LENGTHS, 2, dqk, dv, dtype)
    scale = dqk ** -0.5
    out = varlen_attention(q, k, v, cu, causal=causal, scale=scale)
    ref = varlen_attention_reference(q.double(), k.double(), v.double(), cu, causal=causal,
                                     scale=scale)
    assert out.shape == ref.shape and out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * ref.abs().max().item(), err
    else:
        torch_out = sdpa_per_sequence(q, k, v, cu, causal, scale)
        torch_err = (torch_out.double() - ref).abs().max().item()
        assert err <= 2 * torch_err, (err, torch_err)


def test_fused_qkv_views_and_thread_counts_give_identical_results(isa, monkeypatch):
    """Strided q/k/v (views of one [T, 3, H, D] tensor, as MoonViT passes them) read through
    their strides; every (sequence, head, query block) is computed by one thread with the same
    arithmetic, so neither the layout nor the thread count changes a bit of the result."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(LENGTHS), 3, 4, 72, generator=g)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    q, k, v = qkv.unbind(1)
    want = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, causal=False,
                            scale=0.1)
    for threads in ("1", "3"):
        monkeypatch.setenv("KIMIVL_NUM_THREADS", threads)
        torch.testing.assert_close(varlen_attention(q, k, v, cu, causal=False, scale=0.1), want,
                                   rtol=0, atol=0)


def test_long_causal_sequence_rows_match_direct_fp64(isa):
    """Thousands of keys per query (many online-softmax rescalings): spot rows against the
    softmax written out in fp64 for those rows only."""
    n = 3000 if isa == "portable" else 6000
    q, k, v, cu = packed([n], 1, 72, 72, torch.float32, seed=4)
    q = q * 3  # peaked attention: the running max moves often
    out = varlen_attention(q, k, v, cu, causal=True, scale=72 ** -0.5)
    for row in (0, 1, 95, 96, n // 2, n - 1):
        s = (k[: row + 1, 0].double() @ q[row, 0].double()) * 72 ** -0.5
        want = s.softmax(0) @ v[: row + 1, 0].double()
        assert (out[row, 0].double() - want).abs().max() <= 1e-5 * want.abs().max(), row


def test_late_dominant_key_rescales_the_accumulated_output(isa):
    """Key 250 of 300 outscores everything before it by far more than the kernel's rescaling
    slack (2^8), so the running max jumps in the fourth key block and the partial output must
    be rescaled then, not only on the first block."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(72, generator=g)
    u = 3 * u / u.norm()
    q = u + 0.3 * torch.randn(300, 2, 72, generator=g)
    k, v = torch.randn(300, 2, 72, generator=g), torch.randn(300, 2, 72, generator=g)
    k[250] = 10 * u
    cu = torch.tensor([0, 300])
    for causal in (False, True):
        out = varlen_attention(q, k, v, cu, causal=causal, scale=72 ** -0.5)
        ref = varlen_attention_reference(q.double(), k.double(), v.double(), cu, causal=causal,
                                         scale=72 ** -0.5)
        assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_nan_key_poisons_exactly_the_queries_that_see_it(isa):
    """As in torch: a NaN key turns the outputs that attend to it into NaN, and nothing else
    (the online softmax must not drop it, nor leak it across heads or sequences)."""
    q, k, v, cu = packed([100, 100], 2, 72, 72, torch.float32, seed=5)
    k[130, 0, 5] = float("nan")
    bad = varlen_attention(q, k, v, cu, causal=True, scale=0.1).isnan().any(-1)
    assert bad[:, 0].nonzero().flatten().tolist() == list(range(130, 200))
    assert not bad[:, 1].any()


@pytest.mark.slow
def test_memory_is_linear_in_tokens(tmp_path):
    """32768 tokens in one sequence: an O(T^2) score matrix would need 4 GiB in fp32; the kernel's
    scratch is a few hundred KiB per thread, so the process peak stays far below that."""
    _require_kernel()
    code = (
        "import resource, torch\n"
        "from kimivl_local.kernels.extension import extension\n"
        "from kimivl_local.ops import varlen_attention\n"
        "assert extension() is not None\n"
        "t = 32768\n"
        "q, k, v = (torch.randn(t, 1, 8) for _ in range(3))\n"
        "varlen_attention(q, k, v, torch.tensor([0, t]), causal=False, scale=0.3)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    # Run outside the repository so the installed package (with _C) is the one imported.
    peak_kib = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                  text=True, cwd=tmp_path).stdout.strip())
    assert peak_kib < 1.5 * 2**20, peak_kib  # < 1.5 GiB, torch itself included


def test_kernel_rejects_inconsistent_arguments_naming_them():
    """The C++ entry point validates what Python passes, whoever the caller is."""
    _require_kernel()
    ext = extension()
    q = torch.randn(5, 1, 8)
    out = torch.empty_like(q)
    cu = torch.tensor([0, 3, 5])

    def call(**over):
        args = dict(q=q.data_ptr(), k=q.data_ptr(), v=q.data_ptr(), out=out.data_ptr(), dtype=0,
                    cu_seqlens=cu.data_ptr(), num_seqs=2, total_tokens=5, heads=1, head_dim=8,
                    v_dim=8, q_strides=(8, 8), k_strides=(8, 8), v_strides=(8, 8),
                    out_strides=(8, 8), causal=False, scale=0.5, num_threads=1)
        ext.varlen_attention(**(args | over))

    call()
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        call(dtype=2)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at total_tokens = 6"):
        call(total_tokens=6)
    bad = torch.tensor([0, 4, 3, 5])
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        call(cu_seqlens=bad.data_ptr(), num_seqs=3)
    with pytest.raises(ValueError, match="head_dim and v_dim must be >= 1"):
        call(head_dim=0)


def test_forcing_an_isa_the_cpu_lacks_is_an_error(monkeypatch):
    """KIMIVL_ISA never makes the kernels run code the CPU cannot execute."""
    _require_kernel()
    missing = [i for i in ISAS if i not in build_info()["cpu_isas_supported"]]
    if not missing:
        pytest.skip("this CPU supports every ISA path")
    monkeypatch.setenv("KIMIVL_ISA", missing[0])
    q, k, v, cu = packed([4], 1, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="does not support it"):
        varlen_attention(q, k, v, cu, causal=False, scale=0.5)


def test_fallback_dtypes_and_custom_op_registration():
    """float16 goes to the SDPA fallback (same signature, same answer); the custom op passes
    torch's schema, fake-tensor and dispatch checks."""
    q, k, v, cu = packed([3, 9], 2, 16, 8, torch.float16, seed=6)
    out = varlen_attention(q, k, v, cu, causal=True, scale=0.25)
    ref = varlen_attention_reference(*(x.double() for x in (q, k, v)), cu, causal=True, scale=0.25)
    assert out.dtype == torch.float16 and (out.double() - ref).abs().max() < 2e-3
    q, k, v, cu = packed([3, 9], 2, 16, 8, torch.float32, seed=6)
    torch.library.opcheck(torch.ops.kimivl.varlen_attention.default, (q, k, v, cu, True, 0.25))
