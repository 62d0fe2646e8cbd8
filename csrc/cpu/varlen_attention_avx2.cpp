// Varlen attention on AVX2 + FMA (compiled with -mavx2 -mfma -mf16c on x86-64 only).
#include "cpu/varlen_attention_impl.h"

namespace kimivl {
#ifdef __AVX2__

VarlenKernel varlen_kernel_avx2() { return VarlenAttention<VecAvx2>::kernel(); }

#endif
}  // namespace kimivl
