#include "cpu/repack.h"

#include <algorithm>
#include <cstring>

#include "common.h"
#include "cpu/parallel.h"

namespace kimivl {

namespace {

constexpr int64_t kRows = 16, kChunk = 32;

// The 32 stored values of chunk c of one source row, as on disk (u = q + 2^(bits-1)). Past K
// they are what the torch converter writes: nibble 0 for int4, q = 0 (u = 128) for int8.
inline void chunk_values(const uint8_t* row, int64_t row_bytes, int64_t c, int64_t k_valid,
                         int bits, uint8_t u[kChunk]) {
  const int64_t k0 = c * kChunk;
  if (bits == 4) {
    const int64_t b0 = k0 / 2;
    for (int j = 0; j < kChunk / 2; ++j) {
      const uint8_t byte = b0 + j < row_bytes ? row[b0 + j] : 0;
      u[2 * j] = byte & 0xF;
      u[2 * j + 1] = byte >> 4;
    }
  } else {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(kChunk, row_bytes - k0));
    std::memcpy(u, row + k0, n);
    std::memset(u + n, 0x80, kChunk - n);
  }
  const uint8_t pad = bits == 4 ? 0 : 0x80;
  for (int64_t k = std::max<int64_t>(k0, k_valid); k < k0 + kChunk; ++k) u[k - k0] = pad;
}

}  // namespace

void repack_rows(const uint8_t* src, int64_t src_row_bytes, int64_t rows, int64_t k_valid,
                 int bits, uint8_t* dst, int64_t kc, int64_t row0, int num_threads) {
  check(bits == 4 || bits == 8, "repack_rows: bits must be 4 or 8");
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
          uint8_t* out = block + c * chunk_bytes + 4 * r;
          if (bits == 4) {
            // byte 64i + 4r + t = u[4i + t] | u[16 + 4i + t] << 4
            for (int i = 0; i < 4; ++i)
              for (int t = 0; t < 4; ++t)
                out[64 * i + t] = static_cast<uint8_t>(u[4 * i + t] | (u[16 + 4 * i + t] << 4));
          } else {
            // byte 64j + 4r + t = q[4j + t] in two's complement, q = u - 128
            for (int j = 0; j < 8; ++j)
              for (int t = 0; t < 4; ++t)
                out[64 * j + t] = static_cast<uint8_t>(u[4 * j + t] ^ 0x80);
          }
        }
      }
    }
  });
}

}  // namespace kimivl
