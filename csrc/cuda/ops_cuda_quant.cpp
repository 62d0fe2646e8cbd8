// Python bindings of the CUDA quantized matmul and MoE block (cuda/qgemm.cuh). Pointers are
// device addresses passed as integers, the stream is torch.cuda.current_stream().cuda_stream;
// kimivl_local/ops/ checks every tensor before calling. Nothing here synchronizes or allocates,
// so the calls can be captured in a CUDA graph. The GIL is released while launching.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "common.h"
#include "cuda/qgemm.cuh"

namespace py = pybind11;

namespace {

// (qweight, scales, zeros or 0, scale dtype, bits, out_features, in_features, kp, group_size),
// built by kimivl_local/ops/quant_matmul.py cuda_weight_args().
using WeightArgs = std::array<int64_t, 9>;

kimivl::CudaQWeight to_weight(const WeightArgs& a) {
  kimivl::CudaQWeight w;
  w.q = kimivl::ptr<const uint32_t>(a[0]);
  w.scales = kimivl::ptr<const uint16_t>(a[1]);
  w.zeros = a[2] ? kimivl::ptr<const uint8_t>(a[2]) : nullptr;
  const auto sd = static_cast<kimivl::DType>(a[3]);
  kimivl::check(sd == kimivl::DType::kBFloat16 || sd == kimivl::DType::kFloat16,
                "weight scales must be bfloat16 or float16");
  w.scale_bf16 = sd == kimivl::DType::kBFloat16;
  w.bits = static_cast<int>(a[4]);
  w.n = a[5];
  w.k = a[6];
  w.kp = a[7];
  w.group = a[8];
  return w;
}

kimivl::QPath to_path(int path) {
  kimivl::check(path >= 0 && path <= 2, "path must be 0 (auto), 1 (gemv) or 2 (tensor cores)");
  return static_cast<kimivl::QPath>(path);
}

}  // namespace

void bind_cuda_quant_ops(py::module_& m) {
  m.def(
      "cuda_quant_matmul",
      [](int64_t x, int x_dtype, int64_t rows, const WeightArgs& weight, int64_t y, int path,
         int64_t stream) {
        kimivl::cuda_quant_matmul(kimivl::ptr<const void>(x), static_cast<kimivl::DType>(x_dtype),
                                  rows, to_weight(weight), kimivl::ptr<void>(y), to_path(path),
                                  stream);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("rows"), py::arg("weight"), py::arg("y"),
      py::arg("path"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "y[rows, N] = x[rows, K] . W^T on the GPU (x, y bf16 or fp16) for a weight in "
      "kimivl_local.quant.cuda_layout's layout; path 0 auto, 1 GEMV, 2 tensor cores.");
  m.def(
      "cuda_moe_workspace_bytes",
      [](int64_t tokens, int64_t top_k, int64_t experts, int64_t hidden, int64_t inter,
         int path) {
        return kimivl::cuda_moe_workspace_bytes(tokens, top_k, experts, hidden, inter,
                                                to_path(path));
      },
      py::arg("tokens"), py::arg("top_k"), py::arg("experts"), py::arg("hidden"),
      py::arg("inter"), py::arg("path"),
      "Bytes of device workspace cuda_moe_block needs for these sizes and path.");
  m.def(
      "cuda_moe_block",
      [](int64_t x, int x_dtype, int64_t tokens, int64_t topk_ids, int64_t topk_weights,
         int64_t top_k, int64_t num_experts, const WeightArgs& w13, const WeightArgs& w2,
         int64_t y, int64_t workspace, int64_t workspace_bytes, int path, int64_t stream) {
        kimivl::cuda_moe_block(kimivl::ptr<const void>(x), static_cast<kimivl::DType>(x_dtype),
                               tokens, kimivl::ptr<const int32_t>(topk_ids),
                               kimivl::ptr<const float>(topk_weights), top_k, num_experts,
                               to_weight(w13), to_weight(w2), kimivl::ptr<void>(y),
                               kimivl::ptr<void>(workspace), workspace_bytes, to_path(path),
                               stream);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("tokens"), py::arg("topk_ids"),
      py::arg("topk_weights"), py::arg("top_k"), py::arg("num_experts"), py::arg("w13"),
      py::arg("w2"), py::arg("y"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("path"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Routed experts on the GPU: y[t] = sum_j weight[t, j] * down(silu(gate(x[t])) * up(x[t])) "
      "of expert topk_ids[t, j] (int32), stacked weights in the CUDA layout; ids outside [0, E) "
      "contribute nothing.");
}
