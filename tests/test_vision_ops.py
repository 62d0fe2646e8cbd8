"""The fused vision ops (ops/vision_ops.py) against fp64 oracles on every CPU path, and the
torch fallback against the same oracles."""

import math

import pytest
import torch
from kernel_support import ISAS, force_isa

from kimivl_local.kernels import bridge as _bridge
from kimivl_local.ops.vision_ops import (
    add_layer_norm,
    bias_gelu_,
    bias_rope_,
    rope_tables,
)

EPS32 = torch.finfo(torch.float32).eps
BF16_ROUNDOFF = 2.0 ** -8  # relative error of a round-to-nearest bf16 store (8-bit significand)


@pytest.fixture(params=ISAS + ["torch"])
def path(request, monkeypatch):
    """A kernel ISA path, or "torch": the reference backend's torch body."""
    if request.param == "torch":
        monkeypatch.setattr(_bridge, "_backend", "reference")
    else:
        for op in ("add_layer_norm", "bias_gelu", "bias_rope"):
            force_isa(monkeypatch, request.param, op)
    return request.param


def strided(rows: int, cols: int, gen, dtype=torch.float32, scale=1.0, shift=0.0) -> torch.Tensor:
    """[rows, cols] with a row stride longer than cols (the kernels take strided rows)."""
    full = (scale * torch.randn(rows, cols + 5, generator=gen) + shift).to(dtype)
    return full[:, 2:cols + 2]


def within(got: torch.Tensor, want: torch.Tensor, rel: float, abs_: float) -> bool:
    err = (got.double() - want).abs()
    return bool((err <= rel * want.abs() + abs_).all())


@pytest.mark.parametrize("rows, dim", [(1, 1), (7, 15), (37, 33), (5, 100), (3, 1152)])
@pytest.mark.parametrize("delta_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_layer_norm_matches_fp64(path, rows, dim, delta_dtype, out_dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + dim)
    x = strided(rows, dim, gen, scale=3.0, shift=0.5)  # a mean away from 0 tests the centring
    w, b, db = (torch.randn(dim, generator=gen) for _ in range(3))
    delta = None if delta_dtype is None else strided(rows, dim, gen, delta_dtype)
    x64 = x.double() + (0 if delta is None else delta.double() + db.double())
    sum_abs = x.double().abs() + (0 if delta is None else delta.double().abs() + db.double().abs())
    want = torch.nn.functional.layer_norm(x64, (dim,), w.double(), b.double(), 1e-5)

    out = add_layer_norm(x, w, b, 1e-5, delta=delta, delta_bias=None if delta is None else db,
                         out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (rows, dim)
    assert within(x, x64, 0.0, 2 * EPS32 * sum_abs)  # x + (delta + bias): two fp32 roundings
    # fp32 mean/variance over dim terms: error ~dim eps relative to the normalised row (|z| <~ 4
    # sigma), times |w|, plus the bf16 rounding of the result.
    scale = w.double().abs() * 4 + 1e-3
    rel = BF16_ROUNDOFF if out_dtype == torch.bfloat16 else 0.0
    assert within(out, want, rel, 8 * (dim + 4) * EPS32 * scale.max().item())


@pytest.mark.parametrize("rows, dim", [(1, 1), (9, 17), (33, 100), (4, 4304)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_matches_fp64(path, rows, dim, dtype, with_bias):
    gen = torch.Generator().manual_seed(rows + 7 * dim)
    y = strided(rows, dim, gen, dtype, scale=4.0)  # covers the tails (|u| > 10) too
    bias = torch.randn(dim, generator=gen) if with_bias else None
    u = y.double() + (0 if bias is None else bias.double())
    want = torch.nn.functional.gelu(u, approximate="tanh")
    bias_gelu_(y, bias)
    # fp32: the exp2 polynomial (2e-7), the division and the input's rounding; u * 1e-6 covers
    # the cancellation in 1 + tanh where gelu(u) << |u|.
    rel = BF16_ROUNDOFF + 4 * EPS32 if dtype == torch.bfloat16 else 8 * EPS32
    assert within(y, want, rel, 1e-7 * u.abs())


def test_bias_gelu_keeps_nan_and_saturates(path):
    y = torch.tensor([[float("nan"), -200.0, 200.0, 0.0, -1e30, 1e30] + [0.5] * 11])
    bias_gelu_(y, None)
    assert math.isnan(y[0, 0])
    assert y[0, 1] <= 0 and y[0, 1] > -1e-30
    assert y[0, 2] == 200.0 and y[0, 3] == 0.0 and y[0, 5] == 1e30
    assert y[0, 4] == 0.0


@pytest.mark.parametrize("rows, heads, head_dim", [(1, 1, 2), (7, 3, 6), (37, 2, 18),
                                                   (5, 16, 72), (3, 1, 34)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_rope_matches_fp64(path, rows, heads, head_dim, dtype, with_bias):
    gen = torch.Generator().manual_seed(rows * 100 + heads * 10 + head_dim)
    width = 3 * heads * head_dim
    qkv = strided(rows, width + 3, gen, dtype)  # extra columns past v stay untouched
    before = qkv.clone()
    bias = torch.randn(width, generator=gen) if with_bias else None
    angles = torch.rand(rows, head_dim // 2, generator=gen) * 40
    freqs = torch.polar(torch.ones_like(angles), angles)
    cos, sin = rope_tables(freqs)

    u = qkv[:, :width].double() + (0 if bias is None else bias.double())
    pairs = u[:, :2 * heads * head_dim].view(rows, 2 * heads, head_dim // 2, 2)
    rot = torch.view_as_complex(pairs.contiguous()) * freqs.to(torch.complex128)[:, None]
    want = u.clone()
    want[:, :2 * heads * head_dim] = torch.view_as_real(rot).reshape(rows, -1)

    bias_rope_(qkv, bias, cos, sin, heads, head_dim)
    rel = BF16_ROUNDOFF if dtype == torch.bfloat16 else 0.0
    mag = u.abs().max().item()
    assert within(qkv[:, :width], want, rel, 6 * EPS32 * mag)
    assert torch.equal(qkv[:, width:], before[:, width:])


def test_refuses_bad_arguments():
    x = torch.randn(4, 8)
    w = torch.ones(8)
    with pytest.raises(ValueError, match="x must be a float32"):
        add_layer_norm(x.bfloat16(), w, None, 1e-5)
    with pytest.raises(ValueError, match="weight must be a float32 tensor of shape"):
        add_layer_norm(x, torch.ones(7), None, 1e-5)
    with pytest.raises(ValueError, match="delta must have 8 columns"):
        add_layer_norm(x, w, None, 1e-5, delta=torch.randn(4, 9))
    with pytest.raises(ValueError, match="delta_bias needs delta"):
        add_layer_norm(x, w, None, 1e-5, delta_bias=w)
    with pytest.raises(ValueError, match="eps must be > 0"):
        add_layer_norm(x, w, None, 0.0)
    with pytest.raises(ValueError, match="y must be a 2-D"):
        bias_gelu_(torch.randn(2, 3, 4), None)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        bias_gelu_(torch.randn(8, 4).t(), None)
    cos = sin = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="head_dim must be even"):
        bias_rope_(torch.randn(4, 15), None, cos, sin, 1, 5)
    with pytest.raises(ValueError, match="qkv must have >= 18 columns"):
        bias_rope_(torch.randn(4, 12), None, cos, sin, 1, 6)
    with pytest.raises(ValueError, match="cos must be a contiguous float32"):
        bias_rope_(torch.randn(4, 18), None, torch.zeros(3, 6), sin, 1, 6)
