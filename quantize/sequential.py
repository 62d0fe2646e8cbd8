"""GPTQ over the language model, one decoder layer at a time, so the whole model never sits in
memory: calibration embeddings (text, and images through MoonViT + projector) go through layer
0, whose linears are quantized from the Hessians of their inputs; the quantized layer then
produces the inputs of layer 1, and so on; lm_head last, on the final-normed states.

Routed experts get their own Hessians from the tokens the router sends them, plus a prior: the
statistics of all the layer's tokens through that expert, weighted as PRIOR_TOKENS tokens
(reference §5.2's H_e + α·H_all), so an expert that saw few tokens is not fitted to a
rank-deficient Hessian. An expert that receives fewer than 0.5% of the calibration tokens
(GPTQModel's fallback threshold) is left to RTN, with a log line. Each finished layer is saved in the scratch folder, so an interrupted
run resumes after its last finished layer. Runs on CUDA when available, else the CPU.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kimivl_local.checkpoint.config import PreprocessorConfig
from kimivl_local.checkpoint.shards import Checkpoint
from kimivl_local.engine.loader import fill_parameters
from kimivl_local.engine.multimodal import ImageEncoder, build_prompt
from kimivl_local.inputs.processor import ImageProcessor
from kimivl_local.inputs.tokenizer import Tokenizer
from kimivl_local.model.kimivl import KimiVLForConditionalGeneration
from kimivl_local.model.language import DecoderLayer
from kimivl_local.model.layers import RMSNorm, RopeTables, RotaryTable, linear
from kimivl_local.model.moe import StackedExperts
from kimivl_local.quant.packing import PackedWeight, QuantScheme, dequantize, quantize_rtn

from .calibration import default_samples, load_samples
from .gptq import Hessian, gptq, relative_error
from .plan import Job, Plan
from .writer import chunk_rows

log = logging.getLogger("kimivl_local.quantize")

MAX_SAMPLE_TOKENS = 1024
FALLBACK_SHARE = 0.005  # experts seeing fewer than this share of the tokens use RTN
PRIOR_TOKENS = 128  # weight of the all-tokens prior in each expert's Hessian, in tokens


def run_gptq(plan: Plan, scratch: Path, calib_data: Path | None, n_samples: int,
             device: str | None) -> tuple[Callable, dict[str, dict]]:
    """Quantize the plan's language-model linears with GPTQ into `scratch`; returns the writer's
    provider (module -> (packed, calibration error), None for RTN) and the per-layer report."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scratch.mkdir(parents=True, exist_ok=True)
    targets = {j.module: j for j in plan.quantized}
    rest = [m for m in targets if not m.startswith("language_model.")]
    if rest:
        log.info("GPTQ covers the language model; %d other quantized layers use RTN", len(rest))
    ckpt = Checkpoint.open(plan.src)
    try:
        hidden = _calibration_inputs(ckpt, plan, calib_data, n_samples, dev)
        total = sum(h.shape[0] for h in hidden)
        log.info("GPTQ on %s: %d calibration samples, %d tokens", dev, len(hidden), total)
        stored, report = {}, {}
        min_tokens = math.ceil(FALLBACK_SHARE * total)
        for i in range(plan.config.text.num_hidden_layers):
            hidden = _decoder_layer(plan, ckpt, i, hidden, targets, scratch, min_tokens, stored,
                                    report)
        if "language_model.lm_head" in targets:
            _lm_head(plan, ckpt, hidden, targets, scratch, stored, report)
    finally:
        ckpt.close()
    return _provider(stored), report


def _decoder_layer(plan: Plan, ckpt: Checkpoint, i: int, hidden: list[torch.Tensor],
                   targets: dict[str, Job], scratch: Path, min_tokens: int, stored: dict,
                   report: dict) -> list[torch.Tensor]:
    """Quantize decoder layer i (fp32 copy from the source); returns its outputs."""
    prefix = f"language_model.model.layers.{i}"
    dev = hidden[0].device
    with torch.device("meta"):
        layer = DecoderLayer(plan.config.text, i)
    fill_parameters(layer, ckpt, torch.float32, dev, prefix + ".")
    rope = RotaryTable(plan.config.text.qk_rope_head_dim, plan.config.text.rope_theta,
                       plan.config.text.max_position_embeddings)
    tables = [RopeTables(*rope.get(torch.arange(h.shape[0], device=dev)), h.dtype)
              for h in hidden]

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            return [layer(h, tables[j]) for j, h in enumerate(hidden)]

    mine = {m[len(prefix) + 1:]: j for m, j in targets.items() if m.startswith(prefix + ".")}
    if mine:
        stored |= _layer(scratch / f"layer-{i:03d}", prefix, layer, mine,
                         lambda: _collect(layer, mine, run), min_tokens, report)
    return run()


def _lm_head(plan: Plan, ckpt: Checkpoint, hidden: list[torch.Tensor], targets: dict[str, Job],
             scratch: Path, stored: dict, report: dict) -> None:
    """lm_head from the Hessian of the final-normed states (no logits needed)."""
    text, dev = plan.config.text, hidden[0].device
    with torch.device("meta"):
        holder = nn.Module()
        holder.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        holder.lm_head = linear(text.hidden_size, text.vocab_size)
    fill_parameters(holder.norm, ckpt, torch.float32, dev, "language_model.model.norm.")
    fill_parameters(holder.lm_head, ckpt, torch.float32, dev, "language_model.lm_head.")

    def hessian() -> dict[str, Hessian]:
        h = Hessian(text.hidden_size, dev)
        with torch.no_grad():
            for x in hidden:
                h.add(holder.norm(x))
        return {"lm_head": h}

    stored |= _layer(scratch / "lm_head", "language_model", holder,
                     {"lm_head": targets["language_model.lm_head"]}, hessian, 1, report)


def _calibration_inputs(ckpt: Checkpoint, plan: Plan, calib_data: Path | None, n_samples: int,
                        dev: torch.device) -> list[torch.Tensor]:
    """Input embeddings [T_i, hidden] (fp32) of each calibration sample, images spliced in by
    the vision tower and projector (loaded for this, then dropped)."""
    samples = load_samples(calib_data, n_samples) if calib_data else default_samples(n_samples)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(plan.config)
    for name in ("vision_tower", "multi_modal_projector", "language_model.model.embed_tokens"):
        fill_parameters(model.get_submodule(name), ckpt, torch.float32, dev, name + ".")
    tokenizer = Tokenizer.from_dir(plan.src)
    encoder = ImageEncoder(model, ImageProcessor(PreprocessorConfig.from_dir(plan.src)))
    with torch.no_grad():
        return [build_prompt(model, tokenizer, encoder, s.messages()).embed(0)[:MAX_SAMPLE_TOKENS]
                .float() for s in samples]


def _layer(stem: Path, prefix: str, layer: nn.Module, targets: dict[str, Job],
           hessians: Callable[[], dict[str, Hessian]], min_tokens: int, report: dict) -> dict:
    """GPTQ for the targeted linears of one layer (names relative to it), or the result saved by
    an earlier run; afterwards the layer holds the quantized values, to feed the next layer.
    Returns {full module name: (file, name in file, scheme, calibration error)}."""
    weights_file, meta_file = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    what = stem.name
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        with safe_open(str(weights_file), framework="pt") as f:
            packed = {m: _packed_from(f, m, targets[m].scheme) for m in meta["errors"]}
        log.info("%s: GPTQ result from an earlier run", what)
    else:
        packed, meta = _solve(layer, targets, hessians(), min_tokens, what)
        save_file({f"{m}.{k}": v for m, p in packed.items() for k, v in p.state_dict().items()},
                  str(weights_file))
        meta_file.write_text(json.dumps(meta), encoding="utf-8")
    _apply(layer, targets, packed)
    report[what] = meta["report"]
    return {f"{prefix}.{m}": (weights_file, m, targets[m].scheme, meta["errors"][m])
            for m in packed}


def _collect(layer: nn.Module, targets: dict[str, Job],
             run: Callable[[], object]) -> dict[str, Hessian]:
    """Hessians of the targeted linears' inputs over one calibration pass through `layer`."""
    hessians: dict[str, Hessian] = {}
    hooks = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear) and name in targets:
            hessians[name] = Hessian(module.in_features, module.weight.device)
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, h=hessians[name]: h.add(args[0])))
        elif isinstance(module, StackedExperts) and any(m.startswith(name + ".") for m in targets):
            hooks.append(module.register_forward_pre_hook(_expert_hook(module, name, hessians)))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return hessians


def _solve(layer, targets, hessians, min_tokens, what):
    packed, errors, fallback = {}, {}, []
    sums = {"gptq": [0.0, 0.0], "rtn": [0.0, 0.0]}
    for name, job in targets.items():
        weight = _weight(layer, name)
        hess = hessians.get(_hessian_key(name))
        if hess is None or hess.rows < min_tokens:
            fallback.append(name)
            continue
        prior = hessians.get(_prior_key(name))
        h = hess.h if prior is None else hess.h + (PRIOR_TOKENS / prior.rows) * prior.h
        result = gptq(weight, h, job.scheme, job.source.dtype)
        if result is None:
            log.info("%s %s: Hessian singular even after damping; RTN", what, name)
            fallback.append(name)
            continue
        num, num_rtn, den = _errors(weight, result, job, hess.h)
        for key, n in (("gptq", num), ("rtn", num_rtn)):
            sums[key][0] += n
            sums[key][1] += den
        packed[name] = result
        errors[name] = math.sqrt(num / den) if den else 0.0
    experts = sorted({int(n.split(".")[2]) for n in fallback if n.startswith("mlp.experts.")})
    if experts:
        log.info("%s: experts %s saw fewer than %d calibration tokens; RTN for them", what,
                 ",".join(map(str, experts)), min_tokens)
    report = {k: (math.sqrt(n / d) if d else None) for k, (n, d) in sums.items()}
    report["rtn_fallback"] = sorted(fallback)
    if report["gptq"] is not None:
        log.info("%s: output error %.4f with GPTQ vs %.4f with RTN (calibration inputs)", what,
                 report["gptq"], report["rtn"])
    return packed, {"errors": errors, "report": report}


def _errors(weight: torch.Tensor, result: PackedWeight, job: Job,
            h: torch.Tensor) -> tuple[float, float, float]:
    """‖X(Ŵ-W)ᵀ‖² for GPTQ's Ŵ and RTN's, and ‖XWᵀ‖², in row chunks (RTN is per row), so an
    lm_head-sized weight needs no full-size temporaries beyond GPTQ's dequantized copy."""
    approx = dequantize(result).to(weight.device)
    num = num_rtn = den = 0.0
    rows = chunk_rows(weight.shape[1])
    for r0 in range(0, weight.shape[0], rows):
        w = weight[r0:r0 + rows]
        rtn = dequantize(quantize_rtn(w.to(job.source.dtype), job.scheme)).to(w.device)
        n, d = relative_error(w, approx[r0:r0 + rows], h)
        num, den, num_rtn = num + n, den + d, num_rtn + relative_error(w, rtn, h)[0]
    return num, num_rtn, den


def _expert_hook(module: StackedExperts, name: str, hessians: dict):
    """Per-expert Hessians of the routed tokens (gate and up share their input; down sees
    silu(gate)·up), and of all tokens, the prior."""

    def add(key: str, x: torch.Tensor) -> None:
        if len(x):
            hessians.setdefault(key, Hessian(x.shape[1], x.device)).add(x)

    def hook(mod, args):
        x, _, ids = args
        x = x.float()
        add(f"{name}.gate_up.prior", x)  # one for all experts: they share the input
        for e in range(module.gate_proj.shape[0]):
            h = F.silu(x @ module.gate_proj[e].float().T) * (x @ module.up_proj[e].float().T)
            rows = (ids == e).any(-1)
            add(f"{name}.{e}.gate_up", x[rows])
            add(f"{name}.{e}.down_proj", h[rows])
            add(f"{name}.{e}.down_proj.prior", h)

    return hook


def _hessian_key(name: str) -> str:
    """Experts' gate_proj and up_proj share one Hessian."""
    if name.startswith("mlp.experts.") and name.endswith(("gate_proj", "up_proj")):
        return name.rsplit(".", 1)[0] + ".gate_up"
    return name


def _prior_key(name: str) -> str | None:
    """The all-tokens Hessian of a routed expert's projection (None for other layers)."""
    if not name.startswith("mlp.experts."):
        return None
    if name.endswith("down_proj"):
        return name + ".prior"
    return "mlp.experts.gate_up.prior"


def _weight(layer: nn.Module, name: str) -> torch.Tensor:
    if name.startswith("mlp.experts."):
        _, _, e, proj = name.split(".")
        return getattr(layer.mlp.experts, proj)[int(e)]
    return layer.get_submodule(name).weight


def _apply(layer: nn.Module, targets: dict[str, Job], packed: dict[str, PackedWeight]) -> None:
    """Put the quantized values (GPTQ, or RTN for the rest) into the layer, for the next one."""
    with torch.no_grad():
        for name, job in targets.items():
            weight = _weight(layer, name)
            p = packed.get(name) or quantize_rtn(weight.to(job.source.dtype), job.scheme)
            weight.copy_(dequantize(p).to(weight.device))


def _packed_from(f, module: str, scheme: QuantScheme) -> PackedWeight:
    names = ["weight_packed", "weight_scale", "weight_shape"]
    names += [] if scheme.symmetric else ["weight_zero_point"]
    return PackedWeight.from_state_dict({f"{module}.{n}": f.get_tensor(f"{module}.{n}")
                                         for n in names}, scheme, module + ".")


def _provider(stored: dict[str, tuple[Path, str, QuantScheme, float]]) -> Callable:
    def provide(module: str):
        if module not in stored:
            return None
        file, name, scheme, error = stored[module]
        with safe_open(str(file), framework="pt") as f:
            return _packed_from(f, name, scheme), error

    return provide
