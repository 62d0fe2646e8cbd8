"""`kimivl-local selftest`: every compiled op of this install, on the user's device, against its
torch reference in fp64, on a few shapes (Kimi-VL's real ones among them). The first thing a bug
report should contain, and what `chat` and `serve` point to when a kernel fails.

Each row's error is max |y - y_ref| / max |y_ref|: one number per case that a broken kernel
(wrong layout, race, garbage) drives to O(1). The bounds are loose on purpose; the precise
per-element bounds live in the tests (tests/test_*_kernel.py, tests/test_cuda_*.py):
  * 1e-4 where the kernel computes in fp32 from fp32 inputs;
  * 2e-2 for 16-bit inputs or outputs (bf16 keeps 8 bits: 2^-8 = 0.4% per rounding, a few
    roundings per element);
  * 4e-2 for the CPU quantized kernels, which also round activations to int8 per 32 values
    (half a step is amax / 254 = 0.4% of a block's largest value, per element).
A row also fails when the compiled kernel did not run (the op fell back to torch), so a pass
means the kernel itself was checked.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ..kernels.extension import extension
from ..ops import (mla_decode,
    mla_decode_reference,
    moe_block,
    moe_block_reference,
    quant_matmul,
    quant_matmul_reference,
    varlen_attention,
    varlen_attention_reference)
from ..ops.head_gemv import head_gemv, head_gemv_reference
from ..quant import QuantScheme, quantize_rtn, to_cpu_layout
from ..quant.cuda_layout import to_cuda_layout
from ..quant.packing import concat_out_features

FP32_BOUND, HALF_BOUND, INT8_ACT_BOUND = 1e-4, 2e-2, 4e-2


@dataclass
class Check:
    op: str
    shape: str
    max_error: float | None
    bound: float
    seconds: float | None
    passed: bool
    note: str = ""


@dataclass
class Case:
    op: str
    kernel: str  # the _C entry point that must run
    shape: str
    bound: float
    run: Callable[[], torch.Tensor]
    reference: Callable[[], torch.Tensor]  # fp64 on the CPU


@contextmanager
def _counting(name: str):
    """Count calls of `_C.<name>` (the ops look kernels up by name at call time)."""
    ext = extension()
    real = getattr(ext, name)
    calls = [0]

    def spy(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(ext, name, spy)
    try:
        yield calls
    finally:
        setattr(ext, name, real)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, device: torch.device) -> Check:
    ext = extension()
    if ext is None or not hasattr(ext, case.kernel):
        return Check(case.op, case.shape, None, case.bound, None, False,
                     f"_C.{case.kernel} is not in this build")
    try:
        with _counting(case.kernel) as calls:
            y = case.run()
            _sync(device)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            case.run()
            _sync(device)
            times.append(time.perf_counter() - t0)
        want = case.reference()
        err = ((y.detach().double().cpu() - want).abs().max() / want.abs().max()).item()
    except Exception as exc:  # noqa: BLE001 - a crashing kernel is a failed row, not a crash
        return Check(case.op, case.shape, None, case.bound, None, False,
                     f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if not calls[0]:
        return Check(case.op, case.shape, err, case.bound, min(times), False,
                     "the compiled kernel did not run (torch fallback)")
    ok = err == err and err <= case.bound  # NaN fails
    return Check(case.op, case.shape, err, case.bound, min(times), ok)


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _packed(g, shape, scheme):
    w = torch.randn(*shape, generator=g) * (1 + torch.rand(*shape[:-1], 1, generator=g))
    return quantize_rtn(w.to(torch.bfloat16), scheme)


def _quant_matmul_case(device, g, m, n, k, scheme, dtype) -> Case:
    packed = _packed(g, (n, k), scheme)
    x64 = _rand(g, m, k)
    ref_w = to_cpu_layout(packed)
    if device.type == "cuda":
        w, name = to_cuda_layout(packed, device), "cuda_quant_matmul"
        bound = HALF_BOUND
    else:
        w, name = ref_w, "quant_matmul"
        bound = INT8_ACT_BOUND
    x = x64.to(dtype).to(device)
    return Case("quant_matmul", name, f"M{m} N{n} K{k} {_scheme(scheme)} {_short(dtype)}", bound,
                lambda: quant_matmul(x, w),
                lambda: quant_matmul_reference(x.double().cpu(), ref_w))


def _moe_weights(device, g, hidden, inter, experts) -> tuple:
    """(w13, w2) in the kernel's layout on `device`, and in the CPU layout for the reference;
    INT4 g128 symmetric, the default recipe's experts. Built once for the cases sharing them."""
    scheme = QuantScheme(4, 128, True)
    w13p = concat_out_features([_packed(g, (experts, inter, hidden), scheme),
                                _packed(g, (experts, inter, hidden), scheme)])
    w2p = _packed(g, (experts, hidden, inter), scheme)
    ref = (to_cpu_layout(w13p), to_cpu_layout(w2p))
    if device.type == "cuda":
        return (to_cuda_layout(w13p, device), to_cuda_layout(w2p, device)), ref
    return ref, ref


def _moe_case(device, g, t, weights, topk, dtype) -> Case:
    (w13, w2), ref = weights
    experts, hidden, inter = w13.num_experts, w13.in_features, w2.in_features
    name, bound = (("cuda_moe_block", HALF_BOUND) if device.type == "cuda"
                   else ("moe_block", INT8_ACT_BOUND))
    x64 = _rand(g, t, hidden) / 4
    ids = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(t)])
    topk_weights = torch.rand(t, topk, generator=g)
    x = x64.to(dtype).to(device)
    ids_d, weights_d = ids.to(device), topk_weights.to(device)
    return Case("moe_block", name, f"T{t} H{hidden} I{inter} E{experts} k{topk} {_short(dtype)}",
                bound, lambda: moe_block(x, weights_d, ids_d, w13, w2),
                lambda: moe_block_reference(x.double().cpu(), topk_weights, ids, *ref))


def _varlen_case(device, g, lengths, heads, dqk, dv, causal, dtype) -> Case:
    total = sum(lengths)
    q, k = (_rand(g, total, heads, dqk).to(dtype).to(device) for _ in range(2))
    v = _rand(g, total, heads, dv).to(dtype).to(device)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    cu_d = cu.to(device)
    scale = dqk ** -0.5
    name = "cuda_varlen_attention" if device.type == "cuda" else "varlen_attention"
    bound = FP32_BOUND if dtype == torch.float32 else HALF_BOUND
    return Case("varlen_attention", name,
                f"lens {lengths} H{heads} D{dqk}/{dv} {'causal' if causal else 'full'} "
                f"{_short(dtype)}", bound,
                lambda: varlen_attention(q, k, v, cu_d, causal=causal, scale=scale,
                                         max_seqlen=max(lengths)),
                lambda: varlen_attention_reference(q.double().cpu(), k.double().cpu(),
                                                   v.double().cpu(), cu, causal=causal,
                                                   scale=scale))


def _mla_case(device, g, lens, heads, rank, rope, dtype) -> Case:
    b, cap = len(lens), max(lens)
    cache = _rand(g, b, cap, rank + rope).to(dtype).to(device)
    q_lat, q_pe = _rand(g, b, heads, rank).to(device).float(), _rand(g, b, heads, rope)
    q_pe = q_pe.to(device).float()
    seq = torch.tensor(lens, dtype=torch.int32)
    seq_d, scale = seq.to(device), (128 + rope) ** -0.5
    name = "cuda_mla_decode" if device.type == "cuda" else "mla_decode"
    bound = FP32_BOUND if dtype == torch.float32 else HALF_BOUND
    return Case("mla_decode", name, f"lens {lens} H{heads} r{rank}+{rope} cache {_short(dtype)}",
                bound, lambda: mla_decode(q_lat, q_pe, cache, seq_d, scale=scale),
                lambda: mla_decode_reference(q_lat.double().cpu(), q_pe.double().cpu(),
                                             cache.double().cpu(), seq, scale=scale))


def _head_gemv_case(g, heads, k, n, dtype) -> Case:
    x, w = _rand(g, heads, k).float(), _rand(g, heads, k, n).to(dtype)
    return Case("head_gemv", "head_gemv", f"H{heads} K{k} N{n} w {_short(dtype)}",
                FP32_BOUND if dtype == torch.float32 else HALF_BOUND,
                lambda: head_gemv(x, w), lambda: head_gemv_reference(x, w))


def _scheme(s: QuantScheme) -> str:
    return (f"int{s.bits} {'g' + str(s.group_size) if s.group_size else 'per-channel'} "
            f"{'sym' if s.symmetric else 'asym'}")


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def cases(device: torch.device) -> list[Case]:
    """A few shapes per op: Kimi-VL's (H 2048, I 1408, E 64, top-6; 16 heads, rank 512 + 64;
    MoonViT head dim 72) and awkward ones (odd N, lengths off every tile, head dim not a
    multiple of 8)."""
    g = torch.Generator().manual_seed(0)
    int4, int8 = QuantScheme(4, 128, True), QuantScheme(8, None, True)
    if device.type == "cuda":
        half = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) \
            else torch.float16
        kimi_moe = _moe_weights(device, g, 2048, 1408, 64)  # 0.3 GB of int4 weights
        return [
            _quant_matmul_case(device, g, 1, 2048, 2048, int4, half),
            _quant_matmul_case(device, g, 1, 37, 1408, int8, half),  # odd N, split-K 2
            _quant_matmul_case(device, g, 1, 37, 4096, int8, half),  # split-K 8 (< 2 blocks/SM)
            _quant_matmul_case(device, g, 77, 1408, 2048, QuantScheme(4, 32, False), half),
            _moe_case(device, g, 1, kimi_moe, 6, half),  # GEMV path
            _moe_case(device, g, 40, kimi_moe, 6, half),  # routed tensor-core path
            _varlen_case(device, g, [1, 130, 77], 16, 72, 72, False, half),
            _varlen_case(device, g, [300, 5], 4, 60, 36, True, half),  # D not a multiple of 8
            _varlen_case(device, g, [257], 16, 192, 128, True, half),
            _mla_case(device, g, [1, 4095], 16, 512, 64, half),
            _mla_case(device, g, [300], 3, 40, 8, torch.float32),
        ]
    return [
        _quant_matmul_case(device, g, 1, 37, 1408, int8, torch.float32),
        _quant_matmul_case(device, g, 33, 256, 512, int4, torch.bfloat16),
        _moe_case(device, g, 3, _moe_weights(device, g, 256, 128, 8), 2, torch.float32),
        _varlen_case(device, g, [1, 70, 33], 4, 72, 72, False, torch.float32),
        _varlen_case(device, g, [90], 2, 60, 36, True, torch.bfloat16),
        _mla_case(device, g, [1, 700], 16, 512, 64, torch.bfloat16),
        _mla_case(device, g, [45], 3, 40, 8, torch.float32),
        _head_gemv_case(g, 16, 128, 512, torch.bfloat16),
    ]


def run_selftest(device: torch.device) -> list[Check]:
    return [run_case(c, device) for c in cases(device)]


def format_table(checks: list[Check]) -> str:
    rows = [("op", "shapes", "max error", "bound", "time", "pass")]
    for c in checks:
        rows.append((c.op, c.shape, "-" if c.max_error is None else f"{c.max_error:.2e}",
                     f"{c.bound:.0e}", "-" if c.seconds is None else f"{c.seconds * 1e3:.3f} ms",
                     ("PASS" if c.passed else "FAIL") + (f"  {c.note}" if c.note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[5]
                     for r in rows)


def as_records(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


SELFTEST_HINT = ("if this looks like a kernel bug, run `kimivl-local selftest` and include its "
                 "output in the report")


def main_selftest(device: str, json_path: str | None) -> int:
    """The CLI: print the table (and build facts); 0 when every row passes, 1 otherwise."""
    import json

    from ..engine.memory_plan import resolve_device
    from ..errors import KimiVLError
    from ..kernels.extension import build_info

    dev = resolve_device(device, torch.cuda.is_available())
    info = build_info()
    if not info["available"]:
        raise KimiVLError(f"the compiled extension is not installed ({info['error']}): "
                          "nothing to check; reinstall with a C++ compiler")
    if dev.type == "cuda" and not info.get("cuda"):
        raise KimiVLError("this install's extension was built without CUDA (reinstall with "
                          "KIMIVL_CUDA=on and nvcc on PATH)")
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
             else f"CPU, kernels for {info.get('cpu_isa_selected')}")
    print(f"kimivl-local selftest on {dev} ({where}); torch {torch.__version__}")
    checks = run_selftest(dev)
    print(format_table(checks))
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} of {len(checks)} passed")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"device": str(dev), "where": where, "build": info,
                       "checks": as_records(checks)}, f, indent=1, default=str)
    return 1 if failed else 0
