"""What `quantize` will write, decided before writing anything: per source tensor, copied or
quantized and its exact output tensors; the output shards; sizes per module group; the GPU
memory estimate. `--dry-run` prints this; the writer follows it byte for byte."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from kimivl_local.checkpoint.config import KimiVLConfig
from kimivl_local.checkpoint.shards import Checkpoint, DTYPE_NAMES, TensorInfo
from kimivl_local.errors import InputError
from kimivl_local.model.kimivl import KimiVLForConditionalGeneration
from kimivl_local.model.quantized import DENSE_AT_LOAD, packed_shapes
from kimivl_local.quant.packing import QuantScheme
from kimivl_local.quant.qconfig import QuantizationConfig

from .recipes import Rule, assign, build_qconfig, fallbacks

# What the runtime needs on the GPU besides weights and the latent cache: CUDA context and
# allocator slack (~0.5 GiB) plus one 4096-patch image through MoonViT and prefill activations
# (~1 GiB). A stated allowance, not a measurement.
ACTIVATION_ALLOWANCE = 3 << 29  # 1.5 GiB


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass(frozen=True)
class Job:
    """One source tensor and what it becomes: itself (scheme None) or its packed tensors."""

    source: TensorInfo
    module: str
    scheme: QuantScheme | None
    outputs: tuple[OutTensor, ...]

    @property
    def out_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass(frozen=True)
class Shard:
    file: str
    jobs: tuple[Job, ...]
    header: bytes  # the safetensors header, length prefix included

    @property
    def size(self) -> int:
        return len(self.header) + sum(j.out_bytes for j in self.jobs)


@dataclass(frozen=True)
class Plan:
    src: Path
    config: KimiVLConfig
    jobs: tuple[Job, ...]
    shards: tuple[Shard, ...]
    qconfig: QuantizationConfig
    rules: tuple[Rule, ...]
    fallbacks: dict[str, QuantScheme]  # module -> the group its rule asked for (recipes.fit_group)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def quantized(self) -> list[Job]:
        return [j for j in self.jobs if j.scheme is not None]

    def fingerprint(self, extra: dict) -> str:
        """Changes whenever the source files or anything that decides the output bytes do."""
        files = sorted({j.source.file for j in self.jobs})
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        layout = [(s.file, hashlib.sha256(s.header).hexdigest()) for s in self.shards]
        blob = json.dumps([stats, layout, [str(r) for r in self.rules], extra], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def groups(self) -> dict[str, dict]:
        """Per module group: schemes, parameters, output bytes (source order of first sight)."""
        out = defaultdict(lambda: {"schemes": set(), "params": 0, "bytes": 0})
        for j in self.jobs:
            g = out[module_group(j.source.name)]
            g["schemes"].add(describe(j.scheme, j.source.dtype))
            g["params"] += j.source.numel
            g["bytes"] += j.out_bytes
        return dict(out)

    def gpu_bytes(self, context: int) -> dict[str, int]:
        text = self.config.text
        cache = text.num_hidden_layers * text.latent_dim * 2 * context  # bf16 latent per token
        weights = self.total_bytes + sum(  # the runtime dequantizes these to bf16 at load
            2 * j.source.numel - j.out_bytes for j in self.quantized
            if DENSE_AT_LOAD.search(j.module))
        return {"weights": weights, "latent cache": cache,
                "activations (allowance)": ACTIVATION_ALLOWANCE,
                "total": weights + cache + ACTIVATION_ALLOWANCE}


def describe(scheme: QuantScheme | None, dtype: torch.dtype) -> str:
    if scheme is None:
        return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16")
    group = "channel" if scheme.group_size is None else f"g{scheme.group_size}"
    return f"int{scheme.bits} {group}{'' if scheme.symmetric else ' asym'}"


def module_group(tensor: str) -> str:
    if tensor.startswith("vision_tower."):
        return "vision tower (MoonViT)"
    if tensor.startswith("multi_modal_projector."):
        return "projector"
    for key, group in ((".mlp.experts.", "routed experts"), (".mlp.shared_experts.", "shared experts"),
                       (".mlp.gate.", "router"), ("embed_tokens", "embeddings"),
                       ("lm_head", "lm_head"), ("norm", "norms"), (".self_attn.", "attention"),
                       (".mlp.", "dense MLP")):
        if key in tensor:
            return group
    return "other"


def linear_modules(tensors: dict[str, TensorInfo]) -> dict[str, int]:
    """Module name -> in_features of the 2-D `.weight` tensors except embeddings, in source
    order."""
    return {n.removesuffix(".weight"): t.shape[1] for n, t in tensors.items()
            if n.endswith(".weight") and len(t.shape) == 2 and "embed_tokens" not in n}


def packed_outputs(module: str, shape: tuple[int, int], scheme: QuantScheme,
                   scale_dtype: torch.dtype) -> tuple[OutTensor, ...]:
    """The pack-quantized tensors of one weight; scales keep the weight's dtype, as
    compressed-tensors writes them."""
    dtypes = {"weight_packed": torch.int32, "weight_scale": scale_dtype,
              "weight_shape": torch.int64, "weight_zero_point": torch.int32}
    return tuple(OutTensor(f"{module}.{suffix}", dtypes[suffix], s)
                 for suffix, s in packed_shapes(*shape, scheme).items())


def open_source(src: Path) -> tuple[KimiVLConfig, Checkpoint]:
    """The source checkpoint's config and tensors, validated as strictly as the loader does."""
    config = KimiVLConfig.from_dir(src)
    if "quantization_config" in config.raw:
        raise InputError(f"{src} is already quantized (config.json has a quantization_config); "
                         "quantize from the original bf16 checkpoint")
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    ckpt = Checkpoint.open(src)
    ckpt.validate(model.expected_checkpoint())
    return config, ckpt


def make_plan(src: Path, rules: list[Rule], user_rules: list[Rule] = (),
              shard_bytes: int = 2 << 30) -> Plan:
    config, ckpt = open_source(src)
    # Source order (by file, then offset), so the source is read front to back.
    tensors = dict(sorted(ckpt.tensors.items(), key=lambda kv: (kv[1].file.name, kv[1].offset)))
    modules = linear_modules(tensors)
    assignment = assign(modules, rules, user_rules)
    jobs = []
    for name, info in tensors.items():
        module = name.removesuffix(".weight")
        scheme = assignment.get(module) if name.endswith(".weight") else None
        if scheme is None:
            outputs = (OutTensor(name, info.dtype, info.shape),)
        else:
            try:
                outputs = packed_outputs(module, info.shape, scheme, info.dtype)
            except ValueError as exc:
                raise InputError(f"{module} [{info.shape[0]}, {info.shape[1]}]: {exc}; give it a "
                                 "group that divides its input size, or per-channel "
                                 "(e.g. --rule 'NAME=8:channel')") from None
        jobs.append(Job(info, module, scheme, outputs))
    ordered = list(user_rules) + list(rules)
    return Plan(Path(src), config, tuple(jobs), _layout(jobs, shard_bytes),
                build_qconfig(assignment, ordered), tuple(ordered), fallbacks(assignment, ordered))


def _layout(jobs: list[Job], shard_bytes: int) -> tuple[Shard, ...]:
    """Greedy shards of at most shard_bytes of data (a single larger job gets its own shard)."""
    groups, current, size = [], [], 0
    for job in jobs:
        if current and size + job.out_bytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(job)
        size += job.out_bytes
    groups.append(current)
    n = len(groups)
    return tuple(Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g), _header(g))
                 for i, g in enumerate(groups))


def _header(jobs: list[Job]) -> bytes:
    """The safetensors header: tensors in job order, data contiguous, 8-byte aligned JSON."""
    header, offset = {}, 0
    for job in jobs:
        for t in job.outputs:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob
