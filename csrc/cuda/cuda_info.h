// What the CUDA runtime linked into _C can see. Only compiled when CUDA is enabled.
#pragma once
#include <string>
#include <vector>

namespace kimivl {

struct CudaDevice {
  int index;
  std::string name;
  int sm;  // compute capability as major*10+minor
  size_t total_memory;
};

// Devices visible to the CUDA runtime; `error` is set (and the list empty) when there is no
// driver or no device, which is normal on CPU-only machines.
std::vector<CudaDevice> cuda_devices(std::string* error);
int cuda_runtime_version();

}  // namespace kimivl
