"""Measuring speed: best-of timing and this machine's memory bandwidth (the decode ceiling).

Shared by `kimivl-local bench` and the scripts in bench/, so every reported ratio uses the same
ceiling. Best-of-N filters out other processes on a shared machine.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch


def best_seconds(fn: Callable[[], object], budget_s: float = 2.0, max_runs: int = 20,
                 min_runs: int = 3) -> float:
    """Best wall time of fn() over several runs after one warm-up."""
    fn()
    times: list[float] = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_bandwidth_gbps(mib: int = 512) -> float:
    """Host memory read bandwidth in GB/s: a read-reduce (torch's sum, all its threads) over a
    buffer far larger than the caches, best of 10. Decode only reads weights, so reads are the
    ceiling to compare with (a copy's write-allocate traffic made that figure swing)."""
    src = torch.ones(mib * 2**20 // 4)
    return src.numel() * 4 / best_seconds(src.sum, max_runs=10) / 1e9


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
