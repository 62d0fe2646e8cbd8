"""Whether `pip install` compiles the CUDA kernels, and for which GPUs (used by setup.py).

KIMIVL_CUDA=auto builds CUDA only when the target machine can run it: an NVIDIA driver is there
(then only for the compute capabilities of its GPUs), or the torch installed for the Python that
runs pip is a CUDA build (a GPU-less build box making a CUDA install; then the default list of
architectures). The target torch is probed with `python -E`: pip builds in an isolated
environment whose PYTHONPATH hides the target's site-packages, and `-E` drops that override
while keeping the interpreter, so the probe sees what `import torch` will see after the install.
KIMIVL_CUDA=on, or KIMIVL_CUDA_ARCHS, forces a CUDA build; KIMIVL_CUDA=off never builds one.

Every decision carries a one-line note (no semicolons: it becomes a CMake string) that is
compiled into the extension, so `kimivl-local info` says why CUDA is or is not there.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CudaPlan:
    build: bool
    archs: str | None  # CMake CUDA_ARCHITECTURES; None keeps CMakeLists' default list
    note: str  # why, for the install log and `kimivl-local info`


@dataclass(frozen=True)
class Probes:
    """What the machine has; each is a function so tests can fake it."""
    nvcc: Callable[[], str | None]
    # ["89", ...]; [] a driver but the GPUs unknown; None no driver
    gpu_caps: Callable[[], list[str] | None]
    torch_cuda: Callable[[], str | None]  # CUDA version of the target's torch, None if CPU/absent


def plan_cuda(mode: str, archs_env: str | None, probes: Probes) -> CudaPlan:
    if mode not in MODES:
        raise ValueError(f"KIMIVL_CUDA must be auto, on or off (got {mode!r})")
    if mode == "off":
        return CudaPlan(False, None, "KIMIVL_CUDA=off")
    nvcc = probes.nvcc()
    forced = ("KIMIVL_CUDA=on" if mode == "on"
              else f"KIMIVL_CUDA_ARCHS={archs_env} asks for CUDA" if archs_env else None)
    if forced:
        if not nvcc:
            return CudaPlan(False, None, f"{forced} but no CUDA compiler (nvcc) was found. Set "
                                         "CUDACXX or put nvcc on PATH")
        caps = probes.gpu_caps() if not archs_env else None
        archs = archs_env or _real(caps)
        return CudaPlan(True, archs, f"{forced}" + (f", for the GPUs here (sm {_list(caps)})"
                                                    if not archs_env and caps else ""))
    caps = probes.gpu_caps()
    torch_cuda = probes.torch_cuda()
    if caps is None and not torch_cuda:
        return CudaPlan(False, None, "KIMIVL_CUDA=auto found no NVIDIA driver and no CUDA build "
                                     "of torch. KIMIVL_CUDA=on forces a CUDA build")
    why = (f"NVIDIA GPUs sm {_list(caps)}" if caps else "an NVIDIA driver" if caps is not None
           else f"torch built for CUDA {torch_cuda}")
    if not nvcc:
        return CudaPlan(False, None, f"KIMIVL_CUDA=auto found {why} but no CUDA compiler (nvcc). "
                                     "Install the CUDA toolkit (or set CUDACXX) and reinstall")
    return CudaPlan(True, _real(caps), f"KIMIVL_CUDA=auto found {why}")


def _real(caps: list[str] | None) -> str | None:
    return ";".join(f"{c}-real" for c in caps) if caps else None


def _list(caps: list[str]) -> str:
    return ", ".join(caps)


# --- the real probes ---------------------------------------------------------------------------

def find_nvcc() -> str | None:
    if os.environ.get("CUDACXX"):
        return shutil.which(os.environ["CUDACXX"])
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def gpu_compute_caps() -> list[str] | None:
    """Compute capabilities of the GPUs here ("89"), [] with a driver but no answer, None
    without an NVIDIA driver."""
    for query in (_caps_from_nvidia_smi, _caps_from_libcuda):
        caps = query()
        if caps is not None:
            return caps
    return [] if Path("/proc/driver/nvidia/version").exists() else None


def _caps_from_nvidia_smi() -> list[str] | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = [line.strip().replace(".", "") for line in out.splitlines() if line.strip()]
    return sorted(set(caps)) if caps and all(c.isdigit() for c in caps) else None


def _caps_from_libcuda() -> list[str] | None:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    caps = set()
    for i in range(count.value):
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, i) == 0 and \
                cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, i) == 0:
            caps.add(f"{major.value}{minor.value}")
    return sorted(caps)


_TORCH_CUDA_PROBE = """
import importlib.util, runpy, os
spec = importlib.util.find_spec("torch")
if spec and spec.origin:
    version = os.path.join(os.path.dirname(spec.origin), "version.py")
    if os.path.exists(version):
        print(runpy.run_path(version).get("cuda") or "")
"""


def target_torch_cuda() -> str | None:
    """The CUDA version the target environment's torch was built for (None: CPU build or no
    torch). Reads torch/version.py instead of importing torch: quick and side-effect free."""
    try:
        out = subprocess.run([sys.executable, "-E", "-c", _TORCH_CUDA_PROBE], capture_output=True,
                             text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


REAL_PROBES = Probes(nvcc=find_nvcc, gpu_caps=gpu_compute_caps, torch_cuda=target_torch_cuda)
