"""`--fit-gb`: per-layer routed-expert widths chosen so the planned GPU memory fits a budget.

The routed experts are ~90% of the language model's weights, so only their width is chosen; every
other module keeps the recipe's (and the user's rules) scheme. Each MoE layer gets one width from
WIDTHS for all of its experts' gate, up and down projections, at the width's default group
(recipes.DEFAULT_GROUP, fitted to the layer's input sizes).

Sensitivity (documented choice): for each layer and width, the relative output error of RTN
quantization for isotropic inputs, ‖Ŵ - W‖ / ‖W‖ (the quantize report's RTN error), measured on
SAMPLE_EXPERTS experts' gate, up and down weights of that layer (SAMPLE_ROWS rows of each). It is
not calibration-based: a layer whose inputs are unusually sensitive is not seen. The error of the
model is taken as the sum over layers of their squared errors (independent noise added to the
residual stream), so the allocation is a greedy descent from the widest width: repeatedly lower
by one step the layer whose step adds the least squared error per byte saved, until the planned
GPU memory (Plan.gpu_bytes: weights + latent cache at --context + the activation allowance) fits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kimivl_local.errors import InputError
from kimivl_local.quant.packing import QuantScheme, dequantize, quantize_rtn

from .plan import Plan, make_plan, open_source
from .recipes import DEFAULT_GROUP, ROUTED_EXPERTS, Rule, fit_group

log = logging.getLogger("kimivl_local.quantize")

WIDTHS = (2, 3, 4, 5, 6, 8)
SAMPLE_EXPERTS = 2
SAMPLE_ROWS = 256
PROJS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Mix:
    """The chosen width of each MoE layer and the plan that follows from it."""

    bits: dict[int, int]  # layer -> width
    errors: dict[int, dict[int, float]]  # layer -> width -> relative error (sensitivity)
    plan: Plan
    budget: int
    context: int

    def summary(self) -> str:
        counts = {b: sum(1 for v in self.bits.values() if v == b) for b in WIDTHS}
        mix = ", ".join(f"{n} x int{b}" for b, n in counts.items() if n)
        lines = [f"--fit-gb {self.budget / (1 << 30):g}: routed experts {mix} (MoE layers)",
                 "layer  bits  rel. error (sampled experts)"]
        for layer, b in self.bits.items():
            lines.append(f"{layer:5d}  {b:4d}  {self.errors[layer][b]:.4f}")
        gpu = self.plan.gpu_bytes(self.context)["total"]
        lines.append(f"planned GPU memory {gpu / (1 << 30):.2f} GiB of {self.budget / (1 << 30):.2f} "
                     f"GiB at {self.context:,} tokens; weights {self.plan.total_bytes / (1 << 30):.2f} "
                     "GiB")
        return "\n".join(lines)


def layer_rule(layer: int, bits: int, in_features: tuple[int, ...]) -> Rule:
    """One layer's experts at `bits`, the width's default group fitted to every input size."""
    scheme = QuantScheme(bits, DEFAULT_GROUP[bits], True)
    for k in in_features:
        scheme = fit_group(scheme, k)
    pattern = ROUTED_EXPERTS.replace(r"\.mlp\.experts", rf"\.layers\.{layer}\.mlp\.experts", 1)
    return Rule(pattern, scheme)


def fit_budget(src, recipe_rules: list[Rule], user_rules: list[Rule], budget: int, context: int,
               shard_bytes: int = 2 << 30) -> Mix:
    config, ckpt = open_source(src)
    text = config.text
    layers = [i for i in range(text.num_hidden_layers) if i >= text.first_k_dense_replace]
    if not layers:
        raise InputError("--fit-gb: this checkpoint has no MoE layers to choose widths for")
    inter, hidden = text.moe_intermediate_size, text.hidden_size
    in_features = (hidden, inter)
    errors = {}
    try:
        for layer in layers:
            errors[layer] = _layer_errors(ckpt, layer, text.n_routed_experts)
    finally:
        ckpt.close()
    rules = {b: {layer: layer_rule(layer, b, in_features) for layer in layers} for b in WIDTHS}

    def plan_for(bits: dict[int, int]) -> Plan:
        return make_plan(src, recipe_rules, list(user_rules) + [rules[b][l] for l, b in bits.items()],
                         shard_bytes)

    # Bytes of one layer's experts at each width, from one plan per width (the layers are alike).
    per_width = {b: plan_for({layer: b for layer in layers}).total_bytes for b in WIDTHS}
    lowest = plan_for({layer: WIDTHS[0] for layer in layers})
    if lowest.gpu_bytes(context)["total"] > budget:
        need = lowest.gpu_bytes(context)["total"] / (1 << 30)
        raise InputError(f"--fit-gb {budget / (1 << 30):g}: even with every routed expert at "
                         f"{WIDTHS[0]} bits the plan needs {need:.4f} GiB at {context:,} tokens "
                         "of context; give a larger budget or a smaller --context")
    layer_bytes = {b: (per_width[b] - per_width[WIDTHS[0]]) / len(layers) for b in WIDTHS}
    bits = {layer: WIDTHS[-1] for layer in layers}
    fixed = lowest.gpu_bytes(context)["total"] - layer_bytes[WIDTHS[0]] * len(layers)

    def total(bits):
        return fixed + sum(layer_bytes[b] for b in bits.values())

    while total(bits) > budget:
        best = None
        for layer, b in bits.items():
            i = WIDTHS.index(b)
            if i == 0:
                continue
            lower = WIDTHS[i - 1]
            cost = (errors[layer][lower] ** 2 - errors[layer][b] ** 2) / (
                layer_bytes[b] - layer_bytes[lower])
            if best is None or cost < best[0]:
                best = (cost, layer, lower)
        bits[best[1]] = best[2]
    plan = plan_for(bits)
    while plan.gpu_bytes(context)["total"] > budget:  # header bytes: arithmetic was a hair off
        layer = max((l for l in bits if bits[l] > WIDTHS[0]), key=lambda l: bits[l])
        bits[layer] = WIDTHS[WIDTHS.index(bits[layer]) - 1]
        plan = plan_for(bits)
    return Mix(bits, errors, plan, budget, context)


def _layer_errors(ckpt, layer: int, experts: int) -> dict[int, float]:
    """width -> ‖Ŵ - W‖ / ‖W‖ over SAMPLE_EXPERTS experts' gate, up, down (SAMPLE_ROWS rows)."""
    weights = []
    for e in range(min(SAMPLE_EXPERTS, experts)):
        for proj in PROJS:
            name = f"language_model.model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
            weights.append(ckpt.load(name)[:SAMPLE_ROWS].float())
            ckpt.release(name)
    out = {}
    for b in WIDTHS:
        err = ref = 0.0
        for w in weights:
            scheme = fit_group(QuantScheme(b, DEFAULT_GROUP[b], True), w.shape[1])
            err += float((dequantize(quantize_rtn(w, scheme)) - w).square().sum())
            ref += float(w.square().sum())
        out[b] = (err / ref) ** 0.5 if ref else 0.0
    return out
