"""`kimivl-local download | list | rm`: fetch a repo into the Hugging Face cache, show what is
cached, remove one of kimivl-local's own (quantized) entries."""

from __future__ import annotations

import json
import sys

from ..checkpoint import hub
from ..errors import KimiVLError
from . import model_cache
from .info import format_bytes as size
from .prepare import fetch


def cmd_download(args) -> int:
    if hub.offline():
        raise KimiVLError("HF_HUB_OFFLINE is set, so nothing is downloaded: unset it to download")
    if not hub.is_repo_id(args.repo):
        raise KimiVLError(f"{args.repo!r} is not a Hugging Face repo id (owner/name)")
    remote = hub.remote_repo(args.repo, args.revision)
    print(f"{args.repo} ({remote.revision}, commit {remote.commit[:12]}): {len(remote.files)} "
          f"files, {size(remote.total_bytes)} (skipping {len(remote.skipped)} files the "
          f"runtime does not read) into {hub.cache_dir()}", file=sys.stderr)
    print(fetch(remote).path)
    return 0


def cmd_list(args) -> int:
    ours = model_cache.entries()
    theirs = _hub_checkpoints()
    if args.json:
        print(json.dumps({"kimivl_cache": [dict(name=e.name, path=str(e.path), source=e.source,
                                                revision=e.revision, recipe=e.recipe,
                                                bytes=e.bytes, complete=e.complete)
                                           for e in ours],
                          "hf_cache": theirs}, indent=2))
        return 0
    print(f"quantized to fit, in {model_cache.cache_root()} (remove with `kimivl-local rm NAME`):")
    rows = [("NAME", "SOURCE", "REVISION", "RECIPE", "SIZE")]
    rows += [(e.name, e.source, e.revision[:12], e.recipe + ("" if e.complete else
                                                            " (interrupted; resumes)"),
              size(e.bytes)) for e in ours]
    print(_table(rows) if ours else "  (none)")
    print(f"\ndownloaded, in the Hugging Face cache {hub.cache_dir()} (remove with "
          f"`{hub.hf_cli_name()} cache rm model/REPO`):")
    rows = [("REPO", "REVISION", "SIZE")] + [(t["repo"], t["revision"][:12], size(t["bytes"]))
                                             for t in theirs]
    print(_table(rows) if theirs else "  (none)")
    return 0


def cmd_rm(args) -> int:
    for name in args.names:
        entry = model_cache.remove(name)
        print(f"removed {entry.path} ({size(entry.bytes)})", file=sys.stderr)
    return 0


def _hub_checkpoints() -> list[dict]:
    """Kimi-VL snapshots in the Hugging Face cache (by their config.json's model_type)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            try:
                config = json.loads((rev.snapshot_path / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if config.get("model_type") == "kimi_vl":
                found.append({"repo": repo.repo_id, "revision": rev.commit_hash,
                              "path": str(rev.snapshot_path), "bytes": rev.size_on_disk})
    return found


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in rows)
