// Loading a quantized checkpoint: the on-disk compressed-tensors rows (kimivl_local/quant/
// packing.py) rewritten into the CPU kernels' block layout (kimivl_local/quant/cpu_layout.py)
// in one pass, straight from the mmapped file into the destination.
#pragma once
#include <cstdint>

namespace kimivl {

// Writes rows [row0, row0 + rows) of one [NB, KC, 64 * bits] destination weight from `rows`
// on-disk rows of `src_row_bytes` bytes each (the dense pack-quantized bit stream of u =
// q + 2^(bits-1), bits 2, 3, 4, 5, 6 or 8). Values at k >= k_valid are written as padding
// (stored 0), as cpu_layout.py's torch converter does.
// Rows of the destination outside the range are left untouched, so several sources (gate, up)
// can fill one fused weight.
void repack_rows(const uint8_t* src, int64_t src_row_bytes, int64_t rows, int64_t k_valid,
                 int bits, uint8_t* dst, int64_t kc, int64_t row0, int num_threads);

}  // namespace kimivl
