// Row kernels of the fused vision ops (vision_ops.h), templated on the vector type of
// attention_simd.h and instantiated once per ISA translation unit. Storage is fp32 or bf16
// (uint16_t), math fp32; bf16 results are rounded to nearest even exactly as float_to_bf16
// (and torch) round, in every ISA, so paths differ only in fp32 summation order.
#pragma once
#include <algorithm>
#include <cmath>
#include <utility>

#include "cpu/attention_simd.h"
#include "cpu/vision_ops.h"

namespace kimivl {
namespace {

// What the fused ops need beyond attention_simd.h's vector types: bf16 loads and rounding
// stores, division, min and the swap of adjacent lanes (RoPE pairs).
template <class V>
struct VisionVec;

template <>
struct VisionVec<VecPortable> {
  using T = VecPortable::T;
  static constexpr int W = VecPortable::kLanes;
  static T load(const float* p) { return VecPortable::load(p); }
  static T load(const uint16_t* p) {
    T r;
    for (int i = 0; i < W; ++i) r.v[i] = bf16_to_float(p[i]);
    return r;
  }
  static void store(float* p, T a) { VecPortable::store(p, a); }
  static void store(uint16_t* p, T a) {
    for (int i = 0; i < W; ++i) p[i] = float_to_bf16(a.v[i]);
  }
  static T div(T a, T b) {
    for (int i = 0; i < W; ++i) a.v[i] /= b.v[i];
    return a;
  }
  static T min(T a, T b) {  // b where either is NaN, as minps
    for (int i = 0; i < W; ++i) a.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static T swap_pairs(T a) {
    for (int i = 0; i < W; i += 2) std::swap(a.v[i], a.v[i + 1]);
    return a;
  }
};

#ifdef __AVX2__
template <>
struct VisionVec<VecAvx2> {
  using T = __m256;
  static constexpr int W = 8;
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T load(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, T a) { _mm256_storeu_ps(p, a); }
  static void store(uint16_t* p, T a) {
    const __m256i bits = _mm256_castps_si256(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i half = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd);  // ties to even
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, half), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
    // packus interleaves the 128-bit lanes: [r0..3 r0..3 | r4..7 r4..7]; qwords 0 and 2 hold it.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T swap_pairs(T a) { return _mm256_permute_ps(a, 0xB1); }
};
#endif

#ifdef __AVX512F__
template <>
struct VisionVec<VecAvx512> {
  using T = __m512;
  static constexpr int W = 16;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, T a) { _mm512_storeu_ps(p, a); }
  static void store(uint16_t* p, T a) {
    const __m512i bits = _mm512_castps_si512(a);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i half = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);  // ties to even
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, half), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    const __m512i r = _mm512_mask_blend_epi32(nan, rounded, quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T swap_pairs(T a) { return _mm512_permute_ps(a, 0xB1); }
};
#endif

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }
inline void store1(float* p, float x) { *p = x; }
inline void store1(uint16_t* p, float x) { *p = float_to_bf16(x); }

// gelu_tanh(u) = u * (1 + tanh(s)) / 2 = u / (1 + exp(-2 s)), s = sqrt(2/pi) (u + 0.044715 u^3).
// Past an exponent (log2 units) of 126, u < about -10.5, the result is 0 (exactly: below
// 1e-36 |u|); exp2 is fed the capped exponent so it stays finite.
constexpr float kGeluC = -2.0f * 0.7978845608028654f * 1.4426950408889634f;
constexpr float kGeluCubic = 0.044715f;
constexpr float kGeluCap = 126.0f;

inline float gelu1(float u) {
  const float e = kGeluC * (u + kGeluCubic * u * u * u);
  return e > kGeluCap ? 0.0f : u / (1.0f + exp2_scalar(std::min(e, kGeluCap)));  // NaN stays
}

template <class V>
struct VisionOps {
  using S = VisionVec<V>;
  using T = typename S::T;
  static constexpr int W = S::W;

  template <class Din, class Dout>
  static void add_layer_norm_rows(const AddLayerNormParams& p, int64_t r0, int64_t r1) {
    const int64_t n = p.dim, nv = n / W * W;
    for (int64_t r = r0; r < r1; ++r) {
      float* x = p.x + r * p.x_row;
      if (p.delta) {
        const Din* d = static_cast<const Din*>(p.delta) + r * p.delta_row;
        const float* b = p.delta_bias;
        int64_t i = 0;
        for (; i < nv; i += W) {
          T t = S::load(d + i);
          if (b) t = V::add(t, S::load(b + i));
          S::store(x + i, V::add(S::load(x + i), t));
        }
        for (; i < n; ++i) x[i] += load1(d + i) + (b ? b[i] : 0.0f);
      }
      T acc = V::zero();
      float tail = 0.0f;
      for (int64_t i = 0; i < nv; i += W) acc = V::add(acc, S::load(x + i));
      for (int64_t i = nv; i < n; ++i) tail += x[i];
      const float mean = (V::hsum(acc) + tail) / static_cast<float>(n);
      const T vmean = V::set1(mean);
      acc = V::zero();
      tail = 0.0f;
      for (int64_t i = 0; i < nv; i += W) {
        const T c = V::sub(S::load(x + i), vmean);
        acc = V::fma(c, c, acc);
      }
      for (int64_t i = nv; i < n; ++i) tail += (x[i] - mean) * (x[i] - mean);
      const float rstd = 1.0f / std::sqrt((V::hsum(acc) + tail) / static_cast<float>(n) + p.eps);
      const T vrstd = V::set1(rstd);
      Dout* out = static_cast<Dout*>(p.out) + r * p.out_row;
      for (int64_t i = 0; i < nv; i += W) {
        const T g = V::mul(S::load(p.gamma + i), vrstd);
        const T bias = p.beta ? S::load(p.beta + i) : V::zero();
        S::store(out + i, V::fma(V::sub(S::load(x + i), vmean), g, bias));
      }
      for (int64_t i = nv; i < n; ++i)
        store1(out + i, (x[i] - mean) * (p.gamma[i] * rstd) + (p.beta ? p.beta[i] : 0.0f));
    }
  }

  static void add_layer_norm(const AddLayerNormParams& p, int64_t r0, int64_t r1) {
    const bool din_bf16 = p.delta && p.delta_dtype == DType::kBFloat16;
    const bool dout_bf16 = p.out_dtype == DType::kBFloat16;
    if (din_bf16 && dout_bf16) return add_layer_norm_rows<uint16_t, uint16_t>(p, r0, r1);
    if (din_bf16) return add_layer_norm_rows<uint16_t, float>(p, r0, r1);
    if (dout_bf16) return add_layer_norm_rows<float, uint16_t>(p, r0, r1);
    add_layer_norm_rows<float, float>(p, r0, r1);
  }

  template <class D>
  static void bias_gelu_rows(const BiasGeluParams& p, int64_t r0, int64_t r1) {
    const int64_t n = p.dim, nv = n / W * W;
    const T c = V::set1(kGeluC), cubic = V::set1(kGeluCubic), cap = V::set1(kGeluCap);
    const T one = V::set1(1.0f);
    for (int64_t r = r0; r < r1; ++r) {
      D* y = static_cast<D*>(p.y) + r * p.y_row;
      int64_t i = 0;
      for (; i < nv; i += W) {
        T u = S::load(y + i);
        if (p.bias) u = V::add(u, S::load(p.bias + i));
        const T inner = V::fma(V::mul(cubic, u), V::mul(u, u), u);
        const T e = V::mul(c, inner);
        const T g = S::div(u, V::add(one, V::exp2(S::min(e, cap))));  // a NaN u stays NaN
        S::store(y + i, V::where_gt(e, cap, V::zero(), g));
      }
      for (; i < n; ++i) store1(y + i, gelu1(load1(y + i) + (p.bias ? p.bias[i] : 0.0f)));
    }
  }

  static void bias_gelu(const BiasGeluParams& p, int64_t r0, int64_t r1) {
    if (p.dtype == DType::kBFloat16) return bias_gelu_rows<uint16_t>(p, r0, r1);
    bias_gelu_rows<float>(p, r0, r1);
  }

  template <class D>
  static void bias_rope_rows(const BiasRopeParams& p, int64_t r0, int64_t r1) {
    const int64_t d = p.head_dim, dv = d / W * W;
    for (int64_t r = r0; r < r1; ++r) {
      D* row = static_cast<D*>(p.qkv) + r * p.qkv_row;
      const float* cs = p.cos_table + r * d;
      const float* sn = p.sin_table + r * d;
      for (int64_t h = 0; h < 2 * p.heads; ++h) {
        D* x = row + h * d;
        const float* b = p.bias ? p.bias + h * d : nullptr;
        int64_t e = 0;
        for (; e < dv; e += W) {  // W is even: vectors hold whole pairs
          T v = S::load(x + e);
          if (b) v = V::add(v, S::load(b + e));
          S::store(x + e, V::fma(v, S::load(cs + e), V::mul(S::swap_pairs(v), S::load(sn + e))));
        }
        for (; e < d; e += 2) {
          const float a = load1(x + e) + (b ? b[e] : 0.0f);
          const float c = load1(x + e + 1) + (b ? b[e + 1] : 0.0f);
          store1(x + e, a * cs[e] + c * sn[e]);
          store1(x + e + 1, c * cs[e + 1] + a * sn[e + 1]);
        }
      }
      if (!p.bias) continue;
      D* v = row + 2 * p.heads * d;
      const float* b = p.bias + 2 * p.heads * d;
      const int64_t n = p.heads * d, nv = n / W * W;
      int64_t i = 0;
      for (; i < nv; i += W) S::store(v + i, V::add(S::load(v + i), S::load(b + i)));
      for (; i < n; ++i) store1(v + i, load1(v + i) + b[i]);
    }
  }

  static void bias_rope(const BiasRopeParams& p, int64_t r0, int64_t r1) {
    if (p.dtype == DType::kBFloat16) return bias_rope_rows<uint16_t>(p, r0, r1);
    bias_rope_rows<float>(p, r0, r1);
  }

  static VisionKernels kernels() { return {&add_layer_norm, &bias_gelu, &bias_rope}; }
};

}  // namespace
}  // namespace kimivl
