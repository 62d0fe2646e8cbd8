// Per-head GEMV for MLA's absorbed decode: y[h, :] = x[h, :] . w[h] with w [H, K, N] in bf16 or
// fp32 and x, y fp32. With W_uk [H, 128, 512] it folds q_nope into the latent query, with
// W_uvᵀ [H, 512, 128] it expands the attended latent to the value heads: 2 x 2 MB of bf16 a layer
// that torch would either convert to fp32 on every step or run through its slow CPU bf16 bmm.
#pragma once
#include <cstdint>

#include "common.h"

namespace kimivl {

struct HeadGemvParams {
  const float* x;  // [H, K], row stride x_head (elements), last dim contiguous
  const void* w;   // [H, K, N] contiguous, bf16 or fp32
  DType w_dtype;
  float* y;        // [H, N], row stride y_head, last dim contiguous
  int64_t heads, k, n, x_head, y_head;
  int num_threads;
};

void head_gemv(const HeadGemvParams& p);

// One ISA's kernel: the outputs [n0, n1) of head h. Dispatch and threading live in
// head_gemv.cpp (compiled without ISA flags), as for the attention kernels.
using HeadGemvTile = void (*)(const HeadGemvParams&, int64_t h, int64_t n0, int64_t n1);
HeadGemvTile head_gemv_tile_portable();
HeadGemvTile head_gemv_tile_avx2();

}  // namespace kimivl
