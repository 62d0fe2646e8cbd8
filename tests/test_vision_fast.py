"""MoonViT's and the projector's bf16 fast CPU path (model/vision.py forward_fast, projector.py):
error against the fp64 oracles, image isolation, the torch fallback of the fused ops, and the
memory planner's count of the bf16 weight copies it makes."""

import pytest
import torch
from test_memory_plan import full_model, plan
from test_vision import (
    GRIDS,
    TEXT_HIDDEN,
    TINY,
    make_inputs,
    make_tower,
    oracle_projector,
    oracle_tower,
    randomize,
    seeded,
)

from kimivl_local.engine.memory_plan import vision_fast_bytes
from kimivl_local.kernels import bridge as _bridge
from kimivl_local.model import vision
from kimivl_local.model.projector import Projector
from kimivl_local.model.vision import TowerLinear


def fast_tower():
    tower = make_tower()
    tower.bf16_linears = True
    return tower


def test_fast_tower_torch_fallback_agrees(monkeypatch):
    """The fused ops' torch bodies (no extension / reference backend) give the same tower: both
    store bf16 at the same points and only fp32 summation orders differ, which now and then
    flips one bf16 rounding (measured: max 0.0097, mean 7e-5 apart; most seeds 1e-6)."""
    tower = fast_tower()
    pixels, grids = make_inputs()
    with torch.no_grad():
        kernels = tower(pixels, grids)
        monkeypatch.setattr(_bridge, "_backend", "reference")
        torch_ops = tower(pixels, grids)
    want = oracle_tower(tower.state_dict(), TINY, pixels, GRIDS)
    for a, b, w in zip(kernels, torch_ops, want):
        assert (a.double() - w).abs().max() < 0.25  # test_vision.py's bound
        assert (a - b).abs().max() < 0.05 and (a - b).abs().mean() < 1e-3


def test_fast_projector_close_to_oracle():
    proj = randomize(Projector(TINY, TEXT_HIDDEN))
    merged = torch.randn(7, 4, 48, generator=seeded(3)) * 3 + 1
    want = oracle_projector(proj.state_dict(), merged)
    proj.bf16_linears = True
    with torch.no_grad():
        out = proj(merged)
    assert out.dtype == torch.float32 and out.shape == (7, TEXT_HIDDEN)
    # bf16 roundings (2^-8 relative each) of the normalised input, both weights and the GELU
    # output: a few 2^-8 of the output's scale (|y| ~11 here, up to 39). Measured (seeds 3-5):
    # max error 0.46% of max |y|, mean error 0.44% of mean |y|.
    err, scale = (out.double() - want).abs(), want.abs()
    assert err.max() < 0.01 * scale.max() and err.mean() < 0.01 * scale.mean()
    proj.bf16_linears = False
    with torch.no_grad():
        assert (proj(merged).double() - want).abs().max() < 1e-4


def test_exact_env_turns_the_fast_path_off(monkeypatch):
    monkeypatch.setattr(vision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.delenv(vision.EXACT_ENV, raising=False)
    cpu = torch.device("cpu")
    assert vision.fast_path_default(cpu, torch.float32)
    assert not vision.fast_path_default(cpu, torch.bfloat16)
    assert not vision.fast_path_default(torch.device("meta"), torch.float32)
    monkeypatch.setenv(vision.EXACT_ENV, "1")
    assert not vision.fast_path_default(cpu, torch.float32)


def test_plan_counts_the_bf16_copies_the_fast_path_holds(monkeypatch):
    """What a fast forward really leaves resident (the cached bf16 weights) is what
    vision_fast_bytes counts; the CPU plan adds it (0.83 GB at the real widths)."""
    monkeypatch.setattr(vision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.delenv(vision.EXACT_ENV, raising=False)
    tower, proj = fast_tower(), randomize(Projector(TINY, TEXT_HIDDEN))
    proj.bf16_linears = True
    pixels, grids = make_inputs()
    with torch.no_grad():
        proj(torch.cat(tower(pixels, grids)))
    both = torch.nn.ModuleList([tower, proj])
    held = sum(m.__dict__["_bf16"][1].nbytes for m in both.modules() if isinstance(m, TowerLinear))
    assert held == vision_fast_bytes(both) > 0

    model, config = full_model()
    fast = plan(model, config, device="cpu")
    copies = vision_fast_bytes(model)
    linears = 27 * (1152 * 3456 + 1152 * 1152 + 2 * 1152 * 4304) + 4608 * 4608 + 4608 * 2048
    assert copies == 2 * linears  # 0.83 GB
    assert any("bf16 copies" in note for note in fast.notes)
    monkeypatch.setenv(vision.EXACT_ENV, "1")
    exact = plan(model, config, device="cpu")
    assert vision_fast_bytes(model) == 0
    assert fast.device_weights - exact.device_weights == copies


@pytest.mark.parametrize("grid", [(6, 10), (4, 2), (8, 8), (16, 3), (1, 1)])
def test_fast_patch_embedding_equals_the_convolution(grid):
    """The fast path's matmul patch embedding and separable position resize are the same fp32
    math as the convolution and F.interpolate (bicubic) of the exact path, up to summation order,
    for grids taller, wider, smaller than and equal to the 8x8 table."""
    embed = randomize(vision.PatchEmbed(TINY))
    pixels, _ = make_inputs([grid], seed=5)
    with torch.no_grad():
        want = embed(pixels, [grid])
        got = embed(pixels, [grid], fast=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fast_path_skips_linears_it_cannot_copy():
    """A checkpoint may quantize the projector or tower linears (QuantLinear, an nn.Linear
    subclass of its own): those modules run their own forward, on the exact path."""
    proj = randomize(Projector(TINY, TEXT_HIDDEN))
    merged = torch.randn(3, 4, 48, generator=seeded(3))
    with torch.no_grad():
        want = proj(merged)
        plain = torch.nn.Linear(192, TEXT_HIDDEN)
        plain.load_state_dict(proj.linear_2.state_dict())
        proj.linear_2, proj.bf16_linears = plain, True
        torch.testing.assert_close(proj(merged), want, rtol=0, atol=0)

    tower = fast_tower()
    pixels, grids = make_inputs()
    with torch.no_grad():
        tower.bf16_linears = False
        exact = tower(pixels, grids)
        block = tower.encoder.blocks[1]
        plain = torch.nn.Linear(48, 48)
        plain.load_state_dict(block.wo.state_dict())
        block.wo, tower.bf16_linears = plain, True
        for a, b in zip(tower(pixels, grids), exact):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loaded_model_takes_the_fast_path_by_default(tiny_checkpoint, monkeypatch):
    """End to end: a CPU load holds the tower in fp32, the default (bf16_linears None) takes the
    fast path where the CPU has bf16 hardware, and its features stay close to the exact path's."""
    from PIL import Image

    import kimivl_local

    monkeypatch.setattr(vision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.delenv(vision.EXACT_ENV, raising=False)
    api = kimivl_local.load(tiny_checkpoint, device="cpu")
    image = Image.new("RGB", (84, 56), (200, 40, 90))
    fast = api.image_features([image])[0]
    linears = [m for m in api.model.vision_tower.modules() if isinstance(m, TowerLinear)]
    assert linears and all("_bf16" in m.__dict__ for m in linears)  # the copies were made
    monkeypatch.setenv(vision.EXACT_ENV, "1")
    api.images.memo.clear()
    exact = api.image_features([image])[0]
    assert fast.shape == exact.shape
    diff = (fast.float() - exact.float()).abs().mean() / exact.float().abs().mean()
    assert diff < 0.02  # measured 0.0046
