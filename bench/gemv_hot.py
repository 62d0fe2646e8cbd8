"""The CPU kernels' compute cost per weight at every width, apart from memory bandwidth: one
cache-resident 512 x 2048 weight (at most 1 MB), M = 1, one thread, 50 calls per timing, best of
15 rounds that interleave the widths. Weights per second well above the machine's read bandwidth
(bytes = weights x bits / 8) mean decode at that width is bandwidth-bound, not compute-bound.

    KIMIVL_NUM_THREADS=1 python bench/gemv_hot.py      # KIMIVL_ISA=avx2|portable to compare
"""

import time

import torch

from kimivl_local.ops import quant_matmul
from kimivl_local.quant import QuantScheme, quantize_rtn, to_cpu_layout

N, K, CALLS, ROUNDS = 512, 2048, 50, 15
WIDTHS = {2: 32, 3: 64, 4: 128, 5: 128, 6: 128, 8: None}


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    weights = {b: to_cpu_layout(quantize_rtn((torch.randn(N, K, generator=gen) * 0.02).bfloat16(),
                                             QuantScheme(b, g))) for b, g in WIDTHS.items()}
    x = torch.randn(1, K).bfloat16()
    best = dict.fromkeys(WIDTHS, float("inf"))
    for _ in range(ROUNDS):
        for bits, w in weights.items():
            quant_matmul(x, w)
            t = time.perf_counter()
            for _ in range(CALLS):
                quant_matmul(x, w)
            best[bits] = min(best[bits], (time.perf_counter() - t) / CALLS)
    for bits, t in best.items():
        print(f"int{bits}: {t * 1e6:7.1f} us  {N * K / t / 1e9:6.2f} Gweights/s  "
              f"{N * K * bits / 8 / t / 1e9:6.2f} GB/s of weights")


if __name__ == "__main__":
    main()
