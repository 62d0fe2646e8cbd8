// AVX-512 VNNI micro-kernel (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni, plus
// -mavx512bf16 -mamx-tile -mamx-bf16 for the AMX path of qgemm_amx.h; run only when the CPU has
// them). One zmm lane per output row; vpdpbusd multiplies unsigned weight bytes by signed activation bytes into
// int32 without saturation. int8 weights are stored signed, so they are flipped to unsigned
// (w + 128) with one xor and the extra 128 * sum(a) joins the zero correction.
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own `__Y = __Y` placeholders.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "cpu/qgemm.h"

namespace kimivl {
namespace avx512 {
namespace {

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline __m512 load_scales16(const uint16_t* s, DType dt) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
  if (dt == DType::kFloat16) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 load_zeros16(const int8_t* z) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(z));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}

// Weights live on 4 KB pages, where the hardware prefetcher stops (see qgemm_avx2.cpp). The
// prefetches go to L2 (T1): into L1 (T0) they held L1's fill buffers that the demand loads need,
// and decode at int4 was 7-17% slower (bench/results/cpu-xeon-2core-2026-12-08-amxbf16.md).
constexpr int kPrefetchBytes = 4096;

struct Kernel {
  // Up to 8 activation rows per call: each 64-byte weight load then feeds 16 vpdpbusd.
  static constexpr int kMaxRows = 8;

  template <int Bits, int MR>
  static void block(const uint8_t* q, const uint16_t* s, const int8_t* z, const QWeight& w,
                    const ActRow* rows, float (*out)[16]) {
    // vpdpbusd has a latency of several cycles: with few rows, two accumulator chains per row
    // (low and high nibbles, or even and odd 4-K slots) keep the unit busy; with many rows the
    // rows' own chains do, and registers are short.
    constexpr int C = MR <= 4 ? 2 : 1;
    const int64_t gc = w.group / 32, groups = w.groups();
    const __m512i low4 = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const __m512 offset = _mm512_set1_ps(Bits == 4 ? 0.0f : 128.0f);
    const __m512 zconst = _mm512_set1_ps(Bits == 4 ? 8.0f : 128.0f);
    __m512 y[MR];
    for (int m = 0; m < MR; ++m) y[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 accg[MR];
      for (int m = 0; m < MR; ++m) accg[m] = _mm512_setzero_ps();
      for (int64_t c = g * gc; c < (g + 1) * gc; ++c, q += 64 * Bits) {
        for (int line = 0; line < Bits; ++line)
          _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchBytes + 64 * line), _MM_HINT_T1);
        __m512i acc[C][MR];
        for (int j = 0; j < C; ++j)
          for (int m = 0; m < MR; ++m) acc[j][m] = _mm512_setzero_si512();
        if constexpr (Bits == 4) {
          for (int i = 0; i < 4; ++i) {
            const __m512i raw = _mm512_loadu_si512(q + 64 * i);
            const __m512i lo = _mm512_and_si512(raw, low4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
            for (int m = 0; m < MR; ++m) {
              const int8_t* a = rows[m].q + 32 * c + 4 * i;
              acc[0][m] = _mm512_dpbusd_epi32(acc[0][m], lo, broadcast4(a));
              acc[C - 1][m] = _mm512_dpbusd_epi32(acc[C - 1][m], hi, broadcast4(a + 16));
            }
          }
        } else {
          for (int j = 0; j < 8; ++j) {
            const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(q + 64 * j), flip);
            for (int m = 0; m < MR; ++m)
              acc[j % C][m] =
                  _mm512_dpbusd_epi32(acc[j % C][m], u, broadcast4(rows[m].q + 32 * c + 4 * j));
          }
        }
        for (int m = 0; m < MR; ++m) {
          const __m512i sum = C == 2 ? _mm512_add_epi32(acc[0][m], acc[C - 1][m]) : acc[0][m];
          const __m512 d = _mm512_set1_ps(rows[m].d[c]);
          accg[m] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), accg[m]);
        }
      }
      float corr[MR];  // activation-only, so summed outside the hot loop
      for (int m = 0; m < MR; ++m) {
        corr[m] = 0.0f;
        for (int64_t c = g * gc; c < (g + 1) * gc; ++c) corr[m] += rows[m].ds[c];
      }
      const __m512 sc = load_scales16(s + 16 * g, w.scale_dtype);
      const __m512 zero = z ? _mm512_add_ps(load_zeros16(z + 16 * g), offset) : zconst;
      const __m512 zs = _mm512_mul_ps(sc, zero);
      for (int m = 0; m < MR; ++m)
        y[m] = _mm512_fmadd_ps(sc, accg[m], _mm512_fnmadd_ps(zs, _mm512_set1_ps(corr[m]), y[m]));
    }
    for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out[m], y[m]);
  }
};

}  // namespace
}  // namespace avx512
}  // namespace kimivl

#include "cpu/qgemm_lowbit_avx512.h"

#define KIMIVL_QGEMM_NS avx512
#include "cpu/qgemm_impl.h"

#include "cpu/qgemm_amx.h"
