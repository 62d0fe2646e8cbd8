// AVX2 micro-kernel (compiled with -mavx2 -mfma -mf16c; run only when the CPU has them).
// A 16-row block is two 8-row halves: lanes 0-7 of each 64-byte group are the first 32 bytes.
// int4: unsigned nibbles x int8 activations with vpmaddubsw; the 8 products of a 32-K chunk
// stay below 8 * 2 * 15 * 127 = 30480, so they add up in int16 before one vpmaddwd.
// int8: the sign trick (|w| unsigned, sign moved onto the activation): 2 * 128 * 127 < 32768.
#include <immintrin.h>

#include <cstring>

#include "cpu/qgemm.h"

namespace kimivl {
namespace avx2 {
namespace {

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline __m256 load_scales8(const uint16_t* s, DType dt) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
  if (dt == DType::kFloat16) return _mm256_cvtph_ps(raw);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 load_zeros8(const int8_t* z) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(z));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
}

// Weights live on 4 KB pages, where the hardware prefetcher stops; one thread streaming them
// is latency-bound without this. Blocks of a work item are contiguous, so ahead is usually next.
constexpr int kPrefetchBytes = 4096;

struct Kernel {
  static constexpr int kMaxRows = 4;  // activation rows per call

  template <int Bits, int MR>
  static void block(const uint8_t* q, const uint16_t* s, const int8_t* z, const QWeight& w,
                    const ActRow* rows, float (*out)[16]) {
    // Both halves in one pass while registers allow, so each activation broadcast serves 16
    // rows; otherwise one pass per half.
    constexpr int H = MR <= 2 ? 2 : 1;
    const int64_t gc = w.group / 32, groups = w.groups();
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256 zconst = _mm256_set1_ps(Bits == 4 ? 8.0f : 0.0f);
    for (int pass = 0; pass < 2 / H; ++pass) {
      for (int m = 0; m < MR; ++m)
        for (int hh = 0; hh < H; ++hh)
          _mm256_storeu_ps(out[m] + 8 * (pass + hh), _mm256_setzero_ps());
      const uint8_t* p = q + 32 * pass;
      for (int64_t g = 0; g < groups; ++g) {
        __m256 accg[H][MR];
        for (int m = 0; m < MR; ++m)
          for (int hh = 0; hh < H; ++hh) accg[hh][m] = _mm256_setzero_ps();
        for (int64_t c = g * gc; c < (g + 1) * gc; ++c, p += 64 * Bits) {
          for (int line = 0; line < Bits; ++line) {
            const char* ahead = reinterpret_cast<const char*>(p + kPrefetchBytes + 64 * line);
            _mm_prefetch(ahead, _MM_HINT_T0);
          }
          __m256i acc[H][MR];
          for (int hh = 0; hh < H; ++hh)
            for (int m = 0; m < MR; ++m) acc[hh][m] = _mm256_setzero_si256();
          if constexpr (Bits == 4 && H == 1) {
            // Many rows: unpack the 128 bytes once into registers, then one row at a time, so
            // only one int16 accumulator is live.
            __m256i lo[4], hi[4];
            for (int i = 0; i < 4; ++i) {
              const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * i));
              lo[i] = _mm256_and_si256(raw, low4);
              hi[i] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            }
            for (int m = 0; m < MR; ++m) {
              const int8_t* a = rows[m].q + 32 * c;
              __m256i sum = _mm256_setzero_si256();
              for (int i = 0; i < 4; ++i) {
                const __m256i plo = _mm256_maddubs_epi16(lo[i], broadcast4(a + 4 * i));
                const __m256i phi = _mm256_maddubs_epi16(hi[i], broadcast4(a + 16 + 4 * i));
                sum = _mm256_add_epi16(sum, _mm256_add_epi16(plo, phi));
              }
              acc[0][m] = _mm256_madd_epi16(sum, ones);
            }
          } else if constexpr (Bits == 4) {
            for (int i = 0; i < 4; ++i) {
              for (int hh = 0; hh < H; ++hh) {
                const __m256i raw =
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * i + 32 * hh));
                const __m256i lo = _mm256_and_si256(raw, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                for (int m = 0; m < MR; ++m) {
                  const int8_t* a = rows[m].q + 32 * c + 4 * i;  // broadcasts are CSEd across hh
                  acc[hh][m] = _mm256_add_epi16(
                      acc[hh][m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(a)),
                                                   _mm256_maddubs_epi16(hi, broadcast4(a + 16))));
                }
              }
            }
            for (int hh = 0; hh < H; ++hh)
              for (int m = 0; m < MR; ++m) acc[hh][m] = _mm256_madd_epi16(acc[hh][m], ones);
          } else {
            for (int j = 0; j < 8; ++j) {
              for (int hh = 0; hh < H; ++hh) {
                const __m256i raw =
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * j + 32 * hh));
                const __m256i mag = _mm256_sign_epi8(raw, raw);
                for (int m = 0; m < MR; ++m) {
                  const __m256i a = broadcast4(rows[m].q + 32 * c + 4 * j);
                  const __m256i prod = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, raw));
                  acc[hh][m] = _mm256_add_epi32(acc[hh][m], _mm256_madd_epi16(prod, ones));
                }
              }
            }
          }
          for (int m = 0; m < MR; ++m) {
            const __m256 d = _mm256_set1_ps(rows[m].d[c]);
            for (int hh = 0; hh < H; ++hh)
              accg[hh][m] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(acc[hh][m]), accg[hh][m]);
          }
        }
        float corr[MR];  // activation-only, so summed outside the hot loop
        for (int m = 0; m < MR; ++m) {
          corr[m] = 0.0f;
          for (int64_t c = g * gc; c < (g + 1) * gc; ++c) corr[m] += rows[m].ds[c];
        }
        for (int hh = 0; hh < H; ++hh) {
          const int half = pass + hh;
          const __m256 sc = load_scales8(s + 16 * g + 8 * half, w.scale_dtype);
          const __m256 zs = _mm256_mul_ps(sc, z ? load_zeros8(z + 16 * g + 8 * half) : zconst);
          for (int m = 0; m < MR; ++m) {
            float* o = out[m] + 8 * half;
            const __m256 y = _mm256_fnmadd_ps(zs, _mm256_set1_ps(corr[m]), _mm256_loadu_ps(o));
            _mm256_storeu_ps(o, _mm256_fmadd_ps(sc, accg[hh][m], y));
          }
        }
      }
    }
  }
};

}  // namespace
}  // namespace avx2
}  // namespace kimivl

#include "cpu/qgemm_lowbit_avx2.h"

#define KIMIVL_QGEMM_NS avx2
#include "cpu/qgemm_impl.h"
