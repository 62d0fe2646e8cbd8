// Fused elementwise ops of the MoonViT block on the CPU fast path, where activations are stored
// in bf16 between the bf16 matmuls and the math inside each op is fp32:
//   add_layer_norm: x += delta + delta_bias (the fp32 residual stream), out = LayerNorm(x)
//   bias_gelu:      y = gelu_tanh(y + bias), in place
//   bias_rope:      qkv += bias, then q and k rotated by the 2D RoPE table, in place
// Each one pass over its rows, so the glue no longer costs more than the matmuls (torch's bias
// add, GELU, LayerNorm and dtype conversions took 150 ms a block at 1296 patches, 2 threads).
// Torch-free, like the other kernels: raw pointers, element strides, dtype enums.
#pragma once
#include <cstdint>

#include "common.h"

namespace kimivl {

struct AddLayerNormParams {
  float* x;            // [rows, dim] fp32, row stride x_row; updated in place when delta is set
  const void* delta;   // [rows, dim] fp32/bf16 or null, row stride delta_row
  DType delta_dtype;
  const float* delta_bias;  // [dim] or null (needs delta)
  const float* gamma;  // [dim]
  const float* beta;   // [dim] or null
  void* out;           // [rows, dim] fp32/bf16, row stride out_row
  DType out_dtype;
  int64_t rows, dim, x_row, delta_row, out_row;
  float eps;
  int num_threads;
};

struct BiasGeluParams {
  void* y;             // [rows, dim] fp32/bf16, row stride y_row, in place
  DType dtype;
  const float* bias;   // [dim] or null
  int64_t rows, dim, y_row;
  int num_threads;
};

// Row t of qkv holds `heads` heads of head_dim for q, then for k, then for v (any more columns
// follow). All 3 * heads * head_dim columns get the bias; the first 2 * heads heads (q and k)
// are rotated: pair (2j, 2j+1) -> (a cos - b sin, a sin + b cos) with cos/sin from row t of
// the tables given interleaved: cos_table[t, 2j] = cos_table[t, 2j+1] = cos_j and
// sin_table[t, 2j] = -sin_j, sin_table[t, 2j+1] = +sin_j.
struct BiasRopeParams {
  void* qkv;           // [rows, >= 3 * heads * head_dim] fp32/bf16, row stride qkv_row
  DType dtype;
  const float* bias;   // [3 * heads * head_dim] or null
  const float* cos_table;  // [rows, head_dim] contiguous
  const float* sin_table;  // [rows, head_dim] contiguous
  int64_t rows, heads, head_dim, qkv_row;
  int num_threads;
};

// Validate (std::invalid_argument naming the field), then run on the ISA path chosen by
// selected_isa(), rows split across threads.
void add_layer_norm(const AddLayerNormParams& p);
void bias_gelu(const BiasGeluParams& p);
void bias_rope(const BiasRopeParams& p);

// One ISA's row kernels: rows [r0, r1).
struct VisionKernels {
  void (*add_layer_norm)(const AddLayerNormParams&, int64_t r0, int64_t r1);
  void (*bias_gelu)(const BiasGeluParams&, int64_t r0, int64_t r1);
  void (*bias_rope)(const BiasRopeParams&, int64_t r0, int64_t r1);
};

VisionKernels vision_kernels_portable();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
VisionKernels vision_kernels_avx2();
VisionKernels vision_kernels_avx512();
#endif

}  // namespace kimivl
