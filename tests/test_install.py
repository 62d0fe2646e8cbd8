"""Installing from one clone again and again: `pip install .` twice (the second reuses build/,
whose CMake cache names the cmake and ninja of pip's deleted build environment), a cache left
by a vanished ninja, then `pip install -e .` and `pip wheel .`; every build must be the same.

Slow (several CPU-only builds) and needs the build requirements from PyPI or pip's cache.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so",
                                 "__pycache__", ".pytest_cache", "test-artifacts")

BUILD_INFO = ("import json, kimivl_local.kernels.extension as e, kimivl_local; "
              "print(json.dumps([kimivl_local.__file__, e.build_info()]))")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KIMIVL"))}
    return {**env, "KIMIVL_CUDA": "off", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _pip(venv: Path, clone: Path, *args: str) -> str:
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], cwd=clone,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=1500)
    assert run.returncode == 0, f"pip {' '.join(args)} failed:\n{run.stdout[-5000:]}"
    return run.stdout


def _build_info(venv: Path, cwd: Path) -> tuple[str, dict]:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", BUILD_INFO], cwd=cwd, env=_env(),
                         capture_output=True, text=True, check=True).stdout
    where, info = json.loads(out)
    return where, info


@pytest.mark.slow
def test_reinstalling_from_one_clone_gives_the_same_build(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=IGNORED)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    elsewhere = tmp_path / "elsewhere"  # not the clone: `import kimivl_local` finds the install
    elsewhere.mkdir()

    log = _pip(venv, clone, "install", "-v", "--no-deps", ".")
    assert "Building CXX object" in log  # compile steps reach `pip install -v`
    where, first = _build_info(venv, elsewhere)
    assert first["available"], first
    assert first["cuda_mode"] == "off" and first["cuda_note"] == "KIMIVL_CUDA=off"
    assert "site-packages" in where

    # The second install finds build/ with the cache of the first one's deleted environment.
    caches = list((clone / "build").glob("temp.*/cmake-cuda-off/CMakeCache.txt"))
    assert len(caches) == 1
    log = _pip(venv, clone, "install", "-v", "--no-deps", ".")
    assert "reconfiguring cmake-cuda-off" in log
    assert "Building CXX object" not in log  # same commands, same headers: nothing recompiled
    assert _build_info(venv, elsewhere)[1] == first

    # A cache whose ninja has vanished, whatever made it.
    text = caches[0].read_text()
    ninja = next(line for line in text.splitlines() if line.startswith("CMAKE_MAKE_PROGRAM"))
    caches[0].write_text(text.replace(ninja, "CMAKE_MAKE_PROGRAM:FILEPATH=/nonexistent/bin/ninja"))
    log = _pip(venv, clone, "install", "-v", "--no-deps", "-e", ".")
    assert "/nonexistent/bin/ninja no longer exists" in log
    assert "Building CXX object" not in log  # the editable build reuses the objects too
    where, editable = _build_info(venv, elsewhere)
    assert editable == first
    assert Path(where).parent == clone / "kimivl_local"

    _pip(venv, clone, "wheel", "--no-deps", "-w", str(tmp_path / "wheels"), ".")
    wheel, = (tmp_path / "wheels").glob("kimivl_local-*.whl")
    assert any(name.startswith("kimivl_local/_C.") for name in zipfile.ZipFile(wheel).namelist())
