"""The quality report's output error on calibration data, per group of modules, for RTN and GPTQ
alike: a few calibration samples go through the language model one decoder layer at a time (as
sequential.py does for GPTQ, so the whole model never sits in memory). At each layer the inputs
of its attention, dense MLP, shared experts and routed experts are recorded on the original
(bf16-valued, fp32-computed) model; the layer then takes its quantized weights and each of those
modules runs again on the same inputs: ‖y_q - y‖ / ‖y‖ over all tokens is that module's output
error, in isolation. A second stream runs the calibration inputs through the quantized layers
from the start: its final-normed hidden states against the original's give the error the whole
quantized language model accumulates (and lm_head's logits, when lm_head is quantized, are
compared on the original final states). The vision tower and projector are not measured.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kimivl_local.checkpoint.shards import Checkpoint
from kimivl_local.engine.loader import fill_parameters
from kimivl_local.model.language import DecoderLayer
from kimivl_local.model.layers import RMSNorm, RopeTables, RotaryTable, linear
from kimivl_local.model.moe import MoE
from kimivl_local.quant.packing import PackedWeight, QuantScheme, dequantize, quantize_rtn

from .plan import Job, Plan

log = logging.getLogger("kimivl_local.quantize")

SAMPLES = 4  # default --eval-samples: cheap, enough to rank widths and spot a broken module
MAX_TOKENS = 256  # per sample
LAYER_GROUPS = 3  # the routed experts' error is also given for this many runs of layers
DEFINITION = ("relative output error ‖y_q - y‖ / ‖y‖ on calibration tokens of each module group "
              "(its linears quantized, inputs from the original model); 'final hidden states': "
              "the whole quantized language model against the original after the last norm")

# A provider gives a module's quantized weight (GPTQ's), or None for RTN of the plan's scheme.
Provider = Callable[[str], "tuple[PackedWeight, float] | None"]


def measure(plan: Plan, calib_data: Path | None, n_samples: int, device: str | None,
            provider: Provider | None = None) -> dict | None:
    """The report's "calibration_errors" section; None when n_samples is 0 or nothing of the
    language model is quantized."""
    targets = {j.module: j for j in plan.quantized if j.module.startswith("language_model.")}
    if n_samples <= 0 or not targets:
        return None
    from .sequential import _calibration_inputs

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = Checkpoint.open(plan.src)
    try:
        ref = [h[:MAX_TOKENS] for h in _calibration_inputs(ckpt, plan, calib_data, n_samples, dev)]
        log.info("output error on %d calibration samples, %d tokens", len(ref),
                 sum(len(h) for h in ref))
        quant = [h.clone() for h in ref]
        sums: dict[int, dict[str, list[float]]] = {}
        for i in range(plan.config.text.num_hidden_layers):
            ref, quant, sums[i] = _layer(plan, ckpt, i, ref, quant, targets, provider)
        groups, final = _final(plan, ckpt, ref, quant, targets, provider)
    finally:
        ckpt.close()
    by_group: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for layer in sums.values():
        for g, (n, d) in layer.items():
            by_group[g][0] += n
            by_group[g][1] += d
    by_group |= _layer_groups(sums) | groups
    return {"definition": DEFINITION, "samples": len(ref), "tokens": sum(len(h) for h in ref),
            "groups": {g: _ratio(n, d) for g, (n, d) in by_group.items()},
            "layers": {str(i): {g: _ratio(n, d) for g, (n, d) in s.items()}
                       for i, s in sums.items() if s},
            "final_hidden_states": _ratio(*final)}


def _layer(plan: Plan, ckpt: Checkpoint, i: int, ref: list[torch.Tensor],
           quant: list[torch.Tensor], targets: dict[str, Job], provider: Provider | None):
    """Decoder layer i: both streams one layer on, and {group: [‖Δy‖², ‖y‖²]} of its modules."""
    prefix = f"language_model.model.layers.{i}"
    mine = {m[len(prefix) + 1:]: j for m, j in targets.items() if m.startswith(prefix + ".")}
    layer, tables = _load_layer(plan, ckpt, i, ref)
    modules = _modules(layer, mine)
    calls: dict[str, list] = {name: [] for name in modules}
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out, n=name:
                                     calls[n].append((args, kwargs, out)), with_kwargs=True)
             for name, m in modules.items()]
    with torch.no_grad():
        try:
            ref = [layer(h, tables[j]) for j, h in enumerate(ref)]
        finally:
            for hook in hooks:
                hook.remove()
        _quantize(layer, mine, prefix, provider)
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for name, module in modules.items():
            group = _GROUPS[name]
            for args, kwargs, out in calls[name]:
                sums[group][0] += float((module(*args, **kwargs) - out).square().sum())
                sums[group][1] += float(out.square().sum())
        quant = [layer(h, tables[j]) for j, h in enumerate(quant)]
    return ref, quant, dict(sums)


def _load_layer(plan: Plan, ckpt: Checkpoint, i: int,
                hidden: list[torch.Tensor]) -> tuple[DecoderLayer, list[RopeTables]]:
    """Decoder layer i in fp32 on the inputs' device, and the rope tables of each input."""
    dev = hidden[0].device
    with torch.device("meta"):
        layer = DecoderLayer(plan.config.text, i)
    fill_parameters(layer, ckpt, torch.float32, dev, f"language_model.model.layers.{i}.")
    text = plan.config.text
    rope = RotaryTable(text.qk_rope_head_dim, text.rope_theta, text.max_position_embeddings)
    return layer, [RopeTables(*rope.get(torch.arange(len(h), device=dev)), h.dtype)
                   for h in hidden]


_GROUPS = {"self_attn": "attention", "mlp": "dense MLP", "mlp.shared_experts": "shared experts",
           "mlp.experts": "routed experts"}


def expert_sensitivity(plan: Plan, levels: list[QuantScheme], calib_data: Path | None,
                       n_samples: int, device: str | None) -> dict[int, list[float]]:
    """--fit-gb's sensitivity: for each MoE layer, the routed experts' output error on
    calibration tokens at each of `levels` (RTN of its gate, up and down projections):
    sqrt(Σ ‖w·(ŷ_e(x) - y_e(x))‖² / Σ ‖w·y_e(x)‖²) over the token-expert pairs (x, e, routing
    weight w) of the SENSITIVITY_EXPERTS experts that receive the most tokens; inputs from the
    original model."""
    from .sequential import _calibration_inputs

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = {j.module: j.source.dtype for j in plan.jobs}
    ckpt = Checkpoint.open(plan.src)
    out = {}
    try:
        hidden = [h[:MAX_TOKENS] for h in _calibration_inputs(ckpt, plan, calib_data, n_samples,
                                                              dev)]
        for i in range(plan.config.text.num_hidden_layers):
            layer, tables = _load_layer(plan, ckpt, i, hidden)
            calls = []
            hook = None
            if isinstance(layer.mlp, MoE):
                hook = layer.mlp.experts.register_forward_pre_hook(
                    lambda mod, args: calls.append(args))
            with torch.no_grad():
                try:
                    hidden = [layer(h, tables[j]) for j, h in enumerate(hidden)]
                finally:
                    if hook is not None:
                        hook.remove()
                if calls:
                    dtype = dtypes[f"language_model.model.layers.{i}.mlp.experts.0.gate_proj"]
                    out[i] = _expert_errors(layer.mlp.experts, calls, levels, dtype)
    finally:
        ckpt.close()
    return out


SENSITIVITY_EXPERTS = 8


def _expert_errors(experts: nn.Module, calls: list, levels: list[QuantScheme],
                   dtype: torch.dtype) -> list[float]:
    """Relative output error at each level of the most-used experts on their routed tokens."""
    x = torch.cat([c[0] for c in calls])
    weights, ids = torch.cat([c[1] for c in calls]), torch.cat([c[2] for c in calls])
    counts = torch.bincount(ids.reshape(-1), minlength=experts.gate_proj.shape[0])
    chosen = counts.argsort(descending=True, stable=True)[:SENSITIVITY_EXPERTS].tolist()
    sums = [[0.0, 0.0] for _ in levels]
    for e in chosen:
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if not len(tok):
            continue
        xe, we = x[tok], weights[tok, slot][:, None]
        w = [getattr(experts, p)[e] for p in ("gate_proj", "up_proj", "down_proj")]
        y = we * _swiglu(xe, *w)
        ref = float(y.square().sum())
        for k, scheme in enumerate(levels):
            q = [dequantize(quantize_rtn(t.to(dtype), scheme)).to(t.device, t.dtype) for t in w]
            sums[k][0] += float((we * _swiglu(xe, *q) - y).square().sum())
            sums[k][1] += ref
    return [math.sqrt(n / d) if d else 0.0 for n, d in sums]


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _modules(layer: DecoderLayer, targets: dict[str, Job]) -> dict[str, nn.Module]:
    """The layer's measured modules that hold a quantized linear (relative names)."""
    names = ["self_attn"] + (["mlp.shared_experts", "mlp.experts"] if isinstance(layer.mlp, MoE)
                             else ["mlp"])
    return {n: layer.get_submodule(n) for n in names
            if any(t.startswith(n + ".") for t in targets)}


def _quantize(layer: nn.Module, targets: dict[str, Job], prefix: str,
              provider: Provider | None) -> None:
    """Each targeted weight of the layer replaced by its quantized values (the provider's, else
    RTN of the plan's scheme from the source dtype's values)."""
    for name, job in targets.items():
        if name.startswith("mlp.experts."):
            _, _, e, proj = name.split(".")
            weight = getattr(layer.mlp.experts, proj)[int(e)]
        else:
            weight = layer.get_submodule(name).weight
        given = provider(f"{prefix}.{name}") if provider else None
        packed = given[0] if given else quantize_rtn(weight.to(job.source.dtype), job.scheme)
        weight.copy_(dequantize(packed).to(weight.device, weight.dtype))


def _final(plan: Plan, ckpt: Checkpoint, ref: list[torch.Tensor], quant: list[torch.Tensor],
           targets: dict[str, Job], provider: Provider | None):
    """lm_head's group sums (when quantized) and the final hidden states' [‖Δ‖², ‖h‖²]."""
    text, dev = plan.config.text, ref[0].device
    head = "language_model.lm_head"
    with torch.device("meta"):
        holder = nn.Module()
        holder.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        holder.lm_head = linear(text.hidden_size, text.vocab_size)
    fill_parameters(holder.norm, ckpt, torch.float32, dev, "language_model.model.norm.")
    groups, final = {}, [0.0, 0.0]
    with torch.no_grad():
        normed = [holder.norm(h) for h in ref]
        for h, q in zip(normed, quant):
            final[0] += float((holder.norm(q) - h).square().sum())
            final[1] += float(h.square().sum())
        if head in targets:
            fill_parameters(holder.lm_head, ckpt, torch.float32, dev, "language_model.lm_head.")
            logits = [holder.lm_head(h) for h in normed]
            _quantize(holder, {"lm_head": targets[head]}, "language_model", provider)
            n = sum(float((holder.lm_head(h) - y).square().sum()) for h, y in zip(normed, logits))
            groups["lm_head"] = [n, sum(float(y.square().sum()) for y in logits)]
    return groups, final


def _layer_groups(sums: dict[int, dict[str, list[float]]]) -> dict[str, list[float]]:
    """The routed experts in up to LAYER_GROUPS runs of consecutive MoE layers."""
    layers = [i for i, s in sums.items() if "routed experts" in s]
    size = math.ceil(len(layers) / LAYER_GROUPS) if layers else 1
    out = {}
    for k in range(0, len(layers), size):
        run = layers[k:k + size]
        span = f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}"
        out[f"routed experts, {span}"] = [
            sum(sums[i]["routed experts"][j] for i in run) for j in (0, 1)]
    return out if len(out) > 1 else {}


def _ratio(num: float, den: float) -> float:
    return round(math.sqrt(num / den), 6) if den else 0.0
