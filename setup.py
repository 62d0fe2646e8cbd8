"""Build script: the Python package plus the CMake-built extension ``kimivl_local._C``.

Environment knobs (all optional):
  KIMIVL_SKIP_EXT=1        install the pure-Python package (ops fall back to torch references)
  KIMIVL_CUDA=auto|on|off  compile the CUDA sources when this machine can use them (auto: an
                           NVIDIA driver, or a CUDA build of torch, and nvcc; see
                           build_support/cuda_target.py), always, or never
  KIMIVL_CUDA_ARCHS=...    CMake CUDA_ARCHITECTURES list, e.g. "89" or "75;86;89"; forces CUDA
                           (default: the GPUs present, else the list in CMakeLists.txt)
  KIMIVL_BUILD_JOBS=N      parallel compile jobs (default: all cores)
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from build_support.cmake_cache import drop_stale_cache  # noqa: E402
from build_support.cuda_target import REAL_PROBES, CudaPlan, plan_cuda  # noqa: E402
from build_support.stable_pybind11 import stable_pybind11_cmake_dir  # noqa: E402


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _have_compiler() -> bool:
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    return cxx is not None and shutil.which(cxx) is not None


class CMakeBuild(build_ext):
    """Configures and builds csrc/ with CMake + Ninja; falls back to pure Python when it cannot."""

    def run(self) -> None:
        reason = self._skip_reason()
        if reason:
            # Dropping the extension (rather than building nothing) keeps setuptools from
            # looking for a _C file to copy, e.g. in editable installs.
            print(f"kimivl-local: {reason}; installing without the compiled extension "
                  "(ops run on the slower torch references)")
            self.extensions = []
        super().run()

    @staticmethod
    def _skip_reason() -> str | None:
        if os.environ.get("KIMIVL_SKIP_EXT", "0") == "1":
            return "KIMIVL_SKIP_EXT=1"
        if not _have_compiler():
            return "WARNING no C++ compiler found"
        return None

    def build_extension(self, ext: CMakeExtension) -> None:
        mode = os.environ.get("KIMIVL_CUDA", "auto").lower()
        try:
            plan = plan_cuda(mode, os.environ.get("KIMIVL_CUDA_ARCHS"), REAL_PROBES)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        self._say(f"CUDA {'on' if plan.build else 'off'}: {plan.note}")
        if not plan.build and mode == "on":
            raise SystemExit(f"kimivl-local: {plan.note}")
        try:
            self._cmake(ext, plan, mode)
        except subprocess.CalledProcessError:
            if not plan.build or mode == "on":
                raise
            # A broken CUDA toolchain (host compiler too new for nvcc, ...) must not block a
            # working CPU install: retry without CUDA, say so here and in `kimivl-local info`.
            note = (f"{plan.note}, but the CUDA build failed, so this build is CPU-only (`pip "
                    "install -v` shows why). KIMIVL_CUDA=on makes that an error")
            self._say(f"WARNING {note}")
            self._cmake(ext, CudaPlan(False, None, note), mode)

    @staticmethod
    def _say(text: str) -> None:
        print(f"kimivl-local: {text}", flush=True)

    def _cmake(self, ext: CMakeExtension, plan: CudaPlan, mode: str) -> None:
        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # Under build/ of the source tree, not self.build_temp: editable installs get a new
        # temporary build_temp each time, and would recompile everything.
        temp = f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        build_dir = ROOT / "build" / temp / f"cmake-cuda-{'on' if plan.build else 'off'}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("kimivl-local: cmake not found (pip install cmake)")
        # The tools are named explicitly on every configure: pip's build environment (and with it
        # its cmake and ninja) is new each time, while this build folder is reused.
        ninja = shutil.which("ninja")
        generator = "Ninja" if ninja else "Unix Makefiles"
        make_program = ninja or shutil.which("make")
        # CMake records the cmake binary behind any wrapper (a pyenv shim): only its absence
        # makes the cache stale.
        stale = drop_stale_cache(build_dir, generator=generator, tools={
            "CMAKE_MAKE_PROGRAM": make_program, "CMAKE_COMMAND": None,
            "Python_EXECUTABLE": sys.executable})
        if stale:
            self._say(f"reconfiguring {build_dir.name}: {stale}")
        args = [
            f"-G{generator}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={stable_pybind11_cmake_dir(build_dir.parent)}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DKIMIVL_CUDA={'ON' if plan.build else 'OFF'}",
            f"-DKIMIVL_CUDA_MODE={mode}",
            f"-DKIMIVL_CUDA_NOTE={_cmake_string(plan.note)}",
        ]
        if make_program:
            args.append(f"-DCMAKE_MAKE_PROGRAM={make_program}")
        if plan.build and REAL_PROBES.nvcc():
            args.append(f"-DCMAKE_CUDA_COMPILER={REAL_PROBES.nvcc()}")
        if plan.archs:
            args.append(f"-DKIMIVL_CUDA_ARCHS={plan.archs}")
        else:  # back to CMakeLists' default, not whatever an earlier build left in the cache
            args.append("-UKIMIVL_CUDA_ARCHS")
        jobs = os.environ.get("KIMIVL_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        # Each compile step is printed as it starts ([3/29] Building ...): `pip install -v` shows
        # a long CUDA build's progress.
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


def _cmake_string(text: str) -> str:
    """`text` made safe as a CMake list-free string inside a C string literal."""
    return text.replace(";", ",").replace('"', "'").replace("\\", "/")


setup(
    name="kimivl-local",
    version="0.1.0",
    description="Run Kimi-VL-A3B locally on one consumer GPU or a CPU",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["kimivl_local", "kimivl_local.checkpoint", "kimivl_local.cli",
              "kimivl_local.engine", "kimivl_local.inputs", "kimivl_local.kernels",
              "kimivl_local.model", "kimivl_local.ops", "kimivl_local.quant",
              "kimivl_local.synthetic", "kimivl_local.quantize", "kimivl_local.app"],
    package_dir={
        "kimivl_local": "kimivl_local",
        "kimivl_local.quantize": "quantize",
        "kimivl_local.app": "app",
    },
    ext_modules=[CMakeExtension("kimivl_local._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",  # satisfied by the CPU build torch==2.13.0 (see README)
        "numpy",
        "safetensors>=0.4",
        "tiktoken>=0.7",
        "regex",
        "tqdm",  # the quantize tool's progress bar (quantize/writer.py)
        "pillow>=10",
        "pypdfium2>=4.30",  # PDF pages (kimivl_local/inputs/documents.py)
        "av>=14",  # video frames (kimivl_local/inputs/video.py)
        # Repo ids: cache lookup and downloads (kimivl_local/checkpoint/hub.py); 2.x's HTTP client
        # is httpx2
        # and its cache records each snapshot's file list (an interrupted download is incomplete).
        "huggingface_hub>=2.5,<3",
        # The app and the OpenAI-compatible server (`kimivl-local serve`), installed by default:
        # the chat window is how most people use the runtime. Gradio 6's API moves between minor
        # releases; 6.31 is the one tested.
        "gradio>=6.31,<7",
        "fastapi>=0.110",
        "uvicorn>=0.29",
    ],
    extras_require={
        # transformers is the independent oracle for the language model; pexpect drives the CLI;
        # pypdf (+ cryptography for AES) writes encrypted PDFs; av 18 writes rotated videos; the openai client and
        # playwright (driving Debian's chromium, never a downloaded browser) test the app;
        # compressed-tensors is the oracle for the quantized format (0.20 for its model-free
        # dequantizer; its torch>=2.10 is met by the CPU torch, which it leaves in place);
        # hypothesis fuzzes the parsers.
        "test": ["pytest>=8", "transformers>=4.57", "pexpect", "pypdf[crypto]>=4", "av>=18",
                 "openai>=1.40", "playwright>=1.40", "compressed-tensors>=0.20", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["kimivl-local=kimivl_local.cli.main:main"]},
    zip_safe=False,
)
