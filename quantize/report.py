"""What a quantization costs and changes: the size table (also the `--dry-run` output), the output
error of every quantized linear layer, and the JSON report written next to the weights."""

from __future__ import annotations

import statistics
from collections import defaultdict

from .plan import Plan, describe, module_group

GB = 1e9
GIB = 1 << 30


def size_table(plan: Plan, context: int) -> str:
    """Per module group: format, parameters and bytes; the total; GPU memory at `context`."""
    rows = [(name, " + ".join(sorted(g["schemes"])), f"{g['params'] / 1e6:,.1f} M",
             f"{g['bytes'] / 1e6:,.1f} MB") for name, g in plan.groups().items()]
    rows.append(("total", f"{len(plan.shards)} shard(s)",
                 f"{sum(j.source.numel for j in plan.jobs) / 1e6:,.1f} M",
                 f"{plan.total_bytes / 1e6:,.1f} MB"))
    table = _table([("group", "format", "params", "bytes")] + rows, left=2).split("\n")
    table.insert(len(table) - 1, "-" * len(table[0]))
    source = sum(j.source.nbytes for j in plan.jobs)
    gpu = plan.gpu_bytes(context)
    table.append(f"on disk: {plan.total_bytes:,} bytes ({plan.total_bytes / GIB:.2f} GiB), "
                 f"{plan.total_bytes / source:.1%} of the source's {source / GB:.2f} GB of tensors")
    table.append(f"GPU memory at {context:,} tokens of context: {gpu['total'] / GIB:.2f} GiB = "
                 + " + ".join(f"{k} {v / GIB:.2f}" for k, v in gpu.items() if k != "total"))
    fell = fallback_table(plan)
    return "\n".join(table + ([fell] if fell else []))


def fallbacks(plan: Plan) -> dict[str, dict]:
    """module -> what its rule asked for and what it got, for each group fallback."""
    jobs = {j.module: j for j in plan.quantized}
    return {m: {"asked": describe(asked, None), "used": describe(jobs[m].scheme, None),
                "in_features": jobs[m].source.shape[1]} for m, asked in plan.fallbacks.items()}


def fallback_table(plan: Plan) -> str:
    """The group fallbacks by (asked, used): how many linears, which input sizes ('' if none)."""
    by_kind = defaultdict(list)
    for f in fallbacks(plan).values():
        by_kind[f["asked"], f["used"]].append(f["in_features"])
    if not by_kind:
        return ""
    rows = [(f"{asked} -> {used}", str(len(ks)), ", ".join(map(str, sorted(set(ks)))))
            for (asked, used), ks in by_kind.items()]
    return ("group fallbacks (the recipe's group does not divide these layers' input size):\n"
            + _table([("asked -> used", "linears", "in_features")] + rows, left=1))


def error_table(errors: dict[str, float]) -> str:
    """Per module group: how many quantized linears, and the median and worst output error."""
    by_group = defaultdict(list)
    for module, err in errors.items():
        by_group[module_group(module + ".weight")].append(err)
    return _table([("group", "linears", "median error", "max error")]
                  + [(g, str(len(v)), f"{statistics.median(v):.4f}", f"{max(v):.4f}")
                     for g, v in by_group.items()], left=1)


def calibration_table(section: dict | None) -> str:
    """The report's output error on calibration data per module group ('' when not measured)."""
    if not section:
        return ""
    rows = [(g, f"{e:.4f}") for g, e in section["groups"].items()]
    rows.append(("final hidden states", f"{section['final_hidden_states']:.4f}"))
    n = section["samples"]
    return (f"output error on calibration data ({n} sample{'s' if n != 1 else ''}, "
            f"{section['tokens']} tokens; each group with the original model's inputs):\n"
            + _table([("group", "rel. error")] + rows, left=1))


def _table(rows: list[tuple[str, ...]], left: int) -> str:
    """Aligned columns (the first `left` to the left), a rule under the header row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def build_report(plan: Plan, errors: dict[str, float], method: str,
                 gptq_layers: dict[str, dict] | None = None,
                 calibration: dict | None = None) -> dict:
    return {
        "method": method,
        "rules": [str(r) for r in plan.rules],
        "source_tensor_bytes": sum(j.source.nbytes for j in plan.jobs),
        "output_bytes": plan.total_bytes,
        "groups": {name: {"format": sorted(g["schemes"]), "params": g["params"], "bytes": g["bytes"]}
                   for name, g in plan.groups().items()},
        "error_definition": "relative output error ‖x·(Ŵ - W)ᵀ‖ / ‖x·Wᵀ‖ of each linear layer: "
                            "for RTN its expectation over random x ~ N(0, I), ‖Ŵ - W‖ / ‖W‖ "
                            "(first 128 rows of each chunk); for GPTQ over the calibration inputs",
        "group_fallbacks": fallbacks(plan),
        "linear_errors": {m: round(e, 6) for m, e in sorted(errors.items())},
        **({"gptq_layers": gptq_layers} if gptq_layers else {}),
        **({"calibration_errors": calibration} if calibration else {}),
    }
