// Vector types and register-tiled micro-kernels shared by the attention kernels. Included only by
// the per-ISA translation units; everything sits in an anonymous namespace so each ISA keeps its
// own copy (the linker must never swap an AVX2 body into a portable caller).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace kimivl {
namespace {

// exp2 for x <= 127 (softmax arguments are <= 8, see kRescaleSlack), after Cephes' exp2f:
// x = n + f with n = round(x), 2^f by a degree-6 polynomial on [-0.5, 0.5] (relative error
// < 2e-7), 2^n written into the exponent field. Adding kExp2Shift (1.5 * 2^23 + 127) rounds x to
// an integer and leaves n + 127 in the low mantissa bits, which shifted left by 23 are 2^n.
// x <= -127 gives exactly 0, so masked (-inf) scores contribute nothing; NaN stays NaN.
constexpr float kExp2Poly[6] = {1.535336188319500e-4f, 1.339887440266574e-3f,
                                9.618437357674640e-3f, 5.550332471162809e-2f,
                                2.402264791363012e-1f, 6.931472028550421e-1f};
constexpr float kExp2Shift = 12582912.0f + 127.0f;

inline float exp2_scalar(float x) {
  const float xc = std::max(x, -127.0f);  // NaN stays NaN, and so does every step below
  const float t = xc + kExp2Shift, f = xc - (t - kExp2Shift);
  float p = kExp2Poly[0];
  for (int i = 1; i < 6; ++i) p = p * f + kExp2Poly[i];
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return (p * f + 1.0f) * pow2n;
}

// The online softmaxes keep their running max m until a block's max exceeds it by more than
// this (log2 units): probabilities then stay below 2^8, harmless in fp32, and the accumulated
// output is rescaled only when the max really jumps (the first block, or rarely later).
constexpr float kRescaleSlack = 8.0f;

// Plain C++ lanes: the compiler vectorises what it can for the baseline ISA.
struct VecPortable {
  static constexpr int kLanes = 8;
  struct T {
    float v[kLanes];
  };
  static T set1(float x) {
    T r;
    for (float& e : r.v) e = x;
    return r;
  }
  static T zero() { return set1(0.0f); }
  static T iota() {
    T r;
    for (int i = 0; i < kLanes; ++i) r.v[i] = static_cast<float>(i);
    return r;
  }
  static T load(const float* p) {
    T r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static void store(float* p, T a) { std::memcpy(p, a.v, sizeof(a.v)); }
  static T fma(T a, T b, T c) {  // a * b + c
    for (int i = 0; i < kLanes; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static T add(T a, T b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i];
    return a;
  }
  static T sub(T a, T b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] -= b.v[i];
    return a;
  }
  static T mul(T a, T b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static T max(T a, T b) {
    for (int i = 0; i < kLanes; ++i) a.v[i] = std::max(a.v[i], b.v[i]);
    return a;
  }
  static T where_gt(T a, T b, T x, T y) {  // a > b ? x : y per lane
    for (int i = 0; i < kLanes; ++i) y.v[i] = a.v[i] > b.v[i] ? x.v[i] : y.v[i];
    return y;
  }
  static bool any_gt(T a, T b) {
    bool any = false;
    for (int i = 0; i < kLanes; ++i) any |= a.v[i] > b.v[i];
    return any;
  }
  static T exp2(T x) {
    for (float& e : x.v) e = exp2_scalar(e);
    return x;
  }
  static float hsum(T a) {
    float s = 0.0f;
    for (float e : a.v) s += e;
    return s;
  }
  static float hmax(T a) {
    float m = a.v[0];
    for (float e : a.v) m = std::max(m, e);
    return m;
  }
  static void bf16_to_float_row(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
};

#ifdef __AVX2__
struct VecAvx2 {
  static constexpr int kLanes = 8;
  using T = __m256;
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T zero() { return _mm256_setzero_ps(); }
  static T iota() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T a) { _mm256_storeu_ps(p, a); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T where_gt(T a, T b, T x, T y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
  }
  static bool any_gt(T a, T b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
  static T exp2(T x) {
    // maxps returns its second operand when one is NaN: a NaN x then flows through to the end.
    const T xc = _mm256_max_ps(set1(-127.0f), x);
    const T t = _mm256_add_ps(xc, set1(kExp2Shift));
    const T f = _mm256_sub_ps(xc, _mm256_sub_ps(t, set1(kExp2Shift)));
    T p = set1(kExp2Poly[0]);
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, set1(kExp2Poly[i]));
    p = _mm256_fmadd_ps(p, f, set1(1.0f));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  }
  static float hsum(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax(T a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static void bf16_to_float_row(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
};
#endif

#ifdef __AVX512F__
// 16 lanes; the tile shapes stay those of AVX2 (4 x 3 accumulators of 32 registers' room).
struct VecAvx512 {
  static constexpr int kLanes = 16;
  using T = __m512;
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T zero() { return _mm512_setzero_ps(); }
  static T iota() {
    return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T a) { _mm512_storeu_ps(p, a); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T where_gt(T a, T b, T x, T y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
  }
  static bool any_gt(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
  static T exp2(T x) {  // as VecAvx2::exp2
    const T xc = _mm512_max_ps(set1(-127.0f), x);
    const T t = _mm512_add_ps(xc, set1(kExp2Shift));
    const T f = _mm512_sub_ps(xc, _mm512_sub_ps(t, set1(kExp2Shift)));
    T p = set1(kExp2Poly[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, set1(kExp2Poly[i]));
    p = _mm512_fmadd_ps(p, f, set1(1.0f));
    return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23)));
  }
  static float hsum(T a) { return _mm512_reduce_add_ps(a); }
  static float hmax(T a) { return _mm512_reduce_max_ps(a); }
  static void bf16_to_float_row(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      _mm512_storeu_si512(dst + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
};
#endif

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Address of element `offset` of a float32 or bfloat16 array.
inline const void* element(const void* base, DType dtype, int64_t offset) {
  return static_cast<const char*>(base) + offset * (dtype == DType::kBFloat16 ? 2 : 4);
}

// n floats or bf16s from src to fp32 dst, inline (short rows: a libc memmove call costs more).
template <class V>
void load_row(const void* src, DType dtype, int64_t n, float* dst) {
  if (dtype == DType::kBFloat16)
    return V::bf16_to_float_row(static_cast<const uint16_t*>(src), dst, n);
  const float* f = static_cast<const float*>(src);
  int64_t i = 0;
  for (; i + V::kLanes <= n; i += V::kLanes) V::store(dst + i, V::load(f + i));
  for (; i < n; ++i) dst[i] = f[i];
}

// Register tiles: R rows by C vectors of accumulators (R * C + C + 1 <= 16 AVX2 registers).
constexpr int kTileRows = 4, kTileVecs = 3;

// c[r, j*W..] (+)= sum_s a[r*a_rs + s*a_ss] * b[s*b_ss + j*W..]: a broadcasts, b vectors.
template <class V, int R, int C, bool kAccumulate>
void bcast_tile(const float* a, int64_t a_rs, int64_t a_ss, const float* b, int64_t b_ss,
                int64_t steps, float* c, int64_t c_rs) {
  constexpr int W = V::kLanes;
  typename V::T acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = kAccumulate ? V::load(c + r * c_rs + j * W) : V::zero();
  for (int64_t s = 0; s < steps; ++s) {
    typename V::T bv[C];
    for (int j = 0; j < C; ++j) bv[j] = V::load(b + s * b_ss + j * W);
    for (int r = 0; r < R; ++r) {
      const typename V::T av = V::set1(a[r * a_rs + s * a_ss]);
      for (int j = 0; j < C; ++j) acc[r][j] = V::fma(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) V::store(c + r * c_rs + j * W, acc[r][j]);
}

// c[r, j] = sum_k a[r*a_rs + k] * b[j*b_rs + k] over k < depth (a multiple of W): row dots.
template <class V, int R, int C>
void dot_tile(const float* a, int64_t a_rs, const float* b, int64_t b_rs, int64_t depth, float* c,
              int64_t c_rs) {
  typename V::T acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = V::zero();
  for (int64_t k = 0; k < depth; k += V::kLanes) {
    typename V::T bv[C];
    for (int j = 0; j < C; ++j) bv[j] = V::load(b + j * b_rs + k);
    for (int r = 0; r < R; ++r) {
      const typename V::T av = V::load(a + r * a_rs + k);
      for (int j = 0; j < C; ++j) acc[r][j] = V::fma(av, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < C; ++j) c[r * c_rs + j] = V::hsum(acc[r][j]);
}

// Tile tables indexed [rows - 1][vecs - 1], so edges of 1..4 rows and 1..3 vectors have no
// scalar remainder loops.
template <class V, bool kAccumulate>
struct BcastTiles {
  using Fn = decltype(&bcast_tile<V, 1, 1, kAccumulate>);
  template <int R, int C>
  static constexpr Fn kTile = &bcast_tile<V, R, C, kAccumulate>;
  static constexpr Fn kTable[kTileRows][kTileVecs] = {{kTile<1, 1>, kTile<1, 2>, kTile<1, 3>},
                                                      {kTile<2, 1>, kTile<2, 2>, kTile<2, 3>},
                                                      {kTile<3, 1>, kTile<3, 2>, kTile<3, 3>},
                                                      {kTile<4, 1>, kTile<4, 2>, kTile<4, 3>}};
};

template <class V>
struct DotTiles {
  using Fn = decltype(&dot_tile<V, 1, 1>);
  template <int R, int C>
  static constexpr Fn kTile = &dot_tile<V, R, C>;
  static constexpr Fn kTable[kTileRows][kTileVecs] = {{kTile<1, 1>, kTile<1, 2>, kTile<1, 3>},
                                                      {kTile<2, 1>, kTile<2, 2>, kTile<2, 3>},
                                                      {kTile<3, 1>, kTile<3, 2>, kTile<3, 3>},
                                                      {kTile<4, 1>, kTile<4, 2>, kTile<4, 3>}};
};

// C[rows, vecs*W] (+)= A[rows, steps] B[steps, vecs*W] with A read by broadcast (element (r, s)
// at a[r*a_rs + s*a_ss]) and B rows of vectors. Column panels outermost so a panel of B stays in
// L1 while every row block streams past it.
template <class V, bool kAccumulate>
void bcast_gemm(int64_t rows, int64_t vecs, int64_t steps, const float* a, int64_t a_rs,
                int64_t a_ss, const float* b, int64_t b_ss, float* c, int64_t c_rs) {
  constexpr int W = V::kLanes;
  for (int64_t j = 0; j < vecs; j += kTileVecs) {
    const int64_t nc = std::min<int64_t>(kTileVecs, vecs - j);
    for (int64_t r = 0; r < rows; r += kTileRows) {
      const int64_t nr = std::min<int64_t>(kTileRows, rows - r);
      BcastTiles<V, kAccumulate>::kTable[nr - 1][nc - 1](
          a + r * a_rs, a_rs, a_ss, b + j * W, b_ss, steps, c + r * c_rs + j * W, c_rs);
    }
  }
}

// C[rows, cols] = A[rows, depth] B[cols, depth]^T, both row-major, depth a multiple of W.
template <class V>
void dot_gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_rs,
              const float* b, int64_t b_rs, float* c, int64_t c_rs) {
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int64_t nr = std::min<int64_t>(kTileRows, rows - r);
    for (int64_t j = 0; j < cols; j += kTileVecs) {
      const int64_t nc = std::min<int64_t>(kTileVecs, cols - j);
      DotTiles<V>::kTable[nr - 1][nc - 1](a + r * a_rs, a_rs, b + j * b_rs, b_rs, depth,
                                         c + r * c_rs + j, c_rs);
    }
  }
}

}  // namespace
}  // namespace kimivl
