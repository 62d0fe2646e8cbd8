// Varlen attention on AVX-512 (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq on
// x86-64 only; run when the selected ISA is avx512_vnni, whose CPUs have all of them). 16 query
// lanes per vector: 192-query blocks, twice the AVX2 kernel's work per instruction.
#include "cpu/varlen_attention_impl.h"

namespace kimivl {
#ifdef __AVX512F__

VarlenKernel varlen_kernel_avx512() { return VarlenAttention<VecAvx512>::kernel(); }

#endif
}  // namespace kimivl
