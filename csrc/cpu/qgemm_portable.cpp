// Portable C++ micro-kernel: the reference semantics of the CPU layout, for CPUs without AVX2.
#include <cstring>

#include "cpu/qgemm.h"

namespace kimivl {
namespace portable {
namespace {

float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

float scale_to_float(uint16_t s, DType dt) {
  if (dt == DType::kFloat16) return fp16_to_float(s);
  const uint32_t bits = static_cast<uint32_t>(s) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Kernel {
  static constexpr int kMaxRows = 4;  // activation rows per call

  template <int Bits, int MR>
  static void block(const uint8_t* q, const uint16_t* s, const int8_t* z, const QWeight& w,
                    const ActRow* rows, float (*out)[16]) {
    const int64_t gc = w.group / 32;
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < 16; ++r) out[m][r] = 0.0f;
    for (int64_t g = 0; g < w.groups(); ++g) {
      float accg[MR][16] = {}, corr[MR] = {};
      for (int64_t c = g * gc; c < (g + 1) * gc; ++c, q += 64 * Bits) {
        int32_t acc[MR][16] = {};
        for (int m = 0; m < MR; ++m) {
          const int8_t* a = rows[m].q + 32 * c;
          for (int r = 0; r < 16; ++r) {
            for (int j = 0; j < Bits; ++j) {  // 64-byte groups: 4 (int4) or 8 (int8) per chunk
              for (int t = 0; t < 4; ++t) {
                const uint8_t byte = q[64 * j + 4 * r + t];
                if (Bits == 4) {
                  acc[m][r] += (byte & 15) * a[4 * j + t] + (byte >> 4) * a[16 + 4 * j + t];
                } else {
                  acc[m][r] += static_cast<int8_t>(byte) * a[4 * j + t];
                }
              }
            }
          }
          corr[m] += rows[m].ds[c];
          for (int r = 0; r < 16; ++r) accg[m][r] += rows[m].d[c] * static_cast<float>(acc[m][r]);
        }
      }
      for (int r = 0; r < 16; ++r) {
        const float sc = scale_to_float(s[16 * g + r], w.scale_dtype);
        const float zero = z ? static_cast<float>(z[16 * g + r]) : (Bits == 4 ? 8.0f : 0.0f);
        for (int m = 0; m < MR; ++m) out[m][r] += sc * accg[m][r] - sc * zero * corr[m];
      }
    }
  }
};

}  // namespace
}  // namespace portable
}  // namespace kimivl

#include "cpu/qgemm_lowbit_portable.h"

#define KIMIVL_QGEMM_NS portable
#include "cpu/qgemm_impl.h"
