"""kimivl-local's own cache: checkpoints quantized to fit this machine, one folder per source,
source revision and recipe, under ~/.cache/kimivl-local (KIMIVL_CACHE overrides).

Each entry holds the quantized checkpoint and kimivl-cache.json (what it was made from). It is
built under .staging/ and renamed into place when complete, so an entry is whole or absent; an
interrupted build resumes from its staging folder on the next run (the quantize tool's resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.hub import Located
from ..errors import InputError

MARKER = "kimivl-cache.json"
STAGING = ".staging"


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    source: str  # repo id, or the source folder's path
    revision: str  # commit, or a digest of the source folder's files
    recipe: str
    bytes: int
    complete: bool = True


def cache_root() -> Path:
    root = os.environ.get("KIMIVL_CACHE") or Path.home() / ".cache" / "kimivl-local"
    return Path(root).expanduser().absolute()


def source_of(located: Located) -> tuple[str, str]:
    """(source, revision) identifying a checkpoint: the repo id and commit for a Hub snapshot;
    else the folder's path and a digest of its files' names, sizes and mtimes."""
    if located.repo:
        return located.repo, located.commit
    folder = located.path.resolve()
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.iterdir() if p.is_file())
    return str(folder), hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def entry_name(located: Located, recipe: str) -> str:
    source, revision = source_of(located)
    if located.repo:
        label = source.replace("/", "--")
    else:  # the folder name, plus a hash of its path: two folders named alike stay apart
        label = "local--" + Path(source).name + "-" + hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', label)}--{revision[:12]}--{recipe}"


def find(located: Located, recipe: str) -> Path | None:
    path = cache_root() / entry_name(located, recipe)
    return path if (path / MARKER).is_file() else None


def built_from(located: Located) -> list[tuple[str, Path]]:
    """(recipe, folder) of the complete entries made from `located`, the default recipe first."""
    from ..quantize.recipes import RECIPES

    found = [(r, find(located, r)) for r in sorted(RECIPES, key=lambda r: r != "default")]
    return [(r, path) for r, path in found if path is not None]


def build(located: Located, recipe: str) -> Path:
    """Quantize `located` with `recipe` into the cache (resuming an interrupted build)."""
    from ..quantize.main import quantize

    root = cache_root()
    name = entry_name(located, recipe)
    staging = root / STAGING / name
    staging.parent.mkdir(parents=True, exist_ok=True)
    # force: a staging folder left complete by a crash just before the rename is rebuilt.
    # eval_samples=0: the user asked to chat, not for a quality report; measuring output error
    # would roughly double the time the offer announced.
    quantize(located.path, staging, recipe=recipe, force=True, eval_samples=0)
    source, revision = source_of(located)
    (staging / MARKER).write_text(json.dumps({
        "source": source, "revision": revision, "recipe": recipe,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))
    final = root / name
    if final.exists():  # another run finished first: keep one
        shutil.rmtree(staging)
    else:
        os.rename(staging, final)
    return final


def entries() -> list[Entry]:
    """Every entry, complete ones first, then interrupted builds (which resume on the next run)."""
    root = cache_root()
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        marker = path / MARKER
        if path.name == STAGING or not marker.is_file():
            continue
        try:
            meta = json.loads(marker.read_text())
            found.append(Entry(path.name, path, meta["source"], meta["revision"], meta["recipe"],
                               _size(path)))
        except (OSError, ValueError, KeyError):
            continue  # not ours, or damaged: listed nowhere, removable by hand
    staging = root / STAGING
    for path in sorted(staging.iterdir()) if staging.is_dir() else []:
        name = path.name.removesuffix(".partial")
        found.append(Entry(path.name, path, "?", "?", name.rpartition("--")[2], _size(path),
                           complete=False))
    return found


def remove(name: str) -> Entry:
    """Delete the entry called `name` (as `entries()` names it); only our own entries."""
    for entry in entries():
        if entry.name == name:
            shutil.rmtree(entry.path)
            return entry
    known = ", ".join(e.name for e in entries()) or "none"
    raise InputError(f"{name!r} is not an entry of {cache_root()} (entries: {known}); "
                     "`kimivl-local list` shows them")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
