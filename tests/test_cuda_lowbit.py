"""CUDA kernels for 2, 3, 5 and 6-bit weights: the layout (on the CPU: the converter, and a
scalar emulation of the kernels' unpack step checked against the on-disk codes), the torch
references on that layout, and, on a GPU, the GEMV, tensor-core and MoE paths against fp64
oracles (tolerances: tests/test_cuda_quant.py's docstring; the weights are the same exact
integers u - zero, only narrower)."""

import pytest
import torch
import torch.nn.functional as F

from kimivl_local.ops import moe_block, moe_block_reference, quant_matmul
from kimivl_local.quant import QuantScheme, to_cpu_layout
from kimivl_local.quant.cuda_layout import (LOWBIT_PARTS, CudaQuantWeight, _pack_rows, dequantize,
                                            kernel_supports, to_cuda_layout, unpack_codes)
from kimivl_local.quant.packing import concat_out_features, unpack
from kimivl_local.quant.packing import dequantize as packed_dequantize

from test_cuda_quant import (compiled_cuda, cuda_kernels, make_experts, matmul_check,  # noqa: F401
                             moe_mod, moe_oracle, packed_weight, qm, route)

WIDTHS = (2, 3, 5, 6)
SCHEMES = [QuantScheme(bits, group, sym) for bits in WIDTHS for group in (32, 64, 128, None)
           for sym in (True, False)]


# ---- layout (CPU) ------------------------------------------------------------------------------

ROUND_TRIP = [(s, n, k) for s in SCHEMES  # odd N; K off the 32 grid (per-channel)
              for n, k in [(37, 256), (1, 128), (5, 1408), (3, 40), (64, 200)]
              if s.group_size is None or k % s.group_size == 0]


@pytest.mark.parametrize("scheme,n,k", ROUND_TRIP, ids=str)
def test_round_trip_matches_the_on_disk_dequantization(scheme, n, k):
    packed = packed_weight((n, k), scheme, seed=n * k + scheme.bits)
    w = to_cuda_layout(packed, "cpu")
    assert w.qweight.shape == (n, -(-k // 32) * scheme.bits)  # `bits` words per 32-k chunk
    assert (w.zeros is None) == scheme.symmetric
    assert torch.equal(dequantize(w, torch.float64), packed_dequantize(packed, torch.float64))
    assert torch.equal(w.qweight, _pack_rows(unpack(packed)[0], scheme.bits, w.padded_in_features))


def kernel_code(words: list[int], bits: int, k: int) -> int:
    """qgemm_lowbit.cuh lowbit_code, statement for statement, on a chunk's words (uint32)."""
    low = 2 if bits <= 3 else 4
    high = bits - low
    lp = 32 // low
    u = (words[k // lp] >> (low * (k % lp))) & ((1 << low) - 1)
    if high:
        hp = 32 // high
        u |= ((words[low + k // hp] >> (high * (k % hp))) & ((1 << high) - 1)) << low
    return u


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("sym", [True, False])
def test_kernel_unpack_reads_the_codes_exactly(bits, sym):
    """What the kernels read from each chunk (emulated in Python from the raw words) is the
    on-disk code of every k, padding (k >= K) reads 0, and unpack_codes (the torch references'
    reader) agrees; the chunk's parts are exactly LOWBIT_PARTS."""
    assert sum(LOWBIT_PARTS[bits]) == bits
    n, k = 3, 72  # KP 96: three chunks, the last one mostly padding
    packed = packed_weight((n, k), QuantScheme(bits, None, sym), seed=bits)
    w = to_cuda_layout(packed, "cpu")
    codes = (unpack(packed)[0].to(torch.int16) + (1 << (bits - 1))).tolist()
    words = (w.qweight.to(torch.int64) & 0xFFFFFFFF).tolist()
    for row in range(n):
        for kk in range(w.padded_in_features):
            chunk = words[row][kk // 32 * bits:(kk // 32 + 1) * bits]
            want = codes[row][kk] if kk < k else 0
            assert kernel_code(chunk, bits, kk % 32) == want, (row, kk)
    assert unpack_codes(w)[:, :k].tolist() == codes


def test_fp32_magic_conversion_is_exact():
    """qgemm_lowbit.cuh code_minus_zero: the fp32 with bits 0x4B000000 | u (2^23 + u) minus
    2^23 + zero is u - zero exactly, for every 6-bit code and zero; and int_pair's fp16/bf16
    pairs hold every such difference exactly."""
    u = torch.arange(64, dtype=torch.int64)[:, None].expand(64, 64)
    zero = torch.arange(64, dtype=torch.float32)[None, :].expand(64, 64)
    magic = (0x4B000000 | u).to(torch.int32).view(torch.float32)
    assert torch.equal(magic - (8388608.0 + zero), (u - zero.long()).float())
    diff = (u - zero.long()).float()
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(diff.to(dtype).float(), diff)


def test_documented_bit_positions():
    """u = k mod 2^bits along one chunk: 2 bits -> words 0xE4E4E4E4 (k at bits 2k); 3 bits ->
    the same two low-part words and a high-bit word with bit k = (k mod 8) >> 2."""
    from kimivl_local.quant.packing import PackedWeight, pack_int32

    def words(bits):
        q = (torch.arange(32) % (1 << bits) - (1 << (bits - 1))).to(torch.int8)[None]
        packed = PackedWeight(pack_int32(q, bits), torch.ones(1, 1, dtype=torch.bfloat16),
                              torch.tensor([1, 32]), None, QuantScheme(bits, None, True))
        return [int(v) & 0xFFFFFFFF for v in to_cuda_layout(packed, "cpu").qweight[0]]

    assert words(2) == [0xE4E4E4E4, 0xE4E4E4E4]
    assert words(3) == [0xE4E4E4E4, 0xE4E4E4E4, 0xF0F0F0F0]
    five = words(5)  # low nibbles k mod 16 in plain order; bit 4 set for k mod 32 >= 16
    assert five[:4] == [0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98] and five[4] == 0xFFFF0000


@pytest.mark.parametrize("bits", WIDTHS)
def test_stacked_experts_convert_one_by_one(bits):
    packed = packed_weight((3, 24, 256), QuantScheme(bits, 64, bits % 2 == 0), seed=bits)
    w = to_cuda_layout(packed, "cpu")
    full = packed_dequantize(packed, torch.float64)
    assert w.num_experts == 3 and torch.equal(dequantize(w, torch.float64), full)
    for e in range(3):
        assert torch.equal(dequantize(w.expert(e), torch.float64), full[e])


def test_every_width_has_a_kernel():
    for bits in WIDTHS:
        assert kernel_supports(QuantScheme(bits, 32), 2048)
        assert kernel_supports(QuantScheme(bits, None, False), 1400)
        assert not kernel_supports(QuantScheme(bits, None), 36)  # K % 8
        assert not kernel_supports(QuantScheme(bits, 16), 64)  # group % 32
    w = to_cuda_layout(packed_weight((8, 64), QuantScheme(4, 32)), "cpu")
    with pytest.raises(ValueError, match="qweight must have shape"):  # 4-bit words, 3 bits said
        CudaQuantWeight(w.qweight, w.scales, None, 3, 32, 8, 64)


def test_references_on_the_layout():
    """The torch references the ops fall back to: quant_matmul on CPU tensors, and the MoE
    block with mixed widths equal on the CUDA and CPU layouts and to the fp64 definition."""
    w = to_cuda_layout(packed_weight((40, 96), QuantScheme(3, 32, False)), "cpu")
    x = torch.randn(3, 96, dtype=torch.float64)
    assert torch.equal(quant_matmul(x, w), x @ dequantize(w, torch.float64).T)
    s13, s2 = QuantScheme(5, 32, False), QuantScheme(2, None, True)
    g13, u13 = (packed_weight((4, 64, 64), s13, seed=s) for s in (2, 3))
    d2 = packed_weight((4, 64, 64), s2, seed=4)
    fused = concat_out_features([g13, u13])
    cuda13, cuda2 = to_cuda_layout(fused, "cpu"), to_cuda_layout(d2, "cpu")
    ids = torch.tensor([[0, 2], [2, 0], [3, 3]])
    weights = torch.rand(3, 2)
    x = torch.randn(3, 64, dtype=torch.float64)
    y = moe_block(x, weights, ids, cuda13, cuda2)
    torch.testing.assert_close(y, moe_block_reference(x, weights, ids, to_cpu_layout(fused),
                                                      to_cpu_layout(d2)))
    w13, w2 = packed_dequantize(fused, torch.float64), packed_dequantize(d2, torch.float64)
    expect = torch.zeros_like(x)
    for t in range(3):
        for j in range(2):
            gu = w13[ids[t, j]] @ x[t]
            expect[t] += weights[t, j].double() * (w2[ids[t, j]] @ (F.silu(gu[:64]) * gu[64:]))
    torch.testing.assert_close(y, expect)


def test_entry_points_take_every_width(compiled_cuda):  # noqa: F811
    """The compiled checks (no GPU needed: they run before any CUDA call)."""
    bf16 = qm.DTYPE_CODES[torch.bfloat16]
    for bits in (2, 3, 4, 5, 6, 8):
        compiled_cuda.cuda_quant_matmul(4096, bf16, 0, (4096, 8192, 0, bf16, bits, 64, 128, 128,
                                                        32), 4096, 0, 0)
    with pytest.raises(ValueError, match="bits must be 2, 3, 4, 5, 6 or 8, got 7"):
        compiled_cuda.cuda_quant_matmul(4096, bf16, 0, (4096, 8192, 0, bf16, 7, 64, 128, 128, 32),
                                        4096, 0, 0)


# ---- GPU ---------------------------------------------------------------------------------------

MATMUL_SHAPES = [  # (N, K, group, symmetric): N off 64, K off the group grid, K padding
    (1408, 2048, 128, True), (2832, 2048, 64, False), (2048, 1408, 32, False),
    (200, 1400, None, False), (72, 1400, None, True), (24, 40, None, False), (130, 256, 32, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n,k,group,sym", MATMUL_SHAPES)
@pytest.mark.parametrize("path", ["auto", "gemv", "mma"])
def test_lowbit_matmul_on_gpu(cuda_kernels, bits, n, k, group, sym, path):  # noqa: F811
    w = to_cuda_layout(packed_weight((n, k), QuantScheme(bits, group, sym), seed=n + k + bits),
                       "cuda")
    wd = dequantize(w, torch.float64)
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 130):
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, device="cuda").to(dtype)
            y = qm._run_cuda(x, w, path)
            assert y.shape == (m, n) and y.dtype == dtype
            matmul_check(y, x, wd)
            if path == "auto":
                assert torch.equal(quant_matmul(x, w), y)


MOE_CASES = [  # (T, E, k, hidden, inter, routing)
    (1, 8, 6, 256, 128, "random"), (8, 16, 6, 128, 96, "random"), (9, 16, 6, 128, 96, "random"),
    (130, 64, 6, 256, 128, "random"), (5, 4, 1, 64, 32, "one")]
MOE_SCHEMES = [  # every low width on both sides, mixed with each other and with 4 and 8 bits
    (QuantScheme(3, 32, True), QuantScheme(2, 32, False)),
    (QuantScheme(5, 64, False), QuantScheme(6, None, True)),
    (QuantScheme(2, None, False), QuantScheme(4, 32, True)),
    (QuantScheme(6, 32, True), QuantScheme(3, None, False)),
    (QuantScheme(8, 64, True), QuantScheme(5, 32, True))]


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k,hidden,inter,mode", MOE_CASES)
@pytest.mark.parametrize("s13,s2", MOE_SCHEMES, ids=str)
@pytest.mark.parametrize("path", ["gemv", "mma"])  # auto picks one of them (test_cuda_quant)
def test_lowbit_moe_block_on_gpu(cuda_kernels, t, e, k, hidden, inter, mode, s13, s2,  # noqa: F811
                                 path):
    w13, w2 = make_experts(e, hidden, inter, s13, s2, "cuda", seed=t + e)
    weights, ids = route(t, e, k, seed=t, mode=mode)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(k)).to(dtype)
        y_o, tol = moe_oracle(x, weights, ids, w13, w2)
        y = moe_mod._run_cuda(x.cuda(), weights.cuda(), ids.to(torch.int32).cuda(), w13, w2, path)
        assert y.shape == x.shape and y.dtype == dtype
        err = (y.double().cpu() - y_o).abs()
        assert (err <= tol).all(), f"{dtype}: max excess {(err - tol).max():.3g}"
