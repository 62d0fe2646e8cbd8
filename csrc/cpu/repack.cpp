#include "cpu/repack.h"

#include <algorithm>
#include <cstring>

#include "common.h"
#include "cpu/parallel.h"
#include "cpu/qgemm_lowbit.h"

namespace kimivl {

namespace {

constexpr int64_t kRows = 16, kChunk = 32;

// The 32 stored values of chunk c of one source row (the kernel's v: u = q + 2^(bits-1) below
// 8 bits, q in two's complement at 8), read from the on-disk bit stream (value k at bits
// k * bits ..). Past K they are what the torch converter writes: 0.
inline void chunk_values(const uint8_t* row, int64_t row_bytes, int64_t c, int64_t k_valid,
                         int bits, uint8_t v[kChunk]) {
  const int64_t k0 = c * kChunk;
  const uint32_t mask = (1u << bits) - 1;
  for (int i = 0; i < kChunk; ++i) {
    const int64_t k = k0 + i, bit = k * bits, byte = bit / 8;
    if (k >= k_valid) {
      v[i] = 0;
      continue;
    }
    uint32_t window = byte < row_bytes ? row[byte] : 0;
    if (byte + 1 < row_bytes) window |= static_cast<uint32_t>(row[byte + 1]) << 8;
    const uint32_t u = (window >> (bit % 8)) & mask;
    v[i] = static_cast<uint8_t>(bits == 8 ? u ^ 0x80 : u);
  }
}

// One row's 32 values into its 4-byte lanes of every plane of the chunk (out = chunk + 4r).
inline void write_planes(const uint8_t v[kChunk], int bits, uint8_t* out) {
  int plane = 0, offset = 0;
  for (const int w : {low_part_bits(bits), high_part_bits(bits)}) {
    if (w == 0) break;
    const uint32_t mask = (1u << w) - 1;
    for (int i = 0; i < w; ++i) {
      for (int t = 0; t < 4; ++t) {
        uint32_t byte = 0;
        for (int j = 0; j < 8 / w; ++j) byte |= ((v[4 * (i + w * j) + t] >> offset) & mask) << (w * j);
        out[64 * (plane + i) + t] = static_cast<uint8_t>(byte);
      }
    }
    plane += w;
    offset += w;
  }
}

}  // namespace

void repack_rows(const uint8_t* src, int64_t src_row_bytes, int64_t rows, int64_t k_valid,
                 int bits, uint8_t* dst, int64_t kc, int64_t row0, int num_threads) {
  check(supported_bits(bits), "repack_rows: bits must be 2, 3, 4, 5, 6 or 8");
  check(rows >= 0 && row0 >= 0 && kc >= 0 && k_valid >= 0, "repack_rows: negative size");
  check(src_row_bytes * 8 >= std::min(k_valid, kc * kChunk) * bits,
        "repack_rows: source rows are shorter than k_valid values");
  if (rows == 0 || kc == 0) return;
  const int64_t chunk_bytes = 64 * bits;
  const int64_t first_block = row0 / kRows, last_block = (row0 + rows - 1) / kRows;
  // One block per task: blocks are disjoint in the destination, so threads never share a line
  // except at a block edge shared with another source (filled by a separate call).
  parallel_for(last_block - first_block + 1, 1, num_threads, [&](int64_t begin, int64_t end) {
    uint8_t u[kChunk];
    for (int64_t b = first_block + begin; b < first_block + end; ++b) {
      const int64_t d_lo = std::max(b * kRows, row0);
      const int64_t d_hi = std::min((b + 1) * kRows, row0 + rows);
      uint8_t* block = dst + b * kc * chunk_bytes;
      for (int64_t d = d_lo; d < d_hi; ++d) {
        const uint8_t* row = src + (d - row0) * src_row_bytes;
        const int r = static_cast<int>(d % kRows);
        for (int64_t c = 0; c < kc; ++c) {
          chunk_values(row, src_row_bytes, c, k_valid, bits, u);
          write_planes(u, bits, block + c * chunk_bytes + 4 * r);
        }
      }
    }
  });
}

}  // namespace kimivl
