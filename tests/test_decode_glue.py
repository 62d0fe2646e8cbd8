"""The decode step's small ops, rewritten with fewer dispatched torch ops (model/layers.py):
RopeTables against the pair-rotation formula they replace (bit for bit) and an fp64 oracle,
RMSNorm (one fused rms_norm) against an fp64 oracle."""

import math

import pytest
import torch

from kimivl_local.model.layers import RMSNorm, RopeTables, apply_rope_interleaved


def pairwise(x, cos, sin):
    """The former formulation: slices, four products, a difference, a sum and a cat."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.to(x.dtype).view(shape), sin.to(x.dtype).view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 64), (5, 3, 10), (7, 2), (1, 64)])
def test_rope_tables_equal_pairwise_formula_and_oracle(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    angles = torch.rand(shape[0], shape[-1] // 2, generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    tables = RopeTables(cos, sin, dtype)
    got = tables.apply(x)
    torch.testing.assert_close(got, pairwise(x, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(apply_rope_interleaved(x, cos, sin), got, rtol=0, atol=0)
    # fp64 oracle, element by element: (a, b) -> (a c - b s, b c + a s), evens then odds.
    xd, c, s = x.double(), cos.to(dtype).double(), sin.to(dtype).double()
    half = shape[-1] // 2
    for j in range(half):
        a, b = xd[..., 2 * j], xd[..., 2 * j + 1]
        cj = c[:, j].view((shape[0],) + (1,) * (x.dim() - 2))
        sj = s[:, j].view((shape[0],) + (1,) * (x.dim() - 2))
        tol = 3 * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -23) * (a.abs() + b.abs())
        assert ((got[..., j].double() - (a * cj - b * sj)).abs() <= tol).all()
        assert ((got[..., half + j].double() - (b * cj + a * sj)).abs() <= tol).all()
    # the view of a split (non-contiguous), as MLA passes q_pe
    wide = torch.randn(shape[:-1] + (shape[-1] + 6,), generator=g).to(dtype)
    view = wide[..., 6:]
    torch.testing.assert_close(tables.apply(view), pairwise(view, cos, sin), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 7, 512, 2048])
def test_rms_norm_matches_fp64_oracle(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g).to(dtype))
    norm = norm.to(dtype)
    x = (torch.randn(3, dim, generator=g) * 5).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    xd = x.double()
    normed = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6)
    want = norm.weight.double() * normed.to(dtype).double()  # the reference rounds to x's dtype
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -22
    # two roundings of the normed value (fp32, then x's dtype) and one of the product
    assert ((got.double() - want).abs() <= 3 * eps * (want.abs() + math.ulp(1.0))).all()
