// Python bindings of the fused vision ops (cpu/vision_ops.h). Pointers arrive as integers, strides
// in elements; kimivl_local/ops/vision_ops.py checks the tensors first. The GIL is released while
// a kernel runs.
#include <pybind11/pybind11.h>

#include "cpu/vision_ops.h"

namespace py = pybind11;

void bind_vision_ops(py::module_& m) {
  m.def(
      "add_layer_norm",
      [](int64_t x, int64_t delta, int delta_dtype, int64_t delta_bias, int64_t gamma,
         int64_t beta, int64_t out, int out_dtype, int64_t rows, int64_t dim, int64_t x_row,
         int64_t delta_row, int64_t out_row, double eps, int num_threads) {
        kimivl::AddLayerNormParams p;
        p.x = kimivl::ptr<float>(x);
        p.delta = kimivl::ptr<const void>(delta);
        p.delta_dtype = static_cast<kimivl::DType>(delta_dtype);
        p.delta_bias = kimivl::ptr<const float>(delta_bias);
        p.gamma = kimivl::ptr<const float>(gamma);
        p.beta = kimivl::ptr<const float>(beta);
        p.out = kimivl::ptr<void>(out);
        p.out_dtype = static_cast<kimivl::DType>(out_dtype);
        p.rows = rows, p.dim = dim, p.x_row = x_row, p.delta_row = delta_row, p.out_row = out_row;
        p.eps = static_cast<float>(eps);
        p.num_threads = num_threads;
        kimivl::add_layer_norm(p);
      },
      py::call_guard<py::gil_scoped_release>(), py::kw_only(), py::arg("x"), py::arg("delta"),
      py::arg("delta_dtype"), py::arg("delta_bias"), py::arg("gamma"), py::arg("beta"),
      py::arg("out"), py::arg("out_dtype"), py::arg("rows"), py::arg("dim"), py::arg("x_row"),
      py::arg("delta_row"), py::arg("out_row"), py::arg("eps"), py::arg("num_threads"),
      "x [rows, dim] fp32 += delta (fp32/bf16, 0 = none) + delta_bias (fp32, 0 = none), then "
      "out (fp32/bf16) = LayerNorm(x) * gamma + beta (0 = none), fp32 math.");

  m.def(
      "bias_gelu",
      [](int64_t y, int dtype, int64_t bias, int64_t rows, int64_t dim, int64_t y_row,
         int num_threads) {
        kimivl::BiasGeluParams p;
        p.y = kimivl::ptr<void>(y);
        p.dtype = static_cast<kimivl::DType>(dtype);
        p.bias = kimivl::ptr<const float>(bias);
        p.rows = rows, p.dim = dim, p.y_row = y_row;
        p.num_threads = num_threads;
        kimivl::bias_gelu(p);
      },
      py::call_guard<py::gil_scoped_release>(), py::kw_only(), py::arg("y"), py::arg("dtype"),
      py::arg("bias"), py::arg("rows"), py::arg("dim"), py::arg("y_row"), py::arg("num_threads"),
      "y [rows, dim] (fp32/bf16) = gelu_tanh(y + bias) in place (bias fp32, 0 = none).");

  m.def(
      "bias_rope",
      [](int64_t qkv, int dtype, int64_t bias, int64_t cos_table, int64_t sin_table, int64_t rows,
         int64_t heads, int64_t head_dim, int64_t qkv_row, int num_threads) {
        kimivl::BiasRopeParams p;
        p.qkv = kimivl::ptr<void>(qkv);
        p.dtype = static_cast<kimivl::DType>(dtype);
        p.bias = kimivl::ptr<const float>(bias);
        p.cos_table = kimivl::ptr<const float>(cos_table);
        p.sin_table = kimivl::ptr<const float>(sin_table);
        p.rows = rows, p.heads = heads, p.head_dim = head_dim, p.qkv_row = qkv_row;
        p.num_threads = num_threads;
        kimivl::bias_rope(p);
      },
      py::call_guard<py::gil_scoped_release>(), py::kw_only(), py::arg("qkv"), py::arg("dtype"),
      py::arg("bias"), py::arg("cos_table"), py::arg("sin_table"), py::arg("rows"),
      py::arg("heads"), py::arg("head_dim"), py::arg("qkv_row"), py::arg("num_threads"),
      "qkv [rows, 3 * heads * head_dim] (fp32/bf16) += bias, then q and k heads rotated by the "
      "interleaved 2D RoPE tables [rows, head_dim], in place.");
}
