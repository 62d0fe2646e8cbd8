// Per-head GEMV, portable C++ (the compiler's baseline vectors).
#include "cpu/head_gemv_impl.h"

namespace kimivl {

HeadGemvTile head_gemv_tile_portable() { return run_tile; }

}  // namespace kimivl
