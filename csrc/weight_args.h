// A quantized weight as the bindings receive it: the 9 integers that
// kimivl_local/ops/quant_matmul.py weight_args() builds, turned into the CPU kernels' QWeight.
#pragma once

#include <array>
#include <cstdint>

#include "common.h"
#include "cpu/qgemm.h"

namespace kimivl {

// (qweight, scales, zeros or 0, scale dtype, bits, out_features, in_features, kp, group_size)
using WeightArgs = std::array<int64_t, 9>;

inline QWeight to_qweight(const WeightArgs& a) {
  QWeight w;
  w.q = ptr<const uint8_t>(a[0]);
  w.scales = ptr<const uint16_t>(a[1]);
  w.zeros = a[2] ? ptr<const int8_t>(a[2]) : nullptr;
  w.scale_dtype = static_cast<DType>(a[3]);
  w.bits = static_cast<int>(a[4]);
  w.n = a[5];
  w.k = a[6];
  w.kp = a[7];
  w.group = a[8];
  return w;
}

}  // namespace kimivl
