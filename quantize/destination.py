"""DST and the files beside it: which run may write it (a lock), whether it may be replaced, and
the publish step that puts a finished DST.partial in its place.

Beside DST, in the same folder so that every rename stays on one file system:

  DST.partial/         the run's workspace (writer.Workspace), resumed by the next run
  DST.quantize-lock    flock()ed by the running quantize, which wrote its pid and start time into
                       it; the kernel drops the lock when that process dies, however it dies
  DST.replaced/        with --force, the previous output between the two renames of `publish`;
                       the next run puts it back if the second rename never happened
  DST.replacing        the journal that says so, there from before the first rename until
                       DST.replaced is deleted

Only a folder that `kimivl-local quantize` wrote (config.json with a quantization_config and
quantization_report.json) is ever replaced, and an empty folder; anything else is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kimivl_local.errors import InputError

log = logging.getLogger("kimivl_local.quantize")

REPORT = "quantization_report.json"


def is_quantize_output(folder: Path) -> bool:
    """Whether `folder` holds what `kimivl-local quantize` writes: its report next to a
    config.json with a quantization_config."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return (folder / REPORT).is_file() and "quantization_config" in config
    except (OSError, ValueError, TypeError):
        return False


class Destination:
    def __init__(self, dst: Path, bookkeeping: str):
        """`bookkeeping`: the workspace's own file, deleted from DST once published."""
        self.path, self.bookkeeping = dst, bookkeeping
        self.partial = dst.with_name(dst.name + ".partial")
        self.lock_file = dst.with_name(dst.name + ".quantize-lock")
        self.replaced = dst.with_name(dst.name + ".replaced")
        self.journal = dst.with_name(dst.name + ".replacing")

    def check(self, force: bool) -> None:
        """Refuse a DST that quantize must not write: a file or link, an existing folder
        without --force, or with --force a folder that is not a previous quantize output."""
        dst = self.path
        if dst.is_symlink():
            raise InputError(f"{dst} is a symbolic link; give the folder it points to, or a new "
                             "one")
        if not dst.exists():
            return
        if not dst.is_dir():
            raise InputError(f"{dst} is a file; DST must be a new folder (or, with --force, a "
                             "previous `kimivl-local quantize` output)")
        try:
            empty = not any(dst.iterdir())
        except OSError as exc:
            raise InputError(f"cannot read {dst}: {exc.strerror or exc}") from None
        if empty:
            return  # an empty folder: nothing to lose, rename() replaces it
        if not force:
            raise InputError(f"{dst} already exists; pass --force to replace it")
        if not is_quantize_output(dst):
            raise InputError(f"{dst} is not a `kimivl-local quantize` output (no {REPORT} next "
                             "to a config.json with a quantization_config); --force replaces only "
                             "those: remove it yourself or choose another DST")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold DST's lock for the block; InputError naming the run that holds it."""
        existing = next(p for p in self.path.parents if p.exists())
        if not existing.is_dir():
            raise InputError(f"{existing} is a file, so {self.path} cannot be created in it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                raise InputError(f"{self.path} is being written by another `kimivl-local "
                                 f"quantize` ({holder or 'starting'}); wait for it to finish, "
                                 "or stop it and run this again to resume its work") from None
            # The holder before us unlinks the file on release: a lock on that old inode guards
            # nothing, so take the file that is there now.
            try:
                if os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}, started {started}\n".encode())
            yield
        finally:
            try:
                os.unlink(self.lock_file)
            except OSError:
                pass
            os.close(fd)

    def recover(self) -> None:
        """Finish what a run killed in `publish` left (call under the lock): put the previous
        output back if it was moved aside and the new one never arrived, else drop it; delete
        the bookkeeping file a published output may still hold. Only the journal says that
        DST.replaced is ours: a folder of that name without it is left alone."""
        if (self.path / self.bookkeeping).is_file() and is_quantize_output(self.path):
            (self.path / self.bookkeeping).unlink()
        if not self.journal.is_file():
            return
        if self.replaced.is_dir():
            if self.path.exists():
                shutil.rmtree(self.replaced)
            else:
                os.rename(self.replaced, self.path)
                log.info("restored %s, which an interrupted --force run had moved aside",
                         self.path)
        self.journal.unlink()

    def publish(self, force: bool) -> None:
        """Put the finished DST.partial in DST's place. A previous output (--force) is renamed
        aside first and deleted only once the new one is in place; if the second rename fails
        it is renamed back, so a failed run leaves the old output as it was."""
        self.check(force)
        _fsync_dir(self.partial)
        if self.path.exists() and any(self.path.iterdir()):
            if self.replaced.exists():
                raise InputError(f"{self.replaced} is in the way of replacing {self.path}: "
                                 "move it elsewhere")
            _write_synced(self.journal, f"moving {self.path} aside to {self.replaced} to put "
                                        f"{self.partial} in its place\n")
            os.rename(self.path, self.replaced)
            try:
                os.rename(self.partial, self.path)
            except BaseException:
                os.rename(self.replaced, self.path)
                self.journal.unlink()
                raise
            _fsync_dir(self.path.parent)
            shutil.rmtree(self.replaced)
            self.journal.unlink()
        else:
            os.rename(self.partial, self.path)  # replaces an empty folder
            _fsync_dir(self.path.parent)
        (self.path / self.bookkeeping).unlink()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
