"""Whole-model CPU decode: our kernels on quantized checkpoints against the bf16 torch reference
and against the machine's read bandwidth, timed round-robin in one process.

    python bench/runtime_cpu.py QUANT [BF16] [QUANT BF16 ...] [--steps 48] [--json FILE]
                                [--image 512x512] [--image-rounds 2] [--prefill 512]

Each argument is a checkpoint folder. Quantized ones decode with the compiled kernels, bf16 ones
with --backend reference (torch only). All models are loaded into one process and every round
times one decode step of each, plus a 256 MB read-reduce (the bandwidth ceiling), so they all see
the same interference from other processes; each figure is the best over the rounds. Reported:
ms per token, bytes read per token, GB/s and % of the ceiling, and the speed-up of each quantized
model over the bf16 model with the same layer count. A full bf16 model (33 GB) does not fit a
24 GB machine: compare it on checkpoints with the real widths and expert counts and fewer layers
(`kimivl-local synthetic DST --preset full --layers 4`, then `kimivl-local quantize`); two layer
counts also give the per-layer figures by difference (for each backend with two depths).

A quantized model whose layers the fused CPU decode takes (kimivl_local/model/fused_decode.py) is
timed twice per round, fused and unfused (the torch path between the kernels, as with
KIMIVL_FUSED_DECODE=0; both share the model and its cache), so the A/B sees the same interference.

Also reported, per model: the time of one decode step spent outside the compiled kernels (one
extra step with every `_C` call timed; Python, torch ops and thread hand-offs between kernels).
With --prefill N, per model: a fresh N-token text prefill (ppN), best of --prefill-rounds rounds
interleaved across models, once as the engine runs it (torch's glue between kernels on one
thread) and once with that glue on torch's own threads (main before issue 15's prefill change).
With --image WxH, for the first model: the vision tower + projector on a random WxH image, on
the fast path (bf16 matmuls and activations where the CPU has AVX512-BF16) and the exact fp32
path (KIMIVL_VISION_EXACT=1), the tower alone and per block (by difference with the tower cut to
one block), best of --image-rounds interleaved rounds, and separately the prefill of that
image's prompt with its features already computed: time to first token = vision + prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import kimivl_local
import kimivl_local.engine.generate
from kimivl_local.cli.benchmark import _text_ids, decode_bytes_per_token
from kimivl_local.engine.memory_plan import vision_fast_bytes
from kimivl_local.engine.multimodal import build_prompt
from kimivl_local.kernels import bridge as _bridge
from kimivl_local.kernels.bridge import set_backend

PROMPT = "The quick brown fox jumps over the lazy dog while a robot reads a report. " * 3


class KernelTimer:
    """Stands in for the extension while installed: every `_C` call is timed and summed."""

    def __init__(self, ext):
        self.ext, self.seconds, self.calls = ext, 0.0, 0

    def __getattr__(self, name):
        fn = getattr(self.ext, name)
        if not callable(fn):
            return fn

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def outside_kernels(run) -> tuple[float, float, int]:
    """(step seconds, seconds inside _C calls, number of _C calls) of one decode step."""
    real = _bridge.extension
    timer = KernelTimer(real())
    _bridge.extension = lambda: timer
    try:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    finally:
        _bridge.extension = real
    return total, timer.seconds, timer.calls


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def image_timings(model, size: tuple[int, int], rounds: int) -> dict:
    """Vision tower + projector (fast and exact path), the tower's time per block (the tower
    with all its blocks minus the tower cut to one, over the difference in blocks) on each path,
    and the image prompt's prefill, best of `rounds` interleaved rounds. Also the resident
    memory the first fast call adds (its bf16 weight copies) against the planner's count."""
    w, h = size
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe it."}]}]
    tower = model.model.vision_tower
    projector = model.model.multi_modal_projector
    processed = model.images.preprocess([image])
    _, pixels, grids = processed[0]
    blocks = tower.encoder.blocks
    best = {key: float("inf") for key in ("vision_fast_s", "vision_exact_s", "tower_fast_s",
                                          "tower_exact_s", "tower_1block_fast_s",
                                          "tower_1block_exact_s", "image_prefill_s")}
    saved = tower.bf16_linears, projector.bf16_linears

    features = {}

    def timed(key, fn):
        t0 = time.perf_counter()
        out = fn()
        best[key] = min(best[key], time.perf_counter() - t0)
        return out

    rss_before = rss_bytes()
    try:
        with torch.inference_mode():
            for i in range(rounds):
                for path, fast in (("fast", None), ("exact", False)):
                    tower.bf16_linears = projector.bf16_linears = fast
                    model.images.memo.clear()
                    features[path] = timed(f"vision_{path}_s",
                                           lambda: model.images.features(processed))[0]
                    if i == 0 and path == "fast":
                        best["rss_after_first_fast_gb"] = (rss_bytes() - rss_before) / 1e9
                    timed(f"tower_{path}_s", lambda: tower(pixels, grids))
                    tower.encoder.blocks = blocks[:1]
                    try:
                        timed(f"tower_1block_{path}_s", lambda: tower(pixels, grids))
                    finally:
                        tower.encoder.blocks = blocks
                prompt = build_prompt(model.model, model.tokenizer, model.images, messages)
                prompt.embed(0)  # features memoized: the prefill below is the language model alone
                model.engine.cache.reset()
                timed("image_prefill_s", lambda p=prompt: model.engine.prefill(p))
    finally:
        tower.bf16_linears, projector.bf16_linears = saved
    for path in ("fast", "exact"):
        best[f"block_{path}_s"] = ((best[f"tower_{path}_s"] - best[f"tower_1block_{path}_s"])
                                   / max(len(blocks) - 1, 1))
    diff = (features["fast"].float() - features["exact"].float()).abs()
    best["features_rel_diff_mean"] = (diff.mean() / features["exact"].float().abs().mean()).item()
    best["features_rel_diff_max"] = (diff.max() / features["exact"].float().abs().max()).item()
    best["blocks"] = len(blocks)
    best["planned_fast_copies_gb"] = vision_fast_bytes(model.model) / 1e9
    best["image_tokens"] = model.processor.num_tokens(image)
    best["prompt_tokens"] = len(prompt.ids)
    return best


def prefill_timings(runs: list[dict], n: int, rounds: int) -> None:
    """r["prefill"] = {"one_thread_glue": best s, "torch_thread_glue": best s} per model."""
    single = kimivl_local.engine.generate.torch_single_threaded
    for r in runs:
        r["prefill"] = {"one_thread_glue": float("inf"), "torch_thread_glue": float("inf")}
    try:
        for i in range(rounds):
            for r in runs:
                set_backend(r["backend"])
                ids = _text_ids(r["model"].tokenizer, n)
                modes = list(r["prefill"])
                for mode in modes if i % 2 == 0 else modes[::-1]:
                    kimivl_local.engine.generate.torch_single_threaded = (
                        single if mode == "one_thread_glue" else contextlib.nullcontext)
                    r["model"].engine.cache.reset()
                    t0 = time.perf_counter()
                    r["model"].engine.prefill(ids)
                    r["prefill"][mode] = min(r["prefill"][mode], time.perf_counter() - t0)
    finally:
        kimivl_local.engine.generate.torch_single_threaded = single
        set_backend("auto")


def use_mode(r: dict) -> None:
    """Select run r's backend and, for a quantized model with a fused plan, fused or unfused."""
    set_backend(r["backend"])
    if "plan" in r:
        r["plan"].enabled = r["mode"] == "fused"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", type=int, default=48, help="timed rounds (decode steps per model)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--image", help="also time the vision tower and an image prompt, e.g. 512x512")
    ap.add_argument("--image-rounds", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=0, help="also time an N-token text prefill")
    ap.add_argument("--prefill-rounds", type=int, default=3)
    args = ap.parse_args()

    runs = []
    for path in args.models:
        config = json.loads((Path(path) / "config.json").read_text())
        backend = "auto" if "quantization_config" in config else "reference"
        t0 = time.perf_counter()
        model = kimivl_local.load(path, device="cpu", max_context=max(512, args.prefill + 1),
                                  backend=backend)
        ids = model.tokenizer.encode(PROMPT)
        run = {"path": path, "backend": backend, "model": model, "ids": ids,
               "layers": model.config.text.num_hidden_layers,
               "load_seconds": time.perf_counter() - t0, "best": float("inf")}
        fused = model.model.language_model.fused_decode() if backend == "auto" else None
        if fused is None:
            runs.append({**run, "mode": backend})
        else:  # the same model twice: fused and unfused decode, interleaved
            runs += [{**run, "mode": "fused", "plan": fused},
                     {**run, "mode": "unfused", "plan": fused}]
    probe = torch.ones(64 << 20)  # 256 MB, far larger than the caches
    best_probe = float("inf")
    for r in runs:
        use_mode(r)
        r["times"] = []  # per run: a fused/unfused pair was copied from one dict
        engine = r["model"].engine
        engine.cache.reset()
        r["token"] = int(engine.prefill(r["ids"])[0].argmax())
        # a fused/unfused pair shares one cache, which grows by two tokens a round
        grown = args.steps if "plan" in r else args.steps // 2
        r["bytes"] = decode_bytes_per_token(r["model"].model, len(r["ids"]) + grown)
    for i in range(args.steps):
        for r in runs if i % 2 == 0 else runs[::-1]:  # neither of a pair always goes second
            use_mode(r)
            t0 = time.perf_counter()
            r["token"] = int(r["model"].engine.decode_step(r["token"]).argmax())
            r["times"].append(time.perf_counter() - t0)
            r["best"] = min(r["best"], r["times"][-1])
        for threads in (None, 1):  # on a loaded machine one thread sometimes reads faster
            with _bridge.torch_single_threaded() if threads else contextlib.nullcontext():
                t0 = time.perf_counter()
                probe.sum()
                best_probe = min(best_probe, time.perf_counter() - t0)
    for r in runs:
        use_mode(r)

        def step(r=r):
            r["token"] = int(r["model"].engine.decode_step(r["token"]).argmax())
        r["step_s"], r["kernel_s"], r["kernel_calls"] = outside_kernels(step)
    set_backend("auto")
    ceiling = probe.numel() * 4 / best_probe / 1e9

    print(f"read bandwidth ceiling: {ceiling:.1f} GB/s (best of {args.steps} rounds)")
    records = []
    for r in runs:
        gbps = r["bytes"] / r["best"] / 1e9
        rec = {k: r[k] for k in ("path", "backend", "mode", "layers", "bytes", "load_seconds")}
        outside = r["step_s"] - r["kernel_s"]
        rec.update(ms_per_token=r["best"] * 1e3, median_ms=statistics.median(r["times"]) * 1e3,
                   gbps=gbps, ceiling_gbps=ceiling,
                   instrumented_step_ms=r["step_s"] * 1e3, outside_kernels_ms=outside * 1e3,
                   kernel_calls=r["kernel_calls"])
        records.append(rec)
        print(f"{r['path']}: {r['layers']} layers, {r['mode']}: {r['best'] * 1e3:.1f} ms/token "
              f"(median {rec['median_ms']:.1f}), "
              f"{r['bytes'] / 2**20:.0f} MiB/token -> {gbps:.1f} GB/s = {100 * gbps / ceiling:.0f}% "
              f"of the ceiling; one timed step: {r['step_s'] * 1e3:.1f} ms, "
              f"{outside * 1e3:.1f} ms ({100 * outside / r['step_s']:.0f}%) outside "
              f"{r['kernel_calls']} kernel calls")
    by_layers = {}
    for rec in records:
        by_layers.setdefault(rec["layers"], {}).setdefault(rec["mode"], rec)
    for n, modes in sorted(by_layers.items()):
        for mode in ("auto", "fused", "unfused"):
            if mode in modes and "reference" in modes:
                ratio = modes["reference"]["ms_per_token"] / modes[mode]["ms_per_token"]
                print(f"{n} layers: kernels ({mode}) {ratio:.1f}x the bf16 reference")
        if "fused" in modes and "unfused" in modes:
            best = modes["unfused"]["ms_per_token"] / modes["fused"]["ms_per_token"]
            median = modes["unfused"]["median_ms"] / modes["fused"]["median_ms"]
            print(f"{n} layers: fused decode {best:.2f}x the unfused (best), {median:.2f}x (median) "
                  f"({modes['fused']['path']})")
    for backend in ("auto", "fused", "unfused", "reference"):
        # the first two models of this mode (in argument order) with different depths
        recs = [rec for rec in records if rec["mode"] == backend]
        pair = next(((x, y) for i, x in enumerate(recs) for y in recs[i + 1:]
                     if x["layers"] != y["layers"]), None)
        if pair:
            a, b = sorted(pair, key=lambda rec: rec["layers"])
            ms = (b["ms_per_token"] - a["ms_per_token"]) / (b["layers"] - a["layers"])
            mib = (b["bytes"] - a["bytes"]) / (b["layers"] - a["layers"]) / 2**20
            gbps = mib * 2**20 / ms / 1e6 if ms > 0 else float("nan")
            print(f"per layer ({a['layers']} -> {b['layers']} layers), {backend}: {ms:.2f} ms, "
                  f"{mib:.1f} MiB -> {gbps:.1f} GB/s = {100 * gbps / ceiling:.0f}% of the ceiling")
    if args.prefill:
        once = [(r, rec) for r, rec in zip(runs, records) if r["mode"] != "unfused"]
        prefill_timings([r for r, _ in once], args.prefill, args.prefill_rounds)
        for r, rec in once:
            best = r["prefill"]
            rec.update(prefill_tokens=args.prefill, prefill_s=best["one_thread_glue"],
                       prefill_torch_thread_glue_s=best["torch_thread_glue"])
            print(f"{r['path']}: pp{args.prefill} {args.prefill / best['one_thread_glue']:.1f} "
                  f"tok/s; with torch's glue on torch's threads "
                  f"{args.prefill / best['torch_thread_glue']:.1f} tok/s")
    image = None
    if args.image:
        size = tuple(int(v) for v in args.image.lower().split("x"))
        set_backend(runs[0]["backend"])
        image = image_timings(runs[0]["model"], size, args.image_rounds)
        set_backend("auto")
        ttft = image["vision_fast_s"] + image["image_prefill_s"]
        ttft_exact = image["vision_exact_s"] + image["image_prefill_s"]
        print(f"image {args.image} ({image['image_tokens']} tokens, prompt {image['prompt_tokens']}) "
              f"on {runs[0]['path']}: vision tower + projector {image['vision_fast_s']:.2f} s "
              f"(exact fp32 path {image['vision_exact_s']:.2f} s: "
              f"{image['vision_exact_s'] / image['vision_fast_s']:.2f}x), prefill "
              f"{image['image_prefill_s']:.2f} s; time to first token {ttft:.2f} s vs "
              f"{ttft_exact:.2f} s ({ttft / ttft_exact:.2f}x)")
        print(f"tower alone {image['tower_fast_s']:.2f} s vs {image['tower_exact_s']:.2f} s exact "
              f"({image['tower_exact_s'] / image['tower_fast_s']:.2f}x); per block (by difference "
              f"of {image['blocks']} and 1 blocks) {image['block_fast_s'] * 1e3:.0f} ms vs "
              f"{image['block_exact_s'] * 1e3:.0f} ms exact "
              f"({image['block_exact_s'] / image['block_fast_s']:.2f}x); resident memory after "
              f"the first fast image +{image['rss_after_first_fast_gb']:.2f} GB (planned bf16 "
              f"copies {image['planned_fast_copies_gb']:.2f} GB); fast vs exact features: mean "
              f"|diff| {image['features_rel_diff_mean']:.2%} of mean |exact|, max "
              f"{image['features_rel_diff_max']:.2%} of max")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"ceiling_gbps": ceiling, "steps": args.steps, "records": records,
                       "image": image}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
