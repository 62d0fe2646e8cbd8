"""The on-disk pack-quantized format (kimivl_local.quant.packing) against compressed-tensors, and
the CPU kernel layout (kimivl_local.quant.cpu_layout) against its documented byte formula."""

import pytest
import torch

from kimivl_local.quant import (CpuQuantWeight, PackedWeight, QuantScheme, concat_out_features,
                                dequantize, pack_int32, quantize_rtn, stack_experts, to_cpu_layout,
                                unpack, unpack_int32)
from kimivl_local.quant import cpu_layout
from kimivl_local.quant.packing import BITS

SCHEMES = [QuantScheme(bits, group, sym) for bits in (4, 8) for group in (32, 64, 128, None)
           for sym in (True, False)]
# The other widths: each with a group, per-channel, symmetric and not.
LOW_BIT_SCHEMES = [QuantScheme(bits, group, sym) for bits in (2, 3, 5, 6)
                   for group, sym in ((32, True), (128, False), (None, False), (None, True))]


def _ids(s):
    group = f"g{s.group_size}" if s.group_size else "channel"
    return f"int{s.bits}-{group}-{'sym' if s.symmetric else 'asym'}"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(5, 8), (3, 37), (2, 4, 13), (7, 32), (1, 1)])
def test_pack_roundtrip(bits, shape):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    assert torch.equal(unpack_int32(pack_int32(q, bits), bits, shape[-1]), q)
    assert torch.equal(unpack_int32(pack_int32(q, bits, dim=-2), bits, shape[-2], dim=-2), q)


@pytest.mark.parametrize("bits", BITS)
def test_pack_is_a_dense_bit_stream(bits):
    # Element k at bits k * bits .. of the row's little-endian stream: 3-, 5- and 6-bit values
    # straddle words; the stream is zero-padded to whole words.
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (2, 45), dtype=torch.int8)
    words = pack_int32(q, bits)
    assert words.shape == (2, -(-45 * bits // 32))
    for row in range(2):
        stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words[row].tolist()))
        u = [v + (1 << (bits - 1)) for v in q[row].tolist()]
        assert stream == sum(v << (bits * k) for k, v in enumerate(u))


def test_pack_bit_order():
    # Element k at bits 4 * (k % 8) of word k // 8, offset by +8 (the format's stated convention).
    q = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4, 5]], dtype=torch.int8)
    words = pack_int32(q, 4)
    u = [v + 8 for v in q[0].tolist()] + [0] * 7
    expect = [sum(u[8 * w + i] << (4 * i) for i in range(8)) for w in range(2)]
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == expect


@pytest.mark.parametrize("scheme", SCHEMES + LOW_BIT_SCHEMES, ids=_ids)
def test_rtn_error_within_one_step(scheme):
    torch.manual_seed(0)
    w = torch.randn(24, 256, dtype=torch.bfloat16)
    p = quantize_rtn(w, scheme)
    q, scale, zero = unpack(p)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    step = scale.repeat_interleave(256 // scale.shape[1], dim=1)
    # Round to nearest is within half a step; the clamp of +absmax (symmetric) or a rounded zero
    # point (asymmetric) can cost up to one step at the ends of the range.
    assert ((dequantize(p) - w.float()).abs() <= step * (1 + 1e-6)).all()
    assert ((dequantize(p) - w.float()).abs() <= step / 2 * (1 + 1e-6)).float().mean() > 0.95


@pytest.mark.parametrize("scheme", SCHEMES + LOW_BIT_SCHEMES, ids=_ids)
def test_matches_compressed_tensors(scheme):
    """compressed-tensors' own compressor packs what we pack and decompresses what we wrote."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import (pack_to_int32,
                                                                       unpack_from_int32)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    torch.manual_seed(1)
    ct_scheme = QuantizationScheme(targets=["Linear"],
                                   weights=QuantizationArgs(**scheme.to_config()))
    w = torch.randn(40, 256, dtype=torch.bfloat16)
    ours = quantize_rtn(w, scheme)
    q, _, zero = unpack(ours)
    # Same scale and zero point in, same packed tensors out (ct divides in the input's dtype:
    # fp32 here, as our quantizer does).
    state = {"weight": w.float(), "weight_scale": ours.weight_scale}
    if not scheme.symmetric:
        state["weight_zero_point"] = zero
    packed = PackedQuantizationCompressor.compress(state, ct_scheme)
    assert set(packed) == set(ours.state_dict())
    for name, tensor in ours.state_dict().items():
        assert torch.equal(packed[name], tensor), name
    # ct decompresses in the scale's dtype (bf16); our fp32 dequantization is exact, so rounding
    # it once to bf16 must give ct's result bit for bit.
    back = PackedQuantizationCompressor.decompress(ours.state_dict(), ct_scheme)["weight"]
    assert torch.equal(back, dequantize(ours).to(back.dtype))
    # The raw helpers agree too, on stacked experts and ragged lengths.
    q3 = torch.randint(scheme.qmin, scheme.qmax + 1, (3, 9, 21), dtype=torch.int8)
    assert torch.equal(pack_to_int32(q3, scheme.bits), pack_int32(q3, scheme.bits))
    assert torch.equal(pack_to_int32(q3[0], scheme.bits, packed_dim=0),
                       pack_int32(q3[0], scheme.bits, dim=-2))
    assert torch.equal(unpack_from_int32(pack_int32(q, scheme.bits), scheme.bits, q.shape), q)
    assert ct.__version__


def test_symmetric_scales_match_compressed_tensors_observer():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(16, 256)
    for scheme in (QuantScheme(4, 64, True), QuantScheme(8, 128, True)):
        groups = w.unflatten(-1, (-1, scheme.group_size))
        args = QuantizationArgs(**scheme.to_config())
        scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        assert torch.equal(quantize_rtn(w, scheme).weight_scale, scale)


def test_config_roundtrip_and_rejects():
    for s in SCHEMES + LOW_BIT_SCHEMES:
        assert QuantScheme.from_config(s.to_config()) == s
    with pytest.raises(ValueError, match="actorder"):
        QuantScheme.from_config({**SCHEMES[0].to_config(), "actorder": "group"})
    for bits in (1, 7, 16):  # compressed-tensors packs 1 and 7 bits too; nothing here runs them
        with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 5, 6, 8"):
            QuantScheme(bits=bits)


def test_packed_validation_names_the_tensor():
    p = quantize_rtn(torch.randn(16, 128), QuantScheme(4, 32, False))
    bad = PackedWeight(p.weight_packed[:, :-1], p.weight_scale, p.weight_shape,
                       p.weight_zero_point, p.scheme)
    with pytest.raises(ValueError, match="weight_packed must have shape"):
        bad.validate()
    with pytest.raises(KeyError, match="weight_zero_point"):
        no_zero = {k: v for k, v in p.state_dict().items() if "zero" not in k}
        PackedWeight.from_state_dict(no_zero, p.scheme)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize_rtn(torch.randn(4, 100), QuantScheme(4, 32))


def test_concat_and_stack():
    s = QuantScheme(4, 32, False)
    gate, up = (quantize_rtn(torch.randn(n, 64), s) for n in (24, 40))
    both = concat_out_features([gate, up])
    assert torch.equal(dequantize(both), torch.cat([dequantize(gate), dequantize(up)]))
    experts = [quantize_rtn(torch.randn(24, 64), s) for _ in range(3)]
    stacked = stack_experts(experts)
    assert torch.equal(dequantize(stacked), torch.stack([dequantize(e) for e in experts]))


@pytest.mark.parametrize("scheme", SCHEMES + LOW_BIT_SCHEMES, ids=_ids)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_cpu_layout_is_lossless(scheme, scale_dtype):
    torch.manual_seed(2)
    k = 200 if scheme.group_size is None else 256  # per-channel: K padded to 224 in the layout
    for shape in ((37, k), (3, 21, k)):
        p = quantize_rtn(torch.randn(shape), scheme, scale_dtype=scale_dtype)
        w = to_cpu_layout(p)
        assert w.scales.dtype == scale_dtype
        assert torch.equal(cpu_layout.dequantize(w), dequantize(p))


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(8, 64, False),
                                    QuantScheme(4, None, False), QuantScheme(8, None)]
                         + LOW_BIT_SCHEMES, ids=_ids)
def test_repack_kernel_matches_torch_converter(scheme, monkeypatch):
    """_C.repack_rows writes the bytes of the torch converter, also for fused sources (gate rows
    then up rows) whose boundary falls inside a 16-row block, and for per-channel K=200."""
    from kimivl_local.kernels import bridge as _bridge
    if _bridge.kernel("repack_rows") is None:
        pytest.skip("kimivl_local._C is not built")
    torch.manual_seed(3)
    k = 200 if scheme.group_size is None else 256
    parts = [quantize_rtn(torch.randn(n, k, dtype=torch.bfloat16), scheme) for n in (21, 35)]

    def build():
        w = cpu_layout.allocate(56, k, scheme, torch.bfloat16, num_experts=2)
        for e in range(2):
            cpu_layout.fill_rows(w, parts[0], 0, e)
            cpu_layout.fill_rows(w, parts[1], 21, e)
        return w

    fast = build()
    real_kernel = _bridge.kernel
    monkeypatch.setattr(_bridge, "kernel",
                        lambda name: None if name == "repack_rows" else real_kernel(name))
    slow = build()
    assert torch.equal(fast.qweight, slow.qweight)
    assert torch.equal(fast.scales, slow.scales)
    assert fast.zeros is None or torch.equal(fast.zeros, slow.zeros)
    expect = torch.cat([dequantize(p) for p in parts])
    assert torch.equal(cpu_layout.dequantize(fast), torch.stack([expect, expect]))


def test_fill_rows_refuses_what_does_not_fit():
    w = cpu_layout.allocate(32, 64, QuantScheme(4, 32), torch.bfloat16)
    with pytest.raises(ValueError, match="rows 20..39 outside 0..31"):
        cpu_layout.fill_rows(w, quantize_rtn(torch.randn(20, 64), QuantScheme(4, 32)), 20)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_layout.fill_rows(w, quantize_rtn(torch.randn(8, 64), QuantScheme(8, 32)))


def test_cpu_layout_fp32_scales_become_fp16():
    p = quantize_rtn(torch.randn(16, 64), QuantScheme(4, 32), scale_dtype=torch.float32)
    w = to_cpu_layout(p)
    assert w.scales.dtype == torch.float16
    torch.testing.assert_close(cpu_layout.dequantize(w), dequantize(p), rtol=2 ** -11, atol=0)


@pytest.mark.parametrize("bits", BITS)
def test_cpu_layout_byte_formula(bits):
    """Every byte where the cpu_layout docstring says it is."""
    n, k = 20, 64
    p = quantize_rtn(torch.randn(n, k, dtype=torch.bfloat16), QuantScheme(bits, 32, False))
    q, scale, zero = unpack(p)
    w = to_cpu_layout(p)
    qw = w.qweight
    offset = 0 if bits == 8 else 1 << (bits - 1)
    assert qw.shape[-1] == 64 * bits
    for row in (0, 7, 8, 15, 16, 19):
        b, r = divmod(row, 16)
        for col in range(k):
            c, kk = divmod(col, 32)
            slot, t = divmod(kk, 4)
            v, plane0, at = 0, 0, 0
            for width in cpu_layout.PARTS[bits]:
                j, i = divmod(slot, width)
                byte = int(qw[b, c, 64 * (plane0 + i) + 4 * r + t])
                v |= ((byte >> (width * j)) & ((1 << width) - 1)) << at
                plane0, at = plane0 + width, at + width
            stored = int(q[row, col]) + offset
            assert v == (stored & 0xFF), (row, col)
        for g in range(2):
            assert float(w.scales[b, g, r]) == float(scale[row, g])
            assert int(w.zeros[b, g, r]) == int(zero[row, g]) + offset
    assert (w.scales[1, :, 4:] == 0).all()  # padding rows 20..31


def test_cpu_weight_validation_names_the_tensor():
    w = to_cpu_layout(quantize_rtn(torch.randn(32, 64), QuantScheme(4, 32, False)))
    with pytest.raises(ValueError, match="scales must have shape"):
        CpuQuantWeight(w.qweight, w.scales[:, :1], w.zeros, 4, 32, 32, 64)
    with pytest.raises(ValueError, match="zeros must be one of"):
        CpuQuantWeight(w.qweight, w.scales, w.zeros.to(torch.int32), 4, 32, 32, 64)
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        strided = w.qweight.transpose(0, 1).contiguous().transpose(0, 1)
        CpuQuantWeight(strided, w.scales, w.zeros, 4, 32, 32, 64)
    with pytest.raises(ValueError, match="group_size"):
        CpuQuantWeight(w.qweight, w.scales, w.zeros, 4, 48, 32, 64)
