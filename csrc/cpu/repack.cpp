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

// The same for a chunk whose 32 values lie inside K and whose last value ends at least 8 - Bits
// bytes before the row's end: 8 values are exactly `Bits` bytes of the stream, so each 8 come
// from one little-endian 8-byte load (a fixed-size load: odd-sized copies are not vectorised).
template <int Bits>
inline void chunk_values_whole(const uint8_t* row, int64_t c, uint8_t v[kChunk]) {
  constexpr uint64_t mask = (1u << Bits) - 1;
  const uint8_t* p = row + c * 4 * Bits;
  for (int g = 0; g < 4; ++g) {
    uint64_t word;
    std::memcpy(&word, p + g * Bits, 8);
    for (int i = 0; i < 8; ++i) {
      const auto u = static_cast<uint8_t>((word >> (Bits * i)) & mask);
      v[8 * g + i] = Bits == 8 ? static_cast<uint8_t>(u ^ 0x80) : u;
    }
  }
}

// One part (W bits of each value, from bit Offset) of a row's 32 values into its 4-byte lanes
// of W planes (out = the part's first plane + 4r).
template <int W, int Offset>
inline void write_part(const uint8_t v[kChunk], uint8_t* out) {
  constexpr uint32_t mask = (1u << W) - 1;
  for (int i = 0; i < W; ++i) {
    for (int t = 0; t < 4; ++t) {
      uint32_t byte = 0;
      for (int j = 0; j < 8 / W; ++j) byte |= ((v[4 * (i + W * j) + t] >> Offset) & mask) << (W * j);
      out[64 * i + t] = static_cast<uint8_t>(byte);
    }
  }
}

// One row's 32 values into its lanes of every plane of the chunk (out = chunk + 4r).
template <int Bits>
inline void write_planes(const uint8_t v[kChunk], uint8_t* out) {
  constexpr int lo = low_part_bits(Bits), hi = high_part_bits(Bits);
  write_part<lo, 0>(v, out);
  if constexpr (hi > 0) write_part<hi, lo>(v, out + 64 * lo);
}

template <int Bits>
void repack_width(const uint8_t* src, int64_t src_row_bytes, int64_t rows, int64_t k_valid,
                  uint8_t* dst, int64_t kc, int64_t row0, int num_threads) {
  constexpr int64_t chunk_bytes = 64 * Bits;
  // Chunks [0, whole) lie inside K and leave room for chunk_values_whole's 8-byte loads: the
  // word-at-a-time path; the rest (the row's last chunk, a K that is not a multiple of 32)
  // value by value.
  const int64_t room = src_row_bytes - 3 * Bits - 8;  // the last load of chunk c starts at 4Bc + 3B
  const int64_t whole =
      room < 0 ? 0 : std::min({kc, k_valid / kChunk, room / (4 * Bits) + 1});
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
        uint8_t* lanes = block + 4 * (d % kRows);
        for (int64_t c = 0; c < whole; ++c) {
          chunk_values_whole<Bits>(row, c, u);
          write_planes<Bits>(u, lanes + c * chunk_bytes);
        }
        for (int64_t c = whole; c < kc; ++c) {
          chunk_values(row, src_row_bytes, c, k_valid, Bits, u);
          write_planes<Bits>(u, lanes + c * chunk_bytes);
        }
      }
    }
  });
}

}  // namespace

void repack_rows(const uint8_t* src, int64_t src_row_bytes, int64_t rows, int64_t k_valid,
                 int bits, uint8_t* dst, int64_t kc, int64_t row0, int num_threads) {
  check(supported_bits(bits), "repack_rows: bits must be 2, 3, 4, 5, 6 or 8");
  check(rows >= 0 && row0 >= 0 && kc >= 0 && k_valid >= 0, "repack_rows: negative size");
  check(src_row_bytes * 8 >= std::min(k_valid, kc * kChunk) * bits,
        "repack_rows: source rows are shorter than k_valid values");
  if (rows == 0 || kc == 0) return;
  switch (bits) {
    case 2: return repack_width<2>(src, src_row_bytes, rows, k_valid, dst, kc, row0, num_threads);
    case 3: return repack_width<3>(src, src_row_bytes, rows, k_valid, dst, kc, row0, num_threads);
    case 4: return repack_width<4>(src, src_row_bytes, rows, k_valid, dst, kc, row0, num_threads);
    case 5: return repack_width<5>(src, src_row_bytes, rows, k_valid, dst, kc, row0, num_threads);
    case 6: return repack_width<6>(src, src_row_bytes, rows, k_valid, dst, kc, row0, num_threads);
    default: return repack_width<8>(src, src_row_bytes, rows, k_valid, dst, kc, row0, num_threads);
  }
}

}  // namespace kimivl
