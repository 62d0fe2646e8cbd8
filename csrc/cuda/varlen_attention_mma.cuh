// Warp-level building blocks shared by the CUDA attention kernels (varlen_attention.cu,
// mla_decode.cu): tensor-core MMA m16n8k16 with fp32 accumulation, ldmatrix, cp.async with zero
// fill, and 16-bit packing. Device code only.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A 16x16 row-major, 4 x b32: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//                               a3 = (g+8, 2t+8..)
//   B 16x8 "col", 2 x b32:      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C 16x8 fp32, 4 x f32:       c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// An S accumulator pair (n-tiles 2j, 2j+1) is therefore the A fragment of P for keys 16j..16j+15.
//
// Architectures: bf16 MMA needs sm_80; fp16 m16n8k16 too, so on sm_75 the fp16 MMA runs as two
// m16n8k8 (same fragments split in halves). cp.async needs sm_80; on sm_75 the copies are plain
// 16-byte loads and stores (synchronous, same results). The host never launches a bf16 kernel on a
// device below sm_80 (it throws); the device code for that case traps.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kimivl {
namespace attn {

// Row stride (in 16-bit elements) of a shared-memory tile with `cols` columns (a multiple of 8):
// an odd number of 16-byte chunks, so the 8 row addresses of one ldmatrix hit 8 distinct
// 16-byte bank groups (no bank conflicts).
__host__ __device__ constexpr int smem_stride(int cols) {
  return (cols / 8) % 2 == 1 ? cols : cols + 8;
}

template <typename T>
struct Pack;
template <>
struct Pack<__half> {
  static __device__ __forceinline__ uint32_t two(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half one(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};
template <>
struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t two(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 one(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

template <>
struct Pack<float> {
  static __device__ __forceinline__ float one(float x) { return x; }
  static __device__ __forceinline__ float to_float(float x) { return x; }
};

// d += a * b for one 16x8x16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  // k = 0..7 holds a0, a1 (columns 2t..2t+1) and b0; k = 8..15 holds a2, a3 and b1.
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b0));
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[2]), "r"(a[3]), "r"(b1));
#else
  (void)d, (void)a, (void)b0, (void)b1;
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  // No bf16 tensor cores before sm_80: the host refuses to launch bf16 kernels there.
  (void)d, (void)a, (void)b0, (void)b1;
  __trap();
#endif
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_addr)));
}
// Two matrices; lanes 0..15 supply the row addresses (lanes 16..31 are ignored but must be valid).
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row_addr)));
}

// 16-byte global -> shared copy; zero fill when !valid (src is then never read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(smem) =
      valid ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Load rows [0, kRows) x columns [0, kCols) of a 16-bit global tile into shared memory (row
// stride kStride elements): element (r, c) = g[r * row_stride + c] when r < rows_valid and
// c < cols_valid, else 0. `vec` (uniform over the block): g 16-byte aligned, row_stride and
// cols_valid multiples of 8, so every 16-byte chunk is wholly inside or outside; asynchronous
// (cp.async) then. Otherwise element by element (synchronous).
template <typename T, int kRows, int kCols, int kStride, int kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int rows_valid,
                                          int cols_valid, bool vec) {
  if (vec) {
    constexpr int kChunksPerRow = kCols / 8;
    for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool valid = r < rows_valid && col < cols_valid;
      cp_async_16(s + r * kStride + col, valid ? g + r * row_stride + col : g, valid);
    }
  } else {
    for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
      const int r = e / kCols, col = e % kCols;
      s[r * kStride + col] = (r < rows_valid && col < cols_valid) ? g[r * row_stride + col]
                                                                  : Pack<T>::one(0.f);
    }
  }
}

// Sum / max over the 4 lanes of a quad (the lanes that hold one accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One online-softmax step for the two rows (g, g + 8) of a warp's 16-row accumulator.
// s[kN][4]: scores of this key tile, already multiplied by scale * log2(e) and masked with -inf;
// on return they hold p = 2^(s - m_new) (0 where masked). m, l: running max and this thread's
// partial row sum (the quad's total is formed at the end); o is rescaled by 2^(m_old - m_new).
// A row whose scores are all -inf so far keeps m = -inf, l = 0 and o = 0 (never NaN).
template <int kN, int kO>
__device__ __forceinline__ void online_softmax(float (&s)[kN][4], float (&m)[2], float (&l)[2],
                                               float (&o)[kO][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m[r];
#pragma unroll
    for (int n = 0; n < kN; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
    mx = quad_max(mx);
    const float base = mx == -INFINITY ? 0.f : mx;
    const float corr = exp2f(m[r] - base);  // 0 when m[r] = -inf (o and l are 0 then anyway)
    m[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      s[n][2 * r] = exp2f(s[n][2 * r] - base);
      s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
      sum += s[n][2 * r] + s[n][2 * r + 1];
    }
    l[r] = l[r] * corr + sum;
#pragma unroll
    for (int d = 0; d < kO; ++d) {
      o[d][2 * r] *= corr;
      o[d][2 * r + 1] *= corr;
    }
  }
}

}  // namespace attn
}  // namespace kimivl
