// Shared by every op: the dtype enum passed from Python and scalar bf16/fp16 conversions.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace kimivl {

// Must match kimivl_local/kernels/bridge.py (DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3, kInt32 = 4, kUInt8 = 5 };

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Pointers cross the bridge as integers (see docs/DESIGN.md: the C++ side is torch-free).
template <typename T>
inline T* ptr(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

}  // namespace kimivl
