"""pybind11's headers at a path that outlives pip's build environment (used by setup.py).

Every isolated `pip install` gets pybind11 in a new temporary folder, so its include path, and
with it every compile command, changes from one install to the next: ninja would recompile the
whole extension (minutes of nvcc) even when nothing changed. A copy under build/, keyed by
pybind11's version and rewritten only where a file's bytes differ, keeps the commands and the
header times the same, and a reinstall recompiles only what changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def stable_pybind11_cmake_dir(build_temp: Path) -> str:
    """pybind11's CMake config folder, inside a copy of the package under `build_temp`."""
    import pybind11

    package = Path(pybind11.__file__).resolve().parent
    cmake_dir = Path(pybind11.get_cmake_dir()).resolve()
    copy = build_temp / f"pybind11-{pybind11.__version__}"
    for sub in ("include", "share"):
        if (package / sub).is_dir():
            sync_tree(package / sub, copy / sub)
    return str(copy / cmake_dir.relative_to(package))


def sync_tree(src: Path, dst: Path) -> None:
    """Make `dst` hold `src`'s files, touching only files whose bytes differ."""
    for file in src.rglob("*"):
        if file.is_dir() or "__pycache__" in file.parts:
            continue
        target = dst / file.relative_to(src)
        if target.is_file() and target.read_bytes() == file.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
