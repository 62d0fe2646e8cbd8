// Per-head GEMV on AVX2 + FMA (compiled with -mavx2 -mfma -mf16c on x86-64 only).
#include "cpu/head_gemv_impl.h"

namespace kimivl {
#ifdef __AVX2__

HeadGemvTile head_gemv_tile_avx2() { return run_tile; }

#endif
}  // namespace kimivl
