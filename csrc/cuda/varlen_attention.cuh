// CUDA varlen (packed sequences) attention, FlashAttention-2 style forward. Host interface; the
// kernels are in varlen_attention.cu. Torch-free (see docs/DESIGN.md): raw device pointers,
// element strides, dtype enum, the caller's stream.
#pragma once
#include <cstdint>

#include "common.h"

namespace kimivl {

// out[t, h, :] = softmax(scale * q[t, h] . k[s, h]) @ v[s, h] over the keys s of t's sequence
// (s <= t when causal). q/k/v/out share `dtype` (float16 or bfloat16; bfloat16 needs sm_80),
// their last dims are contiguous, token and head strides are in elements. cu_seqlens is an int32
// device array [num_seqs + 1] (never read on the host); max_seqlen >= every sequence length sizes
// the grid (query rows beyond it are not computed). head_dim and v_dim <= 256.
struct CudaVarlenParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  DType dtype;
  const int32_t* cu_seqlens;
  int64_t num_seqs, max_seqlen, heads, head_dim, v_dim;
  int64_t q_row, q_head, k_row, k_head, v_row, v_head, o_row, o_head;
  bool causal;
  float scale;
};

// `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream); this
// header stays free of CUDA headers so the pybind11 glue compiles as plain C++.
// Validates the host-side arguments (std::invalid_argument naming them), launches on `stream`
// without synchronizing (CUDA-graph capturable) and throws std::runtime_error on launch errors.
void cuda_varlen_attention(const CudaVarlenParams& p, int64_t stream);

}  // namespace kimivl
