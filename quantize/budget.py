"""`--fit-gb`: per-layer routed-expert widths chosen so the planned GPU memory fits a budget.

The routed experts are ~90% of the language model's weights, so only their width is chosen; every
other module keeps the recipe's (and the user's rules) scheme. Each MoE layer gets one level from
LEVELS (a width and group, fewest bytes first: 2 bits at g128 is 2.125 bits per weight, at g32
2.5) for all of its experts' gate, up and down projections (the group fitted to the layer's
input sizes).

Sensitivity (documented choice): for each layer and width, the routed experts' relative output
error on calibration data (output_error.expert_sensitivity: eval_samples samples of the
calibration set, --calib-data or the built-in one, run through the original model layer by
layer; at each MoE layer the SENSITIVITY_EXPERTS most-used experts are quantized with RTN at
every level and rerun on their routed tokens). With eval_samples 0 (no calibration pass; fast on
a large checkpoint) it is the RTN weight error ‖Ŵ - W‖ / ‖W‖ instead, the output error for
isotropic inputs, on SAMPLE_EXPERTS experts' gate, up and down weights (SAMPLE_ROWS rows each),
which does not see a layer whose inputs are unusually sensitive. The error of the
model is taken as the sum over layers of their squared errors (independent noise added to the
residual stream), so the allocation is a greedy descent from the widest width: repeatedly lower
by one step the layer whose step adds the least squared error per byte saved (ties: the widest
layer first, so alike layers end up within one step of each other), until the planned
GPU memory (Plan.gpu_bytes: weights + latent cache at --context + the activation allowance) fits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kimivl_local.errors import InputError
from kimivl_local.quant.packing import QuantScheme, dequantize, quantize_rtn

from .output_error import SAMPLES, expert_sensitivity
from .plan import Plan, describe, make_plan, open_source
from .recipes import ROUTED_EXPERTS, Rule, fit_group

log = logging.getLogger("kimivl_local.quantize")

LEVELS = (QuantScheme(2, 128), QuantScheme(2, 32), QuantScheme(3, 128), QuantScheme(3, 64),
          QuantScheme(4, 128), QuantScheme(5, 128), QuantScheme(6, 128), QuantScheme(8, None))
SAMPLE_EXPERTS = 2
SAMPLE_ROWS = 256
PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Mix:
    """The chosen width of each MoE layer and the plan that follows from it."""

    levels: dict[int, int]  # layer -> index into LEVELS
    errors: dict[int, list[float]]  # layer -> relative error at each level (sensitivity)
    measured: str  # what the errors are
    plan: Plan
    budget: int
    context: int

    @property
    def bits(self) -> dict[int, int]:
        return {layer: LEVELS[i].bits for layer, i in self.levels.items()}

    def summary(self) -> str:
        counts = {i: sum(1 for v in self.levels.values() if v == i) for i in range(len(LEVELS))}
        mix = ", ".join(f"{n} x {describe(LEVELS[i], None)}" for i, n in counts.items() if n)
        lines = [f"--fit-gb {self.budget / (1 << 30):g}: routed experts of the MoE layers: {mix}",
                 f"layer  experts       rel. error ({self.measured})"]
        for layer, i in self.levels.items():
            lines.append(f"{layer:5d}  {describe(LEVELS[i], None):12s}  "
                         f"{self.errors[layer][i]:.4f}")
        gpu = self.plan.gpu_bytes(self.context)
        lines.append(f"planned GPU memory {gpu['total'] / (1 << 30):.2f} GiB of "
                     f"{self.budget / (1 << 30):.2f} GiB at {self.context:,} tokens; weights "
                     f"{gpu['weights'] / (1 << 30):.2f} GiB as loaded, "
                     f"{self.plan.total_bytes / 1e9:.2f} GB on disk")
        return "\n".join(lines)


def layer_rule(layer: int, scheme: QuantScheme, in_features: tuple[int, ...]) -> Rule:
    """One layer's experts at `scheme`, its group fitted to every input size."""
    for k in in_features:
        scheme = fit_group(scheme, k)
    pattern = ROUTED_EXPERTS.replace(r"\.mlp\.experts", rf"\.layers\.{layer}\.mlp\.experts", 1)
    return Rule(pattern, scheme)


def fit_budget(src, recipe_rules: list[Rule], user_rules: list[Rule], budget: int, context: int,
               shard_bytes: int = 2 << 30, eval_samples: int = SAMPLES,
               calib_data: Path | None = None, device: str | None = None,
               errors: dict[int, list[float]] | None = None) -> Mix:
    """The mix; `errors` (layer -> error at each level, as Mix.errors) skips the measurement."""
    config, ckpt = open_source(src)
    text = config.text
    layers = [i for i in range(text.num_hidden_layers) if i >= text.first_k_dense_replace]
    measured = "given"
    try:
        if not layers:
            raise InputError("--fit-gb: this checkpoint has no MoE layers to choose widths for")
        if errors is None and eval_samples <= 0:
            errors = {layer: _layer_errors(ckpt, layer, text.n_routed_experts) for layer in layers}
            measured = "weight, sampled experts, RTN"
    finally:
        ckpt.close()
    inter, hidden = text.moe_intermediate_size, text.hidden_size
    rules = [{layer: layer_rule(layer, level, (hidden, inter)) for layer in layers}
             for level in LEVELS]
    if errors is None:
        errors = expert_sensitivity(make_plan(src, recipe_rules, user_rules, shard_bytes),
                                    [r[layers[0]].scheme for r in rules], calib_data,
                                    eval_samples, device)
        measured = f"output, {eval_samples} calibration samples, RTN"

    def plan_for(levels: dict[int, int]) -> Plan:
        return make_plan(src, recipe_rules, list(user_rules) + [rules[i][l] for l, i in levels.items()],
                         shard_bytes)

    # GPU bytes with every layer at each level (the layers are alike): one plan per level.
    per_level = [plan_for({layer: i for layer in layers}).gpu_bytes(context)["total"]
                 for i in range(len(LEVELS))]
    if per_level[0] > budget:
        raise InputError(f"--fit-gb {budget / (1 << 30):g}: even with every routed expert at "
                         f"{describe(LEVELS[0], None)} the plan needs {per_level[0] / (1 << 30):.4f} "
                         f"GiB at {context:,} tokens of context; give a larger budget, a smaller "
                         "--context, or rules that shrink other modules (e.g. --recipe int4)")
    layer_bytes = [(b - per_level[0]) / len(layers) for b in per_level]  # over the lowest level
    levels = {layer: len(LEVELS) - 1 for layer in layers}

    def total(levels):
        return per_level[0] + sum(layer_bytes[i] for i in levels.values())

    while total(levels) > budget:
        best = None
        for layer, i in levels.items():
            if i == 0:
                continue
            saved = max(layer_bytes[i] - layer_bytes[i - 1], 1.0)  # a fitted group may tie
            cost = (errors[layer][i - 1] ** 2 - errors[layer][i] ** 2) / saved
            step = (cost, -i, layer)  # ties (alike layers): lower the widest first, evenly
            if best is None or step < best[0]:
                best = (step, layer)
        levels[best[1]] -= 1
    plan = plan_for(levels)
    while plan.gpu_bytes(context)["total"] > budget:  # header bytes: the arithmetic was a hair off
        layer = max((l for l in levels if levels[l] > 0), key=lambda l: levels[l])
        levels[layer] -= 1
        plan = plan_for(levels)
    return Mix(levels, errors, measured, plan, budget, context)


def _layer_errors(ckpt, layer: int, experts: int) -> list[float]:
    """‖Ŵ - W‖ / ‖W‖ at each level over SAMPLE_EXPERTS experts' gate, up, down (SAMPLE_ROWS
    rows)."""
    weights = []
    for e in range(min(SAMPLE_EXPERTS, experts)):
        for proj in PROJS:
            name = f"language_model.model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
            weights.append(ckpt.load(name)[:SAMPLE_ROWS].float())  # owned memory, freed here
    out = []
    for level in LEVELS:
        err = ref = 0.0
        for w in weights:
            packed = quantize_rtn(w, fit_group(level, w.shape[1]))
            err += float((dequantize(packed) - w).square().sum())
            ref += float(w.square().sum())
        out.append((err / ref) ** 0.5 if ref else 0.0)
    return out
