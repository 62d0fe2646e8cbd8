// Varlen attention on plain C++ lanes (any CPU).
#include "cpu/varlen_attention_impl.h"

namespace kimivl {

VarlenKernel varlen_kernel_portable() { return VarlenAttention<VecPortable>::kernel(); }

}  // namespace kimivl
