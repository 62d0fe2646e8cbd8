"""Hugging Face repo ids, through huggingface_hub: the library that owns the cache layout resolves
them (HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE as it reads them at import), and downloads fetch
only the files the runtime reads (safetensors, JSON, tiktoken.model): never code, never pickles.

huggingface_hub is imported where used: a checkpoint folder never needs it.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import InputError, ModelNotFoundError

ALLOW_PATTERNS = ("*.safetensors", "*.json", "tiktoken.model")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class NotCachedError(ModelNotFoundError):
    """A repo id (at a revision) whose files are not all in the local Hugging Face cache."""


@dataclass(frozen=True)
class Located:
    """A checkpoint folder; for a repo id also the repo and the commit its snapshot holds."""

    path: Path
    repo: str | None = None
    commit: str | None = None


@dataclass(frozen=True)
class RemoteRepo:
    """What a download of `repo` at `commit` would fetch."""

    repo: str
    revision: str
    commit: str
    files: dict[str, int]  # the runtime's files -> bytes
    skipped: tuple[str, ...]  # everything else in the repo (code, pickles, docs)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def is_repo_id(spec: str | os.PathLike) -> bool:
    return bool(_REPO_ID.match(str(spec)))


def resolve_model_path(spec: str | os.PathLike, revision: str | None = None) -> Path:
    """A checkpoint folder, given as a path or as a repo id already in the local HF cache."""
    return locate(spec, revision).path


def locate(spec: str | os.PathLike, revision: str | None = None) -> Located:
    """The checkpoint folder `spec` names (a path, or a repo id in the local HF cache at
    `revision`, default main); ModelNotFoundError (NotCachedError for a repo id) if there is none."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json; point --model at "
                                     "the checkpoint folder (the one holding config.json and the "
                                     "*.safetensors files)")
        if revision:
            raise InputError(f"--revision {revision} applies to Hugging Face repo ids; {path} is "
                             "a folder")
        return Located(path)
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; --model needs the checkpoint folder")
    if not is_repo_id(spec):
        raise ModelNotFoundError(f"no such folder: {path}")
    repo = str(spec)
    snapshot = cached_snapshot(repo, revision)
    if snapshot is None:
        raise NotCachedError(not_cached_message(repo, revision))
    return Located(snapshot, repo, snapshot.name)


def cached_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The complete cached snapshot of `repo` at `revision` (a branch, tag or commit), or None.

    No network: huggingface_hub looks the revision up in the cache's refs, and refuses a snapshot
    that its recorded file listing shows is incomplete (an interrupted download)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                        allow_patterns=list(ALLOW_PATTERNS)))
    except LocalEntryNotFoundError:  # includes IncompleteSnapshotError
        return None
    except HFValidationError as exc:
        raise ModelNotFoundError(f"{repo} is not a valid Hugging Face repo id: {exc}") from None
    return folder if (folder / "config.json").is_file() else None


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def not_cached_message(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    at = f" at revision {revision}" if revision else ""
    return (f"{repo}{at} is not in the local Hugging Face cache ({cache_dir()}). Download it with "
            f"`kimivl-local download {repo}{rev}` (or `{hf_download_command(repo, revision)}`), "
            "or give chat, generate or serve --download, or pass the checkpoint folder")


def hf_download_command(repo: str, revision: str | None = None) -> str:
    """The installed huggingface_hub CLI's command that fetches what the runtime reads."""
    include = " ".join(f"--include '{p}'" for p in ALLOW_PATTERNS)
    rev = f" --revision {revision}" if revision else ""
    return f"{hf_cli_name()} download {repo}{rev} {include}"


def hf_cli_name() -> str:
    """The console script huggingface_hub installs for downloads (`hf` since 0.34; older
    versions shipped `huggingface-cli`)."""
    try:
        scripts = {e.name for e in metadata.distribution("huggingface_hub").entry_points
                   if e.group == "console_scripts"}
    except metadata.PackageNotFoundError:
        scripts = set()
    for name in ("hf", "huggingface-cli"):
        if name in scripts:
            return name
    return "hf"


def remote_repo(repo: str, revision: str | None = None) -> RemoteRepo:
    """Ask the Hub what `repo` at `revision` holds (one API call, file sizes included);
    InputError when it holds no checkpoint the runtime can read (e.g. only .py or .bin files)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    with _hub_errors(repo, revision):
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    files = {name: sizes[name] for name in filter_repo_objects(sizes, allow_patterns=ALLOW_PATTERNS)}
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        found = ", ".join(sorted(sizes)[:8]) or "no files"
        raise InputError(f"{repo} has no safetensors checkpoint (config.json and *.safetensors); "
                         f"it holds {found}{', ...' if len(sizes) > 8 else ''}. kimivl-local "
                         "reads safetensors and JSON only: it never runs a repo's code or loads "
                         "pickled .bin weights")
    return RemoteRepo(repo, revision or "main", info.sha, files,
                      tuple(sorted(set(sizes) - set(files))))


def download(remote: RemoteRepo) -> Path:
    """Fetch `remote`'s files into the HF cache (progress bars on stderr; a dropped connection
    resumes where it stopped); returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    with _hub_errors(remote.repo, remote.revision):
        # The same patterns as cached_snapshot's check, so a finished download counts as complete.
        folder = snapshot_download(remote.repo, revision=remote.revision,
                                   allow_patterns=list(ALLOW_PATTERNS))
    return Path(folder)


@contextmanager
def _hub_errors(repo: str, revision: str | None):
    """huggingface_hub's and its HTTP client's exceptions as one-line errors."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        yield
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo} has no revision {revision!r} on the Hub") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo} is not a model repo on the Hub (or it is private and "
                                 f"you are not logged in: `{hf_cli_name()} auth login`)") from None
    except OfflineModeIsEnabled:
        raise NotCachedError(f"{not_cached_message(repo, revision)}. HF_HUB_OFFLINE is set, so "
                             "nothing is downloaded: unset it to download") from None
    except (HfHubHTTPError, httpx2.TransportError, LocalEntryNotFoundError) as exc:
        # An error status, no connection, or (snapshot_download) the Hub unreachable mid-way.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelNotFoundError(f"could not get {repo} from the Hugging Face Hub "
                                 f"({type(exc).__name__}: {first}); run the same command again "
                                 "to resume") from None
