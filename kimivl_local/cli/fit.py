"""Would a checkpoint fit this machine as it is, or once quantized by a named recipe? The memory
planner's own estimate (memory_plan.py) on meta-device models, with the runtime flags `load()`
gets: nothing is read but JSON and safetensors headers, nothing is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import DEFAULT_MAX_CONTEXT
from ..checkpoint.config import KimiVLConfig, PreprocessorConfig
from ..engine.generate import Engine
from ..engine.memory_plan import MemoryPlan, MemoryPlanError, plan_memory
from ..errors import KimiVLError
from ..inputs.processor import ImageProcessor
from ..model.kimivl import KimiVLForConditionalGeneration
from ..model.quantized import swap_modules
from ..quant.qconfig import QuantizationConfig

# `quantize --recipe default` (RTN) measured on a full-shape synthetic checkpoint (3 layers, 16
# experts, 2.32 GB of bf16 tensors) on a Xeon (Sapphire Rapids): 31 s of CPU time, i.e. ~75 MB of
# source per CPU-second; 109 s of wall time on that 2-core machine under a load average of 13.
# Only the estimate shown before asking; a busy machine or a slow disk takes longer.
QUANTIZE_BYTES_PER_S = 75e6


@dataclass(frozen=True)
class RecipeFit:
    recipe: str
    output_bytes: int  # the quantized checkpoint on disk
    source_bytes: int
    plan: MemoryPlan | None  # None: does not fit (or the recipe does not apply)
    why_not: str = ""

    @property
    def minutes(self) -> float:
        """Estimated quantization time."""
        return self.source_bytes / QUANTIZE_BYTES_PER_S / 60


def plan_as_is(folder: Path, options: dict, max_context: int | None) -> MemoryPlan:
    """The memory plan `load(folder, **options)` will make; MemoryPlanError when it cannot fit."""
    config = KimiVLConfig.from_dir(folder)
    qconfig = QuantizationConfig.from_model_config(config.raw, str(folder / "config.json"))
    return _plan(folder, config, qconfig, options, max_context)


def is_quantized(folder: Path) -> bool:
    return "quantization_config" in KimiVLConfig.from_dir(folder).raw


def recipe_fits(folder: Path, options: dict, max_context: int | None) -> list[RecipeFit]:
    """For every named recipe: its output size and whether the result fits, by the same plan."""
    from ..quantize.plan import make_plan
    from ..quantize.recipes import RECIPES, recipe_rules

    config = KimiVLConfig.from_dir(folder)
    fits = []
    for recipe in RECIPES:
        try:
            qplan = make_plan(folder, recipe_rules(recipe))
        except KimiVLError as exc:  # e.g. a group size that does not divide a layer
            fits.append(RecipeFit(recipe, 0, 0, None, str(exc)))
            continue
        source = sum(j.source.nbytes for j in qplan.jobs)
        try:
            plan = _plan(folder, config, qplan.qconfig, options, max_context)
        except MemoryPlanError as exc:
            fits.append(RecipeFit(recipe, qplan.total_bytes, source, None, str(exc)))
            continue
        fits.append(RecipeFit(recipe, qplan.total_bytes, source, plan))
    return fits


def choose(fits: list[RecipeFit]) -> RecipeFit | None:
    """The default recipe when it fits, else the smallest that does; None when none fits."""
    fitting = [f for f in fits if f.plan is not None]
    default = [f for f in fitting if f.recipe == "default"]
    return (default or sorted(fitting, key=lambda f: f.plan.device_total) or [None])[0]


def _plan(folder: Path, config: KimiVLConfig, qconfig: QuantizationConfig | None, options: dict,
          max_context: int | None) -> MemoryPlan:
    # Mirrors the planner `api.load` passes to `load_model`, for the model it would build.
    dtype = options.get("dtype") or config.dtype
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    if qconfig:
        swap_modules(model, config.text, qconfig)
    processor = ImageProcessor(PreprocessorConfig.from_dir(folder),
                               in_token_limit=options.get("max_image_tokens"))
    context = max_context or min(DEFAULT_MAX_CONTEXT, config.text.max_position_embeddings)
    return plan_memory(model, config, dtype, device=str(options.get("device") or "auto"),
                       max_context=context, prefill_chunk=Engine.prefill_chunk,
                       image_patches=processor.in_token_limit,
                       gpu_memory_gb=options.get("gpu_memory"),
                       cpu_experts=options.get("cpu_experts"))
