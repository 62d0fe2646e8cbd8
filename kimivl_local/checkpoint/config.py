"""Frozen configuration dataclasses built from a checkpoint folder's JSON files.

The checkpoint's own files always win; the defaults below are the documented values of
Kimi-VL-A3B (reference §1) and are only used for fields a file leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_json(path: Path, *, required: bool = True, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """Parse one JSON object file, raising `error` with a message that names the file.
    A missing file is an error when `required`, else {}."""
    if not path.is_file():
        if required:
            raise error(f"{path.name} is missing from {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


# Sizes, counts and ids far above any real model's, low enough that nothing sized from the config
# is allocated before the checkpoint's own tensors are checked against it.
_MAX_SIZE = 1 << 20
_MAX_ID = (1 << 31) - 1
# (lowest, highest) accepted for an integer field; any other int field is a size in 1.._MAX_SIZE.
_INT_RANGES = {
    "first_k_dense_replace": (0, _MAX_SIZE), "n_shared_experts": (0, _MAX_SIZE),
    "max_position_embeddings": (1, 1 << 24), "media_placeholder_token_id": (0, _MAX_ID),
    "bos_token_id": (0, _MAX_ID), "eos_token_id": (0, _MAX_ID), "pad_token_id": (0, _MAX_ID),
    "max_length": (1, 1 << 24),
}
# Float fields that may be 0 (the others must be > 0); all must be finite.
_MAY_BE_ZERO = {"temperature", "image_mean"}


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass `cls` from the known keys of `data`, each checked against the field's
    declared type and range before anything uses it; unknown keys are ignored."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        kwargs[f.name] = _checked(data[f.name], f.type, f.name, where)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _checked(value: Any, annotation: str, name: str, where: str, label: str = "") -> Any:
    """`value` if it fits `annotation` (a dataclass field's type, as written above), else a
    ConfigError naming the file and field (`label`, default `name`)."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {label or name} must be {expected}, "
                           f"not {json.dumps(value)[:80]}")

    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return None
    kind = options[0]
    if kind == "int":
        lo, hi = _INT_RANGES.get(name, (1, _MAX_SIZE))
        if isinstance(value, list) and "list[int]" in options and value:
            return [_checked(v, "int", name, where, f"{name}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise bad(f"an integer in {lo}..{hi}")
    elif kind == "float":
        lo = 0.0 if name in _MAY_BE_ZERO else math.ulp(0.0)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value < lo):
            raise bad("a finite number" + (" >= 0" if lo == 0 else " > 0"))
    elif kind in ("bool", "str"):
        if type(value).__name__ != kind:
            raise bad("true or false" if kind == "bool" else "a string")
    elif kind == "dict":
        if not isinstance(value, dict):
            raise bad("an object")
    elif kind.startswith("tuple["):
        items = [a.strip() for a in kind[6:-1].split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise bad(f"a list of {len(items)} {items[0]}s")
        return tuple(_checked(v, t, name, where, f"{name}[{i}]")
                     for i, (v, t) in enumerate(zip(value, items)))
    else:
        raise AssertionError(f"no check for {annotation}")  # a new field type: add its check
    return value


@dataclass(frozen=True)
class TextConfig:
    """text_config: the DeepSeek-V3-style MLA/MoE language model (Moonlight-16B-A3B)."""

    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.446
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    rope_theta: float = 800000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = 163839

    def __post_init__(self):
        unsupported = []
        if self.q_lora_rank is not None:
            unsupported.append(f"q_lora_rank={self.q_lora_rank} (Kimi-VL has null)")
        if self.scoring_func != "sigmoid":
            unsupported.append(f"scoring_func={self.scoring_func!r} (Kimi-VL uses 'sigmoid')")
        if self.topk_method != "noaux_tc":
            unsupported.append(f"topk_method={self.topk_method!r} (Kimi-VL uses 'noaux_tc')")
        if self.hidden_act != "silu":
            unsupported.append(f"hidden_act={self.hidden_act!r} (Kimi-VL uses 'silu')")
        if self.rope_scaling:
            unsupported.append(f"rope_scaling={self.rope_scaling!r} (Kimi-VL has null)")
        if self.attention_bias:
            unsupported.append("attention_bias=true (Kimi-VL has no biases)")
        if self.tie_word_embeddings:
            unsupported.append("tie_word_embeddings=true (Kimi-VL has an untied lm_head)")
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            unsupported.append(f"n_group={self.n_group}, topk_group={self.topk_group} with "
                               f"{self.n_routed_experts} experts")
        if self.num_experts_per_tok > self.n_routed_experts:
            unsupported.append(f"num_experts_per_tok={self.num_experts_per_tok} > "
                               f"n_routed_experts={self.n_routed_experts}")
        if self.num_key_value_heads != self.num_attention_heads:
            unsupported.append("num_key_value_heads != num_attention_heads")
        if unsupported:
            raise ConfigError("unsupported text_config: " + "; ".join(unsupported))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached token per layer: the normalised c_kv plus the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


@dataclass(frozen=True)
class VisionConfig:
    """vision_config: MoonViT-SO-400M."""

    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    merge_kernel_size: tuple[int, int] = (2, 2)

    def __post_init__(self):
        object.__setattr__(self, "merge_kernel_size", tuple(self.merge_kernel_size))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("vision_config.hidden_size must be a multiple of num_attention_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class KimiVLConfig:
    """config.json: the whole model."""

    text: TextConfig
    vision: VisionConfig
    media_placeholder_token_id: int = 163605
    torch_dtype: str = "bfloat16"
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config.json") -> "KimiVLConfig":
        model_type = data.get("model_type")
        if model_type != "kimi_vl":
            raise ConfigError(f"{where}: model_type is {model_type!r}, expected 'kimi_vl' "
                              "(is this a Kimi-VL checkpoint?)")
        for key in ("text_config", "vision_config"):
            if not isinstance(data.get(key), dict):
                raise ConfigError(f"{where}: {key} is missing")
        torch_dtype = data.get("torch_dtype") or data["text_config"].get("torch_dtype") or "bfloat16"
        if torch_dtype not in DTYPES:
            raise ConfigError(f"{where}: torch_dtype {torch_dtype!r} is not one of {sorted(DTYPES)}")
        return cls(
            text=_from_dict(TextConfig, data["text_config"], f"{where} text_config"),
            vision=_from_dict(VisionConfig, data["vision_config"], f"{where} vision_config"),
            media_placeholder_token_id=_checked(data.get("media_placeholder_token_id", 163605),
                                                "int", "media_placeholder_token_id", where),
            torch_dtype=torch_dtype,
            raw=data,
        )

    @classmethod
    def from_dir(cls, path: Path) -> "KimiVLConfig":
        return cls.from_dict(read_json(Path(path) / "config.json"), str(Path(path) / "config.json"))


@dataclass(frozen=True)
class PreprocessorConfig:
    """preprocessor_config.json: how images become patches."""

    patch_size: int = 14
    merge_kernel_size: tuple[int, int] = (2, 2)
    in_token_limit: int = 4096
    pad_input: bool = True
    num_pooled_tokens: int = 1024
    # OpenAI-CLIP values are the processor class defaults; the real file's values win.
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        for name in ("merge_kernel_size", "image_mean", "image_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_dir(cls, path: Path) -> "PreprocessorConfig":
        where = Path(path) / "preprocessor_config.json"
        return _from_dict(cls, read_json(where, required=False), str(where))


@dataclass(frozen=True)
class GenerationConfig:
    """generation_config.json: stop tokens and the publisher's sampling defaults."""

    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_length: int | None = None

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_dir(cls, path: Path) -> "GenerationConfig":
        where = Path(path) / "generation_config.json"
        return _from_dict(cls, read_json(where, required=False), str(where))
