// CUDA absorbed MLA decode over the latent cache (split-K / flash-decoding). Host interface; the
// kernels are in mla_decode.cu. Torch-free (see docs/DESIGN.md).
#pragma once
#include <cstdint>

#include "common.h"

namespace kimivl {

// o_lat[b, h, :] = softmax_s(scale * (q_lat[b, h] . c[b, s] + q_pe[b, h] . k_pe[b, s])) @ c[b, s]
// over s < seq_lens[b], cache[b, s] = [c (rank) | k_pe (rope)]; the same math as the CPU
// mla_decode (csrc/cpu/attention.h). All pointers are device pointers; last dims contiguous,
// strides in elements.
//
// Work split: entry b's tokens [0, max_seq_len) are cut into num_splits chunks (a multiple of 64
// tokens each); one CTA per (chunk, b) reads each cached row once for all heads and writes an
// unnormalised partial (ws_o [batch, num_splits, heads, rank] fp32, ws_ml [batch, num_splits,
// heads, 2] fp32: running max in log2 units and sum) that a second kernel merges by log-sum-exp
// into out. seq_lens (int32 [batch]) is read on the device only: lengths are clamped to
// [0, min(capacity, max_seq_len)], an entry with no tokens gets zeros. The caller guarantees
// max_seq_len >= every seq_lens[b] (tokens past it are not attended to).
struct CudaMlaDecodeParams {
  const void* q_lat;
  const void* q_pe;
  DType q_dtype;  // float32, bfloat16 or float16 (q_lat and q_pe alike)
  const void* cache;
  DType cache_dtype;  // float32, bfloat16 or float16
  const int32_t* seq_lens;
  float* out;
  float* ws_o;
  float* ws_ml;
  int64_t batch, heads, rank, rope, capacity, max_seq_len, num_splits;
  int64_t q_lat_batch, q_lat_head, q_pe_batch, q_pe_head;
  int64_t cache_batch, cache_row, out_batch, out_head;
  float scale;
};

// `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream); this
// header stays free of CUDA headers so the pybind11 glue compiles as plain C++.
// Validates host-side arguments (std::invalid_argument naming them), launches both kernels on
// `stream` without synchronizing (CUDA-graph capturable); std::runtime_error on launch errors.
// Returns the path taken: "tensor_core" (bf16/fp16 cache, rank 512, rope 64, heads <= 16,
// 16-byte aligned cache rows) or "simt" (everything else, fp32 arithmetic on CUDA cores).
const char* cuda_mla_decode(const CudaMlaDecodeParams& p, int64_t stream);

}  // namespace kimivl
