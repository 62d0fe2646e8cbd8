// Fused vision ops on AVX2 + FMA (compiled with -mavx2 -mfma -mf16c on x86-64 only).
#include "cpu/vision_ops_impl.h"

namespace kimivl {
#ifdef __AVX2__

VisionKernels vision_kernels_avx2() { return VisionOps<VecAvx2>::kernels(); }

#endif
}  // namespace kimivl
