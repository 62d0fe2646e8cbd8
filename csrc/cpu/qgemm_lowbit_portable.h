// Portable C++ micro-kernel for the 2-, 3-, 5- and 6-bit layouts (cpu/qgemm_lowbit.h): the
// reference semantics. Included by qgemm_portable.cpp after its scale_to_float.
#pragma once
#include "cpu/qgemm.h"
#include "cpu/qgemm_lowbit.h"

namespace kimivl {
namespace portable {
namespace {

struct LowbitKernel {
  static constexpr int kMaxRows = 4;  // activation rows per call

  // Row r's stored value at k (< 32) of the chunk at q.
  template <int Bits>
  static int value(const uint8_t* q, int r, int k) {
    constexpr int lo = low_part_bits(Bits), hi = high_part_bits(Bits);
    const int s = k / 4, t = k % 4;
    auto part = [&](int w, int plane0, int offset) {
      const uint8_t byte = q[64 * (plane0 + s % w) + 4 * r + t];
      return ((byte >> (w * (s / w))) & ((1 << w) - 1)) << offset;
    };
    return part(lo, 0, 0) | (hi > 0 ? part(hi, lo, lo) : 0);
  }

  template <int Bits, int MR>
  static void block(const uint8_t* q, const uint16_t* s, const int8_t* z, const QWeight& w,
                    const ActRow* rows, float (*out)[16]) {
    const int64_t gc = w.group / 32;
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < 16; ++r) out[m][r] = 0.0f;
    for (int64_t g = 0; g < w.groups(); ++g) {
      float accg[MR][16] = {}, corr[MR] = {};
      for (int64_t c = g * gc; c < (g + 1) * gc; ++c, q += 64 * Bits) {
        int v[16][32];
        for (int r = 0; r < 16; ++r)
          for (int k = 0; k < 32; ++k) v[r][k] = value<Bits>(q, r, k);
        for (int m = 0; m < MR; ++m) {
          const int8_t* a = rows[m].q + 32 * c;
          for (int r = 0; r < 16; ++r) {
            int32_t acc = 0;
            for (int k = 0; k < 32; ++k) acc += v[r][k] * a[k];
            accg[m][r] += rows[m].d[c] * static_cast<float>(acc);
          }
          corr[m] += rows[m].ds[c];
        }
      }
      for (int r = 0; r < 16; ++r) {
        const float sc = scale_to_float(s[16 * g + r], w.scale_dtype);
        const float zero = static_cast<float>(z ? z[16 * g + r] : stored_zero(Bits));
        for (int m = 0; m < MR; ++m) out[m][r] += sc * accg[m][r] - sc * zero * corr[m];
      }
    }
  }
};

}  // namespace
}  // namespace portable
}  // namespace kimivl
