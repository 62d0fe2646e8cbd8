"""moe_block against an fp64 oracle, on every CPU kernel path this machine can run.

The oracle follows the kernel's math exactly: x is quantized to int8 per 32-block as the kernel
does (quantize_activations_reference, bit-exact), gate/up in fp64, h = silu(gate) * up, h
quantized per 32-block, down in fp64, router-weighted sum. What the kernel does differently is
round in fp32, so its h differs from the fp64 h by at most eps_h (propagated from the matmul
bound of test_quant_matmul: 2 (KC + G + 8) 2^-24 sum|terms|, |silu'| <= 1.1, plus 1e-6 |h| for
evaluating silu and the product). Where that can move h * 127 / amax across a rounding boundary
(an "ambiguous" element, rare), the int8 value may differ by one step; the bound allows one step d
there and the exact value elsewhere:
  |y - y_o| <= sum_j |w_j| (c2 sum|W2 h_o| + |W2| (rel_d |h_o| + d [ambiguous])) + 1e-6 sum|w y|
and 2^-8 |y_o| more for a bf16 output (8 significant bits).
On the AMX path (256 tokens or more on an AMX CPU) x, h and the dequantized weights are rounded to
bf16 instead (exactly as the oracle does for x and the weights; h within the bf16 values of
h -/+ eps_h) and every product accumulates in fp32.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from kimivl_local.ops import moe_block, moe_block_reference, quantize_activations_reference
from kimivl_local.quant import QuantScheme, quantize_rtn, to_cpu_layout
from kimivl_local.quant.cpu_layout import dequantize

from kernel_support import ISAS, bf16_tiles, force_isa

moe_mod = sys.modules["kimivl_local.ops.moe"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    return force_isa(monkeypatch, request.param, "moe_block")


def make_experts(e, hidden, inter, s13, s2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(e, hidden, inter, generator=g) / inter ** 0.5
    return (to_cpu_layout(quantize_rtn(w13.bfloat16(), s13)),
            to_cpu_layout(quantize_rtn(w2.bfloat16(), s2)))


def matmul_bound(w, wd, xh):
    """The quant_matmul tolerance for dequantized weight wd of layout w (test_quant_matmul)."""
    kc = -(-w.in_features // 32)
    return 2 * (kc + kc * 32 // w.group_size + 8) * 2.0 ** -24 * (xh.abs() @ wd.abs().T)


def quantize_with_slack(h, eps):
    """fp64 int8 quantization of h [P, I] per 32-block, the per-element slack of the kernel's
    value (relative d error and a whole step where rounding is ambiguous)."""
    blocks, eb = h.unflatten(-1, (-1, 32)), eps.unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True)
    d_amax = eb.amax(-1, keepdim=True)  # the kernel's amax is within this of ours
    d = amax / 127
    v = torch.where(amax > 0, blocks * 127 / amax, torch.zeros_like(blocks))
    hq = v.round() * d
    eps_v = eb + blocks.abs() * d_amax / (amax - d_amax).clamp_min(1e-300)  # bound on |h_k - h|
    move = eps_v * 127 / amax.clamp_min(1e-300) + 2e-5  # ... on the kernel's h * 127 / amax
    ambiguous = (v - v.floor() - 0.5).abs() <= move
    rel_d = d_amax / amax.clamp_min(1e-300)
    slack = hq.abs() * rel_d * 2 + ambiguous * (d + d_amax / 127)
    return hq.flatten(-2), slack.flatten(-2), int(ambiguous.sum())


def bf16_with_slack(h, eps):
    """h [P, I] rounded to bf16 as the AMX path stores it, and the per-element slack of the
    kernel's value: its h lies within eps of ours, and rounding is monotonic, so its bf16 value
    lies between those of h - eps and h + eps."""
    def to_bf16(v):
        return v.float().bfloat16().double()
    hq = to_bf16(h)
    return hq, torch.maximum(to_bf16(h + eps) - hq, hq - to_bf16(h - eps))


def bf16_bound(k, xh, wd):
    """fp32 accumulation of bf16 products over k (the AMX tiles): 2 (k + 8) 2^-24 sum|terms|."""
    return 2 * (-(-k // 32) * 32 + 8) * 2.0 ** -24 * (xh.abs() @ wd.abs().T)


def oracle(x, weights, ids, w13, w2, bf16=False):
    """fp64 result and bound, for activations quantized to int8 per 32 K, or for the AMX path's
    bf16 operands (bf16=True, kernel_support.bf16_tiles)."""
    w13d, w2d = dequantize(w13, torch.float64), dequantize(w2, torch.float64)
    if bf16:  # s * (v - z) is exact in fp32: the kernel's weights are these rounded once
        xh = x.float().bfloat16().double()
        w13d, w2d = (w.float().bfloat16().double() for w in (w13d, w2d))
    else:
        xh = quantize_activations_reference(x)
    out = torch.zeros(x.shape, dtype=torch.float64)
    tol = torch.zeros(x.shape, dtype=torch.float64)
    inter = w2.in_features
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gu = xh[tok] @ w13d[e].T
        eps = bf16_bound(w13.in_features, xh[tok], w13d[e]) if bf16 else matmul_bound(
            w13, w13d[e], xh[tok])
        g, u, eg, eu = gu[:, :inter], gu[:, inter:], eps[:, :inter], eps[:, inter:]
        h = F.silu(g) * u
        eps_h = 1.1 * eg * (u.abs() + eu) + (F.silu(g).abs() + 1.1 * eg) * eu + 1e-6 * h.abs()
        if bf16:
            hq, slack = bf16_with_slack(h, eps_h)
            bound = bf16_bound(inter, hq.abs() + slack, w2d[e])
        else:
            hq, slack, _ = quantize_with_slack(h, eps_h)
            bound = matmul_bound(w2, w2d[e], hq)
        y = hq @ w2d[e].T
        wt = weights[tok, slot, None].double()
        out.index_add_(0, tok, wt * y)
        err = bound + slack @ w2d[e].abs().T + 1e-6 * y.abs()
        tol.index_add_(0, tok, wt.abs() * err)
    return out, tol + 1e-12


def route(t, e, k, seed, mode="random"):
    g = torch.Generator().manual_seed(seed)
    if mode == "one":  # every token to the same expert (k = 1)
        ids = torch.full((t, 1), e - 1, dtype=torch.int64)
    else:  # a random top-k of the first e // 2 + k experts: the rest get no tokens
        pool = min(e, e // 2 + k)
        ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(ids.shape, generator=g) + 0.1
    return weights, ids


CASES = [  # (T, E, k, hidden, inter, routing)
    (1, 8, 6, 128, 64, "random"), (3, 8, 1, 128, 64, "random"), (17, 16, 6, 96, 96, "random"),
    (5, 4, 1, 64, 32, "one")]
SCHEMES = [  # (w13, w2): symmetric int4 as Kimi ships, asymmetric, int8, mixed, per-channel
    (QuantScheme(4, 32, True), QuantScheme(4, 32, True)),
    (QuantScheme(4, 32, False), QuantScheme(8, None, False)),
    (QuantScheme(8, 32, True), QuantScheme(4, 32, False)),
    # the other widths: 3-bit experts as a budget mix picks them, 2/5/6 mixed, asymmetric
    (QuantScheme(3, 32, True), QuantScheme(3, 32, True)),
    (QuantScheme(2, 32, False), QuantScheme(6, 32, True)),
    (QuantScheme(5, 32, True), QuantScheme(2, None, False))]


@pytest.mark.parametrize("t,e,k,hidden,inter,mode", CASES)
@pytest.mark.parametrize("s13,s2", SCHEMES)
def test_against_fp64(isa, t, e, k, hidden, inter, mode, s13, s2):
    w13, w2 = make_experts(e, hidden, inter, s13, s2, seed=t + e)
    weights, ids = route(t, e, k, seed=t, mode=mode)
    x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(k)).bfloat16()
    y_o, tol = oracle(x, weights, ids, w13, w2, bf16_tiles(isa, t, moe=True))
    tol_bf16 = tol + 2.0 ** -8 * y_o.abs()
    # Against the fp32 reference without activation quantization: int8 per 32 costs ~0.5% per GEMM.
    ref = moe_block_reference(x.double(), weights, ids, w13, w2)
    for dtype, bound in ((torch.float32, tol), (torch.bfloat16, tol_bf16)):
        y = moe_block(x.to(dtype), weights, ids, w13, w2)  # same values: x is bf16-exact
        assert y.shape == x.shape and y.dtype == dtype
        err = (y.double() - y_o).abs()
        assert (err <= bound).all(), f"{dtype}: max excess {(err - bound).max():.3g}"
        assert (y.double() - ref).norm() <= 3e-2 * ref.norm()


def test_prefill_512_tokens(isa):
    """T = 512, top-6 of 16 experts: multi-tile experts, several column items, int32 ids."""
    s = QuantScheme(4, 64, True)
    w13, w2 = make_experts(16, 128, 64, s, s, seed=5)
    weights, ids = route(512, 16, 6, seed=6)
    x = torch.randn(512, 128)
    y = moe_block(x, weights, ids.to(torch.int32), w13, w2)
    y_o, tol = oracle(x, weights, ids, w13, w2, bf16_tiles(isa, 512, moe=True))
    assert ((y.double() - y_o).abs() <= tol).all()


def test_threads_do_not_change_the_result(isa, monkeypatch):
    s = QuantScheme(4, 32, True)
    w13, w2 = make_experts(8, 256, 128, s, s)  # 54 pairs * 2 * 3 * 256 * 128 ops: 2 threads
    weights, ids = route(9, 8, 6, seed=1)
    x = torch.randn(9, 256)
    monkeypatch.setenv("KIMIVL_NUM_THREADS", "1")
    one = moe_block(x, weights, ids, w13, w2)
    monkeypatch.setenv("KIMIVL_NUM_THREADS", "2")
    assert torch.equal(moe_block(x, weights, ids, w13, w2), one)


def test_fallback_without_extension_is_the_reference(monkeypatch):
    monkeypatch.setattr(moe_mod, "kernel", lambda name: None)
    s = QuantScheme(4, 32, False)
    w13, w2 = make_experts(4, 64, 32, s, s)
    weights, ids = route(6, 4, 2, seed=2)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    expect = moe_block_reference(x, weights, ids, w13, w2)
    assert torch.equal(moe_block(x, weights, ids, w13, w2), expect)
    assert moe_block(x[:0], weights[:0], ids[:0], w13, w2).shape == (0, 64)


def test_registered_op():
    s = QuantScheme(4, 32, True)
    w13, w2 = make_experts(4, 64, 32, s, s)
    weights, ids = route(3, 4, 2, seed=3)
    torch.library.opcheck(moe_mod._moe_block_op, (
        torch.randn(3, 64), weights, ids, w13.qweight, w13.scales, w13.zeros, w13.bits,
        w13.group_size, w2.qweight, w2.scales, w2.zeros, w2.bits, w2.group_size))


def test_bad_arguments_name_the_argument():
    s = QuantScheme(4, 32, True)
    w13, w2 = make_experts(4, 64, 32, s, s)
    weights, ids = route(2, 4, 2, seed=4)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 64\]"):
        moe_block(torch.randn(2, 32), weights, ids, w13, w2)
    with pytest.raises(ValueError, match=r"topk_weights must have shape \[2, 2\]"):
        moe_block(x, weights[:, :1], ids, w13, w2)
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        moe_block(x, weights.double(), ids, w13, w2)
    with pytest.raises(ValueError, match="topk_ids must be"):
        moe_block(x, weights, ids.float(), w13, w2)
    with pytest.raises(ValueError, match="topk_ids: expert id 4 outside"):
        moe_block(x, weights, torch.full_like(ids, 4), w13, w2)
    with pytest.raises(ValueError, match=r"w2 must be \[E, H, I\]"):
        moe_block(x, weights, ids, w13, w13)
    with pytest.raises(ValueError, match=r"w13 must be a stacked"):
        moe_block(x, weights, ids, w13.expert(0), w2)
    odd = make_experts(2, 64, 16, s, QuantScheme(4, None, True))
    with pytest.raises(ValueError, match="I a multiple of 32"):
        moe_block(x, weights, torch.zeros_like(ids), *odd)
