#!/usr/bin/env bash
# The device session in one call (see bench/gpu_session.py for the steps, and
# bench/gpu_prep.sh for what to prepare here first). On the device machine:
#   run(command="bash bench/gpu_session.sh", carry=[".prebuilt", ".whl"], timeout_s=600)
# Anywhere, without a GPU: bash bench/gpu_session.sh --dry-run
# Results: $OUT/summary.json and $OUT/steps.log ($OUT defaults to bench/out/gpu-session).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/out/gpu-session}
mkdir -p "$OUT"
# Carried wheels (bench/gpu_prep.sh) go to a private folder on PYTHONPATH: the machine has no
# package registry, and nothing in its own environment is replaced.
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE=${KIMIVL_WHEEL_SITE:-/tmp/kimivl-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || { echo "gpu_session: installing .whl/ failed" >&2; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
"$PY" bench/gpu_session.py --out "$OUT" "$@" 2>&1 | tee "$OUT/driver.log"
exit "${PIPESTATUS[0]}"
