"""Whole-model CPU decode: our kernels on quantized checkpoints against the bf16 torch reference.

    python bench/runtime_cpu.py --full QUANT27 --pair BF16_2L QUANT_2L --pair BF16_4L QUANT_4L
                                [--gen-tokens 32] [--prompt-tokens 128] [--out DIR]

Each run is `kimivl-local bench` in a fresh process (its own peak RSS). QUANT27 is the 27-layer
quantized checkpoint (absolute numbers). A full bf16 model (33 GB) does not fit a 24 GB machine,
so the reference is compared on checkpoints with the real widths and expert counts but fewer
layers: --pair BF16 QUANT runs both (the bf16 one with --backend reference), and two pairs with
different layer counts give the per-layer decode time of each by difference (the lm_head and
embedding cost cancels). Writes runtime_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(model: str, *extra: str, gen: int, prompt: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "kimivl_local.cli", "bench", model, "--device", "cpu",
               "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--json", str(out), *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def layers(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["text_config"]["num_hidden_layers"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", help="27-layer quantized checkpoint")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("BF16", "QUANT"))
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--image", default="none")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    kw = dict(gen=args.gen_tokens, prompt=args.prompt_tokens)
    records = {}
    if args.full:
        records["full"] = bench(args.full, "--image", args.image, **kw)
    for bf16, quant in args.pair:
        n = layers(bf16)
        records[f"{n}L"] = {"layers": n,
                            "reference_bf16": bench(bf16, "--backend", "reference", "--image", "none",
                                                    **kw),
                            "kernels_quant": bench(quant, "--image", "none", **kw)}
    rows = []
    if "full" in records:
        r = records["full"]
        rows.append(f"27 layers, quantized, kernels: decode {r['decode_tokens_per_second']:.2f} tok/s, "
                    f"{r['decode_gbps']:.1f} GB/s = {100 * r['decode_gbps'] / r['ceiling_gbps']:.0f}% "
                    f"of measured {r['ceiling_gbps']:.1f} GB/s; load {r['load_seconds']:.1f} s, "
                    f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, TTFT {r['ttft_text_seconds']:.2f} s")
    pairs = [v for k, v in records.items() if k != "full"]
    for p in pairs:
        ref, q = (1 / p[k]["decode_tokens_per_second"] for k in ("reference_bf16", "kernels_quant"))
        rows.append(f"{p['layers']} layers: reference bf16 {ref * 1e3:.0f} ms/token, kernels "
                    f"{q * 1e3:.0f} ms/token -> {ref / q:.1f}x")
    if len(pairs) >= 2:
        a, b = sorted(pairs, key=lambda p: p["layers"])[:2]
        dl = b["layers"] - a["layers"]
        per = {k: (1 / b[k]["decode_tokens_per_second"] - 1 / a[k]["decode_tokens_per_second"]) / dl
               for k in ("reference_bf16", "kernels_quant")}
        rows.append(f"per MoE layer (difference of {a['layers']}L and {b['layers']}L): reference "
                    f"{per['reference_bf16'] * 1e3:.1f} ms, kernels {per['kernels_quant'] * 1e3:.1f} ms"
                    f" -> {per['reference_bf16'] / per['kernels_quant']:.1f}x")
        records["per_layer_seconds"] = per
    print("\n".join(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_cpu.json").write_text(json.dumps({"records": records, "summary": rows},
                                                          indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
