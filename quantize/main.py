"""`kimivl-local quantize SRC DST`: compress a bf16 Kimi-VL checkpoint; `quantize()` is the same
from Python."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
import time
from pathlib import Path

from kimivl_local.checkpoint.hub import resolve_model_path
from kimivl_local.errors import CheckpointError, InputError, KimiVLError

from .budget import fit_budget
from .destination import Destination, REPORT
from .output_error import MAX_TOKENS, SAMPLES as EVAL_SAMPLES, measure
from .plan import Plan, make_plan
from .recipes import RECIPES, parse_rule, recipe_rules
from .report import GB, build_report, calibration_table, error_table, size_table
from .writer import MANIFEST, Workspace, check_space, finish, write_shards

log = logging.getLogger("kimivl_local.quantize")

EPILOG = """recipes:
{recipes}

rules: --rule 'REGEX=BITS[:GROUP][:sym|asym]' (repeatable, tried before the recipe's rules, first
match wins). REGEX is searched in module names such as
language_model.model.layers.3.mlp.experts.17.down_proj; BITS 2, 3, 4, 5, 6 or 8, or 16 to keep
bf16; GROUP 32, 64, 128 or channel (default 32 for 2 bits, 64 for 3, 128 for 4-6, channel for
8). Routers always stay bf16.
Where a recipe's group does not divide a layer's input size, that layer takes the largest smaller
multiple of 32 that does, else per-channel (--dry-run lists these fallbacks); a --rule's group
must divide.
  e.g. --recipe int4 --rule 'lm_head=8' --rule 'layers\\.0\\.=16'

An interrupted or failed run resumes when the same command is run again (DST.partial holds its
progress); one run at a time writes a DST (DST.quantize-lock).
"""


def quantize(src, dst, recipe: str = "default", rules: list[str] = (), method: str = "rtn",
             force: bool = False, shard_size: int = 2 << 30, calib_data: Path | None = None,
             calib_samples: int = 64, device: str | None = None, fit_gb: float | None = None,
             context: int = 8192, eval_samples: int = EVAL_SAMPLES) -> dict:
    """Quantize checkpoint `src` (folder or cached HF repo id) into folder `dst`; returns the
    report (also written to dst/quantization_report.json). fit_gb: choose the routed experts'
    widths per layer so the planned GPU memory at `context` fits (budget.py); eval_samples:
    calibration samples for the report's output error per module group and for fit_gb's
    sensitivity (0: no report section, and fit_gb uses weight error)."""
    src, dst = resolve_model_path(src), Path(dst).expanduser().absolute()
    _check_paths(src, dst, force)
    plan = _plan(src, recipe, rules, shard_size, fit_gb, context, eval_samples, calib_data,
                 device)
    return write(plan, dst, method=method, force=force, calib_data=calib_data,
                 calib_samples=calib_samples, device=device, eval_samples=eval_samples)


def write(plan: Plan, dst: Path, method: str = "rtn", force: bool = False,
          calib_data: Path | None = None, calib_samples: int = 64, device: str | None = None,
          eval_samples: int = EVAL_SAMPLES) -> dict:
    """Write `plan` to dst, holding dst's lock: in dst.partial (resumed when a run of the same
    plan and settings left one, only published when that run completed it), renamed to dst when
    complete; returns the report. Any failure is a KimiVLError saying what is kept."""
    if method not in ("rtn", "gptq"):
        raise InputError(f"method must be rtn or gptq, got {method!r}")
    if eval_samples < 0:
        raise InputError(f"--eval-samples must be 0 or more, got {eval_samples}")
    if calib_data is not None and not Path(calib_data).exists():  # before any shard is written
        raise InputError(f"--calib-data {calib_data}: no such file or folder")
    calib = {"data": str(calib_data) if calib_data else None, "samples": calib_samples}
    dest = Destination(dst, MANIFEST)
    ws = Workspace(dest.partial,
                   plan.fingerprint({"method": method, **(calib if method == "gptq" else {})}))
    try:
        with dest.locked():
            try:
                try:
                    dest.recover()
                    dest.check(force)
                    ws.open()
                    if not ws.complete:
                        check_space(plan, ws)
                        _write(plan, ws, method, calib_data, calib_samples, device, eval_samples)
                    report = json.loads((ws.path / REPORT).read_text(encoding="utf-8"))
                    dest.publish(force)
                except CheckpointError:
                    ws.discard()  # a corrupt source: nothing of this run is worth resuming
                    raise
                except OSError as exc:
                    raise InputError(_failure(exc, plan, dst, ws)) from None
            except BaseException:
                if not ws.worth_keeping():
                    ws.discard()
                raise
    except OSError as exc:  # taking the lock: DST's folder cannot be written
        raise InputError(f"cannot write {exc.filename or dst}: {exc.strerror or exc}") from None
    return report


def _plan(src: Path, recipe: str, rules: list[str], shard_size: int, fit_gb: float | None,
          context: int, eval_samples: int, calib_data: Path | None, device: str | None) -> Plan:
    """The recipe and rules' plan, or with --fit-gb the budget's mix (its summary printed)."""
    if eval_samples < 0:
        raise InputError(f"--eval-samples must be 0 or more, got {eval_samples}")
    recipe_list, user = recipe_rules(recipe), [parse_rule(r) for r in rules]
    if fit_gb is None:
        return make_plan(src, recipe_list, user, shard_size)
    if fit_gb <= 0:
        raise InputError(f"--fit-gb must be a positive number of GiB, got {fit_gb:g}")
    mix = fit_budget(src, recipe_list, user, int(fit_gb * (1 << 30)), context, shard_size,
                     eval_samples, calib_data, device)
    log.info("%s", mix.summary())
    return mix.plan


def _write(plan: Plan, ws: Workspace, method: str, calib_data: Path | None, calib_samples: int,
           device: str | None, eval_samples: int) -> None:
    provider, layers = None, None
    if method == "gptq":  # imported here: it pulls in the tokenizer and image stack
        from .sequential import run_gptq

        provider, layers = run_gptq(plan, ws.scratch, calib_data, calib_samples, device)
    errors = write_shards(plan, ws, provider)
    calibration = measure(plan, calib_data, eval_samples, device, provider)
    finish(plan, ws, build_report(plan, errors, method, layers, calibration))
    ws.seal()


def _failure(exc: OSError, plan: Plan, dst: Path, ws: Workspace) -> str:
    """One line: which file could not be read or written, why, and what is kept."""
    where = Path(exc.filename) if exc.filename else dst
    verb = "read" if where.is_relative_to(plan.src) else "write"
    if ws.complete:
        kept = f"{ws.path} is complete: run the same command again to publish it"
    elif ws.worth_keeping():
        kept = (f"{ws.path} keeps {len(ws.shards)} of {len(plan.shards)} shards: run the same "
                "command again to resume once that is fixed, or delete it")
    else:
        kept = "nothing was kept"
    return f"cannot {verb} {where}: {exc.strerror or exc}; {kept}"


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise InputError(f"DST {dst} must be outside SRC {src} (and not contain it)")
    Destination(dst, MANIFEST).check(force)  # again under the lock; here to fail before planning


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 500MB, got {text!r}")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** " KMGT".index(m[2].upper() or " "))


def _parser() -> argparse.ArgumentParser:
    recipes = "\n".join(textwrap.fill(doc, 96, initial_indent=f"  {name:13s}",
                                       subsequent_indent=" " * 15)
                         for name, (doc, _) in RECIPES.items())
    p = argparse.ArgumentParser(prog="kimivl-local quantize",
                                description="Compress a bf16 Kimi-VL checkpoint to the "
                                            "compressed-tensors pack-quantized format.",
                                epilog=EPILOG.format(recipes=recipes),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="bf16 checkpoint folder or Hugging Face repo id in the local cache")
    p.add_argument("dst", type=Path, help="output folder (written as DST.partial, then renamed)")
    p.add_argument("--recipe", default="default", choices=list(RECIPES), help="default: default")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=BITS[:GROUP][:sym|asym]",
                   help="per-module override, see below (repeatable)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="round-to-nearest (default), or GPTQ with calibration data")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sizes and GPU memory estimate, write nothing")
    p.add_argument("--context", type=int, default=8192,
                   help="context length for the GPU memory estimate (default 8192)")
    p.add_argument("--fit-gb", type=float, metavar="GIB",
                   help="choose each MoE layer's routed-expert width (2-8 bits) so the planned GPU "
                        "memory at --context fits GIB (other modules follow the recipe and rules)")
    p.add_argument("--force", action="store_true",
                   help="replace DST if it is an earlier quantize output (never another folder)")
    p.add_argument("--shard-size", type=parse_size, default=2 << 30,
                   help="largest output shard (default 2GiB; also the unit of resumption)")
    p.add_argument("--calib-data", type=Path,
                   help="calibration for GPTQ, the report's output error and --fit-gb: a folder "
                        "of .txt and image files, or a JSONL file of "
                        '{"text": ..., "image": path} lines (default: a built-in synthetic set)')
    p.add_argument("--calib-samples", type=int, default=64,
                   help="GPTQ calibration samples (default 64)")
    p.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES,
                   help="calibration samples (first %d tokens each) for the report's output error "
                        "per module group, RTN or GPTQ, and for --fit-gb's sensitivity (default "
                        "%d; 0 skips the report's and makes --fit-gb use weight error)"
                        % (MAX_TOKENS, EVAL_SAMPLES))
    p.add_argument("--device", help="GPTQ and output-error device (default: cuda when available, "
                                    "else cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        src, dst = resolve_model_path(args.src), args.dst.expanduser().absolute()
        if not args.dry_run:
            _check_paths(src, dst, args.force)
        t0 = time.perf_counter()
        plan = _plan(src, args.recipe, args.rule, args.shard_size, args.fit_gb, args.context,
                     args.eval_samples, args.calib_data, args.device)
        print(size_table(plan, args.context))
        if args.dry_run:
            return 0
        report = write(plan, dst, args.method, args.force, args.calib_data, args.calib_samples,
                       args.device, args.eval_samples)  # the plan carries --fit-gb's rules
    except KimiVLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume from {args.dst}.partial",
              file=sys.stderr)
        return 130
    print(error_table(report["linear_errors"]))
    if "calibration_errors" in report:
        print(calibration_table(report["calibration_errors"]))
    print(f"wrote {dst}: {report['output_bytes'] / GB:.2f} GB from "
          f"{report['source_tensor_bytes'] / GB:.2f} GB ({args.recipe}, {args.method}) in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
