// AVX2 micro-kernel for the 2-, 3-, 5- and 6-bit layouts (cpu/qgemm_lowbit.h). Included by
// qgemm_avx2.cpp after its helpers (broadcast4, load_scales8, load_zeros8, kPrefetchBytes).
// One pass per 8-row half (the first or last 32 bytes of every 64-byte plane). vpmaddubsw
// products of a slot are at most 2 * 127 * (2^bits - 1), so kSum16 slots add up in int16 before
// one vpmaddwd widens them (all 8 for 2 and 3 bits, 4 for 5 bits, 2 for 6 bits).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <utility>

#include "cpu/qgemm.h"
#include "cpu/qgemm_lowbit.h"

namespace kimivl {
namespace avx2 {
namespace {

template <int W, int O, int S>
inline __m256i part_slot(const __m256i* planes) {
  constexpr int pos = W * (S / W);
  const __m256i raw = planes[S % W];
  __m256i moved;
  if constexpr (O >= pos) moved = _mm256_slli_epi16(raw, O - pos);
  else moved = _mm256_srli_epi16(raw, pos - O);
  return _mm256_and_si256(moved, _mm256_set1_epi8(static_cast<char>(((1 << W) - 1) << O)));
}

struct LowbitKernel {
  static constexpr int kMaxRows = 4;  // activation rows per call

  template <int Bits>
  static constexpr int kSum16 = std::min(8, 32767 / (2 * 127 * ((1 << Bits) - 1)));

  template <int Bits, int MR, int S>
  static inline void dot_slot(const __m256i* planes, const ActRow* rows, int64_t c,
                              __m256i* sum, __m256i* acc) {
    constexpr int lo = low_part_bits(Bits), hi = high_part_bits(Bits);
    __m256i v = part_slot<lo, 0, S>(planes);
    if constexpr (hi > 0) v = _mm256_or_si256(v, part_slot<hi, lo, S>(planes + lo));
    for (int m = 0; m < MR; ++m)
      sum[m] = _mm256_add_epi16(sum[m],
                                _mm256_maddubs_epi16(v, broadcast4(rows[m].q + 32 * c + 4 * S)));
    if constexpr ((S + 1) % kSum16<Bits> == 0 || S == 7) {
      for (int m = 0; m < MR; ++m) {
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(sum[m], _mm256_set1_epi16(1)));
        sum[m] = _mm256_setzero_si256();
      }
    }
  }

  template <int Bits, int MR, int... S>
  static inline void dot(const __m256i* planes, const ActRow* rows, int64_t c, __m256i* sum,
                         __m256i* acc, std::integer_sequence<int, S...>) {
    (dot_slot<Bits, MR, S>(planes, rows, c, sum, acc), ...);
  }

  template <int Bits, int MR>
  static void block(const uint8_t* q, const uint16_t* s, const int8_t* z, const QWeight& w,
                    const ActRow* rows, float (*out)[16]) {
    const int64_t gc = w.group / 32, groups = w.groups();
    const __m256 zconst = _mm256_set1_ps(static_cast<float>(stored_zero(Bits)));
    for (int half = 0; half < 2; ++half) {
      __m256 y[MR];
      for (int m = 0; m < MR; ++m) y[m] = _mm256_setzero_ps();
      const uint8_t* p = q + 32 * half;
      for (int64_t g = 0; g < groups; ++g) {
        __m256 accg[MR];
        for (int m = 0; m < MR; ++m) accg[m] = _mm256_setzero_ps();
        for (int64_t c = g * gc; c < (g + 1) * gc; ++c, p += 64 * Bits) {
          __m256i planes[Bits];
          for (int i = 0; i < Bits; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + 64 * i), _MM_HINT_T0);
            planes[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * i));
          }
          __m256i sum[MR], acc[MR];
          for (int m = 0; m < MR; ++m) sum[m] = acc[m] = _mm256_setzero_si256();
          dot<Bits, MR>(planes, rows, c, sum, acc, std::make_integer_sequence<int, 8>());
          for (int m = 0; m < MR; ++m) {
            const __m256 d = _mm256_set1_ps(rows[m].d[c]);
            accg[m] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(acc[m]), accg[m]);
          }
        }
        float corr[MR];
        for (int m = 0; m < MR; ++m) {
          corr[m] = 0.0f;
          for (int64_t c = g * gc; c < (g + 1) * gc; ++c) corr[m] += rows[m].ds[c];
        }
        const __m256 sc = load_scales8(s + 16 * g + 8 * half, w.scale_dtype);
        const __m256 zs = _mm256_mul_ps(sc, z ? load_zeros8(z + 16 * g + 8 * half) : zconst);
        for (int m = 0; m < MR; ++m)
          y[m] = _mm256_fmadd_ps(sc, accg[m], _mm256_fnmadd_ps(zs, _mm256_set1_ps(corr[m]), y[m]));
      }
      for (int m = 0; m < MR; ++m) _mm256_storeu_ps(out[m] + 8 * half, y[m]);
    }
  }
};

}  // namespace
}  // namespace avx2
}  // namespace kimivl
