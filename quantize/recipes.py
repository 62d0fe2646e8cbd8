"""Which linear layers get which bits: rules over module names, and the named recipes.

A rule is `REGEX=BITS[:GROUP][:sym|asym]`: REGEX is searched in the module name (the checkpoint
name without `.weight`, e.g. `language_model.model.layers.3.mlp.experts.17.down_proj`); BITS is
2, 3, 4, 5, 6 or 8, or 16 to keep the checkpoint's dtype; GROUP is 32, 64, 128 or `channel`
(default: 32 for 2 bits, 64 for 3, 128 for 4 to 6, channel for 8: the fewer the levels, the more
a scale per few weights pays for itself); symmetric unless `asym`. The first matching rule wins, and `--rule`s are
tried before the recipe's. Routers (`mlp.gate`) always stay in the checkpoint's dtype: the runtime
computes their top-k in fp32. Linear layers that no rule matches stay in the checkpoint's dtype.

A recipe quantizes any checkpoint: where its group does not divide a layer's input size, that
layer falls back to the largest smaller group that does and that the kernels take (a multiple of
32, see quant/layout.py), else to per-channel, at the same bits (`fit_group`; the plan lists each
fallback). A `--rule` is taken as written: a group that does not divide is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from kimivl_local.errors import InputError
from kimivl_local.quant.layout import CHUNK
from kimivl_local.quant.packing import QuantScheme
from kimivl_local.quant.qconfig import ConfigGroup, QuantizationConfig

GROUPS = {"32": 32, "64": 64, "128": 128, "channel": None}
DEFAULT_GROUP = {2: 32, 3: 64, 4: 128, 5: 128, 6: 128, 8: None}
ROUTER = re.compile(r"\.mlp\.gate$")

ROUTED_EXPERTS = r"\.mlp\.experts\.\d+\.(gate|up|down)_proj$"
SHARED_EXPERTS = r"\.mlp\.shared_experts\.(gate|up|down)_proj$"
ATTENTION = r"\.self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$"
DENSE_MLP = r"\.layers\.\d+\.mlp\.(gate|up|down)_proj$"
LM_HEAD = r"^language_model\.lm_head$"
LANGUAGE_MODEL = r"^language_model\."

INT4_G128 = QuantScheme(4, 128, True)
INT8_CHANNEL = QuantScheme(8, None, True)


@dataclass(frozen=True)
class Rule:
    pattern: str
    scheme: QuantScheme | None  # None: keep the checkpoint's dtype

    def matches(self, module: str) -> bool:
        return re.search(self.pattern, module) is not None

    def __str__(self) -> str:
        s = self.scheme
        if s is None:
            return f"{self.pattern}=16"
        group = "channel" if s.group_size is None else str(s.group_size)
        return f"{self.pattern}={s.bits}:{group}:{'sym' if s.symmetric else 'asym'}"


RECIPES: dict[str, tuple[str, tuple[Rule, ...]]] = {
    "experts-int4": ("routed experts INT4 g32 symmetric, everything else bf16 (the split of "
                     "Moonshot's own INT4 releases)",
                     (Rule(ROUTED_EXPERTS, QuantScheme(4, 32, True)),)),
    "default": ("routed experts INT4 g128; shared experts, attention, dense layer and lm_head "
                "INT8 per-channel; router, norms, embeddings and MoonViT bf16 (fits 12 GB)",
                (Rule(ROUTED_EXPERTS, INT4_G128), Rule(SHARED_EXPERTS, INT8_CHANNEL),
                 Rule(ATTENTION, INT8_CHANNEL), Rule(DENSE_MLP, INT8_CHANNEL),
                 Rule(LM_HEAD, INT8_CHANNEL))),
    "int8": ("every linear layer of the language model INT8 per-channel (routers stay bf16)",
             (Rule(LANGUAGE_MODEL, INT8_CHANNEL),)),
    "int4": ("every linear layer of the language model INT4 g128 (routers stay bf16)",
             (Rule(LANGUAGE_MODEL, INT4_G128),)),
}


def parse_rule(text: str) -> Rule:
    """`REGEX=BITS[:GROUP][:sym|asym]` -> Rule; InputError saying what is wrong."""
    pattern, eq, spec = text.rpartition("=")
    if not eq or not pattern:
        raise InputError(f"--rule {text!r}: expected REGEX=BITS[:GROUP][:sym|asym], "
                         "e.g. 'mlp\\.experts=4:128' or 'lm_head=8'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InputError(f"--rule {text!r}: {pattern!r} is not a valid regex ({exc})") from None
    bits, *rest = spec.split(":")
    if bits not in [str(b) for b in DEFAULT_GROUP] + ["16"]:
        raise InputError(f"--rule {text!r}: BITS must be 2, 3, 4, 5, 6, 8 or 16 (keep), "
                         f"got {bits!r}")
    if bits == "16":
        if rest:
            raise InputError(f"--rule {text!r}: 16 keeps the checkpoint's dtype and takes no "
                             "group or symmetry")
        return Rule(pattern, None)
    group, symmetric = DEFAULT_GROUP[int(bits)], True
    if rest and rest[0] not in ("sym", "asym"):
        if rest[0] not in GROUPS:
            raise InputError(f"--rule {text!r}: GROUP must be one of {', '.join(GROUPS)}, "
                             f"got {rest[0]!r}")
        group = GROUPS[rest.pop(0)]
    if rest:
        if rest[0] not in ("sym", "asym"):
            raise InputError(f"--rule {text!r}: expected sym or asym, got {rest[0]!r}")
        symmetric = rest.pop(0) == "sym"
    if rest:
        raise InputError(f"--rule {text!r}: unexpected {':'.join(rest)!r} after the symmetry")
    return Rule(pattern, QuantScheme(int(bits), group, symmetric))


def recipe_rules(recipe: str) -> tuple[Rule, ...]:
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe][1]


def fit_group(scheme: QuantScheme, in_features: int) -> QuantScheme:
    """`scheme`, or its fallback for a layer of `in_features` inputs: the largest smaller group
    that divides in_features and is a multiple of CHUNK (what the CPU and CUDA kernels take),
    else per-channel; bits and symmetry stay."""
    group = scheme.group_size
    if group is None or in_features % group == 0:
        return scheme
    for smaller in range(min(group - 1, in_features) // CHUNK * CHUNK, 0, -CHUNK):
        if in_features % smaller == 0:
            return replace(scheme, group_size=smaller)
    return replace(scheme, group_size=None)


def winner(module: str, rules: list[Rule]) -> Rule | None:
    """The first rule matching `module`; None for routers and unmatched modules (kept)."""
    if ROUTER.search(module):
        return None
    return next((r for r in rules if r.matches(module)), None)


def assign(modules: dict[str, int], rules: list[Rule],
           user_rules: list[Rule] = ()) -> dict[str, QuantScheme | None]:
    """module -> scheme (None: kept) by the first matching rule, user rules first; `modules` maps
    each module to its input size, which a recipe rule's group is fitted to (`fit_group`); routers
    are always kept. A user rule that matches no quantizable module is an error (a typo,
    usually)."""
    ordered = list(user_rules) + list(rules)
    result = {}
    for module, in_features in modules.items():
        rule = winner(module, ordered)
        if rule is None or rule.scheme is None or rule in user_rules:
            result[module] = None if rule is None else rule.scheme
        else:
            result[module] = fit_group(rule.scheme, in_features)
    for rule in user_rules:
        if not any(rule.matches(m) and not ROUTER.search(m) for m in modules):
            raise InputError(f"--rule {rule}: {rule.pattern!r} matches no quantizable linear "
                             "layer (routers always stay bf16); see `--dry-run` for the names")
    return result


def fallbacks(assignment: dict[str, QuantScheme | None],
              rules: list[Rule]) -> dict[str, QuantScheme]:
    """module -> the scheme its rule asked for, for every module that `assign` fell back."""
    asked = {m: winner(m, rules) for m in assignment}
    return {m: asked[m].scheme for m, s in assignment.items()
            if s is not None and asked[m].scheme != s}


def build_qconfig(assignment: dict[str, QuantScheme | None],
                  rules: list[Rule]) -> QuantizationConfig:
    """The compressed-tensors config that resolves every module exactly as `assignment` does.

    Readers settle overlapping targets differently (compressed-tensors' loader by exact name,
    then regex order; its dequantizer by group order), so no module may match two targets: each
    rule's target excludes, by a lookahead, the earlier rules that overlap it on this checkpoint
    (re.match(".*?(?:p)") is re.search("p")) and the modules of its own that fell back to another
    group; those get targets of their own, spelled by `_name_patterns`. Every module kept dense is
    listed by name in `ignore`, as compressed-tensors itself writes it.
    """
    modules = list(assignment)
    groups: dict[QuantScheme, list[str]] = {}
    for i, rule in enumerate(rules):
        if rule.scheme is None:
            continue
        won = [m for m in modules if assignment[m] is not None and rule.matches(m)
               and not any(r.matches(m) for r in rules[:i])]
        fell: dict[QuantScheme, list[str]] = {}
        for m in won:
            if assignment[m] != rule.scheme:
                fell.setdefault(assignment[m], []).append(m)
        overlapping = [r.pattern for r in rules[:i]
                       if any(r.matches(m) for m in modules if rule.matches(m))]
        guard = "".join(f"(?!.*?(?:{p}))" for p in overlapping)
        if fell:
            guard += f"(?!(?:{'|'.join(_name_patterns(sum(fell.values(), []), modules))})$)"
        if len(won) > sum(map(len, fell.values())):
            groups.setdefault(rule.scheme, []).append(f"re:{guard}.*?(?:{rule.pattern})")
        for scheme, names in fell.items():
            names = "|".join(_name_patterns(names, modules))
            groups.setdefault(scheme, []).append(f"re:(?:{names})$")
    config = QuantizationConfig(
        tuple(ConfigGroup(f"group_{i}", tuple(targets), scheme)
              for i, (scheme, targets) in enumerate(groups.items())),
        tuple(m for m in modules if assignment[m] is None))
    mismatched = [m for m in modules if config.scheme_for(m) != assignment[m]]
    if mismatched:  # the regex translation above is exact; this guards its invariant
        raise AssertionError(f"quantization_config resolves {mismatched[:3]} differently")
    return config


def _name_patterns(names: list[str], modules: list[str]) -> list[str]:
    """Regexes that fully match exactly `names` among `modules`: each name with its numbers
    generalised (layers.\\d+.mlp.experts.\\d+.down_proj) where that matches no other module, else
    the name itself; short even when every expert of every layer falls back."""
    chosen, covered, wanted = [], set(), set(names)
    for name in names:
        if name in covered:
            continue
        general = re.sub(r"\d+", r"\\d+", re.escape(name))
        hits = {m for m in modules if re.fullmatch(general, m)}
        pattern = general if hits <= wanted else re.escape(name)
        chosen.append(pattern)
        covered |= hits if hits <= wanted else {name}
    return chosen
