"""Memory planning: where each part of the model lives, and whether it fits, decided from the
config and the (meta-device) model before a byte of weights is read.

On a GPU: weights, the latent KV cache for --max-context tokens and the activations of one
prefill chunk must fit the budget (--gpu-memory, else the device's free memory). The token
embeddings stay in host memory (a lookup moves one row per token), and --cpu-experts N keeps the
routed experts of the last N MoE layers in host memory, run by the CPU kernels, which is what
lets 6-8 GB GPUs hold the rest. On the CPU: the same sum must fit the machine's memory.
When something cannot fit, `plan_memory` raises MemoryPlanError saying what to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint.config import KimiVLConfig
from ..errors import KimiVLError

GiB = 1 << 30
# CUDA context, cuBLAS workspace and allocator slack that no tensor accounts for.
CUDA_RESERVE = 600 << 20
EMBEDDINGS = "language_model.model.embed_tokens.weight"
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


class MemoryPlanError(KimiVLError):
    """The requested device, context length or memory budget cannot hold the model."""


@dataclass(frozen=True)
class Placement:
    """Where parameters live: `device` computes; embeddings and the routed experts of
    `cpu_expert_layers` may stay on the host (CPU)."""

    device: torch.device
    embeddings_on_host: bool = False
    cpu_expert_layers: tuple[int, ...] = ()
    # On the CPU, MoonViT and the projector compute in fp32: torch's CPU bf16 matmul runs ~4x
    # slower than fp32 on CPUs without AVX512-BF16/AMX (measured 8 vs 33 GFLOP/s on 2 AVX2 cores)
    # and the tower is 0.4 B parameters, so an image's time to first token is worth 0.8 GB.
    vision_fp32: bool = False

    def dtype_of(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype parameter `name` is held in, for a model computing in `dtype`."""
        if self.vision_fp32 and name.startswith(VISION_PREFIXES):
            return torch.float32
        return dtype

    def device_of(self, name: str) -> torch.device:
        """The device of the parameter or module called `name` (checkpoint naming)."""
        if self.device.type == "cpu":
            return self.device
        if self.embeddings_on_host and name.startswith(EMBEDDINGS.removesuffix(".weight")):
            return torch.device("cpu")
        layer = expert_layer(name)
        if layer is not None and layer in self.cpu_expert_layers:
            return torch.device("cpu")
        return self.device


def expert_layer(name: str) -> int | None:
    """The layer index of a routed-experts name (`...layers.{i}.mlp.experts...`), else None."""
    head, sep, tail = name.partition(".mlp.experts")
    if not sep or tail[:1] not in ("", "."):
        return None
    index = head.rpartition(".layers.")[2]
    return int(index) if index.isdigit() else None


@dataclass
class MemoryPlan:
    placement: Placement
    device_weights: int
    host_weights: int
    kv_cache: int
    activations: int
    budget: int | None  # bytes the compute device may use (None: the CPU, see host_total)
    host_total: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def device_total(self) -> int:
        reserve = CUDA_RESERVE if self.placement.device.type == "cuda" else 0
        return self.device_weights + self.kv_cache + self.activations + reserve

    def summary(self) -> str:
        p = self.placement
        lines = [f"device {p.device}: weights {_gb(self.device_weights)}, KV cache "
                 f"{_gb(self.kv_cache)}, activations ~{_gb(self.activations)}"
                 + (f", total {_gb(self.device_total)} of {_gb(self.budget)}"
                    if self.budget is not None else "")]
        if p.device.type == "cuda":
            host = []
            if p.embeddings_on_host:
                host.append("embeddings")
            if p.cpu_expert_layers:
                host.append(f"routed experts of {len(p.cpu_expert_layers)} layers "
                            f"({_layer_ranges(p.cpu_expert_layers)})")
            if host:
                lines.append(f"host memory: {' and '.join(host)}, {_gb(self.host_weights)}")
        return "; ".join(lines + self.notes)


def module_bytes(model: nn.Module, dtype: torch.dtype, device: torch.device,
                 placement: Placement | None = None) -> dict[str, int]:
    """Resident bytes of each parameter or quantized module of the meta-device `model`, by name,
    as `load_model` will hold them on `device` (in `placement`'s dtypes when given)."""
    from ..model.quantized import QuantExperts, QuantLinear

    sizes, skip = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantExperts)):
            sizes[name] = module.resident_bytes(device, dtype)
            skip.add(name + ".")
    for name, param in model.named_parameters():
        if any(name.startswith(prefix) for prefix in skip):
            if not name.endswith(".bias"):
                continue
        held = placement.dtype_of(name, dtype) if placement else dtype
        itemsize = 4 if name.endswith("e_score_correction_bias") else held.itemsize
        sizes[name] = param.numel() * itemsize
    return sizes


def vision_fast_bytes(model: nn.Module) -> int:
    """The bf16 weight copies MoonViT's fast CPU path makes at its first image (TowerLinear,
    the projector's linears: half their fp32 bytes; 0.83 GB at the real widths), 0 where the
    path will not run. On the CPU the tower is held in fp32 (Placement.vision_fp32)."""
    from ..model.vision import TowerLinear, fast_path_default

    if not fast_path_default(torch.device("cpu"), torch.float32):
        return 0
    return sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, TowerLinear))


def activation_bytes(config: KimiVLConfig, max_context: int, prefill_chunk: int,
                     image_patches: int, device: torch.device) -> int:
    """An upper estimate of the transient memory of the largest step: one prefill chunk of the
    language model at full context, or MoonViT on one image of `image_patches` patches."""
    t, v = config.text, config.vision
    c, s, h = min(prefill_chunk, max_context), max_context, t.num_attention_heads
    # The CPU path computes attention and the vision tower in fp32; a GPU in the model's dtype
    # (assumed 16-bit there).
    f32 = 4 if device.type == "cpu" else 2
    lm = c * t.hidden_size * f32 * 8  # residual stream, norms, projections
    lm += c * h * (t.qk_head_dim * 2 + t.v_head_dim) * f32  # q, and k/v of the chunk
    lm += s * h * (t.qk_head_dim + t.qk_nope_head_dim + 2 * t.v_head_dim) * f32  # expanded K/V
    if device.type == "cpu":  # torch's CPU attention materializes the scores of a chunk
        lm += c * h * s * f32
    lm += c * max(t.intermediate_size * 3,
                  t.num_experts_per_tok * (3 * t.moe_intermediate_size + t.hidden_size)) * f32
    vit = image_patches * (v.hidden_size * 6 + v.intermediate_size * 2) * f32
    logits = t.vocab_size * f32 * 4
    return int(1.25 * (max(lm, vit) + logits))


def plan_memory(model: nn.Module, config: KimiVLConfig, dtype: torch.dtype, *, device: str,
                max_context: int, prefill_chunk: int, image_patches: int,
                gpu_memory_gb: float | None = None, cpu_experts: int | None = None,
                cuda_available: bool | None = None, device_free: int | None = None,
                host_total: int | None = None) -> MemoryPlan:
    """Place the meta-device `model` and check that it fits (MemoryPlanError if not).

    device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    gpu_memory_gb: the GPU budget (default: the device's free memory). cpu_experts: routed-expert
    layers kept on the host (GPU only); with device "auto" and none given, as many as needed.
    cuda_available / device_free / host_total: measured here unless given (tests pass them).
    """
    text = config.text
    if max_context < 1 or max_context > text.max_position_embeddings:
        raise MemoryPlanError(f"--max-context must be in 1..{text.max_position_embeddings} "
                              f"(the model's limit), got {max_context}")
    if cpu_experts is not None and cpu_experts < 0:
        raise MemoryPlanError(f"--cpu-experts must be >= 0, got {cpu_experts}")
    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        raise MemoryPlanError(f"--gpu-memory must be a positive number of GB, got {gpu_memory_gb}")
    compute = resolve_device(device, torch.cuda.is_available() if cuda_available is None
                              else cuda_available)
    moe_layers = [i for i in range(text.num_hidden_layers) if text.is_moe_layer(i)]
    if compute.type == "cpu":
        if cpu_experts:
            raise MemoryPlanError("--cpu-experts keeps routed experts in host memory while the "
                                  "rest runs on a GPU; it needs --device cuda")
        if gpu_memory_gb is not None:
            raise MemoryPlanError("--gpu-memory applies to --device cuda; this run is on the CPU")
    if cpu_experts is not None and cpu_experts > len(moe_layers):
        raise MemoryPlanError(f"--cpu-experts {cpu_experts}: the model has only "
                              f"{len(moe_layers)} MoE layers")

    cpu_placement = Placement(compute, vision_fp32=dtype.itemsize < 4)
    sizes = module_bytes(model, dtype, compute,
                         cpu_placement if compute.type == "cpu" else None)
    cpu_sizes = module_bytes(model, dtype, torch.device("cpu")) if compute.type == "cuda" else sizes
    kv = text.num_hidden_layers * max_context * text.latent_dim * dtype.itemsize
    act = activation_bytes(config, max_context, prefill_chunk, image_patches, compute)
    host_total = _host_total() if host_total is None else host_total

    if compute.type == "cpu":
        fast_copies = vision_fast_bytes(model)
        plan = MemoryPlan(cpu_placement, sum(sizes.values()) + fast_copies, 0, kv, act, None,
                          host_total)
        if fast_copies:
            plan.notes.append(f"weights include {_gb(fast_copies)} of bf16 copies for the vision "
                              f"tower's fast path (KIMIVL_VISION_EXACT=1: none, fp32 speed)")
        if host_total is not None and plan.device_total > host_total:
            raise MemoryPlanError(
                f"the model needs about {_gb(plan.device_total)} of memory ({plan.summary()}) "
                f"but this machine has {_gb(host_total)}. Use a quantized checkpoint (kimivl-local "
                f"quantize MODEL OUT --recipe default) or a smaller --max-context")
        return plan

    if device_free is None:
        device_free = torch.cuda.mem_get_info(compute)[0]
    budget = device_free
    if gpu_memory_gb is not None:
        budget = int(gpu_memory_gb * GiB)
        if budget > device_free:
            raise MemoryPlanError(f"--gpu-memory {gpu_memory_gb:g} GB is more than the "
                                  f"{_gb(device_free)} free on {compute}")

    def plan_with(n: int) -> MemoryPlan:
        placement = Placement(compute, True, tuple(moe_layers[len(moe_layers) - n:]) if n else ())
        on_device = sum(b for name, b in sizes.items() if placement.device_of(name) == compute)
        on_host = sum(b for name, b in cpu_sizes.items() if placement.device_of(name).type == "cpu")
        return MemoryPlan(placement, on_device, on_host, kv, act, budget, host_total)

    if cpu_experts is not None or device != "auto":
        plan = plan_with(cpu_experts or 0)
        if plan.device_total > budget:
            raise MemoryPlanError(_does_not_fit(plan, plan_with, len(moe_layers), max_context))
    else:  # auto: the fewest host-expert layers that fit
        for n in range(len(moe_layers) + 1):
            plan = plan_with(n)
            if plan.device_total <= budget:
                break
        else:
            raise MemoryPlanError(_does_not_fit(plan, plan_with, len(moe_layers), max_context))
        if n:
            plan.notes.append(f"chose --cpu-experts {n} to fit")
    if host_total is not None and plan.host_weights > host_total:
        raise MemoryPlanError(f"the host part ({_gb(plan.host_weights)}) does not fit this "
                              f"machine's {_gb(host_total)} of memory; lower --cpu-experts")
    return plan


def _does_not_fit(plan: MemoryPlan, plan_with, moe_layers: int, max_context: int) -> str:
    hints = []
    for n in range(len(plan.placement.cpu_expert_layers) + 1, moe_layers + 1):
        if plan_with(n).device_total <= plan.budget:
            hints.append(f"--cpu-experts {n}")
            break
    per_token = plan.kv_cache // max_context
    room = plan.budget - (plan.device_total - plan.kv_cache)
    if room > 0 and room // per_token >= 1024:
        hints.append(f"--max-context {room // per_token // 1024 * 1024}")
    fix = (" Try " + " or ".join(hints) + ".") if hints else \
        " Even with every routed expert in host memory it does not fit: use --device cpu."
    return (f"the model does not fit the GPU: it needs about {_gb(plan.device_total)} "
            f"({plan.summary()}).{fix}")


def resolve_device(device: str, cuda_available: bool) -> torch.device:
    """`--device` (auto, cpu, cuda, cuda:N) as a torch device, or a one-line error."""
    if device == "auto":
        return torch.device("cuda" if cuda_available else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MemoryPlanError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise MemoryPlanError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not cuda_available:
            raise MemoryPlanError("--device cuda: no CUDA GPU is visible to torch (is this the "
                                  "CPU build of torch, or is the driver missing?); use --device "
                                  "cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", 0)
        elif dev.index >= torch.cuda.device_count():
            raise MemoryPlanError(f"--device {device}: only {torch.cuda.device_count()} GPU(s)")
    return dev


def _host_total() -> int | None:
    """The machine's memory, or KIMIVL_HOST_MEMORY_GB (a smaller budget: tests, shared hosts)."""
    budget = os.environ.get("KIMIVL_HOST_MEMORY_GB")
    if budget:
        try:
            return int(float(budget) * GiB)
        except ValueError:
            raise MemoryPlanError(f"KIMIVL_HOST_MEMORY_GB must be a number of GB, got "
                                  f"{budget!r}") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GB"


def _layer_ranges(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
