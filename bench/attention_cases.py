"""Benchmark cases for the attention kernels (CPU, or CUDA with --device cuda), against torch on the
same inputs.

varlen attention on MoonViT shapes (16 heads x 72, bidirectional): one 1024-patch image against
torch's fused SDPA, three unequal images against a per-image SDPA loop. MLA decode at 1K/8K/32K
context (B=1, H=16, 512 + 64 bf16 cache) against the torch absorbed form (`mla_decode_reference`,
the model's einsum math), with the cache bytes read per second next to the memory bandwidth. Like
a decode step, which reads every layer's cache in turn, the calls rotate over enough cache copies
(at least COLD_BYTES) that nothing is served from the L3 cache.

CUDA (--device cuda, bf16): varlen attention on MoonViT shapes (16 x 72, bidirectional) and MLA
prefill shapes (16 heads, q/k 192, v 128, causal), against torch SDPA (flash backend where it
takes the shape) on equal-length batches and a per-image SDPA loop on unequal ones; MLA decode at
1K/8K/32K against the torch absorbed form in bf16, with GB/s next to a device-to-device copy
ceiling measured in the same run. Times are CUDA-event times, best of several runs; the caches
rotate over copies larger than the L2 cache.

bench/kernels.py collects `records(ceiling_gbps)`; run alone, this measures the ceiling itself:
    python bench/attention_cases.py [--device cpu|cuda] [--json FILE] [--threads N]
                                    [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kimivl_local.kernels.bridge import num_threads
from kimivl_local.kernels.extension import build_info
from kimivl_local.ops import mla_decode, mla_decode_reference, varlen_attention

COLD_BYTES = 256 << 20


@dataclass
class Case:
    op: str
    shape: str
    ours: Callable[[], object]
    torch: Callable[[], object]
    bytes: int  # moved by one call: inputs read plus output written
    flops: int


def best_seconds(*fns: Callable[[], object], budget_s: float = 2.0,
                 max_runs: int = 50) -> list[float]:
    """Best time of each function over rounds that run them in turn after one warm-up, so they
    see the same machine load (best-of filters out other processes)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < max_runs and (len(times[0]) < 3 or sum(map(sum, times)) < budget_s):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [min(ts) for ts in times]


def best_cuda_seconds(*fns: Callable[[], object], budget_s: float = 2.0,
                      max_runs: int = 50) -> list[float]:
    """best_seconds with CUDA events: device time of each call, best over interleaved rounds."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < max_runs and (len(times[0]) < 3 or sum(map(sum, times)) < budget_s):
        for fn, ts in zip(fns, times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end) / 1e3)
    return [min(ts) for ts in times]


def measure_cuda_ceiling_gbps() -> float:
    """Device memory bandwidth: a device-to-device copy of 512 MB (each byte read and written)."""
    src = torch.ones(128 << 20, device="cuda")
    dst = torch.empty_like(src)
    (copy,) = best_cuda_seconds(lambda: dst.copy_(src), max_runs=20)
    return 2 * src.numel() * 4 / copy / 1e9


def measure_ceiling_gbps() -> float:
    """Memory bandwidth as bench/kernels.py measures it: the best of a read-reduce and a copy
    (each byte counted twice) over 512 MB, far larger than the caches."""
    src = torch.ones(128 << 20)
    dst = torch.empty_like(src)
    read, copy = best_seconds(src.sum, lambda: dst.copy_(src), max_runs=10)
    nbytes = src.numel() * 4
    return max(nbytes / read, 2 * nbytes / copy) / 1e9


def cuda_kernel_path() -> str:
    """What runs the CUDA cases: the device's compute capability, or the torch fallback."""
    info = build_info()
    if not (info["available"] and info.get("cuda")):
        return "torch-fallback"
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def kernel_isa() -> str:
    """The path the attention kernels run: AVX2 for avx2 and avx512_vnni (csrc/cpu/attention.h)."""
    info = build_info()
    if not info["available"]:
        return "torch-fallback"
    return "avx2" if info.get("cpu_isa_selected") in ("avx2", "avx512_vnni", "amx") else "portable"


def varlen_case(lengths: list[int], dtype: torch.dtype, heads: int = 16, dim: int = 72) -> Case:
    t = sum(lengths)
    g = torch.Generator().manual_seed(0)
    # MoonViT hands the kernel views of one fused qkv projection.
    q, k, v = torch.randn(t, 3, heads, dim, generator=g).to(dtype).unbind(1)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    scale = dim ** -0.5
    if len(set(lengths)) == 1:  # equal lengths: one fused SDPA call over [B, H, L, D]
        qb, kb, vb = (x.view(len(lengths), lengths[0], heads, dim).transpose(1, 2).contiguous()
                      for x in (q, k, v))
        baseline = lambda: F.scaled_dot_product_attention(qb, kb, vb, scale=scale)  # noqa: E731
    else:
        bounds = cu.tolist()  # contiguous [H, L, D] per image: torch's best case, not our views
        per_image = [tuple(x[s:e].transpose(0, 1).contiguous() for x in (q, k, v))
                     for s, e in zip(bounds, bounds[1:])]
        baseline = lambda: [F.scaled_dot_product_attention(*x, scale=scale)  # noqa: E731
                            for x in per_image]
    images = "+".join(map(str, lengths))
    return Case(
        op="varlen_attention",
        shape=f"{images} patches, {heads}x{dim}, bidir, {str(dtype).removeprefix('torch.')}",
        ours=lambda: varlen_attention(q, k, v, cu, causal=False, scale=scale),
        torch=baseline,
        bytes=4 * t * heads * dim * dtype.itemsize,
        flops=sum(4 * n * n * heads * dim for n in lengths))


def mla_case(context: int, heads: int = 16, rank: int = 512, rope: int = 64) -> Case:
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(1, context, rank + rope, generator=g).bfloat16()
    copies = -(-COLD_BYTES // (cache.numel() * 2))
    caches = itertools.cycle([cache] + [cache.clone() for _ in range(copies - 1)])
    q_lat = torch.randn(1, heads, rank, generator=g) * 0.05
    q_pe = torch.randn(1, heads, rope, generator=g) * 0.05
    lens = torch.tensor([context])
    scale = 192 ** -0.5
    return Case(
        op="mla_decode",
        shape=f"B=1 H={heads} ctx={context // 1024}K {rank}+{rope} bf16 cache",
        ours=lambda: mla_decode(q_lat, q_pe, next(caches), lens, scale=scale),
        torch=lambda: mla_decode_reference(q_lat, q_pe, next(caches), lens, scale=scale),
        bytes=context * (rank + rope) * 2,
        flops=2 * context * heads * (rank + rope + rank))


def cuda_varlen_case(lengths: list[int], heads: int, dqk: int, dv: int, causal: bool) -> Case:
    t = sum(lengths)
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    # MoonViT hands the kernel views of one fused qkv projection; so does MLA prefill (q | k | v).
    qkv = torch.randn(t, heads, 2 * dqk + dv, generator=g, device="cuda").to(dtype)
    q, k, v = qkv[..., :dqk], qkv[..., dqk:2 * dqk], qkv[..., 2 * dqk:]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    scale, max_len = dqk ** -0.5, max(lengths)
    if len(set(lengths)) == 1:  # equal lengths: one fused SDPA call over [B, H, L, D]
        qb, kb, vb = (x.reshape(len(lengths), lengths[0], heads, -1).transpose(1, 2).contiguous()
                      for x in (q, k, v))
        sdpa = lambda: F.scaled_dot_product_attention(qb, kb, vb, scale=scale,  # noqa: E731
                                                      is_causal=causal)
        try:  # the flash backend where it takes the shape (same q/k/v head dims)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                sdpa()

            def baseline():
                with torch.nn.attention.sdpa_kernel(
                        torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    return sdpa()
            backend = "SDPA flash"
        except RuntimeError:
            baseline, backend = sdpa, "SDPA"
    else:  # contiguous [H, L, D] per image: torch's best case, not our views
        bounds = cu.tolist()
        per_image = [tuple(x[s:e].transpose(0, 1).contiguous() for x in (q, k, v))
                     for s, e in zip(bounds, bounds[1:])]
        baseline = lambda: [F.scaled_dot_product_attention(  # noqa: E731
            *x, scale=scale, is_causal=causal) for x in per_image]
        backend = "SDPA loop"
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    images = "+".join(map(str, lengths))
    return Case(
        op="varlen_attention",
        shape=(f"{images}, {heads}x{dqk}/{dv}, {'causal' if causal else 'bidir'}, bf16 "
               f"vs {backend}"),
        ours=lambda: varlen_attention(q, k, v, cu, causal=causal, scale=scale,
                                      max_seqlen=max_len),
        torch=baseline,
        bytes=t * heads * (2 * dqk + 2 * dv) * dtype.itemsize,
        flops=2 * pairs * heads * (dqk + dv))


def cuda_mla_case(context: int, heads: int = 16, rank: int = 512, rope: int = 64) -> Case:
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(1, context, rank + rope, generator=g, device="cuda").bfloat16()
    copies = -(-COLD_BYTES // (cache.numel() * 2))  # past the L2 cache, like a real decode step
    caches = itertools.cycle([cache] + [cache.clone() for _ in range(copies - 1)])
    q_lat = (torch.randn(1, heads, rank, generator=g, device="cuda") * 0.05).bfloat16()
    q_pe = (torch.randn(1, heads, rope, generator=g, device="cuda") * 0.05).bfloat16()
    lens = torch.tensor([context], device="cuda", dtype=torch.int32)
    scale = 192 ** -0.5

    def absorbed_torch():  # the model's einsum form in bf16 over one cache layer
        c = next(caches)[0]
        q = torch.cat([q_lat[0], q_pe[0]], -1)
        w = ((q @ c.T).float() * scale).softmax(-1)
        return (w.bfloat16() @ c[:, :rank]).float()

    return Case(
        op="mla_decode",
        shape=f"B=1 H={heads} ctx={context // 1024}K {rank}+{rope} bf16 cache vs torch bf16",
        ours=lambda: mla_decode(q_lat, q_pe, next(caches), lens, scale=scale,
                                max_seq_len=context),
        torch=absorbed_torch,
        bytes=context * (rank + rope) * 2,
        flops=2 * context * heads * (rank + rope + rank))


def build_cases(device: str = "cpu") -> list[Case]:
    if device == "cuda":
        varlen = [cuda_varlen_case(lengths, 16, 72, 72, False)
                  for lengths in ([1024] * 4, [4096], [1024, 576, 256])]
        varlen += [cuda_varlen_case(lengths, 16, 192, 128, True)
                   for lengths in ([2048] * 2, [2048, 700, 33])]
        return varlen + [cuda_mla_case(n * 1024) for n in (1, 8, 32)]
    varlen = [varlen_case(lengths, dtype) for lengths in ([1024], [1024, 576, 256])
              for dtype in (torch.float32, torch.bfloat16)]
    return varlen + [mla_case(n * 1024) for n in (1, 8, 32)]


def run_case(case: Case, ceiling_gbps: float, budget_s: float = 2.0, device: str = "cpu") -> dict:
    timer = best_cuda_seconds if device == "cuda" else best_seconds
    seconds, torch_seconds = timer(case.ours, case.torch, budget_s=budget_s)
    return {"op": case.op, "backend": device,
            "isa": cuda_kernel_path() if device == "cuda" else kernel_isa(), "shape": case.shape,
            "seconds": seconds, "gbps": case.bytes / seconds / 1e9,
            "gflops": case.flops / seconds / 1e9, "ceiling_gbps": ceiling_gbps,
            "torch_seconds": torch_seconds}


def records(ceiling_gbps: float, budget_s: float = 2.0, device: str = "cpu") -> list[dict]:
    """One record per case: {op, backend, isa, shape, seconds, gbps, gflops, ceiling_gbps,
    torch_seconds}; gbps counts bytes moved (for MLA decode: the cache read). device "cuda"
    runs the CUDA cases (ceiling_gbps then being measure_cuda_ceiling_gbps())."""
    return [run_case(case, ceiling_gbps, budget_s, device) for case in build_cases(device)]


def format_table(rows: list[dict]) -> str:
    w = max([46] + [len(r["shape"]) + 2 for r in rows])  # 46 for the CPU cases
    head = (f"{'op':<17}{'shape':<{w}}{'isa':<9}{'ours ms':>9}{'torch ms':>10}{'speedup':>9}"
            f"{'GFLOP/s':>9}{'GB/s':>8}{'of ceil':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['op']:<17}{r['shape']:<{w}}{r['isa']:<9}{r['seconds'] * 1e3:>9.2f}"
            f"{r['torch_seconds'] * 1e3:>10.2f}{r['torch_seconds'] / r['seconds']:>8.2f}x"
            f"{r['gflops']:>9.1f}{r['gbps']:>8.2f}{r['gbps'] / r['ceiling_gbps']:>8.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="run the CPU kernels (default) or the CUDA kernels")
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for torch and the kernels (default: all cores)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed runs per case and backend (more: steadier)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["KIMIVL_NUM_THREADS"] = str(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA device")
        ceiling = measure_cuda_ceiling_gbps()
        rows = records(ceiling, budget_s=args.budget, device="cuda")
        print(f"device: {torch.cuda.get_device_name()}   device-to-device copy ceiling: "
              f"{ceiling:.1f} GB/s")
    else:
        ceiling = measure_ceiling_gbps()
        rows = records(ceiling, budget_s=args.budget)
        print(f"threads: {num_threads()}   memory bandwidth ceiling (copy): {ceiling:.1f} GB/s")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
