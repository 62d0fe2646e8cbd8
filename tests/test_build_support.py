"""The install's decisions, with the machine faked: whether CUDA is compiled (and for which
GPUs), when a CMake build folder's cache must be dropped, and the stable pybind11 copy
(build_support/)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from build_support.cmake_cache import drop_stale_cache, stale_reason  # noqa: E402
from build_support.cuda_target import Probes, plan_cuda  # noqa: E402
from build_support.stable_pybind11 import sync_tree  # noqa: E402


def probes(nvcc="/usr/local/cuda/bin/nvcc", caps=None, torch_cuda=None):
    return Probes(nvcc=lambda: nvcc, gpu_caps=lambda: caps, torch_cuda=lambda: torch_cuda)


def test_auto_builds_only_for_the_gpus_present():
    plan = plan_cuda("auto", None, probes(caps=["86", "89"]))
    assert plan.build and plan.archs == "86-real;89-real"
    assert "sm 86, 89" in plan.note


def test_auto_without_driver_or_cuda_torch_stays_cpu_and_says_why():
    plan = plan_cuda("auto", None, probes(caps=None, torch_cuda=None))
    assert not plan.build
    assert "no NVIDIA driver" in plan.note and "KIMIVL_CUDA=on" in plan.note


def test_auto_builds_the_default_list_for_a_cuda_torch_without_a_gpu():
    plan = plan_cuda("auto", None, probes(caps=None, torch_cuda="12.8"))
    assert plan.build and plan.archs is None  # CMakeLists' default architectures
    assert "CUDA 12.8" in plan.note


def test_auto_with_a_driver_that_names_no_gpu_builds_the_default_list():
    plan = plan_cuda("auto", None, probes(caps=[]))
    assert plan.build and plan.archs is None


def test_auto_with_a_gpu_but_no_nvcc_says_what_is_missing():
    plan = plan_cuda("auto", None, probes(nvcc=None, caps=["90"]))
    assert not plan.build
    assert "sm 90" in plan.note and "no CUDA compiler" in plan.note


def test_on_forces_cuda_without_any_gpu():
    plan = plan_cuda("on", None, probes(caps=None))
    assert plan.build and plan.archs is None and plan.note == "KIMIVL_CUDA=on"


def test_on_still_targets_the_gpus_present():
    assert plan_cuda("on", None, probes(caps=["120"])).archs == "120-real"


def test_archs_force_cuda_in_auto_and_win_over_the_gpus_present():
    plan = plan_cuda("auto", "75;89", probes(caps=["90"]))
    assert plan.build and plan.archs == "75;89"
    assert plan.note == "KIMIVL_CUDA_ARCHS=75;89 asks for CUDA"


def test_forced_without_nvcc_is_not_built_and_says_so():
    plan = plan_cuda("on", None, probes(nvcc=None))
    assert not plan.build and "no CUDA compiler" in plan.note


def test_off_never_probes():
    def boom():
        raise AssertionError("probed")

    plan = plan_cuda("off", "89", Probes(nvcc=boom, gpu_caps=boom, torch_cuda=boom))
    assert not plan.build and plan.note == "KIMIVL_CUDA=off"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="auto, on or off"):
        plan_cuda("yes", None, probes())


def _cache(build: Path, cmake: Path, ninja: Path, generator="Ninja") -> None:
    build.mkdir(parents=True, exist_ok=True)
    (build / "CMakeCache.txt").write_text(
        "# This is the CMakeCache file.\n"
        f"CMAKE_COMMAND:INTERNAL={cmake}\n"
        f"CMAKE_GENERATOR:INTERNAL={generator}\n"
        f"CMAKE_MAKE_PROGRAM:FILEPATH={ninja}\n"
        "KIMIVL_CUDA:STRING=OFF\n")


def _tools(tmp_path: Path, name: str) -> tuple[Path, Path]:
    bin_dir = tmp_path / name / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("cmake", "ninja"):
        (bin_dir / tool).write_text("")
    return bin_dir / "cmake", bin_dir / "ninja"


def _uses(cmake: Path, make: Path) -> dict[str, str]:
    return {"CMAKE_MAKE_PROGRAM": str(make), "CMAKE_COMMAND": str(cmake)}


def test_cache_of_a_deleted_build_environment_is_dropped(tmp_path):
    old_cmake, old_ninja = _tools(tmp_path, "pip-build-env-old")
    new_cmake, new_ninja = _tools(tmp_path, "pip-build-env-new")
    build = tmp_path / "build"
    _cache(build, old_cmake, old_ninja)
    (build / "objects.o").write_text("kept")
    old_ninja.unlink()
    old_cmake.unlink()
    reason = drop_stale_cache(build, generator="Ninja", tools=_uses(new_cmake, new_ninja))
    assert "no longer exists" in reason
    assert not (build / "CMakeCache.txt").exists() and (build / "objects.o").exists()


def test_cache_of_the_same_tools_is_kept(tmp_path):
    cmake, ninja = _tools(tmp_path, "venv")
    _cache(tmp_path / "build", cmake, ninja)
    kept = drop_stale_cache(tmp_path / "build", generator="Ninja", tools=_uses(cmake, ninja))
    assert kept is None
    assert (tmp_path / "build" / "CMakeCache.txt").exists()


def test_cache_of_other_existing_tools_or_generator_is_stale(tmp_path):
    cmake, ninja = _tools(tmp_path, "a")
    other_cmake, other_ninja = _tools(tmp_path, "b")
    _cache(tmp_path / "build", cmake, ninja)
    assert "this build uses" in stale_reason(tmp_path / "build", generator="Ninja",
                                             tools=_uses(cmake, other_ninja))
    assert "generator" in stale_reason(tmp_path / "build", generator="Unix Makefiles",
                                       tools=_uses(cmake, Path("/usr/bin/make")))
    python = {"Python_EXECUTABLE": str(other_cmake)}  # another interpreter, same version
    (tmp_path / "build" / "CMakeCache.txt").write_text(f"Python_EXECUTABLE:FILEPATH={cmake}\n")
    assert "Python_EXECUTABLE" in stale_reason(tmp_path / "build", generator="Ninja", tools=python)


def test_a_tool_given_as_none_is_only_checked_to_exist(tmp_path):
    cmake, ninja = _tools(tmp_path, "a")
    _cache(tmp_path / "build", cmake, ninja)
    tools = {"CMAKE_COMMAND": None, "CMAKE_MAKE_PROGRAM": str(ninja)}
    assert stale_reason(tmp_path / "build", generator="Ninja", tools=tools) is None
    cmake.unlink()
    assert "no longer exists" in stale_reason(tmp_path / "build", generator="Ninja", tools=tools)


def test_no_cache_is_nothing_to_drop(tmp_path):
    assert stale_reason(tmp_path, generator="Ninja", tools={}) is None


def test_pybind11_copy_rewrites_only_changed_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "include").mkdir(parents=True)
    (src / "include" / "same.h").write_text("same")
    (src / "include" / "changed.h").write_text("new")
    sync_tree(src, dst)
    (dst / "include" / "changed.h").write_text("old")
    os.utime(dst / "include" / "same.h", (1, 1))
    os.utime(dst / "include" / "changed.h", (1, 1))
    sync_tree(src, dst)
    assert (dst / "include" / "changed.h").read_text() == "new"
    assert os.stat(dst / "include" / "changed.h").st_mtime > 1
    assert os.stat(dst / "include" / "same.h").st_mtime == 1  # untouched: nothing recompiles
