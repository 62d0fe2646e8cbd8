// Per-head GEMV: checks, ISA choice and threading; head_gemv_impl.h does the math.
#include "cpu/head_gemv.h"

#include <algorithm>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

namespace kimivl {
namespace {

HeadGemvTile select_tile() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))  // as CMake's ISA flags
  if (selected_isa() != Isa::kPortable && isa_supported(Isa::kAvx2)) return head_gemv_tile_avx2();
#endif
  return head_gemv_tile_portable();
}

// Output columns per work item: a multiple of the kernel's 64-wide tile.
constexpr int64_t kBand = 128;

}  // namespace

void head_gemv(const HeadGemvParams& p) {
  check(p.w_dtype == DType::kBFloat16 || p.w_dtype == DType::kFloat32,
        "head_gemv: w must be bfloat16 or float32");
  check(p.x && p.w && p.y, "head_gemv: null data pointer");
  check(p.heads >= 1 && p.k >= 1 && p.n >= 1, "head_gemv: heads, k and n must be >= 1");
  check(p.x_head >= p.k && p.y_head >= p.n, "head_gemv: row strides shorter than the rows");
  const HeadGemvTile tile = select_tile();
  const int64_t bands = (p.n + kBand - 1) / kBand;
  parallel_for(p.heads * bands, 1, std::max(p.num_threads, 1), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / bands, n0 = (item % bands) * kBand;
      tile(p, h, n0, std::min(p.n, n0 + kBand));
    }
  });
}

}  // namespace kimivl
