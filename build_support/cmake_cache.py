"""Reusing a CMake build folder only while the tools it remembers still exist (used by setup.py).

pip builds each install in a fresh temporary environment with its own cmake and ninja and deletes
it afterwards, but the build folder under build/ outlives it, and its CMakeCache.txt keeps the
paths of that environment's cmake and ninja. A later configure then fails on the vanished ninja.
So before each configure, a cache made by other tools, another Python or another generator is
removed; the folder's object files stay, and ninja recompiles only what changed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def cached_values(cache: Path) -> dict[str, str]:
    """KEY -> value of every entry in a CMakeCache.txt."""
    values = {}
    for line in cache.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_-]*):[A-Z]+=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def stale_reason(build_dir: Path, *, generator: str, tools: dict[str, str | None]) -> str | None:
    """Why the cache in `build_dir` cannot be reused with this generator and these tools (cache
    key -> the path this configure uses, or None to check only that the cached one exists);
    None when it can, or when there is none."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    old = cached_values(cache)
    if old.get("CMAKE_GENERATOR", generator) != generator:
        return f"it was made for the {old['CMAKE_GENERATOR']} generator"
    for key, now in tools.items():
        before = old.get(key)
        if not before:
            continue
        if not Path(before).exists():
            return f"its {key} {before} no longer exists"
        if now and os.path.normpath(before) != os.path.normpath(now):
            return f"its {key} is {before}, this build uses {now}"
    return None


def drop_stale_cache(build_dir: Path, **how) -> str | None:
    """Remove a cache that `stale_reason` rejects; return the reason (None when kept)."""
    reason = stale_reason(build_dir, **how)
    if reason:
        (build_dir / "CMakeCache.txt").unlink()
    return reason
