// AVX-512 VNNI micro-kernel for the 2-, 3-, 5- and 6-bit layouts (cpu/qgemm_lowbit.h). Included
// by qgemm_avx512.cpp after its helpers (broadcast4, load_scales16, load_zeros16,
// kPrefetchBytes), so it is compiled with that file's flags. Each of the 8 slots of a chunk is
// rebuilt as 16 rows x 4 unsigned bytes by one or two shift+mask (+ or) steps on the planes, then
// takes one vpdpbusd per activation row, as int4 does: the work per chunk is that of int4 while
// the bytes read are bits / 8 per weight.
#pragma once
#include <immintrin.h>

#include <utility>

#include "cpu/qgemm.h"
#include "cpu/qgemm_lowbit.h"

namespace kimivl {
namespace avx512 {
namespace {

// Slot S of a part of width W whose bits sit at offset O of the value, in place (16-bit shifts
// never carry a neighbour byte's bits into the masked field: the field stays inside its byte).
template <int W, int O, int S>
inline __m512i part_slot(const __m512i* planes) {
  constexpr int pos = W * (S / W);
  const __m512i raw = planes[S % W];
  __m512i moved;
  if constexpr (O >= pos) moved = _mm512_slli_epi16(raw, O - pos);
  else moved = _mm512_srli_epi16(raw, pos - O);
  return _mm512_and_si512(moved, _mm512_set1_epi8(static_cast<char>(((1 << W) - 1) << O)));
}

struct LowbitKernel {
  static constexpr int kMaxRows = 4;  // activation rows per call

  template <int Bits, int MR, int S>
  static inline void dot_slot(const __m512i* planes, const ActRow* rows, int64_t c,
                              __m512i* acc) {
    constexpr int lo = low_part_bits(Bits), hi = high_part_bits(Bits);
    __m512i v = part_slot<lo, 0, S>(planes);
    if constexpr (hi > 0) v = _mm512_or_si512(v, part_slot<hi, lo, S>(planes + lo));
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm512_dpbusd_epi32(acc[m], v, broadcast4(rows[m].q + 32 * c + 4 * S));
  }

  template <int Bits, int MR, int... S>
  static inline void dot(const __m512i* planes, const ActRow* rows, int64_t c, __m512i* acc,
                         std::integer_sequence<int, S...>) {
    (dot_slot<Bits, MR, S>(planes, rows, c, acc), ...);
  }

  template <int Bits, int MR>
  static void block(const uint8_t* q, const uint16_t* s, const int8_t* z, const QWeight& w,
                    const ActRow* rows, float (*out)[16]) {
    const int64_t gc = w.group / 32, groups = w.groups();
    const __m512 zconst = _mm512_set1_ps(static_cast<float>(stored_zero(Bits)));
    __m512 y[MR];
    for (int m = 0; m < MR; ++m) y[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 accg[MR];
      for (int m = 0; m < MR; ++m) accg[m] = _mm512_setzero_ps();
      for (int64_t c = g * gc; c < (g + 1) * gc; ++c, q += 64 * Bits) {
        __m512i planes[Bits];
        for (int i = 0; i < Bits; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchBytes + 64 * i), _MM_HINT_T1);
          planes[i] = _mm512_loadu_si512(q + 64 * i);
        }
        __m512i acc[MR];
        for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_si512();
        dot<Bits, MR>(planes, rows, c, acc, std::make_integer_sequence<int, 8>());
        for (int m = 0; m < MR; ++m) {
          const __m512 d = _mm512_set1_ps(rows[m].d[c]);
          accg[m] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(acc[m]), accg[m]);
        }
      }
      float corr[MR];
      for (int m = 0; m < MR; ++m) {
        corr[m] = 0.0f;
        for (int64_t c = g * gc; c < (g + 1) * gc; ++c) corr[m] += rows[m].ds[c];
      }
      const __m512 sc = load_scales16(s + 16 * g, w.scale_dtype);
      const __m512 zs = _mm512_mul_ps(sc, z ? load_zeros16(z + 16 * g) : zconst);
      for (int m = 0; m < MR; ++m)
        y[m] = _mm512_fmadd_ps(sc, accg[m], _mm512_fnmadd_ps(zs, _mm512_set1_ps(corr[m]), y[m]));
    }
    for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out[m], y[m]);
  }
};

}  // namespace
}  // namespace avx512
}  // namespace kimivl
