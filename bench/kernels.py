"""Kernel benchmarks on Kimi-VL's real shapes, next to torch and the machine's bandwidth.

    python bench/kernels.py [--device cpu|cuda] [--json FILE] [--threads N] [--filter TEXT]
                            [--quick] [--widths]

Prints one row per case and, with --json, writes one record per case:
  {op, backend, isa, shape, seconds, gbps, gflops, ceiling_gbps, torch_seconds,
   torch_fp32_seconds}
gbps counts the weight bytes the call must read; ceiling_gbps is this machine's read bandwidth,
a 256 MB torch read-reduce timed round-robin with the case's own calls (best of each, so both
see the same load from other processes); torch_seconds is torch's bf16 matmul on the
dequantized weights (torch_fp32_seconds the same in fp32), timed in the same rounds. Decode-shaped
cases rotate over enough weight copies (or experts) that nothing is served from the L3 cache.
Compare ratios within one run: on shared machines absolute times are noise.

--isa-ab amx,avx512_vnni times the CPU cases once per named kernel path (KIMIVL_ISA, switched
per call), round-robin in the same rounds as torch and the probe: one row per path, so the
paths' ratios come from one run. --prefill keeps only the M = 512 cases.

--widths runs only the width sweep (width_sweep_cases: the routed-expert block at M = 1 for 2, 3,
4, 5, 6 and 8 bits; bytes and time per call should fall with the width).

Cases come from CASE_BUILDERS: a builder takes the parsed arguments and returns Case objects, so
new ops (e.g. attention) add one function to that list.

--device cuda runs the same cases through the CUDA kernels (CudaQuantWeight) and writes the same
records with backend "cuda" and isa = the GPU's name: each time is the best, over rounds, of the
mean of 10 back-to-back calls timed with CUDA events (the calls rotate over weight copies, or
disjoint experts, adding up to at least 256 MB so that nothing is served from L2);
ceiling_gbps is a device-to-device copy_ of a 1 GB buffer timed the same way in the same rounds,
counting its read and write traffic; torch_seconds is cuBLAS bf16 F.linear on the dequantized
weights (for the MoE block, the dense bf16 expert loop); torch_fp32_seconds is not measured.
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

from kimivl_local.kernels.extension import build_info
from kimivl_local.ops import moe_block, quant_matmul
from kimivl_local.quant import PackedWeight, QuantScheme, cuda_layout, quantize_rtn, to_cpu_layout
from kimivl_local.quant.cpu_layout import dequantize

HIDDEN, EXPERT_I, SHARED_I, EXPERTS, TOP_K = 2048, 1408, 2816, 64, 6
COLD_BYTES = 256 << 20  # rotate over at least this much weight memory (8x a 32 MB L3)
SCHEMES = {"int4-g128": QuantScheme(4, 128, True), "int8-ch": QuantScheme(8, None, True)}


@dataclass
class Case:
    op: str
    shape: str
    run: Callable[[], object]  # ours; each call may use the next weight copy
    bytes: int  # weight bytes one call must read
    flops: float
    torch_bf16: Callable[[], object] | None = None
    torch_fp32: Callable[[], object] | None = None
    reps: int = 20


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    it = itertools.cycle(fns)
    return lambda: next(it)()


def copies_for(nbytes: int) -> int:
    return max(1, min(64, -(-COLD_BYTES // max(nbytes, 1))))


def random_weight(shape, scheme) -> torch.Tensor:
    return quantize_rtn((torch.randn(shape) * 0.02).bfloat16(), scheme)


def quant_matmul_cases(args) -> list[Case]:
    cases = []
    for (name, n, k), (sname, scheme), m in itertools.product(
            [("q_proj", 3072, HIDDEN), ("o_proj", HIDDEN, HIDDEN), ("lm_head", 163840, HIDDEN)],
            SCHEMES.items(), [1, 512]):
        if m > 1 and (args.quick or name == "lm_head") or m == 1 and args.prefill:
            continue
        w = to_cpu_layout(random_weight((n, k), scheme))
        ws = [w]
        if m == 1:
            ws += [to_cpu_layout(random_weight((n, k), scheme))
                   for _ in range(copies_for(w.nbytes()) - 1)]
        x = torch.randn(m, k).bfloat16()
        dense = dequantize(w)
        bf16, fp32 = [dense.bfloat16()], [dense]
        if m == 1:  # torch's weights rotate too
            bf16 += [torch.randn(n, k).bfloat16() for _ in range(copies_for(n * k * 2) - 1)]
            fp32 += [torch.randn(n, k) for _ in range(copies_for(n * k * 4) - 1)]
        x32 = x.float()
        cases.append(Case(
            "quant_matmul", f"{name} {sname} M={m} N={n} K={k}",
            rotating([lambda w=w, x=x: quant_matmul(x, w) for w in ws]), w.nbytes(),
            2.0 * m * n * k,
            rotating([lambda d=d, x=x: F.linear(x, d) for d in bf16]),
            rotating([lambda d=d, x=x32: F.linear(x, d) for d in fp32]),
            reps=20 if m == 1 else 3))
    return cases


def _torch_moe(x, weights, ids, w13, w2):
    """The plain torch block on dense stacked weights: one expert at a time."""
    out = torch.zeros_like(x, dtype=torch.float32)
    inter = w2.shape[2]
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gu = F.linear(x[tok], w13[e])
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        out.index_add_(0, tok, F.linear(h, w2[e]).float() * weights[tok, slot, None])
    return out.to(x.dtype)


def moe_cases(args) -> list[Case]:
    cases = []
    scheme = SCHEMES["int4-g128"]
    for name, e, k, inter in [("routed experts", EXPERTS, TOP_K, EXPERT_I),
                              ("shared experts", 1, 1, SHARED_I)]:
        def stack():
            return (to_cpu_layout(random_weight((e, 2 * inter, HIDDEN), scheme)),
                    to_cpu_layout(random_weight((e, HIDDEN, inter), scheme)))

        quant = [stack()]
        per_expert = sum(w.nbytes() for w in quant[0]) // e
        d13, d2 = (dequantize(w) for w in quant[0])
        dense = {torch.float32: [(d13, d2)]}
        dense[torch.bfloat16] = [(d13.bfloat16(), d2.bfloat16())]
        for m in [1] if args.quick else [512] if args.prefill else [1, 512]:
            x = torch.randn(m, HIDDEN).bfloat16()
            g = torch.Generator().manual_seed(m)
            if m == 1 and e > 1:  # consecutive calls take disjoint experts: each is cold again
                routes = [torch.tensor([[(k * i + j) % e for j in range(k)]]) for i in range(32)]
            else:
                routes = [torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)])]
            touched = per_expert * int(routes[0].unique().numel())
            if m == 1 and e == 1:  # one expert: rotate over weight copies instead
                quant += [stack() for _ in range(copies_for(touched) - len(quant))]
                for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
                    want = copies_for((d13.numel() + d2.numel()) * size) - len(dense[dtype])
                    dense[dtype] += [(torch.randn(d13.shape).to(dtype),
                                      torch.randn(d2.shape).to(dtype)) for _ in range(want)]
            calls = [(torch.rand(r.shape), r) for r in routes]

            def runs(fn, weights, x=x, calls=calls):
                n = max(len(calls), len(weights))
                return rotating([lambda i=i: fn(x, *calls[i % len(calls)],
                                                *weights[i % len(weights)]) for i in range(n)])

            cases.append(Case(
                "moe_block", f"{name} E={e} top-{k} {HIDDEN}<->{inter} int4-g128 M={m}",
                runs(moe_block, quant), touched, 2.0 * m * k * 3 * HIDDEN * inter,
                runs(_torch_moe, dense[torch.bfloat16], x.bfloat16()),
                runs(_torch_moe, dense[torch.float32], x.float()), reps=20 if m == 1 else 2))
    return cases


# The width sweep: each width at the group `quantize` gives it by default (quantize/recipes.py).
WIDTHS = {2: 32, 3: 64, 4: 128, 5: 128, 6: 128, 8: None}


def random_experts(e: int, shape: tuple[int, int], scheme: QuantScheme):
    """E random quantized experts in the CPU layout, quantized 8 at a time (bounded temporaries)."""
    parts = [random_weight((min(8, e - i), *shape), scheme) for i in range(0, e, 8)]
    zp = None if scheme.symmetric else torch.cat([p.weight_zero_point for p in parts])
    return to_cpu_layout(PackedWeight(torch.cat([p.weight_packed for p in parts]),
                                      torch.cat([p.weight_scale for p in parts]),
                                      parts[0].weight_shape, zp, scheme))


def width_sweep_cases(args) -> list[Case]:
    """Decode (M = 1) through the routed experts at every width: the bytes read per call scale
    with the width, and so should the time, while the kernel stays bandwidth-bound."""
    cases = []
    for bits, group in WIDTHS.items():
        scheme = QuantScheme(bits, group, True)
        w13 = random_experts(EXPERTS, (2 * EXPERT_I, HIDDEN), scheme)
        w2 = random_experts(EXPERTS, (HIDDEN, EXPERT_I), scheme)
        per_expert = (w13.nbytes() + w2.nbytes()) // EXPERTS
        x = torch.randn(1, HIDDEN).bfloat16()
        calls = [(torch.rand(1, TOP_K), torch.tensor([[(TOP_K * i + j) % EXPERTS
                                                      for j in range(TOP_K)]]))
                 for i in range(32)]  # consecutive calls take disjoint experts: cold each time
        cases.append(Case(
            "moe_block", f"routed experts E={EXPERTS} top-{TOP_K} int{bits}-"
            f"{'ch' if group is None else f'g{group}'} M=1",
            rotating([lambda c=c, w13=w13, w2=w2: moe_block(x, *c, w13, w2) for c in calls]),
            per_expert * TOP_K, 2.0 * TOP_K * 3 * HIDDEN * EXPERT_I))
    return cases


CASE_BUILDERS: list[Callable[[argparse.Namespace], list[Case]]] = [quant_matmul_cases, moe_cases,
                                                                   width_sweep_cases]


def cuda_weight(shape, scheme) -> cuda_layout.CudaQuantWeight:
    return cuda_layout.to_cuda_layout(random_weight(shape, scheme), "cuda")


def cuda_quant_matmul_cases(args) -> list[Case]:
    cases = []
    for (name, n, k), (sname, scheme), m in itertools.product(
            [("q_proj", 3072, HIDDEN), ("o_proj", HIDDEN, HIDDEN), ("lm_head", 163840, HIDDEN)],
            SCHEMES.items(), [1, 8, 512]):
        if m > 1 and args.quick:
            continue
        ws = [cuda_weight((n, k), scheme)]
        ws += [cuda_weight((n, k), scheme) for _ in range(copies_for(ws[0].nbytes()) - 1)]
        x = torch.randn(m, k, device="cuda").bfloat16()
        bf16 = [cuda_layout.dequantize(w, torch.bfloat16) for w in ws[:copies_for(n * k * 2)]]
        cases.append(Case(
            "quant_matmul", f"{name} {sname} M={m} N={n} K={k}",
            rotating([lambda w=w, x=x: quant_matmul(x, w) for w in ws]), ws[0].nbytes(),
            2.0 * m * n * k, rotating([lambda d=d, x=x: F.linear(x, d) for d in bf16]),
            reps=20 if m < 512 else 5))
    return cases


def cuda_moe_cases(args) -> list[Case]:
    cases = []
    scheme = SCHEMES["int4-g128"]
    for name, e, k, inter in [("routed experts", EXPERTS, TOP_K, EXPERT_I),
                              ("shared experts", 1, 1, SHARED_I)]:
        def stack():
            return (cuda_weight((e, 2 * inter, HIDDEN), scheme),
                    cuda_weight((e, HIDDEN, inter), scheme))

        quant = [stack()]
        per_expert = sum(w.nbytes() for w in quant[0]) // e
        if e == 1:  # one expert: rotate over weight copies instead
            quant += [stack() for _ in range(copies_for(per_expert) - 1)]
        dense = [tuple(cuda_layout.dequantize(w, torch.bfloat16) for w in ws)
                 for ws in quant[:2]]  # shared by the cases of this block
        for m in [1] if args.quick else [1, 8, 512]:
            x = torch.randn(m, HIDDEN, device="cuda").bfloat16()
            g = torch.Generator().manual_seed(m)
            if m == 1 and e > 1:  # consecutive calls take disjoint experts: each is cold again
                routes = [torch.tensor([[(k * i + j) % e for j in range(k)]]) for i in range(32)]
            else:
                routes = [torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)])]
            touched = per_expert * int(routes[0].unique().numel())
            calls = [(torch.rand(r.shape, device="cuda"), r.cuda()) for r in routes]

            def runs(fn, weights, x=x, calls=calls):
                n = max(len(calls), len(weights))
                return rotating([lambda i=i: fn(x, *calls[i % len(calls)],
                                                *weights[i % len(weights)]) for i in range(n)])

            cases.append(Case(
                "moe_block", f"{name} E={e} top-{k} {HIDDEN}<->{inter} int4-g128 M={m}",
                runs(moe_block, quant), touched, 2.0 * m * k * 3 * HIDDEN * inter,
                runs(_torch_moe, dense), reps=20 if m < 512 else 5))
    return cases


CUDA_CASE_BUILDERS: list[Callable[[argparse.Namespace], list[Case]]] = [
    cuda_quant_matmul_cases, cuda_moe_cases]


class CopyBandwidth:
    """Device-to-device copy of a 1 GB buffer: read plus write traffic is the GPU's ceiling."""

    def __init__(self):
        self.src = torch.ones(256 << 20, device="cuda")
        self.dst = torch.empty_like(self.src)

    def __call__(self):
        return self.dst.copy_(self.src)

    @property
    def nbytes(self) -> int:
        return 2 * self.src.numel() * 4


def gpu_times(fns: dict[str, Callable[[], object]], reps: int, inner: int = 10,
              budget_s: float = 60.0) -> dict:
    """Per function, the best over rounds of the mean of `inner` back-to-back calls, timed with
    CUDA events (round-robin, one warm-up call each)."""
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    best, start = dict.fromkeys(fns, float("inf")), time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            n = 1 if name == "bw" else inner
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(n):
                fn()
            t1.record()
            t1.synchronize()
            best[name] = min(best[name], t0.elapsed_time(t1) / 1e3 / n)
        if time.perf_counter() - start > budget_s:
            break
    return best


class Bandwidth:
    """Read bandwidth of a 256 MB reduce: the ceiling, probed between the timed calls so that it
    sees the same load from other processes as they do."""

    def __init__(self):
        self.buf = torch.ones(64 << 20)

    def __call__(self):
        return self.buf.sum()

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * 4


def under_isa(isa: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the CPU kernels forced onto one path (the extension reads KIMIVL_ISA per call)."""
    def run():
        os.environ["KIMIVL_ISA"] = isa
        try:
            return fn()
        finally:
            os.environ.pop("KIMIVL_ISA")
    return run


def best_times(fns: dict[str, Callable[[], object]], reps: int, budget_s: float = 60.0) -> dict:
    """Best time of each function, called round-robin (one warm-up call each)."""
    for fn in fns.values():
        fn()
    best, start = dict.fromkeys(fns, float("inf")), time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write one JSON record per case to this file")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--filter", default="", help="only cases whose op or shape contains this")
    parser.add_argument("--quick", action="store_true", help="decode shapes only")
    parser.add_argument("--widths", action="store_true",
                        help="only the CPU width sweep (routed experts at 2-8 bits, M = 1)")
    parser.add_argument("--prefill", action="store_true", help="prefill shapes (M = 512) only")
    parser.add_argument("--isa-ab", default="",
                        help="comma-separated CPU kernel paths (KIMIVL_ISA names) to time side by "
                             "side, e.g. amx,avx512_vnni")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the CPU kernels (default); cuda: the CUDA kernels")
    args = parser.parse_args(argv)
    isas = [p for p in args.isa_ab.split(",") if p]
    if isas and args.device != "cpu":
        raise SystemExit("--isa-ab names CPU kernel paths: use it with --device cpu")
    torch.set_num_threads(args.threads)
    os.environ["KIMIVL_NUM_THREADS"] = str(args.threads)
    info = build_info()
    torch.manual_seed(0)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        isa = torch.cuda.get_device_name()
        if not info.get("cuda"):
            isa += " (no CUDA kernels in _C: torch reference)"
        probe, builders, timer = CopyBandwidth(), CUDA_CASE_BUILDERS, gpu_times
    else:
        isa = (os.environ.get("KIMIVL_ISA") or info.get("cpu_isa_selected")
               or "none (torch reference)")
        probe, builders, timer = Bandwidth(), CASE_BUILDERS, best_times
        if args.widths:
            builders = [width_sweep_cases]
        elif args.prefill:
            builders = [quant_matmul_cases, moe_cases]
    where = "" if args.device == "cpu" else f"device {args.device}, "
    print(f"{where}threads {args.threads}, isa {isa}, load average {os.getloadavg()[0]:.2f}")
    head = (f"{'op':13} {'shape':58} {'ms':>9} {'GB/s':>6} {'ceil':>5} {'%bw':>4} {'GFLOP/s':>8} "
            f"{'bf16 ms':>9} {'fp32 ms':>9} {'x bf16':>6} {'x fp32':>6}")
    print(head + "\n" + "-" * len(head))
    records = []
    for builder in builders:
        for case in builder(args):
            if args.filter and args.filter not in f"{case.op} {case.shape}":
                continue
            paths = {p: under_isa(p, case.run) for p in isas} if isas else {isa: case.run}
            fns = {**paths, "bw": probe}
            if case.torch_bf16:
                fns["bf16"] = case.torch_bf16
            if case.torch_fp32:
                fns["fp32"] = case.torch_fp32
            best = timer(fns, case.reps)
            ceiling = probe.nbytes / best["bw"] / 1e9
            t16, t32 = best.get("bf16"), best.get("fp32")
            for path in paths:
                sec = best[path]
                rec = {"op": case.op, "backend": args.device, "isa": path, "shape": case.shape,
                       "seconds": sec,
                       "gbps": case.bytes / sec / 1e9, "gflops": case.flops / sec / 1e9,
                       "ceiling_gbps": ceiling, "torch_seconds": t16, "torch_fp32_seconds": t32}
                records.append(rec)
                fmt = lambda t: f"{t * 1e3:9.3f}" if t else f"{'-':>9}"  # noqa: E731
                ratio = lambda t: f"{t / sec:6.2f}" if t else f"{'-':>6}"  # noqa: E731
                label = f"{case.shape} [{path}]" if isas else case.shape
                print(f"{case.op:13} {label:58} {sec * 1e3:9.3f} {rec['gbps']:6.1f} "
                      f"{ceiling:5.1f} {100 * rec['gbps'] / ceiling:4.0f} {rec['gflops']:8.1f} "
                      f"{fmt(t16)} {fmt(t32)} "
                      f"{ratio(t16)} {ratio(t32)}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
