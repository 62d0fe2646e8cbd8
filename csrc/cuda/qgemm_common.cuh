// Device helpers of the quantized GEMM kernels: activation loads, scale reads, the magic-number
// int4/int8 -> fp16/bf16 conversions, warp reductions and the m16n8k16 tensor-core step.
// Weight layout and the nibble order these conversions assume: kimivl_local/quant/cuda_layout.py.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_common.cuh"
#include "cuda/qgemm.cuh"

namespace kimivl {
namespace qg {

// ---- activations -------------------------------------------------------------------------

template <typename XT>
struct XType;

template <>
struct XType<__half> {
  // Two consecutive elements packed in a 32-bit word -> fp32 (exact).
  static __device__ __forceinline__ float2 pair(uint32_t v) {
    __half2 h;
    memcpy(&h, &v, 4);
    return __half22float2(h);
  }
  static __device__ __forceinline__ __half from_float(float f) { return __float2half_rn(f); }
};

template <>
struct XType<__nv_bfloat16> {
  // bf16 is the upper half of an fp32: a shift (mask) converts exactly, on every architecture.
  static __device__ __forceinline__ float2 pair(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float f) {
    return __float2bfloat16_rn(f);
  }
};

// Scale bits (bf16 or fp16) -> fp32.
__device__ __forceinline__ float scale_to_float(uint16_t bits, bool bf16) {
  return bf16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16)
              : __half2float(__ushort_as_half(bits));
}

// 16 read-only bytes through the non-coherent path; p must be 16-byte aligned.
__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// ---- magic-number dequantization ----------------------------------------------------------

// (a & b) | c in one LOP3 (truth table 0xEA = (0xF0 & 0xCC) | 0xAA).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ __half2 as_half2(uint32_t v) {
  __half2 h;
  memcpy(&h, &v, 4);
  return h;
}

__device__ __forceinline__ uint32_t as_u32(__half2 h) {
  uint32_t v;
  memcpy(&v, &h, 4);
  return v;
}

__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 h) {
  uint32_t v;
  memcpy(&v, &h, 4);
  return v;
}

// The fp16 pair (1024 + zero, 1024 + zero): subtracting it from a magic half (1024 + u) leaves
// u - zero exactly (zero <= 255, so 1024 + zero is an fp16 integer; ulp(1024..2047) = 1).
__device__ __forceinline__ __half2 int_bias_f16(int zero) {
  return __float2half2_rn(1024.0f + static_cast<float>(zero));
}

// int4 word -> pair i (i < 4) of elements (2i, 2i + 1) as fp16 u - zero. Nibble positions i and
// i + 4 hold elements 2i and 2i + 1 (layout order [0, 2, 4, 6, 1, 3, 5, 7]); shifting them to
// bits 0-3 and 16-19 and OR-ing 0x6400 (1024.0) into each half makes 1024 + u.
__device__ __forceinline__ __half2 int4_pair_f16(uint32_t word, int i, __half2 bias) {
  return __hsub2(as_half2(and_or(word >> (4 * i), 0x000f000fu, 0x64006400u)), bias);
}

// int8 word -> pair i (i < 2) of elements (2i, 2i + 1): a byte permute puts bytes 2i and 2i + 1
// under the exponent byte 0x64, making 1024 + u in each half.
__device__ __forceinline__ __half2 int8_pair_f16(uint32_t word, int i, __half2 bias) {
  const uint32_t v = __byte_perm(word, 0x64646464u, i == 0 ? 0x5150u : 0x5352u);
  return __hsub2(as_half2(v), bias);
}

// bf16 magic for int4: 0x4300 is 128.0 (ulp 1 up to 255), so OR-ing the nibble gives 128 + u.
__device__ __forceinline__ __nv_bfloat162 int4_bias_bf16(int zero) {
  return __float2bfloat162_rn(128.0f + static_cast<float>(zero));
}

__device__ __forceinline__ __nv_bfloat162 int4_pair_bf16(uint32_t word, int i,
                                                         __nv_bfloat162 bias) {
  const uint32_t v = and_or(word >> (4 * i), 0x000f000fu, 0x43004300u);
  __nv_bfloat162 h;
  memcpy(&h, &v, 4);
  return __hsub2(h, bias);  // (128 + u) - (128 + zero): exact, |u - zero| <= 15
}

// ---- warp reduction -----------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float silu_mul(float g, float u) {
  return g / (1.0f + __expf(-g)) * u;
}

}  // namespace qg
}  // namespace kimivl
