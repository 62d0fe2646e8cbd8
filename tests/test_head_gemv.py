"""ops.head_gemv (MLA's absorbed per-head products) against an fp64 oracle, every CPU path."""

import pytest
import torch

from kimivl_local.ops.head_gemv import head_gemv, head_gemv_reference

from kernel_support import force_isa

@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h, k, n", [(1, 1, 1), (3, 7, 63), (16, 128, 512), (16, 512, 128),
                                     (2, 5, 65), (5, 33, 130), (1, 300, 200)])
def test_matches_fp64(isa, dtype, h, k, n, monkeypatch):
    force_isa(monkeypatch, isa, "head_gemv")
    gen = torch.Generator().manual_seed(h * 1000 + k + n)
    x = torch.randn(h, k + 3, generator=gen)[:, 1:k + 1]  # strided rows, contiguous last dim
    w = torch.randn(h, k, n, generator=gen).to(dtype)
    want = head_gemv_reference(x, w)
    got = head_gemv(x, w)
    assert got.dtype == torch.float32 and got.shape == (h, n)
    # fp32 accumulation over k terms of the exact products (bf16 weights are exact in fp32)
    bound = 4 * k * torch.finfo(torch.float32).eps * head_gemv_reference(x.abs(), w.abs())
    assert ((got.double() - want).abs() <= bound + 1e-30).all()


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="same H, K"):
        head_gemv(torch.randn(2, 3), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="x must be float32"):
        head_gemv(torch.randn(2, 3).bfloat16(), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="w must be contiguous"):
        head_gemv(torch.randn(2, 3), torch.randn(2, 5, 3).transpose(1, 2))
