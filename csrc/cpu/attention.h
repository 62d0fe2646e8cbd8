// CPU attention kernels: varlen (packed sequences) attention and MLA decode over the latent cache.
// Torch-free (see docs/DESIGN.md): raw pointers, element strides, dtype enums; the caller owns
// inputs and outputs. Arithmetic is fp32 whatever the storage dtype.
#pragma once
#include <cstdint>

#include "common.h"

namespace kimivl {

// out[t, h, :] = softmax(scale * q[t, h] . k[s, h]) @ v[s, h] over the keys s of t's sequence
// (s <= t when causal). q/k/v/out share `dtype` (fp32 or bf16); their last dims are contiguous and
// rows/heads are addressed through the strides (in elements), so q/k/v may be views of a fused qkv.
struct VarlenAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  DType dtype;
  const int64_t* cu_seqlens;  // [num_seqs + 1], 0 first, total_tokens last, non-decreasing
  int64_t num_seqs, total_tokens, heads, head_dim, v_dim;
  int64_t q_row, q_head, k_row, k_head, v_row, v_head, o_row, o_head;
  bool causal;
  float scale;
  int num_threads;
};

// o_lat[b, h, :] = softmax_s(scale * (q_lat[b, h] . c[b, s] + q_pe[b, h] . k_pe[b, s])) @ c[b, s]
// over s < seq_lens[b], where cache[b, s] = [c (rank) | k_pe (rope)]: the absorbed MLA decode
// (all heads share one latent key/value). q is fp32, the cache fp32 or bf16, o_lat fp32.
struct MlaDecodeParams {
  const float* q_lat;
  const float* q_pe;
  const void* cache;
  DType cache_dtype;
  const int64_t* seq_lens;  // [batch], each in [1, capacity]
  float* out;
  int64_t batch, heads, rank, rope, capacity;
  int64_t q_lat_batch, q_lat_head, q_pe_batch, q_pe_head;  // strides (elements)
  int64_t cache_batch, cache_row, out_batch, out_head;
  float scale;
  int num_threads;
};

// Validate (std::invalid_argument naming the field), plan the work and run it on the ISA path
// chosen by selected_isa(): AVX2 when it is avx2 or avx512_vnni (there is no AVX-512 code),
// portable C++ otherwise.
void varlen_attention(const VarlenAttentionParams& p);
void mla_decode(const MlaDecodeParams& p);

// Per-ISA work-item kernels, one instantiation of the shared templates per ISA translation unit.
// Planning, scratch allocation and threading live in the dispatchers (compiled without ISA
// flags), so no standard-library code built with -mavx2 can be merged into portable callers.
struct VarlenKernel {
  int64_t block_q;  // queries per tile of the kernel
  int64_t (*scratch_floats)(const VarlenAttentionParams&, int64_t max_len);
  // Queries [q_begin, q_end) (q_begin a multiple of block_q) of sequence `seq`, one head.
  void (*run)(const VarlenAttentionParams&, int64_t seq, int64_t head, int64_t q_begin,
              int64_t q_end, float* scratch);
};

struct MlaDecodeKernel {
  int64_t chunk;  // cached tokens per inner step; splits are multiples of it
  int64_t (*scratch_floats)(const MlaDecodeParams&);
  int64_t (*partial_floats)(const MlaDecodeParams&);  // one split's running max, sum and output
  // Tokens [t0, t1) of batch entry b, all heads, into `partial` (unnormalised).
  void (*split)(const MlaDecodeParams&, int64_t b, int64_t t0, int64_t t1, float* partial,
                float* scratch);
  // Merge `count` consecutive partials of batch entry b into out[b, head] (log-sum-exp).
  void (*combine)(const MlaDecodeParams&, int64_t b, int64_t head, const float* partials,
                  int64_t count);
};

// Scratch and partial buffers reach the kernels 64-byte aligned (allocate kAlignPad more floats);
// their rows are whole vectors, so no vector load splits a cache line.
constexpr int64_t kAlignPad = 16;
inline float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

VarlenKernel varlen_kernel_portable();
MlaDecodeKernel mla_decode_kernel_portable();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KIMIVL_X86_KERNELS 1
VarlenKernel varlen_kernel_avx2();
VarlenKernel varlen_kernel_avx512();
MlaDecodeKernel mla_decode_kernel_avx2();
#endif

}  // namespace kimivl
