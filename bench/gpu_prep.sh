#!/usr/bin/env bash
# Run HERE (no GPU needed) before a device session; then on the device machine:
#   run(command="bash bench/gpu_session.sh", carry=[".prebuilt", ".whl"], timeout_s=600)
#
# 1. .prebuilt/_C.cpython-312-x86_64-linux-gnu.so: the extension with CUDA for sm_90 (H100/H200;
#    KIMIVL_CUDA_ARCHS to change), built for the device's Python 3.12. The extension links no
#    torch (plain pointers and ints cross the border) and the CUDA runtime statically, so it only
#    needs glibc/libstdc++ and the driver there. gpu_session.py falls back to compiling on the
#    device when this file is missing or unusable, and compiles there anyway at the end.
# 2. .whl/: pure-Python wheels of test packages the device image lacks (see KINDS.md).
# Both folders are git-ignored; they travel only through `carry` (4-5 MB together).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python3.12)}
ARCHS=${KIMIVL_CUDA_ARCHS:-90-real}
VENV=${PREP_VENV:-/tmp/kimivl-prep312}
BUILD=${PREP_BUILD:-/tmp/kimivl-prep312-build}
WHEELS=${PREP_WHEELS:-"pexpect==4.9.0 ptyprocess==0.7.0"}

[ -x "$PY312" ] || { echo "gpu_prep: no Python 3.12 at $PY312 (set PY312)" >&2; exit 2; }
command -v nvcc > /dev/null || { echo "gpu_prep: nvcc not on PATH" >&2; exit 2; }
[ -d "$VENV" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/pip" install -q pybind11 cmake ninja
mkdir -p .prebuilt .whl
rm -f .prebuilt/_C.*
nice "$VENV/bin/cmake" -S . -B "$BUILD" -GNinja -DCMAKE_BUILD_TYPE=Release -DKIMIVL_CUDA=ON \
  -DKIMIVL_CUDA_ARCHS="$ARCHS" -DPython_EXECUTABLE="$VENV/bin/python" \
  -Dpybind11_DIR="$("$VENV/bin/python" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/.prebuilt"
nice "$VENV/bin/cmake" --build "$BUILD" -j "${KIMIVL_BUILD_JOBS:-$(nproc)}"
# The module imports on a Python 3.12 without torch and says it has CUDA for these archs.
(cd .prebuilt && "$VENV/bin/python" -c "
import importlib.util, sys
spec = importlib.util.spec_from_file_location('kimivl_local._C', [f for f in __import__('os').listdir('.') if f.startswith('_C.')][0])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
i = m.build_info(); print('prebuilt:', {k: i[k] for k in ('cuda', 'cuda_archs') if k in i})
sys.exit(0 if i.get('cuda') else 1)")
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- csrc CMakeLists.txt || echo '+dirty csrc')" \
  > .prebuilt/COMMIT
rm -f .whl/*.whl
if [ -n "$WHEELS" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --abi none --platform any -d .whl $WHEELS
fi
ls -la .prebuilt .whl
