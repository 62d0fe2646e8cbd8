"""--fit-gb: the chosen mix fits the budget, lowers the least sensitive layers first, and the
loaded model's size matches the plan."""

import pytest
import torch

import kimivl_local
from kimivl_local.errors import InputError

from quantize_support import import_quantize

budget = import_quantize("budget")
recipes = import_quantize("recipes")
qmain = import_quantize("main")

CONTEXT = 512
_ERRORS = {}


def _measured(src):
    """The mix with room for every width: the calibration sensitivity, measured once."""
    if src not in _ERRORS:
        _ERRORS[src] = budget.fit_budget(src, recipes.recipe_rules("default"), [], 1 << 40,
                                         CONTEXT)
    return _ERRORS[src]


def _sensitivity(src) -> dict[int, list[float]]:
    return _measured(src).errors


def _fit(src, nbytes):
    return budget.fit_budget(src, recipes.recipe_rules("default"), [], nbytes, CONTEXT,
                             errors=_sensitivity(src))


def _range(src) -> tuple[int, int]:
    """Planned GPU bytes with every routed expert at int2 g32, and at int8."""
    low = budget.fit_budget(src, recipes.recipe_rules("default"),
                            [recipes.parse_rule(f"{recipes.ROUTED_EXPERTS}=2")], 1 << 40, CONTEXT,
                            errors=_sensitivity(src))
    return (low.plan.gpu_bytes(CONTEXT)["total"],
            _fit(src, 1 << 40).plan.gpu_bytes(CONTEXT)["total"])


def test_sensitivity_is_calibration_output_error(tiny128_checkpoint):
    errors = _sensitivity(tiny128_checkpoint)
    assert set(errors) == {1, 2}  # the MoE layers
    for layer, errs in errors.items():
        assert len(errs) == len(budget.LEVELS)
        # fewer bytes, more error: each level's error above the next wider one's
        assert all(a > b > 0 for a, b in zip(errs, errs[1:])), (layer, errs)
        assert errs[-1] < 0.02 < 0.1 < errs[0]
    assert "output, 4 calibration samples" in _measured(tiny128_checkpoint).summary()
    weight = budget.fit_budget(tiny128_checkpoint, recipes.recipe_rules("default"), [], 1 << 40,
                               CONTEXT, eval_samples=0)  # the cheap proxy: RTN weight error
    assert "weight, sampled experts" in weight.summary()
    assert set(weight.errors) == {1, 2} and weight.errors[1][0] > weight.errors[1][-1]


def test_fit_budget_picks_a_mix_within_budget(tiny128_checkpoint):
    assert set(_fit(tiny128_checkpoint, 1 << 40).bits.values()) == {8}  # room for the widest
    smallest, full = _range(tiny128_checkpoint)
    for frac in (0.3, 0.6, 0.9):
        limit = int(smallest + frac * (full - smallest))
        mix = _fit(tiny128_checkpoint, limit)
        assert mix.plan.gpu_bytes(CONTEXT)["total"] <= limit
        assert min(mix.bits.values()) < 8
        # the widths really are in the plan, one layer at a time
        for job in mix.plan.quantized:
            if ".mlp.experts." in job.module:
                layer = int(job.module.split(".layers.")[1].split(".")[0])
                assert job.scheme.bits == mix.bits[layer], job.module
    # greedy: a larger budget never gives a layer fewer bits
    small, large = (_fit(tiny128_checkpoint, int(smallest + f * (full - smallest)))
                    for f in (0.3, 0.8))
    assert all(small.bits[i] <= large.bits[i] for i in small.bits)


def test_fit_budget_says_when_nothing_fits(tiny128_checkpoint):
    with pytest.raises(InputError, match="even with every routed expert at int2 g128"):
        _fit(tiny128_checkpoint, 1 << 20)
    with pytest.raises(InputError, match="--fit-gb must be a positive"):
        qmain.quantize(tiny128_checkpoint, "/nonexistent/never-written", fit_gb=-1)


def test_loaded_size_matches_the_plan(tiny128_checkpoint, tmp_path):
    smallest, full = _range(tiny128_checkpoint)
    target = (smallest + full) // 2
    dst = tmp_path / "fit"
    qmain.quantize(tiny128_checkpoint, dst, fit_gb=target / (1 << 30), context=CONTEXT)
    mix = _fit(tiny128_checkpoint, target)
    loaded = kimivl_local.load(dst, device="cpu", dtype=torch.bfloat16).model
    bits = {m.w13.bits for m in loaded.modules() if hasattr(m, "w13") and m.w13 is not None}
    assert bits == set(mix.bits.values())
    # The CPU loader keeps MoonViT and the projector in fp32: counted at the plan's bf16 here.
    params = sum(p.numel() * (2 if p.dtype == torch.float32 and not name.startswith("language_model")
                              else p.element_size())
                 for name, p in loaded.named_parameters())
    quant = sum(m.nbytes() - (m.bias.numel() * m.bias.element_size() if getattr(m, "bias", None)
                              is not None else 0)
                for m in loaded.modules() if hasattr(m, "on_kernel"))
    planned = mix.plan.gpu_bytes(CONTEXT)["weights"]
    assert abs(params + quant - planned) <= 0.02 * planned
