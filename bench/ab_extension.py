"""Two builds of the extension in one process, interleaved: an N-token prefill of one checkpoint
with a saved `_C` (e.g. main's) against this tree's, so a kernel change is measured under the same
load from other processes.

    cp kimivl_local/_C*.so /tmp/old/           # before rebuilding
    python bench/ab_extension.py CKPT /tmp/old/_C.cpython-311-x86_64-linux-gnu.so
                                 [--tokens 512] [--rounds 6]

Each round runs both builds (order alternating) and prints their times; the summary gives the
best of each and the median of the per-round ratios (old / new), the figure to trust on a shared
machine. The logits of the two builds are compared once (largest absolute difference).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import kimivl_local
from kimivl_local.cli.benchmark import _text_ids
from kimivl_local.kernels import bridge as _bridge
from kimivl_local.kernels.extension import extension


def load_extension(path: str):
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("old_extension", help="path of the saved _C*.so")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    builds = {"old": load_extension(args.old_extension), "new": extension()}
    model = kimivl_local.load(args.checkpoint, device="cpu", max_context=args.tokens + 1)
    ids = _text_ids(model.tokenizer, args.tokens)
    real = _bridge.extension

    def prefill(name: str):
        _bridge.extension = lambda: builds[name]
        try:
            model.engine.cache.reset()
            return model.engine.prefill(ids)[0]
        finally:
            _bridge.extension = real

    diff = (prefill("old") - prefill("new")).abs().max().item()
    print(f"largest |logit difference| old vs new: {diff:.3g}")
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            t0 = time.perf_counter()
            prefill(name)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r}: old {times['old'][-1]:.3f} s, new {times['new'][-1]:.3f} s", flush=True)
    ratios = sorted(o / n for o, n in zip(times["old"], times["new"]))
    n = args.tokens
    print(f"pp{n}: old {n / min(times['old']):.1f} tok/s, new {n / min(times['new']):.1f} tok/s "
          f"(best of {args.rounds}); median per-round speed-up {ratios[len(ratios) // 2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
