// The per-head GEMV tile, written as plain loops that the compiler vectorizes for the ISA of
// the translation unit that includes this file (head_gemv_portable.cpp, head_gemv_avx2.cpp).
// Everything is in an anonymous namespace: each ISA's copy stays private to its unit.
#pragma once
#include <cstring>

#include "cpu/head_gemv.h"

namespace kimivl {
namespace {

constexpr int64_t kTile = 64;  // outputs per accumulator block: 8 AVX2 registers

inline float load_w(const uint16_t* w, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(w[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float load_w(const float* w, int64_t i) { return w[i]; }

// Rows of w requested ahead of the one being read. A tile reads 128-256 bytes of each row, rows
// n elements apart (1 KB for w_uk): a stride the hardware prefetcher follows late, so the
// ~2-4 KB a core needs in flight to stream at its share of the bandwidth are requested here.
constexpr int64_t kAheadRows = 16;

// acc[0, len) += sum_k x[k] * rows[k * n + j]: streams the tile's column band of w once.
template <typename W, int64_t kLen>
inline void accumulate(const float* x, const W* rows, int64_t k, int64_t n, int64_t len,
                       float* acc) {
  const int64_t width = kLen > 0 ? kLen : len;
  const int64_t bytes = width * static_cast<int64_t>(sizeof(W));
  for (int64_t kk = 0; kk < k; ++kk) {
    const float xv = x[kk];
    const W* row = rows + kk * n;
    if (kk + kAheadRows < k) {  // past the last row would be a wasted (harmless) request
      const char* ahead = reinterpret_cast<const char*>(row + kAheadRows * n);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(ahead + b);
    }
    for (int64_t j = 0; j < width; ++j) acc[j] += xv * load_w(row, j);
  }
}

template <typename W>
void tile(const HeadGemvParams& p, int64_t h, int64_t n0, int64_t n1) {
  const W* w = static_cast<const W*>(p.w) + h * p.k * p.n;
  const float* x = p.x + h * p.x_head;
  float* y = p.y + h * p.y_head;
  for (int64_t c = n0; c < n1; c += kTile) {
    const int64_t len = n1 - c < kTile ? n1 - c : kTile;
    alignas(64) float acc[kTile] = {};
    if (len == kTile)
      accumulate<W, kTile>(x, w + c, p.k, p.n, len, acc);  // fixed trip count: vectorized
    else
      accumulate<W, 0>(x, w + c, p.k, p.n, len, acc);
    std::memcpy(y + c, acc, len * sizeof(float));
  }
}

void run_tile(const HeadGemvParams& p, int64_t h, int64_t n0, int64_t n1) {
  if (p.w_dtype == DType::kBFloat16)
    tile<uint16_t>(p, h, n0, n1);
  else
    tile<float>(p, h, n0, n1);
}

}  // namespace
}  // namespace kimivl
