// MLA decode on plain C++ lanes (any CPU).
#include "cpu/mla_decode_impl.h"

namespace kimivl {

MlaDecodeKernel mla_decode_kernel_portable() { return MlaDecode<VecPortable>::kernel(); }

}  // namespace kimivl
