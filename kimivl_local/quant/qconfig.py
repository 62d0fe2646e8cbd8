"""`quantization_config` in config.json: the compressed-tensors schema, read and written here.

The subset that weight-only integer checkpoints use (what `compressed-tensors` writes and vLLM /
transformers read):

  "quantization_config": {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["re:..."], "weights": {"num_bits": 4, "type": "int",
                      "symmetric": true, "strategy": "group", "group_size": 128, ...},
                      "input_activations": null, "output_activations": null,
                      "format": "pack-quantized"}, ...},
    "ignore": ["language_model.lm_head", ...], "kv_cache_scheme": null, ...}

A target is "re:" + a regex tried with `re.match` (anchored at the start only), a plain string
equal to the module's name, or the class name "Linear" (every linear layer). A module that an
ignore entry matches stays dense; otherwise, when several targets match, compressed-tensors'
`apply_quantization_config` takes exact names first, then regexes in sorted order, then the class
name (`match_targets`), a target listed in two groups belonging to the later one. This module
resolves the same way. (Its model-free dequantizer takes the first matching group instead; the
two agree whenever each module matches one target, as `kimivl-local quantize` writes them.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..errors import ConfigError
from .packing import QuantScheme

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
# compressed-tensors' weight-only integer presets (`quant_scheme.py`), usable as a group's name.
PRESETS = {"W4A16": QuantScheme(4, 128, True), "W4A16_ASYM": QuantScheme(4, 128, False),
           "W8A16": QuantScheme(8, 128, True)}


@dataclass(frozen=True)
class ConfigGroup:
    name: str
    targets: tuple[str, ...]
    scheme: QuantScheme


@dataclass(frozen=True)
class QuantizationConfig:
    groups: tuple[ConfigGroup, ...]
    ignore: tuple[str, ...] = ()

    def scheme_for(self, module: str) -> QuantScheme | None:
        """The scheme of linear module `module` (its checkpoint name), None when it stays dense."""
        if any(match_name(module, pattern) for pattern in self.ignore):
            return None
        schemes = {t: g.scheme for g in self.groups for t in g.targets}  # later groups win
        matches = [t for t in schemes if t == "Linear" or match_name(module, t)]
        if not matches:
            return None
        return schemes[min(matches, key=lambda t: (t == "Linear", t.startswith("re:"), t))]

    def to_dict(self) -> dict:
        """The config.json entry, in the field order compressed-tensors writes."""
        return {
            "config_groups": {g.name: {"targets": list(g.targets), "weights": g.scheme.to_config(),
                                       "input_activations": None, "output_activations": None,
                                       "format": FORMAT} for g in self.groups},
            "format": FORMAT,
            "global_compression_ratio": None,
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
            "quant_method": QUANT_METHOD,
            "quantization_status": "compressed",
        }

    @classmethod
    def from_model_config(cls, raw: dict, where: str = "config.json") -> "QuantizationConfig | None":
        """Parse config.json's quantization_config (None when the checkpoint is not quantized);
        anything this runtime cannot run raises ConfigError naming the field."""
        data = raw.get("quantization_config")
        if data is None:
            return None
        where = f"{where} quantization_config"
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be an object")
        if data.get("quant_method") != QUANT_METHOD:
            raise ConfigError(f"{where}: quant_method {data.get('quant_method')!r} is not supported "
                              f"(kimivl-local reads {QUANT_METHOD!r} checkpoints, e.g. from "
                              "`kimivl-local quantize`)")
        if data.get("quantization_status", "compressed") != "compressed":
            raise ConfigError(f"{where}: quantization_status {data['quantization_status']!r}: "
                              "only compressed (packed) checkpoints can be loaded")
        groups = data.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ConfigError(f"{where}: config_groups must be a non-empty object")
        ignore = data.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise ConfigError(f"{where}: ignore must be a list of module names or 're:' patterns")
        return cls(tuple(_group(name, g, f"{where}.config_groups.{name}", data.get("format"))
                         for name, g in groups.items()), tuple(ignore))


def _group(name: str, group, where: str, default_format: str | None) -> ConfigGroup:
    if isinstance(group, list):  # a preset name mapped to its targets
        if name not in PRESETS:
            raise ConfigError(f"{where}: preset {name!r} is not one of {sorted(PRESETS)}")
        return ConfigGroup(name, _targets(group, where), PRESETS[name])
    if not isinstance(group, dict):
        raise ConfigError(f"{where} must be an object or a list of targets")
    fmt = group.get("format") or default_format
    if fmt != FORMAT:
        raise ConfigError(f"{where}: format {fmt!r} is not supported (only {FORMAT!r})")
    for key in ("input_activations", "output_activations"):
        if group.get(key):
            raise ConfigError(f"{where}: {key} quantization is not supported (weight-only "
                              "checkpoints only)")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ConfigError(f"{where}: weights must be an object")
    weights = dict(weights)
    if weights.get("strategy") is None:  # inferred from group_size, as compressed-tensors does
        size = weights.get("group_size")
        weights["strategy"] = "channel" if size == -1 else "group" if size else "tensor"
    try:
        scheme = QuantScheme.from_config(weights)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}.weights: {exc}") from None
    return ConfigGroup(name, _targets(group.get("targets"), where), scheme)


def _targets(targets, where: str) -> tuple[str, ...]:
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"{where}: targets must be a non-empty list of strings")
    for t in targets:
        if t.startswith("re:"):
            try:
                _compiled(t[3:])
            except re.error as exc:
                raise ConfigError(f"{where}: target {t!r} is not a valid regex ({exc})") from None
    return tuple(targets)


def match_name(name: str, target: str) -> bool:
    """compressed-tensors' rule: 're:' + regex matched at the start of the name, else equality."""
    if target.startswith("re:"):
        return _compiled(target[3:]).match(name) is not None
    return target == name


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)
