// Fused vision ops on AVX-512 (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq on
// x86-64 only; run when the selected ISA is avx512_vnni, whose CPUs have all of them).
#include "cpu/vision_ops_impl.h"

namespace kimivl {
#ifdef __AVX512F__

VisionKernels vision_kernels_avx512() { return VisionOps<VecAvx512>::kernels(); }

#endif
}  // namespace kimivl
