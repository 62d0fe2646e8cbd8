// 2, 3, 5 and 6-bit weights (layout: kimivl_local/quant/cuda_layout.py, LOWBIT_PARTS): a 32-k
// chunk of a row is `BITS` whole 32-bit words. Each code is split into a low part of L bits and
// a high part of H bits (2 = 2, 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2); the low parts of the chunk's
// 32 codes fill its first L words in plain order (word j holds k = (32 / L) j + e at bits L e),
// the high parts the next H words the same way. With k a compile-time constant (the loops that
// call these are unrolled) every code is two shifts, two masks and an OR, with no straddling.
// u - zero is then made exact in fp32 (|u - zero| < 64) and, for the tensor-core path, in
// fp16/bf16 (both hold integers up to 256 exactly).
#pragma once
#include <type_traits>

#include "cuda/qgemm_common.cuh"

namespace kimivl {
namespace qg {

__host__ __device__ constexpr bool is_lowbit(int bits) {
  return bits == 2 || bits == 3 || bits == 5 || bits == 6;
}
__host__ __device__ constexpr int low_part(int bits) { return bits <= 3 ? 2 : 4; }
__host__ __device__ constexpr int high_part(int bits) { return bits - low_part(bits); }

// The chunk's BITS words; p points at the chunk (row start + c * BITS words). Even widths load
// 8-byte pairs: rows are KC * BITS words and chunks start at c * BITS words, both even, and the
// tensor is 16-byte aligned.
template <int BITS>
__device__ __forceinline__ void load_chunk(const uint32_t* p, uint32_t (&w)[BITS]) {
  if constexpr (BITS % 2 == 0) {
#pragma unroll
    for (int i = 0; i < BITS / 2; ++i) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
      w[2 * i] = v.x;
      w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = __ldg(p + i);
  }
}

// Code k (< 32) of a chunk.
template <int BITS>
__device__ __forceinline__ uint32_t lowbit_code(const uint32_t (&w)[BITS], int k) {
  constexpr int L = low_part(BITS), H = high_part(BITS);
  constexpr int LP = 32 / L;  // low parts per word
  uint32_t u = (w[k / LP] >> (L * (k % LP))) & ((1u << L) - 1u);
  if constexpr (H > 0) {
    constexpr int HP = 32 / H;
    u |= ((w[L + k / HP] >> (H * (k % HP))) & ((1u << H) - 1u)) << L;
  }
  return u;
}

// fp32 2^23 + u minus bias = 2^23 + zero: u - zero exactly (both are integers below 2^24).
__device__ __forceinline__ float lowbit_bias(int zero) {
  return 8388608.0f + static_cast<float>(zero);
}

__device__ __forceinline__ float code_minus_zero(uint32_t u, float bias) {
  return __uint_as_float(0x4B000000u | u) - bias;
}

// Two small integers (|v| <= 256) as an exact fp16 or bf16 pair, low element first.
template <typename XT>
__device__ __forceinline__ uint32_t int_pair(int lo, int hi) {
  if constexpr (std::is_same_v<XT, __half>)
    return as_u32(__floats2half2_rn(static_cast<float>(lo), static_cast<float>(hi)));
  else
    return as_u32(__floats2bfloat162_rn(static_cast<float>(lo), static_cast<float>(hi)));
}

}  // namespace qg

// Calls f(std::integral_constant<int, BITS>{}) for bits in {2, 3, 4, 5, 6, 8}, so one template
// serves every width (the entry points check bits before any launch).
template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: check(false, "the CUDA kernels take 2, 3, 4, 5, 6 or 8 bits");
  }
}

}  // namespace kimivl
