"""Peak GPU memory of a long prefill against the memory planner's prediction.

    python bench/gpu_memory.py CHECKPOINT [--context 32768] [--prompt-tokens N] [--json FILE]

Loads CHECKPOINT on CUDA with --max-context, prefills N tokens (default context - 64) and decodes
8, and reports torch's peak allocated and reserved bytes next to the plan's parts (weights on
the device, KV cache, activations, and the fixed reserve for the CUDA context and allocator
slack). `within_plan` says whether the peak allocated stayed under the planned device total,
the promise `kimivl-local` makes before it reads a byte of weights. Exit code 1 when not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import kimivl_local
from kimivl_local.engine.memory_plan import CUDA_RESERVE

TEXT = "Memory planning decides before loading where each part lives and whether it fits. "


def measure(path: str, context: int, prompt_tokens: int) -> dict:
    t0 = time.perf_counter()
    model = kimivl_local.load(path, device="cuda", max_context=context)
    load_s = time.perf_counter() - t0
    plan, dev = model.memory_plan, model.device
    torch.cuda.synchronize(dev)
    after_load = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    ids = model.tokenizer.encode(TEXT)
    ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    t0 = time.perf_counter()
    logits, _ = model.engine.prefill(ids)
    token = int(logits.argmax())
    torch.cuda.synchronize(dev)
    prefill_s = time.perf_counter() - t0
    for _ in range(8):
        token = int(model.engine.decode_step(token).argmax())
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return {
        "checkpoint": str(model.path), "gpu": torch.cuda.get_device_name(dev),
        "context": context, "prompt_tokens": prompt_tokens, "load_seconds": load_s,
        "prefill_seconds": prefill_s, "plan_summary": plan.summary(),
        "plan_device_weights": plan.device_weights, "plan_kv_cache": plan.kv_cache,
        "plan_activations": plan.activations, "plan_reserve": CUDA_RESERVE,
        "plan_device_total": plan.device_total, "plan_host_weights": plan.host_weights,
        "allocated_after_load": after_load, "peak_allocated": peak,
        "peak_reserved": torch.cuda.max_memory_reserved(dev),
        "device_used_at_end": total - free,  # every process on the GPU, CUDA context included
        "within_plan": peak <= plan.device_total,
        "peak_over_plan_without_reserve": peak / (plan.device_total - CUDA_RESERVE),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    r = measure(args.model, args.context, args.prompt_tokens or args.context - 64)
    gib = 2 ** 30
    print(f"{r['gpu']}: {r['prompt_tokens']} tokens prefilled in {r['prefill_seconds']:.2f}s; "
          f"peak allocated {r['peak_allocated'] / gib:.2f} GiB, reserved "
          f"{r['peak_reserved'] / gib:.2f} GiB, planned {r['plan_device_total'] / gib:.2f} GiB "
          f"({r['plan_summary']})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=1)
    return 0 if r["within_plan"] else 1


if __name__ == "__main__":
    sys.exit(main())
