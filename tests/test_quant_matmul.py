"""quant_matmul against fp64 oracles, on every CPU kernel path this machine can run.

Tolerances (mag = sum_k |W[n,k] * x_hat[k]|, computed in fp64):
  * exact-math oracle, y_o = dequant(W) . x_hat with x_hat the kernel's int8 activations
    (quantize_activations_reference): the integer dot products are exact, and the kernel rounds in
    fp32 about once per 32-K chunk and per group, so |y - y_o| <= 2 (KC + G + 8) 2^-24 mag;
    a bf16 output adds one rounding, 2^-8 |y_o| (8 significant bits).
  * true product, y_t = dequant(W) . x: the activation error is at most half an int8 step,
    amax_block / 254, per element, so |y - y_t| <= sum_k |W[n,k]| amax_b(k) / 254 plus the above;
    over random data the relative RMS error stays below 1% (about 0.4% expected for int8 per 32).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kimivl_local
from kimivl_local.kernels.extension import extension as kernel_extension
from kimivl_local.ops import quant_matmul, quant_matmul_reference, quantize_activations_reference
from kimivl_local.quant import QuantScheme, quantize_rtn, to_cpu_layout
from kimivl_local.quant.cpu_layout import CpuQuantWeight, dequantize

from kernel_support import ISAS, bf16_tiles, force_isa

qm = sys.modules["kimivl_local.ops.quant_matmul"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Force one kernel path; skip the paths this CPU (or this install) cannot run."""
    return force_isa(monkeypatch, request.param, "quant_matmul")


def make_weight(n, k, bits, group, sym, scale_dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
    return to_cpu_layout(quantize_rtn(w.to(scale_dtype), QuantScheme(bits, group, sym)))


def tolerance(x, w, out_dtype, bf16=False):
    """(exact-oracle result, its bound) and (true product, its bound) as described above, for
    activations quantized to int8 per 32 K, or for the AMX path's bf16 operands (bf16=True,
    kernel_support.bf16_tiles)."""
    wd = dequantize(w, torch.float64)
    x64 = x.double()
    y_true = x64 @ wd.T
    if bf16:
        # s * (v - z) is exact in fp32, so the kernel's weight is wd rounded once to bf16.
        xh, wh = x.float().bfloat16().double(), wd.float().bfloat16().double()
        y_exact, mag = xh @ wh.T, xh.abs() @ wh.abs().T
        tol = 2 * (-(-w.in_features // 32) * 32 + 8) * 2.0 ** -24 * mag
        if out_dtype == torch.bfloat16:
            tol = tol + 2.0 ** -8 * y_exact.abs()
        # each operand is within 2^-9 of its own value
        return y_exact, tol, y_true, tol + 1.01 * 2.0 ** -8 * (x64.abs() @ wd.abs().T) + 1e-12
    xh = quantize_activations_reference(x)
    y_exact, mag = xh @ wd.T, xh.abs() @ wd.abs().T
    kc, g = -(-w.in_features // 32), -(-w.in_features // 32) * 32 // w.group_size
    tol = 2 * (kc + g + 8) * 2.0 ** -24 * mag
    if out_dtype == torch.bfloat16:
        tol = tol + 2.0 ** -8 * y_exact.abs()
    blocks = torch.nn.functional.pad(x64, (0, (-x.shape[1]) % 32)).unflatten(-1, (-1, 32))
    half_step = (blocks.abs().amax(-1, keepdim=True) / 254).expand_as(blocks).flatten(-2)
    half_step = half_step[:, :x.shape[1]]
    return y_exact, tol, y_true, tol + half_step @ wd.abs().T + 1e-12


SHAPES = [  # (N, K, group): N not a multiple of 16, K at a group boundary, K = one group,
    (50, 256, 32), (50, 256, 64), (33, 384, 128), (24, 128, 128), (40, 200, None), (16, 64, None)]


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k,group", SHAPES)
# 2, 3, 5, 6 bits: the other symmetry of each is in test_moe_kernel's schemes.
@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False), (2, True),
                                      (3, False), (5, False), (6, False)])
def test_against_fp64(isa, m, n, k, group, bits, sym):
    w = make_weight(n, k, bits, group, sym, seed=n + k)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        y = quant_matmul(x, w)
        assert y.shape == (m, n) and y.dtype == dtype
        y_exact, tol, y_true, loose = tolerance(x, w, dtype, bf16_tiles(isa, m))
        err = (y.double() - y_exact).abs()
        assert (err <= tol).all(), f"max excess {(err - tol).max():.3g}"
        assert ((y.double() - y_true).abs() <= loose).all()
        assert (y.double() - y_true).norm() <= 1e-2 * y_true.norm()


@pytest.mark.parametrize("bits,sym", [(4, True), (8, False), (3, True)])
def test_every_row_count_of_a_tile(isa, bits, sym):
    """M = 1..17: every micro-kernel row count (up to 8 rows per call on AVX-512, 4 elsewhere)
    and the tails after full tiles."""
    w = make_weight(40, 320, bits, 64, sym, seed=bits)
    x = torch.randn(17, 320, generator=torch.Generator().manual_seed(bits))
    for m in range(1, 18):
        y = quant_matmul(x[:m], w)
        y_exact, tol, _, _ = tolerance(x[:m], w, torch.float32, bf16_tiles(isa, m))
        err = (y.double() - y_exact).abs()
        assert (err <= tol).all(), f"M={m}: max excess {(err - tol).max():.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_prefill_rows(isa, bits):
    """M = 512 (many row tiles and column items), fp16 scales, leading batch dims."""
    w = make_weight(72, 256, bits, 128, False, scale_dtype=torch.float16)
    x = torch.randn(2, 256, 256)
    y = quant_matmul(x, w)
    assert y.shape == (2, 256, 72)
    y_exact, tol, _, _ = tolerance(x.view(512, 256), w, torch.float32, bf16_tiles(isa, 512))
    assert ((y.view(512, 72).double() - y_exact).abs() <= tol).all()


def test_threads_do_not_change_the_result(isa, monkeypatch):
    w = make_weight(1000, 1024, 4, 128, True)  # 2 * 7 * 1000 * 1024 ops: enough for 2 threads
    x = torch.randn(7, 1024)
    monkeypatch.setenv("KIMIVL_NUM_THREADS", "1")
    one = quant_matmul(x, w)
    monkeypatch.setenv("KIMIVL_NUM_THREADS", "2")
    assert torch.equal(quant_matmul(x, w), one)  # each output is summed by one thread, in order


def test_special_values(isa):
    w = make_weight(32, 64, 4, 32, True)
    x = torch.randn(3, 64)
    x[0] = 0.0
    x[1, 5] = float("nan")
    y = quant_matmul(x, w)
    assert (y[0] == 0).all() and y[1].isnan().all() and y[2].isfinite().all()
    assert quant_matmul(x[:0], w).shape == (0, 32)


def test_fallback_without_extension_is_the_reference(monkeypatch):
    monkeypatch.setattr(qm, "kernel", lambda name: None)
    w = make_weight(48, 128, 4, 64, False)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    assert torch.equal(quant_matmul(x, w), quant_matmul_reference(x, w))
    x64 = torch.randn(2, 128, dtype=torch.float64)  # not a kernel dtype: reference, in fp64
    torch.testing.assert_close(quant_matmul(x64, w), x64 @ dequantize(w, torch.float64).T)


def test_registered_op():
    w = make_weight(32, 64, 4, 32, False)
    x = torch.randn(3, 64)
    torch.library.opcheck(qm._quant_matmul_op, (x, w.qweight, w.scales, w.zeros, w.bits,
                                                w.group_size, w.out_features, w.in_features))


def test_bad_arguments_name_the_argument():
    w = make_weight(32, 64, 4, 32, True)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 64\]"):
        quant_matmul(torch.randn(2, 63), w)
    with pytest.raises(ValueError, match="x must be"):
        quant_matmul(x.to(torch.int32), w)
    with pytest.raises(ValueError, match="x must be contiguous"):
        quant_matmul(torch.randn(64, 2).T, w)
    with pytest.raises(TypeError, match="w must be a CpuQuantWeight"):
        quant_matmul(x, torch.randn(32, 64))
    stacked = to_cpu_layout(quantize_rtn(torch.randn(2, 32, 64), QuantScheme(4, 32)))
    with pytest.raises(ValueError, match=r"w must be one \[N, K\] weight"):
        quant_matmul(x, stacked)
    with pytest.raises(ValueError, match="w is on cpu but x is on meta"):
        quant_matmul(x.to("meta"), w)
    with pytest.raises(ValueError, match="scales must have shape"):
        CpuQuantWeight(w.qweight, w.scales[:1], None, 4, 32, 32, 64)


_SPIN_SCRIPT = """
import sys, torch
from kimivl_local.ops import quant_matmul
w, x = torch.load(sys.argv[1], weights_only=False)
torch.save(quant_matmul(x, w), sys.argv[2])
"""


@pytest.mark.parametrize("spin, warned", [
    ("fast", True), ("0", False), *(pytest.param(bad, True, marks=pytest.mark.slow)
                                    for bad in ("-5", "100001", "99999999999999999999"))])
def test_bad_spin_time_is_named_and_the_default_used(spin, warned, tmp_path):
    """KIMIVL_SPIN_US (csrc/cpu/parallel.cpp) that is not a whole number of microseconds up to
    100000 gets one warning naming it, and the pool still computes the same product."""
    if not hasattr(kernel_extension(), "quant_matmul"):
        pytest.skip("no compiled quant_matmul in this install")
    w = make_weight(1000, 1024, 4, 128, True)  # enough work for the pool's second thread
    x = torch.randn(7, 1024)
    torch.save((w, x), tmp_path / "in.pt")
    env = {**os.environ, "KIMIVL_SPIN_US": spin, "KIMIVL_NUM_THREADS": "2",
           "PYTHONPATH": str(Path(kimivl_local.__file__).parents[1])}  # this test's build
    # cwd: `python -c` puts it first on sys.path, where a source checkout without _C may sit
    run = subprocess.run([sys.executable, "-c", _SPIN_SCRIPT, str(tmp_path / "in.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, check=True,
                         timeout=120, env=env, cwd=tmp_path)
    warnings = [line for line in run.stderr.splitlines() if "KIMIVL_SPIN_US" in line]
    if warned:
        assert warnings == [(f"kimivl-local: warning: KIMIVL_SPIN_US={spin} is not a whole number"
                             " of microseconds from 0 to 100000; using 100")]
    else:
        assert warnings == []
    assert torch.equal(torch.load(tmp_path / "out.pt"), quant_matmul(x, w))
