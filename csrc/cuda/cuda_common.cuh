// Shared by the CUDA kernels: error checks that turn a CUDA error into a Python exception
// (pybind11 translates std::runtime_error), and the stream handle passed from Python.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kimivl {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// After a launch: configuration errors surface here; no device sync (graph-capture safe).
inline void check_launch(const char* kernel) { cuda_check(cudaGetLastError(), kernel); }

// Python passes torch.cuda.current_stream().cuda_stream as an integer.
inline cudaStream_t as_stream(int64_t handle) {
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(handle));
}

}  // namespace kimivl
