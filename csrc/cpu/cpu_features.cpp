#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define KIMIVL_X86 1
#include <cpuid.h>
#endif
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kimivl {
namespace {

#ifdef KIMIVL_X86
unsigned long long xgetbv0() {
  unsigned int eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

// Linux enables AMX's 8 KB tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); a tile instruction without it kills the process with SIGILL.
bool request_amx_permission() {
#if defined(KIMIVL_X86) && defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
#ifdef KIMIVL_X86
  unsigned int a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  if (!osxsave) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;               // XMM and YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;         // XTILECFG, XTILEDATA
  f.fma = os_avx && (c & (1u << 12));
  f.f16c = os_avx && (c & (1u << 29));
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = os_avx && (b & (1u << 5));
    f.avx512f = os_avx512 && (b & (1u << 16));
    f.avx512bw = os_avx512 && (b & (1u << 30));
    f.avx512vl = os_avx512 && (b & (1u << 31));
    f.avx512_vnni = os_avx512 && (c & (1u << 11));
    f.avx512_vbmi = os_avx512 && (c & (1u << 1));
    f.amx_bf16 = os_amx && (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16 and AMX-TILE
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) {
    f.avx_vnni = os_avx && (a & (1u << 4));
    f.avx512_bf16 = os_avx512 && (a & (1u << 5));
  }
  f.amx_permitted = f.amx_bf16 && request_amx_permission();
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kAmx: return isa_supported(Isa::kAvx512Vnni) && f.avx512_bf16 && f.avx512_vbmi &&
                           f.amx_permitted;
    case Isa::kAvx512Vnni: return f.avx512f && f.avx512bw && f.avx512vl && f.avx512_vnni;
    case Isa::kAvx2: return f.avx2 && f.fma && f.f16c;
    default: return true;
  }
}

Isa selected_isa() {
  const char* forced = std::getenv("KIMIVL_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    for (Isa isa : {Isa::kAmx, Isa::kAvx512Vnni, Isa::kAvx2, Isa::kPortable}) {
      if (std::strcmp(forced, isa_name(isa)) == 0) {
        if (!isa_supported(isa))
          throw std::runtime_error(std::string("KIMIVL_ISA=") + forced +
                                   (isa == Isa::kAmx && cpu_features().amx_bf16
                                        ? " but the OS did not grant this process AMX tile state"
                                        : " but this CPU does not support it"));
        return isa;
      }
    }
    throw std::runtime_error(std::string("KIMIVL_ISA=") + forced +
                             " is not one of amx, avx512_vnni, avx2, portable");
  }
  for (Isa isa : {Isa::kAmx, Isa::kAvx512Vnni, Isa::kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return Isa::kPortable;
}

}  // namespace kimivl
