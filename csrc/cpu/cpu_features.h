// Run-time CPU feature detection (CPUID + XGETBV) and the choice of kernel ISA path.
#pragma once
#include <string>

namespace kimivl {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool avx_vnni = false;
  bool amx_int8 = false;
  bool amx_permitted = false;  // Linux granted this process the AMX tile data state
};

// What the CPU and the OS both support (AVX state enabled in XCR0), detected once.
const CpuFeatures& cpu_features();

// Kernel paths, best first. The CPU kernels pick the best one the CPU supports unless the
// environment variable KIMIVL_ISA names another (so tests can cover every path on one machine).
// kAmx is avx512_vnni plus AMX int8 tiles for the quantized matmul's prefill (M >= 16); every
// other kernel treats it as avx512_vnni. Only KIMIVL_ISA=amx selects it (coarser activation
// scales, see qgemm_amx.h).
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);
// The path in force: KIMIVL_ISA if set (error if the CPU lacks it), else the best supported
// (never kAmx).
Isa selected_isa();

}  // namespace kimivl
