// Fused vision ops on plain C++ lanes (any CPU).
#include "cpu/vision_ops_impl.h"

namespace kimivl {

VisionKernels vision_kernels_portable() { return VisionOps<VecPortable>::kernels(); }

}  // namespace kimivl
