// What the CPU kernels of every width share about the layout (kimivl_local/quant/cpu_layout.py):
// a stored value of `bits` bits is split into a low part and an optional high part, each kept as
// `width` planes of 64 bytes per 32-K chunk (16 rows x 4 bytes, one 32-bit lane per row), where
// bits w*j .. w*j + w - 1 of byte 4r + t of plane i hold the part of k = 4 * (i + w*j) + t.
// So slot s (k = 4s .. 4s + 3) of a part is plane s % w shifted right by w * (s / w) and masked.
#pragma once

namespace kimivl {

constexpr bool supported_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
}
// 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2; 2, 4 and 8 are one part.
constexpr int low_part_bits(int bits) { return bits == 3 ? 2 : (bits == 5 || bits == 6) ? 4 : bits; }
constexpr int high_part_bits(int bits) { return bits - low_part_bits(bits); }
// The zero of a stored value when symmetric: unsigned codes u = q + 2^(bits-1) below 8 bits.
constexpr int stored_zero(int bits) { return bits == 8 ? 0 : 1 << (bits - 1); }

}  // namespace kimivl
