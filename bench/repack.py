"""Loading speed of quantized weights on the CPU: `_C.repack_rows` (the on-disk pack-quantized
rows into the kernels' plane layout) per width, on one expert's fused gate + up weight
(2816 x 2048), one thread, best of 7; rounds interleave the widths.

    python bench/repack.py
"""

import time

import torch

from kimivl_local.kernels.bridge import kernel
from kimivl_local.quant import cpu_layout
from kimivl_local.quant.packing import QuantScheme, quantize_rtn

N, K, ROUNDS = 2816, 2048, 7
WIDTHS = {2: 32, 3: 64, 4: 128, 5: 128, 6: 128, 8: None}


def main() -> None:
    repack = kernel("repack_rows")
    if repack is None:
        raise SystemExit("kimivl_local._C is not built")
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)).bfloat16()
    cases = {}
    for bits, group in WIDTHS.items():
        p = quantize_rtn(w, QuantScheme(bits, group))
        cases[bits] = (p.weight_packed.contiguous(),
                       cpu_layout.allocate(N, K, p.scheme, torch.bfloat16).qweight)
    best = dict.fromkeys(WIDTHS, float("inf"))
    for _ in range(ROUNDS):
        for bits, (src, dst) in cases.items():
            t = time.perf_counter()
            repack(src.data_ptr(), src.shape[1] * 4, N, K, bits, dst.data_ptr(), dst.shape[1], 0, 1)
            best[bits] = min(best[bits], time.perf_counter() - t)
    for bits, t in best.items():
        print(f"int{bits}: {t * 1e3:6.2f} ms  {N * K / t / 1e9:5.2f} Gvalues/s")


if __name__ == "__main__":
    main()
