"""The CUDA quantized matmul and MoE block: the weight layout (runs on the CPU), the magic-number
conversions the kernels apply to it (emulated bit for bit in torch on the CPU), the dispatch and
its fallbacks, and, on a GPU, the kernels against fp64 oracles.

GPU tolerances. The kernels multiply exact integer weights u - zero (16-bit operands) with x and
accumulate in fp32, applying the group scale in fp32; so against y_o = x · dequant(W)ᵀ in fp64
the error is fp32 summation, |err| <= c · K · 2^-24 · mag with mag = |x| · |W|ᵀ (we allow
c · K = 2^10 for K <= 11264: the kernels sum at most a few hundred terms in sequence, the rest in
trees; tensor cores may truncate inside their adds), plus the output rounding to x's dtype, at
most its unit roundoff eps = 2^-8 (bf16) or 2^-11 (fp16) relative. The MoE block stores
h = silu(g) · u in x's dtype before the down projection (as vLLM does), which adds eps · |h| per
element, propagated through |W2| and the router weights; its output rounding is allowed twice.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from kimivl_local.kernels.extension import extension
from kimivl_local.ops import moe_block, moe_block_reference, quant_matmul, quant_matmul_reference
from kimivl_local.quant import QuantScheme, quantize_rtn, to_cpu_layout
from kimivl_local.quant.cuda_layout import (INT4_ORDER, CudaQuantWeight, _pack_rows, dequantize,
                                            kernel_supports, to_cuda_layout, unpack_codes)
from kimivl_local.quant.packing import PackedWeight, concat_out_features, pack_int32, unpack
from kimivl_local.quant.packing import dequantize as packed_dequantize

qm = sys.modules["kimivl_local.ops.quant_matmul"]
moe_mod = sys.modules["kimivl_local.ops.moe"]

ALL_SCHEMES = [QuantScheme(bits, group, sym) for bits in (4, 8) for group in (32, 64, 128, None)
               for sym in (True, False)]


def packed_weight(shape, scheme, dtype=torch.bfloat16, seed=0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * (1 + torch.rand(*shape[:-1], 1, generator=g))
    return quantize_rtn(w.to(dtype), scheme)


# ---- layout (CPU) ------------------------------------------------------------------------------

ROUND_TRIP = [(s, n, k) for s in ALL_SCHEMES  # odd N; K per-channel off the 32 grid
              for n, k in [(37, 256), (1, 128), (5, 1408), (3, 40), (64, 200)]
              if s.group_size is None or k % s.group_size == 0]


@pytest.mark.parametrize("scheme,n,k", ROUND_TRIP, ids=str)
def test_round_trip_matches_the_on_disk_dequantization(scheme, n, k):
    packed = packed_weight((n, k), scheme, seed=n * k)
    w = to_cuda_layout(packed, "cpu")
    assert w.qweight.shape == (n, -(-k // 32) * 32 * scheme.bits // 32)
    assert (w.zeros is None) == scheme.symmetric
    assert torch.equal(dequantize(w, torch.float64), packed_dequantize(packed, torch.float64))
    assert dequantize(w, torch.bfloat16).dtype == torch.bfloat16
    # the fast word permutation agrees with packing the signed values by the definition
    assert torch.equal(w.qweight, _pack_rows(unpack(packed)[0], scheme.bits, w.padded_in_features))


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, False), QuantScheme(8, None, True),
                                    QuantScheme(4, 128, True)], ids=str)
def test_stacked_experts_convert_one_by_one(scheme):
    packed = packed_weight((3, 24, 256), scheme, seed=1)
    w = to_cuda_layout(packed, "cpu")
    assert w.num_experts == 3 and w.qweight.shape[0] == 3
    full = packed_dequantize(packed, torch.float64)
    assert torch.equal(dequantize(w, torch.float64), full)
    for e in range(3):
        assert torch.equal(dequantize(w.expert(e), torch.float64), full[e])
    assert w.nbytes() == sum(w.expert(e).nbytes() for e in range(3))


def test_fp32_scales_become_16_bit():
    small = packed_weight((8, 64), QuantScheme(4, 32, True), dtype=torch.float32)
    assert to_cuda_layout(small, "cpu").scales.dtype == torch.float16
    huge = PackedWeight(small.weight_packed, small.weight_scale * 1e6, small.weight_shape, None,
                        small.scheme)
    w = to_cuda_layout(huge, "cpu")
    assert w.scales.dtype == torch.bfloat16  # outside fp16's range
    torch.testing.assert_close(dequantize(w), packed_dequantize(huge), rtol=2 ** -8, atol=0)


def test_int4_word_holds_the_documented_nibble_order():
    """Row of 8 with codes u = 0..7 (q = -8..-1): nibble p holds element INT4_ORDER[p]."""
    q = torch.arange(-8, 0, dtype=torch.int8)[None]
    packed = PackedWeight(pack_int32(q, 4), torch.ones(1, 1, dtype=torch.bfloat16),
                          torch.tensor([1, 8]), None, QuantScheme(4, None, True))
    w = to_cuda_layout(packed, "cpu")
    word = int(w.qweight[0, 0]) & 0xFFFFFFFF
    assert word == 0x75316420
    assert [(word >> (4 * p)) & 0xF for p in range(8)] == list(INT4_ORDER)
    assert torch.equal(unpack_codes(w)[0, :8], torch.arange(8, dtype=torch.int16))


def _halves(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> their (low, high) 16-bit halves as float16 [*, 2] (little endian)."""
    return words.contiguous().view(torch.float16).view(*words.shape, 2)


def _bf_halves(words: torch.Tensor) -> torch.Tensor:
    return words.contiguous().view(torch.bfloat16).view(*words.shape, 2)


@pytest.mark.parametrize("sym", [True, False])
def test_magic_number_conversion_of_the_layout(sym):
    """Emulate csrc/cuda/qgemm_common.cuh on the layout's words: int4 pair i = ((w >> 4i) &
    0x000f000f) | 0x64006400 as two fp16 minus (1024 + zero) is elements (2i, 2i + 1); the bf16
    variant ORs 0x43004300 and subtracts 128 + zero; int8 pair i puts bytes (2i, 2i + 1) under
    0x64. Each must equal u - zero exactly."""
    for bits in (4, 8):
        scheme = QuantScheme(bits, 32, sym)
        w = to_cuda_layout(packed_weight((16, 64), scheme, seed=bits), "cpu")
        words = w.qweight.to(torch.int64) & 0xFFFFFFFF  # [N, W]
        zero = (w.zeros.to(torch.int64) if w.zeros is not None
                else torch.full(w.scales.shape, 1 << (bits - 1)))
        per_word = 32 // bits
        z = zero.repeat_interleave(32 // per_word, dim=1)  # group of each word (group 32)
        expect = (unpack_codes(w).to(torch.int64).view(16, -1, per_word)
                  - z[..., None]).to(torch.float32)
        got16, got_bf = [], []
        for i in range(per_word // 2):
            if bits == 4:
                v = ((words >> (4 * i)) & 0x000F000F) | 0x64006400
                vb = ((words >> (4 * i)) & 0x000F000F) | 0x43004300
                got_bf.append(_bf_halves(_i32(vb)).float() - (128 + z[..., None]))
            else:
                lo, hi = (words >> (16 * i)) & 0xFF, (words >> (16 * i + 8)) & 0xFF
                v = lo | (0x64 << 8) | (hi << 16) | (0x64 << 24)
            got16.append(_halves(_i32(v)).float() - (1024 + z[..., None]).float())
        got = torch.stack(got16, dim=2).flatten(-2)  # [N, W, per_word]
        assert torch.equal(got, expect)
        if bits == 4:
            assert torch.equal(torch.stack(got_bf, dim=2).flatten(-2), expect)


def _i32(v: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def test_bad_layouts_are_rejected():
    w = to_cuda_layout(packed_weight((8, 64), QuantScheme(4, 32, False)), "cpu")
    with pytest.raises(ValueError, match="scales must have shape"):
        CudaQuantWeight(w.qweight, w.scales[:1], w.zeros, 4, 32, 8, 64)
    with pytest.raises(ValueError, match="qweight must be one of"):
        CudaQuantWeight(w.qweight.float(), w.scales, w.zeros, 4, 32, 8, 64)
    with pytest.raises(ValueError, match="zeros must be one of"):
        CudaQuantWeight(w.qweight, w.scales, w.zeros.to(torch.int8), 4, 32, 8, 64)
    with pytest.raises(ValueError, match="group_size must be a multiple of 32"):
        CudaQuantWeight(w.qweight, w.scales, w.zeros, 4, 16, 8, 64)
    with pytest.raises(ValueError, match="zeros is on meta"):
        CudaQuantWeight(w.qweight, w.scales, w.zeros.to("meta"), 4, 32, 8, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        to_cuda_layout(packed_weight((8, 64), QuantScheme(4, 16, True)), "cpu")
    with pytest.raises(ValueError, match="expert"):
        w.expert(0)


def test_kernel_supports():
    assert kernel_supports(QuantScheme(4, 128, True), 2048)
    assert kernel_supports(QuantScheme(8, None, False), 1400)
    assert not kernel_supports(QuantScheme(8, None, False), 36)  # K % 8
    assert not kernel_supports(QuantScheme(4, 16, True), 64)  # group % 32


# ---- dispatch (CPU) ----------------------------------------------------------------------------

def test_cpu_tensors_take_the_reference():
    w = to_cuda_layout(packed_weight((40, 96), QuantScheme(4, 32, False)), "cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(3, 2, 96).to(dtype)
        y = quant_matmul(x, w)
        assert y.shape == (3, 2, 40) and y.dtype == dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert torch.equal(y, (x.to(acc) @ dequantize(w, acc).T).to(dtype))


def test_moe_reference_is_layout_independent():
    s13, s2 = QuantScheme(4, 32, False), QuantScheme(8, None, True)
    g13 = packed_weight((4, 64, 64), s13, seed=2)
    u13 = packed_weight((4, 64, 64), s13, seed=3)
    d2 = packed_weight((4, 64, 64), s2, seed=4)
    fused = concat_out_features([g13, u13])
    cuda13, cuda2 = to_cuda_layout(fused, "cpu"), to_cuda_layout(d2, "cpu")
    cpu13, cpu2 = to_cpu_layout(fused), to_cpu_layout(d2)
    x = torch.randn(5, 64, dtype=torch.float64)
    ids = torch.tensor([[0, 2], [2, 0], [0, 0], [2, 2], [0, 2]])  # experts 1 and 3: no tokens
    weights = torch.rand(5, 2)
    y = moe_block(x, weights, ids, cuda13, cuda2)
    torch.testing.assert_close(y, moe_block_reference(x, weights, ids, cpu13, cpu2))
    # and against a from-scratch fp64 evaluation of the definition
    w13, w2 = packed_dequantize(fused, torch.float64), packed_dequantize(d2, torch.float64)
    expect = torch.zeros_like(x)
    for t in range(5):
        for j in range(2):
            gu = w13[ids[t, j]] @ x[t]
            expect[t] += weights[t, j].double() * (w2[ids[t, j]] @ (F.silu(gu[:64]) * gu[64:]))
    torch.testing.assert_close(y, expect)


def test_bad_arguments_name_the_argument():
    w = to_cuda_layout(packed_weight((32, 64), QuantScheme(4, 32, True)), "cpu")
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="w is on cpu but x is on meta"):
        quant_matmul(x.to("meta"), w)
    with pytest.raises(TypeError, match="CpuQuantWeight or CudaQuantWeight"):
        quant_matmul(x, torch.randn(32, 64))
    s = QuantScheme(4, 32, True)
    w13 = to_cuda_layout(packed_weight((2, 64, 64), s), "cpu")
    w2 = to_cuda_layout(packed_weight((2, 64, 32), s), "cpu")
    ids, weights = torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1)
    with pytest.raises(TypeError, match="one layout"):
        moe_block(x, weights, ids, w13, to_cpu_layout(packed_weight((2, 64, 32), s)))
    with pytest.raises(ValueError, match=r"w2 must be \[E, H, I\]"):
        moe_block(x, weights, ids, w13, w13)
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        moe_block(x, weights.double(), ids, w13, w2)
    assert moe_block(x, weights, ids, w13, w2).shape == (2, 64)


def test_registered_ops():
    w = to_cuda_layout(packed_weight((32, 64), QuantScheme(4, 32, False)), "cpu")
    x = torch.randn(3, 64)
    torch.library.opcheck(qm._cuda_quant_matmul_op, (x, w.qweight, w.scales, w.zeros, w.bits,
                                                     w.group_size, w.out_features, w.in_features))
    s = QuantScheme(4, 32, True)
    w13 = to_cuda_layout(packed_weight((4, 64, 64), s), "cpu")
    w2 = to_cuda_layout(packed_weight((4, 64, 32), s), "cpu")
    ids = torch.tensor([[0, 1], [3, 1], [1, 0]])
    torch.library.opcheck(moe_mod._cuda_moe_block_op, (
        x, torch.rand(3, 2), ids, w13.qweight, w13.scales, w13.zeros, w13.bits, w13.group_size,
        w2.qweight, w2.scales, w2.zeros, w2.bits, w2.group_size))


@pytest.fixture
def compiled_cuda():
    """The CUDA entry points of _C (callable without a GPU up to their first CUDA call)."""
    ext = extension()
    if ext is None or not hasattr(ext, "cuda_quant_matmul"):
        pytest.skip("this install's _C was built without the CUDA quant kernels")
    return ext


def test_workspace_layout(compiled_cuda):
    """GEMV path: h [P, I] in x's dtype; routed path: h, sorted pairs, 3 tile lists of
    ceil(P / 64) + min(E, P), the tile count, fp32 pair outputs [P, H]; each 256-aligned."""
    def al(n):
        return -(-n // 256) * 256

    for t, k, e, h, i in [(1, 6, 64, 2048, 1408), (9, 6, 64, 2048, 1408), (1000, 2, 3, 96, 40)]:
        p = t * k
        tiles = -(-p // 64) + min(e, p)
        gemv = al(p * i * 2)
        mma = gemv + al(p * 4) + 3 * al(tiles * 4) + al(4) + al(p * h * 4)
        assert compiled_cuda.cuda_moe_workspace_bytes(t, k, e, h, i, 1) == gemv
        assert compiled_cuda.cuda_moe_workspace_bytes(t, k, e, h, i, 2) == mma
        assert compiled_cuda.cuda_moe_workspace_bytes(t, k, e, h, i, 0) == (gemv if t <= 8
                                                                             else mma)


def test_entry_points_check_before_launching(compiled_cuda):
    """Bad arguments raise before any CUDA call (fake, aligned device addresses)."""
    ext = compiled_cuda
    bf16, f32 = qm.DTYPE_CODES[torch.bfloat16], qm.DTYPE_CODES[torch.float32]
    good = (4096, 8192, 0, bf16, 4, 64, 128, 128, 32)
    with pytest.raises(ValueError, match="bfloat16 or float16 activations"):
        ext.cuda_quant_matmul(4096, f32, 1, good, 4096, 0, 0)
    with pytest.raises(ValueError, match="path must be"):
        ext.cuda_quant_matmul(4096, bf16, 1, good, 4096, 3, 0)
    with pytest.raises(ValueError, match="in_features % 8 == 0"):
        ext.cuda_quant_matmul(4096, bf16, 1, (4096, 8192, 0, bf16, 4, 64, 36, 64, 64), 4096, 0, 0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        ext.cuda_quant_matmul(4098, bf16, 1, good, 4096, 0, 0)
    with pytest.raises(ValueError, match="scales must be bfloat16 or float16"):
        ext.cuda_quant_matmul(4096, bf16, 1, good[:3] + (f32,) + good[4:], 4096, 0, 0)
    ext.cuda_quant_matmul(4096, bf16, 0, good, 4096, 0, 0)  # no rows: nothing to launch
    w13 = (4096, 8192, 0, bf16, 4, 64, 128, 128, 32)  # [E, 2I = 64, H = 128]
    w2 = (4096, 8192, 0, bf16, 4, 128, 32, 32, 32)    # [E, H = 128, I = 32]
    need = ext.cuda_moe_workspace_bytes(3, 2, 4, 128, 32, 0)
    with pytest.raises(ValueError, match=f"hold {need} bytes"):
        ext.cuda_moe_block(4096, bf16, 3, 4096, 4096, 2, 4, w13, w2, 4096, 4096, need - 1, 0, 0)
    with pytest.raises(ValueError, match="w13 must be"):
        ext.cuda_moe_block(4096, bf16, 3, 4096, 4096, 2, 4, w13, w13, 4096, 4096, need, 0, 0)


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.fixture
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ext = extension()
    if ext is None or not hasattr(ext, "cuda_quant_matmul"):
        pytest.skip("this install's _C was built without the CUDA quant kernels")
    return ext


EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff, relative


def matmul_check(y, x, wd):
    """Elementwise bound of the module docstring, plus: no worse than torch in x's dtype."""
    x64 = x.double()
    y_o = x64 @ wd.T
    mag = x64.abs() @ wd.abs().T
    tol = EPS[x.dtype] * y_o.abs() + 2.0 ** -14 * mag + 1e-30
    err = (y.double() - y_o).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max():.3g} at {(err - tol).argmax()}"
    torch_err = (F.linear(x, wd.to(x.dtype)).double() - y_o).norm()
    assert (y.double() - y_o).norm() <= 2 * torch_err + 1e-6 * y_o.norm()


MATMUL_SHAPES = [  # (N, K, scheme): N not a multiple of 64, K at and off group boundaries
    (1408, 2048, QuantScheme(4, 128, True)), (2832, 2048, QuantScheme(4, 64, False)),
    (2048, 1408, QuantScheme(4, 32, False)), (576, 2048, QuantScheme(8, None, True)),
    (200, 1400, QuantScheme(8, None, False)), (72, 1400, QuantScheme(4, None, True)),
    (130, 256, QuantScheme(8, 128, False))]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,scheme", MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("path", ["auto", "gemv", "mma"])
def test_quant_matmul_on_gpu(cuda_kernels, n, k, scheme, path):
    w = to_cuda_layout(packed_weight((n, k), scheme, seed=n + k), "cuda")
    wd = dequantize(w, torch.float64)
    for m in (1, 2, 3, 7, 8, 9, 33, 130):
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, device="cuda", generator=None).to(dtype)
            y = qm._run_cuda(x, w, path)
            assert y.shape == (m, n) and y.dtype == dtype
            matmul_check(y, x, wd)
            if path == "auto":
                assert torch.equal(quant_matmul(x, w), y)


@pytest.mark.gpu
def test_quant_matmul_special_values(cuda_kernels):
    w = to_cuda_layout(packed_weight((64, 128), QuantScheme(4, 32, True)), "cuda")
    for path in ("gemv", "mma"):
        x = torch.randn(3, 128, device="cuda", dtype=torch.bfloat16)
        x[0] = 0
        x[1, 5] = float("nan")
        y = qm._run_cuda(x, w, path)
        assert (y[0] == 0).all() and y[1].isnan().all() and y[2].isfinite().all()
    assert quant_matmul(x[:0], w).shape == (0, 64)
    buf = torch.randn(3 * 128 + 1, device="cuda", dtype=torch.bfloat16)
    odd = buf[1:].view(3, 128)  # 2 bytes off 16-byte alignment: the op copies it
    assert odd.data_ptr() % 16 == 2
    assert torch.equal(quant_matmul(odd, w), quant_matmul(odd.clone(), w))


@pytest.mark.gpu
def test_unsupported_cuda_calls_take_the_reference(cuda_kernels):
    w = to_cuda_layout(packed_weight((24, 36), QuantScheme(4, None, True)), "cuda")  # K % 8 != 0
    x = torch.randn(2, 36, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(quant_matmul(x, w), quant_matmul_reference(x, w))
    w = to_cuda_layout(packed_weight((24, 64), QuantScheme(4, 32, True)), "cuda")
    x32 = torch.randn(2, 64, device="cuda")
    assert torch.equal(quant_matmul(x32, w), quant_matmul_reference(x32, w))
    with pytest.raises(ValueError, match="w is on cuda"):
        quant_matmul(x32.cpu(), w)


@pytest.mark.gpu
@pytest.mark.slow
def test_lm_head_shape(cuda_kernels):
    w = to_cuda_layout(packed_weight((163840, 2048), QuantScheme(8, None, True)), "cuda")
    wd = dequantize(w, torch.float32)
    for m in (1, 9):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        matmul_check(quant_matmul(x, w), x, wd.double())


def make_experts(e, hidden, inter, s13, s2, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(e, hidden, inter, generator=g) / inter ** 0.5
    return (to_cuda_layout(quantize_rtn(w13.bfloat16(), s13), device),
            to_cuda_layout(quantize_rtn(w2.bfloat16(), s2), device))


def route(t, e, k, seed, mode="random"):
    g = torch.Generator().manual_seed(seed)
    if mode == "one":  # every token to the last expert (k = 1)
        ids = torch.full((t, 1), e - 1, dtype=torch.int64)
    else:  # a random top-k of the first e // 2 + k experts: the rest get no tokens
        pool = min(e, e // 2 + k)
        ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)])
    return torch.rand(ids.shape, generator=g) + 0.1, ids


def moe_oracle(x, weights, ids, w13, w2):
    """fp64 result and the elementwise bound of the module docstring."""
    eps = EPS[x.dtype]
    x64 = x.double()
    w13d, w2d = dequantize(w13, torch.float64).cpu(), dequantize(w2, torch.float64).cpu()
    inter = w2.in_features
    out, tol = torch.zeros_like(x64), torch.zeros_like(x64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = w13d[e] @ x64[t]
            mag = w13d[e].abs() @ x64[t].abs()
            g, u = gu[:inter], gu[inter:]
            h = F.silu(g) * u
            d_gu = 2.0 ** -14 * mag
            d_h = eps * h.abs() + 1.1 * d_gu[:inter] * (u.abs() + d_gu[inter:]) \
                + (F.silu(g).abs() + 1.1 * d_gu[:inter]) * d_gu[inter:]
            wt = float(weights[t, j])
            out[t] += wt * (w2d[e] @ h)
            tol[t] += abs(wt) * (w2d[e].abs() @ (d_h + 2.0 ** -14 * h.abs()))
    return out, tol + 2 * eps * out.abs() + 1e-30


MOE_CASES = [  # (T, E, k, hidden, inter, routing)
    (1, 8, 6, 256, 128, "random"), (3, 8, 1, 256, 128, "random"), (8, 16, 6, 128, 96, "random"),
    (9, 16, 6, 128, 96, "random"), (40, 8, 2, 256, 64, "random"), (130, 64, 6, 256, 128, "random"),
    (5, 4, 1, 64, 32, "one")]
MOE_SCHEMES = [
    (QuantScheme(4, 32, True), QuantScheme(4, 32, True)),
    (QuantScheme(4, 64, False), QuantScheme(8, None, False)),
    (QuantScheme(8, 32, True), QuantScheme(4, 32, False))]


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k,hidden,inter,mode", MOE_CASES)
@pytest.mark.parametrize("s13,s2", MOE_SCHEMES, ids=str)
@pytest.mark.parametrize("path", ["auto", "gemv", "mma"])
def test_moe_block_on_gpu(cuda_kernels, t, e, k, hidden, inter, mode, s13, s2, path):
    w13, w2 = make_experts(e, hidden, inter, s13, s2, "cuda", seed=t + e)
    weights, ids = route(t, e, k, seed=t, mode=mode)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(k)).to(dtype)
        y_o, tol = moe_oracle(x, weights, ids, w13, w2)
        xc, wc = x.cuda(), weights.cuda()
        for id_dtype in (torch.int64, torch.int32):
            y = moe_mod._run_cuda(xc, wc, ids.to(id_dtype).cuda(), w13, w2, path)
            assert y.shape == x.shape and y.dtype == dtype
            err = (y.double().cpu() - y_o).abs()
            assert (err <= tol).all(), f"{dtype}: max excess {(err - tol).max():.3g}"
        ref = moe_block_reference(xc.double(), wc, ids.cuda(), w13, w2).cpu()
        assert (y.double().cpu() - ref).norm() <= 1e-2 * ref.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["gemv", "mma"])
def test_moe_ids_outside_the_experts_contribute_nothing(cuda_kernels, path):
    s = QuantScheme(4, 32, True)
    w13, w2 = make_experts(4, 64, 32, s, s, "cuda", seed=7)
    weights, ids = route(12, 4, 2, seed=8)
    x = torch.randn(12, 64, dtype=torch.bfloat16, device="cuda")
    bad = ids.clone()
    bad[::3, 1] = 4
    bad[1::3, 0] = -1
    masked = weights.clone()
    masked[bad != ids] = 0
    y = moe_mod._run_cuda(x, weights.cuda(), bad.cuda(), w13, w2, path)
    expect = moe_mod._run_cuda(x, masked.cuda(), ids.cuda(), w13, w2, path)
    assert torch.equal(y, expect)


@pytest.mark.gpu
def test_cuda_graph_replay_is_identical(cuda_kernels):
    s = QuantScheme(4, 128, True)
    w = to_cuda_layout(packed_weight((1408, 2048), s), "cuda")
    w13, w2 = make_experts(16, 256, 128, s, QuantScheme(4, 128, False), "cuda", seed=9)
    for t in (1, 24):  # GEMV / routed tensor-core paths
        x = torch.randn(t, 2048, device="cuda", dtype=torch.bfloat16)
        xm = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16)
        weights, ids = (v.cuda() for v in route(t, 16, 6, seed=t))
        quant_matmul(x, w), moe_block(xm, weights, ids, w13, w2)  # warm up outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = quant_matmul(x, w)
            ym = moe_block(xm, weights, ids, w13, w2)
        for seed in range(3):  # new inputs in place, then replay
            g = torch.Generator(device="cuda").manual_seed(seed)
            x.copy_(torch.randn(x.shape, device="cuda", generator=g))
            xm.copy_(torch.randn(xm.shape, device="cuda", generator=g))
            nw, ni = route(t, 16, 6, seed=100 + seed)
            weights.copy_(nw)
            ids.copy_(ni)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, quant_matmul(x, w))
            assert torch.equal(ym, moe_block(xm, weights, ids, w13, w2))
