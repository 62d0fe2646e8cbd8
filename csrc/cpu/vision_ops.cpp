// Fused vision ops: argument checks, ISA choice and threading; vision_ops_impl.h does the math.
#include "cpu/vision_ops.h"

#include <algorithm>
#include <string>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

namespace kimivl {
namespace {

VisionKernels select_kernels() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))  // as CMake's ISA flags
  if (selected_isa() == Isa::kAvx512Vnni) return vision_kernels_avx512();
  if (selected_isa() != Isa::kPortable && isa_supported(Isa::kAvx2)) return vision_kernels_avx2();
#endif
  return vision_kernels_portable();
}

bool float_or_bf16(DType t) { return t == DType::kFloat32 || t == DType::kBFloat16; }

// Rows per work item: about 16K elements, so a thread's share is worth the hand-off.
int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)); }

}  // namespace

void add_layer_norm(const AddLayerNormParams& p) {
  const std::string op = "add_layer_norm: ";
  check(p.x && p.gamma && p.out, op + "null data pointer");
  check(p.rows >= 0 && p.dim >= 1, op + "rows must be >= 0 and dim >= 1");
  check(float_or_bf16(p.out_dtype), op + "out must be float32 or bfloat16");
  check(p.x_row >= p.dim && p.out_row >= p.dim, op + "row strides shorter than the rows");
  check(!p.delta_bias || p.delta, op + "delta_bias needs delta");
  if (p.delta) {
    check(float_or_bf16(p.delta_dtype), op + "delta must be float32 or bfloat16");
    check(p.delta_row >= p.dim, op + "delta row stride shorter than the rows");
  }
  check(p.eps > 0.0f, op + "eps must be > 0");
  const auto run = select_kernels().add_layer_norm;
  parallel_for(p.rows, row_grain(p.dim), std::max(p.num_threads, 1),
               [&](int64_t r0, int64_t r1) { run(p, r0, r1); });
}

void bias_gelu(const BiasGeluParams& p) {
  const std::string op = "bias_gelu: ";
  check(p.y != nullptr, op + "null data pointer");
  check(float_or_bf16(p.dtype), op + "y must be float32 or bfloat16");
  check(p.rows >= 0 && p.dim >= 1, op + "rows must be >= 0 and dim >= 1");
  check(p.y_row >= p.dim, op + "row stride shorter than the rows");
  const auto run = select_kernels().bias_gelu;
  parallel_for(p.rows, row_grain(p.dim), std::max(p.num_threads, 1),
               [&](int64_t r0, int64_t r1) { run(p, r0, r1); });
}

void bias_rope(const BiasRopeParams& p) {
  const std::string op = "bias_rope: ";
  check(p.qkv && p.cos_table && p.sin_table, op + "null data pointer");
  check(float_or_bf16(p.dtype), op + "qkv must be float32 or bfloat16");
  check(p.rows >= 0 && p.heads >= 1, op + "rows must be >= 0 and heads >= 1");
  check(p.head_dim >= 2 && p.head_dim % 2 == 0,
        op + "head_dim must be even and >= 2, got " + std::to_string(p.head_dim));
  check(p.qkv_row >= 3 * p.heads * p.head_dim, op + "qkv row stride shorter than q, k and v");
  const auto run = select_kernels().bias_rope;
  parallel_for(p.rows, row_grain(3 * p.heads * p.head_dim), std::max(p.num_threads, 1),
               [&](int64_t r0, int64_t r1) { run(p, r0, r1); });
}

}  // namespace kimivl
