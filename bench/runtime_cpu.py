"""Whole-model CPU decode: our kernels on quantized checkpoints against the bf16 torch reference
and against the machine's read bandwidth, timed round-robin in one process.

    python bench/runtime_cpu.py QUANT [BF16] [QUANT BF16 ...] [--steps 48] [--json FILE]

Each argument is a checkpoint folder. Quantized ones decode with the compiled kernels, bf16 ones
with --backend reference (torch only). All models are loaded into one process and every round
times one decode step of each, plus a 256 MB read-reduce (the bandwidth ceiling), so they all see
the same interference from other processes; each figure is the best over the rounds. Reported:
ms per token, bytes read per token, GB/s and % of the ceiling, and the speed-up of each quantized
model over the bf16 model with the same layer count. A full bf16 model (33 GB) does not fit a
24 GB machine: compare it on checkpoints with the real widths and expert counts and fewer layers
(`kimivl-local synthetic DST --preset full --layers 4`, then `kimivl-local quantize`); two layer
counts also give the per-layer figures by difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import kimivl_local
from kimivl_local.benchmark import decode_bytes_per_token
from kimivl_local.ops._bridge import set_backend

PROMPT = "The quick brown fox jumps over the lazy dog while a robot reads a report. " * 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", type=int, default=48, help="timed rounds (decode steps per model)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    runs = []
    for path in args.models:
        config = json.loads((Path(path) / "config.json").read_text())
        backend = "auto" if "quantization_config" in config else "reference"
        t0 = time.perf_counter()
        model = kimivl_local.load(path, device="cpu", max_context=512, backend=backend)
        ids = model.tokenizer.encode(PROMPT)
        runs.append({"path": path, "backend": backend, "model": model, "ids": ids,
                     "layers": model.config.text.num_hidden_layers,
                     "load_seconds": time.perf_counter() - t0, "best": float("inf")})
    probe = torch.ones(64 << 20)  # 256 MB, far larger than the caches
    best_probe = float("inf")
    for r in runs:
        set_backend(r["backend"])
        engine = r["model"].engine
        engine.cache.reset()
        r["token"] = int(engine.prefill(r["ids"])[0].argmax())
        r["bytes"] = decode_bytes_per_token(r["model"].model, len(r["ids"]) + args.steps // 2)
    for _ in range(args.steps):
        for r in runs:
            set_backend(r["backend"])
            t0 = time.perf_counter()
            r["token"] = int(r["model"].engine.decode_step(r["token"]).argmax())
            r["best"] = min(r["best"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        probe.sum()
        best_probe = min(best_probe, time.perf_counter() - t0)
    set_backend("auto")
    ceiling = probe.numel() * 4 / best_probe / 1e9

    print(f"read bandwidth ceiling: {ceiling:.1f} GB/s (best of {args.steps} rounds)")
    records = []
    for r in runs:
        gbps = r["bytes"] / r["best"] / 1e9
        rec = {k: r[k] for k in ("path", "backend", "layers", "bytes", "load_seconds")}
        rec.update(ms_per_token=r["best"] * 1e3, gbps=gbps, ceiling_gbps=ceiling)
        records.append(rec)
        print(f"{r['path']}: {r['layers']} layers, {r['backend']}: {r['best'] * 1e3:.1f} ms/token, "
              f"{r['bytes'] / 2**20:.0f} MiB/token -> {gbps:.1f} GB/s = {100 * gbps / ceiling:.0f}% "
              f"of the ceiling")
    by_layers = {}
    for rec in records:
        by_layers.setdefault(rec["layers"], {})[rec["backend"]] = rec
    for n, pair in sorted(by_layers.items()):
        if len(pair) == 2:
            ratio = pair["reference"]["ms_per_token"] / pair["auto"]["ms_per_token"]
            print(f"{n} layers: kernels {ratio:.1f}x the bf16 reference")
    full = [n for n, p in by_layers.items() if len(p) == 2]
    if len(full) >= 2:
        a, b = sorted(full)[:2]
        for backend in ("auto", "reference"):
            per = (by_layers[b][backend]["ms_per_token"] - by_layers[a][backend]["ms_per_token"]) / (b - a)
            print(f"per layer ({a} -> {b} layers), {backend}: {per:.2f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"ceiling_gbps": ceiling, "steps": args.steps, "records": records}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
