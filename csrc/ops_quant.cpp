// Python bindings of the quantized matmul and the MoE expert block (csrc/cpu/qgemm.h).
// Pointers arrive as integers; kimivl_local/ops/ checks every tensor before calling. The GIL is
// released while the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "common.h"
#include "cpu/qgemm.h"
#include "cpu/repack.h"
#include "weight_args.h"

namespace py = pybind11;

using kimivl::to_qweight;
using kimivl::WeightArgs;

void bind_quant_ops(py::module_& m) {
  m.def(
      "quant_matmul",
      [](int64_t x, int x_dtype, int64_t rows, const WeightArgs& weight, int64_t y, int y_dtype,
         int num_threads) {
        kimivl::quant_matmul(kimivl::ptr<const void>(x), static_cast<kimivl::DType>(x_dtype), rows,
                             to_qweight(weight), kimivl::ptr<void>(y),
                             static_cast<kimivl::DType>(y_dtype), num_threads);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("weight"), py::arg("y"),
      py::arg("y_dtype"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "y[rows, N] = x[rows, K] . W^T for a weight in kimivl_local.quant.cpu_layout's layout.");
  m.def(
      "moe_block",
      [](int64_t x, int x_dtype, int64_t tokens, int64_t topk_ids,
         int64_t topk_weights, int64_t top_k, int64_t num_experts, const WeightArgs& w13,
         const WeightArgs& w2, int64_t y, int y_dtype, int num_threads) {
        kimivl::moe_block(kimivl::ptr<const void>(x), static_cast<kimivl::DType>(x_dtype), tokens,
                          kimivl::ptr<const int32_t>(topk_ids),
                          kimivl::ptr<const float>(topk_weights), top_k, num_experts,
                          to_qweight(w13), to_qweight(w2), kimivl::ptr<void>(y),
                          static_cast<kimivl::DType>(y_dtype), num_threads);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("tokens"), py::arg("topk_ids"),
      py::arg("topk_weights"), py::arg("top_k"), py::arg("num_experts"), py::arg("w13"),
      py::arg("w2"), py::arg("y"), py::arg("y_dtype"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "Routed experts: y[t] = sum_j weight[t, j] * down(silu(gate(x[t])) * up(x[t])) of expert "
      "topk_ids[t, j], for stacked weights in the CPU layout.");
  m.def(
      "repack_rows",
      [](int64_t src, int64_t src_row_bytes, int64_t rows, int64_t k_valid, int bits, int64_t dst,
         int64_t kc, int64_t row0, int num_threads) {
        kimivl::repack_rows(kimivl::ptr<const uint8_t>(src), src_row_bytes, rows, k_valid, bits,
                            kimivl::ptr<uint8_t>(dst), kc, row0, num_threads);
      },
      py::arg("src"), py::arg("src_row_bytes"), py::arg("rows"), py::arg("k_valid"),
      py::arg("bits"), py::arg("dst"), py::arg("kc"), py::arg("row0"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>(),
      "Rows [row0, row0 + rows) of a CPU-layout qweight [NB, KC, 64 * bits] from on-disk "
      "pack-quantized rows (kimivl_local/quant/cpu_layout.py).");
}
