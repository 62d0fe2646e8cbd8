"""`kimivl-local quantize` never strands the user: a full, read-only or size-limited file system,
a DST that is a file, a second run on the same DST and a run killed or failing while it
publishes each end in one line of error, no `*.tmp` left behind, and a next run that resumes
or publishes; --force replaces only an earlier quantize output, atomically."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from quantize_support import REPO, import_quantize

qmain = import_quantize("main")
writer = import_quantize("writer")
destination = import_quantize("destination")

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def _error_line(err: str) -> str:
    """The one `error:` line of a failed run's stderr (progress bars and log lines aside)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _leftovers(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".tmp", ".quantize-lock", ".partial", ".replaced",
                                      ".replacing")))


def _bits(folder) -> int:
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    return config["config_groups"]["group_0"]["weights"]["num_bits"]


@contextlib.contextmanager
def _tmpfs(path, size: str, readonly: bool = False):
    """A size-limited tmpfs at `path` (root only; skips where mounting is not permitted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    path.mkdir()
    options = f"size={size}" + (",ro" if readonly else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_file_system_is_refused_up_front_and_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    with _tmpfs(tmp_path / "mnt", "2m") as mnt:
        (mnt / "filler").write_bytes(b"\0" * (2048 - 350) * 1024)  # 350 KB left, 685 KB needed
        assert qmain.main([str(tiny_checkpoint), str(mnt / "q")]) == 2
        line = _error_line(capsys.readouterr().err)
        assert line.startswith(f"error: not enough space for {mnt}/q.partial: the output needs "
                               "0.8 MB more, its file system has 0.3 MB free; free some space")
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]


def test_disk_filling_up_mid_run_keeps_finished_shards_and_resumes(tiny_checkpoint, tmp_path,
                                                                     capsys, monkeypatch):
    args = [str(tiny_checkpoint), "--shard-size", "100KB"]
    with _tmpfs(tmp_path / "mnt", "2m") as mnt:
        (mnt / "filler").write_bytes(b"\0" * (2048 - 350) * 1024)  # room for 2 of the 7 shards
        with monkeypatch.context() as m:  # the up-front check passes: another writer took the space
            m.setattr(writer.shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 40))
            assert qmain.main([args[0], str(mnt / "q"), *args[1:]]) == 2
        line = _error_line(capsys.readouterr().err)
        assert line.startswith(f"error: cannot write {mnt}/q.partial/model-00003-of-00007")
        assert "No space left on device" in line
        assert f"{mnt}/q.partial keeps 2 of 7 shards: run the same command again" in line
        assert _leftovers(mnt) == ["q.partial"]  # no *.tmp, no lock
        (mnt / "filler").unlink()
        calls = []
        original = writer.write_shard
        monkeypatch.setattr(writer, "write_shard", lambda *a: calls.append(a) or original(*a))
        assert qmain.main([args[0], str(mnt / "q"), *args[1:]]) == 0
        assert len(calls) == 5 and _leftovers(mnt) == []
        assert qmain.main([args[0], str(tmp_path / "fresh"), *args[1:]]) == 0
        for f in (tmp_path / "fresh").iterdir():
            assert (mnt / "q" / f.name).read_bytes() == f.read_bytes(), f.name


_FSIZE_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # writes past it fail with EFBIG
from quantize_support import import_quantize
sys.exit(import_quantize("main").main(sys.argv[1:]))
"""


@pytest.mark.slow  # a subprocess that imports torch, then quantizes
def test_size_limited_writes_fail_in_one_line_and_remove_the_tmp(tiny_checkpoint, tmp_path):
    # No root needed: RLIMIT_FSIZE makes the one 685 KB shard fail at 300 KB (Python ignores
    # SIGXFSZ, so the write returns EFBIG).
    run = subprocess.run([sys.executable, "-c", _FSIZE_LIMITED, str(tiny_checkpoint),
                          str(tmp_path / "q")], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    line = _error_line(run.stderr)
    assert line.startswith(f"error: cannot write {tmp_path}/q.partial/model-00001-of-00001")
    assert line.endswith("File too large; nothing was kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert qmain.main([str(tiny_checkpoint), str(tmp_path / "q")]) == 0


def test_unwritable_folder(tiny_checkpoint, tmp_path, capsys):
    if os.geteuid() == 0:  # root ignores permission bits: a read-only file system instead
        context, reason = _tmpfs(tmp_path / "ro", "1m", readonly=True), "Read-only file system"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        context, reason = contextlib.nullcontext(tmp_path / "ro"), "Permission denied"
    with context as ro:
        assert qmain.main([str(tiny_checkpoint), str(ro / "q")]) == 2
        line = _error_line(capsys.readouterr().err)
        assert line == f"error: cannot write {ro}/q.quantize-lock: {reason}"
        assert list(ro.iterdir()) == []


def test_dst_that_is_a_file_is_refused_and_untouched(tiny_checkpoint, tmp_path, capsys):
    dst = tmp_path / "q"
    dst.write_text("my notes")
    for force in ([], ["--force"]):
        assert qmain.main([str(tiny_checkpoint), str(dst), *force]) == 2
        assert _error_line(capsys.readouterr().err).startswith(f"error: {dst} is a file; DST must")
    assert dst.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert qmain.main([str(tiny_checkpoint), str(dst / "sub")]) == 2  # a file as a parent folder
    assert _error_line(capsys.readouterr().err) == (
        f"error: {dst} is a file, so {dst}/sub cannot be created in it")


_HOLD_LOCK = """
import sys
from pathlib import Path
from quantize_support import import_quantize
d = import_quantize("destination").Destination(Path(sys.argv[1]), "quantize-manifest.json")
with d.locked():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_run_on_the_same_dst_is_refused_naming_the_first(tiny_checkpoint, tmp_path, capsys):
    dst = tmp_path / "q"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(dst)], env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert qmain.main([str(tiny_checkpoint), str(dst)]) == 2
        line = _error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {dst} is being written by another `kimivl-local quantize` "
                               f"(pid {holder.pid}, started 20")
        assert not dst.exists() and not dst.with_name("q.partial").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, though the lock file stays
        holder.wait()
    assert dst.with_name("q.quantize-lock").exists()
    assert qmain.main([str(tiny_checkpoint), str(dst)]) == 0
    assert _leftovers(tmp_path) == []


_KILL_IN_PUBLISH = """
import os, signal, sys
from quantize_support import import_quantize
destination = import_quantize("destination")
rename = os.rename
def killing_rename(a, b):
    if str(a).endswith(".partial"):  # the new output's rename: die just before it
        os.kill(os.getpid(), signal.SIGKILL)
    rename(a, b)
destination.os.rename = killing_rename
sys.exit(import_quantize("main").main(sys.argv[1:]))
"""


def _kill_in_publish(*args):
    run = subprocess.run([sys.executable, "-c", _KILL_IN_PUBLISH, *map(str, args)], env=ENV,
                         capture_output=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr


@pytest.mark.slow  # a subprocess that imports torch, then quantizes
def test_run_killed_in_publish_is_published_by_the_next(tiny_checkpoint, tmp_path, monkeypatch):
    dst = tmp_path / "q"
    _kill_in_publish(tiny_checkpoint, dst)
    assert not dst.exists() and dst.with_name("q.partial").is_dir()
    calls = []
    monkeypatch.setattr(writer, "write_shard", lambda *a: calls.append(a))
    assert qmain.main([str(tiny_checkpoint), str(dst)]) == 0
    assert calls == [] and destination.is_quantize_output(dst)  # nothing rewritten
    assert not (dst / writer.MANIFEST).exists() and _leftovers(tmp_path) == []


@pytest.mark.slow  # a subprocess that imports torch, then quantizes
def test_force_run_killed_between_its_renames_loses_nothing(tiny_checkpoint, tmp_path, capsys):
    dst = tmp_path / "q"
    assert qmain.main([str(tiny_checkpoint), str(dst), "--recipe", "int8"]) == 0
    _kill_in_publish(tiny_checkpoint, dst, "--recipe", "int4", "--force")
    # the old output was renamed aside, the new one never arrived
    assert not dst.exists() and _bits(tmp_path / "q.replaced") == 8
    assert (tmp_path / "q.replacing").is_file()  # the journal that makes q.replaced ours
    assert qmain.main([str(tiny_checkpoint), str(dst)]) == 2  # no --force: the old one comes back
    assert "already exists; pass --force" in _error_line(capsys.readouterr().err)
    assert _bits(dst) == 8 and not (tmp_path / "q.replaced").exists()
    assert qmain.main([str(tiny_checkpoint), str(dst), "--recipe", "int4", "--force"]) == 0
    assert _bits(dst) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_force_run_failing_to_publish_leaves_the_old_output(tiny_checkpoint, tmp_path, capsys,
                                                            monkeypatch):
    dst = tmp_path / "q"
    assert qmain.main([str(tiny_checkpoint), str(dst), "--recipe", "int8"]) == 0
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    rename = os.rename

    def failing_rename(a, b):
        if str(a).endswith(".partial"):
            raise OSError(5, "Input/output error", str(a))
        rename(a, b)

    with monkeypatch.context() as m:
        m.setattr(destination.os, "rename", failing_rename)
        assert qmain.main([str(tiny_checkpoint), str(dst), "--recipe", "int4", "--force"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line == (f"error: cannot write {tmp_path}/q.partial: Input/output error; "
                    f"{tmp_path}/q.partial is complete: run the same command again to publish it")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert qmain.main([str(tiny_checkpoint), str(dst), "--recipe", "int4", "--force"]) == 0
    assert _bits(dst) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_force_never_replaces_a_folder_quantize_did_not_write(tiny_checkpoint, tmp_path, capsys):
    for name, files in [("model", {"config.json": '{"quantization_config": {}}'}),  # no report
                        ("photos", {"a.jpg": "jpeg"})]:
        dst = tmp_path / name
        dst.mkdir()
        for f, text in files.items():
            (dst / f).write_text(text)
        assert qmain.main([str(tiny_checkpoint), str(dst), "--force"]) == 2
        assert "is not a `kimivl-local quantize` output" in _error_line(capsys.readouterr().err)
        assert {p.name: p.read_text() for p in dst.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "photos"]


def test_a_folder_named_like_the_aside_folder_is_never_touched(tiny_checkpoint, tmp_path, capsys):
    dst, mine = tmp_path / "q", tmp_path / "q.replaced"
    for folder in (dst, mine):
        assert qmain.main([str(tiny_checkpoint), str(folder), "--recipe", "int8"]) == 0
    (mine / "notes.txt").write_text("mine")
    assert qmain.main([str(tiny_checkpoint), str(dst), "--recipe", "int4", "--force"]) == 2
    assert _error_line(capsys.readouterr().err).startswith(f"error: {mine} is in the way of")
    assert (mine / "notes.txt").read_text() == "mine" and _bits(dst) == 8
    shutil.rmtree(dst)  # the user clears the way; no journal, so q.replaced is not "restored"
    assert qmain.main([str(tiny_checkpoint), str(dst), "--recipe", "int4"]) == 0
    assert (mine / "notes.txt").read_text() == "mine" and _bits(dst) == 4
