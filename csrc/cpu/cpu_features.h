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
  bool avx512_vbmi = false;
  bool avx_vnni = false;
  bool amx_bf16 = false;
  bool amx_permitted = false;  // Linux granted this process the AMX tile data state
};

// What the CPU and the OS both support (AVX state enabled in XCR0), detected once.
const CpuFeatures& cpu_features();

// Kernel paths, best first. The CPU kernels pick the best one the CPU supports unless the
// environment variable KIMIVL_ISA names another (so tests can cover every path on one machine).
// kAmx is avx512_vnni plus AMX bf16 tiles for the quantized matmul's and the MoE block's
// prefill (qgemm_amx.h); every other kernel, and decode, treats it as avx512_vnni.
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);
// The path in force: KIMIVL_ISA if set (error if the CPU lacks it), else the best supported.
Isa selected_isa();

}  // namespace kimivl
