"""What `chat`, `generate` and `serve` do before loading: get the weights of a repo id that is not
in the local cache, and make a checkpoint that does not fit this machine fit, once, by quantizing
it into kimivl-local's cache (reused on every later run).

Nothing is downloaded or quantized without the user's yes at the prompt or a flag (--download,
--fit); without a terminal to ask and without the flag, the run stops saying what to run. This is
CLI code: it talks to the user on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint import hub
from ..engine.memory_plan import MemoryPlanError
from ..errors import KimiVLError
from . import fit, model_cache
from .info import format_bytes as size


def prepare(spec: str, revision: str | None, *, download: bool, fit_flag: bool, options: dict,
            max_context: int | None) -> Path:
    """The folder to load for `spec`: as given, freshly downloaded, or a cached fitted copy."""
    located = get_weights(spec, revision, download=download)
    return fitted(located, options, max_context, assume_yes=fit_flag)


def get_weights(spec: str, revision: str | None, *, download: bool) -> hub.Located:
    """`spec`'s checkpoint folder, downloading a repo id that is not cached after a yes."""
    try:
        return hub.locate(spec, revision)
    except hub.NotCachedError as exc:
        if hub.offline():
            raise hub.NotCachedError(f"{exc}. HF_HUB_OFFLINE is set, so nothing is downloaded: "
                                     "unset it to download") from None
        if not download and not sys.stdin.isatty():
            raise
    remote = hub.remote_repo(spec, revision)
    _say(f"{spec} ({remote.revision}, commit {remote.commit[:12]}) is not in the local cache: "
         f"{len(remote.files)} files, {size(remote.total_bytes)} "
         f"(safetensors, JSON and tiktoken.model only; skipping {len(remote.skipped)} others) "
         f"into {hub.cache_dir()}")
    if not download and not confirm(f"Download {size(remote.total_bytes)} now?"):
        raise KimiVLError(f"not downloaded; `kimivl-local download {spec}"
                          f"{f' --revision {revision}' if revision else ''}` fetches it later")
    return fetch(remote)


def fetch(remote: hub.RemoteRepo) -> hub.Located:
    folder = hub.download(remote)
    _say(f"downloaded {remote.repo} to {folder}")
    return hub.Located(folder, remote.repo, folder.name)


def fitted(located: hub.Located, options: dict, max_context: int | None, *,
           assume_yes: bool) -> Path:
    """`located` itself when the planner says it fits (or when no recipe would help: the load
    then reports the planner's error); else its quantized copy from our cache, built once.
    The load plans the chosen folder again, with the free memory of that moment: one plan takes
    0.06-0.16 s on the full Kimi-VL-A3B shapes, too little to thread the plan through load()."""
    try:
        fit.plan_as_is(located.path, options, max_context)
        return located.path
    except MemoryPlanError as exc:
        as_is = exc
    if fit.is_quantized(located.path):
        return located.path
    for recipe, cached in model_cache.built_from(located):
        try:
            fit.plan_as_is(cached, options, max_context)
        except MemoryPlanError:
            continue
        _say(f"using the {recipe}-quantized copy from kimivl-local's cache ({cached}): "
             f"the bf16 checkpoint does not fit")
        return cached
    choice = fit.choose(fit.recipe_fits(located.path, options, max_context))
    if choice is None:
        return located.path
    where = model_cache.cache_root() / model_cache.entry_name(located, choice.recipe)
    plan = choice.plan
    budget = plan.budget if plan.budget is not None else plan.host_total
    offer = (f"{located.repo or located.path} does not fit: {as_is}\nQuantized with recipe "
             f"{choice.recipe!r} it fits: about {size(plan.device_total)}"
             f"{f' of {size(budget)}' if budget else ''} ({plan.summary()}). Quantizing reads "
             f"{size(choice.source_bytes)} and writes {size(choice.output_bytes)} to {where}, "
             f"once ({_duration(choice.minutes)}); later runs start from it.")
    if not assume_yes:
        if not sys.stdin.isatty():
            raise MemoryPlanError(f"{offer}\nPass --fit to do that, or run `kimivl-local "
                                  f"quantize {located.path} OUT --recipe {choice.recipe}`")
        _say(offer)
        if not confirm("Quantize it now?"):
            raise as_is
    else:
        _say(offer)
    path = model_cache.build(located, choice.recipe)
    _say(f"quantized into {path}")
    return path


def confirm(question: str) -> bool:
    """A yes/no question on the terminal; anything but y/yes (or end of input) is a no."""
    sys.stderr.write(f"{question} [y/N] ")  # stderr: generate's stdout is the answer
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _duration(minutes: float) -> str:
    return f"about {minutes:.0f} min" if minutes >= 1 else "under a minute"
