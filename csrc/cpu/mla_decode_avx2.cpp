// MLA decode on AVX2 + FMA (compiled with -mavx2 -mfma -mf16c on x86-64 only).
#include "cpu/mla_decode_impl.h"

namespace kimivl {
#ifdef __AVX2__

MlaDecodeKernel mla_decode_kernel_avx2() { return MlaDecode<VecAvx2>::kernel(); }

#endif
}  // namespace kimivl
