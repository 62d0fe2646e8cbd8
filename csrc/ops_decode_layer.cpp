// Python bindings of the fused CPU decode layer (csrc/cpu/decode_layer.h). A DecodeLayer is
// built once per decoder layer from a dict of pointers and sizes that kimivl_local/ops/
// decode_layer.py assembles (and whose tensors it keeps alive); a step runs every layer in one
// call with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/decode_layer.h"
#include "weight_args.h"

namespace py = pybind11;

namespace {

template <typename T>
T get(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::invalid_argument(std::string("decode_layer: missing ") + key);
  return d[key].cast<T>();
}

kimivl::QWeight qweight(const py::dict& d, const char* key) {
  return kimivl::to_qweight(get<kimivl::WeightArgs>(d, key));
}

kimivl::RouterSpec router(const py::dict& d) {
  kimivl::RouterSpec r;
  r.weight = kimivl::ptr<const float>(get<int64_t>(d, "weight"));
  r.bias = kimivl::ptr<const float>(get<int64_t>(d, "bias"));
  r.experts = get<int64_t>(d, "experts");
  r.hidden = get<int64_t>(d, "hidden");
  r.top_k = get<int64_t>(d, "top_k");
  r.n_group = get<int64_t>(d, "n_group");
  r.topk_group = get<int64_t>(d, "topk_group");
  r.norm_topk_prob = get<bool>(d, "norm_topk_prob");
  r.scaling = get<float>(d, "scaling");
  return r;
}

kimivl::DecodeLayerSpec layer_spec(const py::dict& d) {
  kimivl::DecodeLayerSpec s;
  s.act = static_cast<kimivl::DType>(get<int>(d, "act_dtype"));
  s.hidden = get<int64_t>(d, "hidden");
  s.heads = get<int64_t>(d, "heads");
  s.nope = get<int64_t>(d, "nope");
  s.rope = get<int64_t>(d, "rope");
  s.v_dim = get<int64_t>(d, "v_dim");
  s.rank = get<int64_t>(d, "rank");
  s.rms_eps = get<float>(d, "rms_eps");
  s.kv_eps = get<float>(d, "kv_eps");
  s.scale = get<float>(d, "scale");
  s.input_norm = kimivl::ptr<const void>(get<int64_t>(d, "input_norm"));
  s.post_norm = kimivl::ptr<const void>(get<int64_t>(d, "post_norm"));
  s.kv_norm = kimivl::ptr<const void>(get<int64_t>(d, "kv_norm"));
  s.q_proj = qweight(d, "q_proj");
  s.kv_a_proj = qweight(d, "kv_a_proj");
  s.o_proj = qweight(d, "o_proj");
  s.w_uk = kimivl::ptr<const void>(get<int64_t>(d, "w_uk"));
  s.w_uv_t = kimivl::ptr<const void>(get<int64_t>(d, "w_uv_t"));
  s.kv_b_dtype = static_cast<kimivl::DType>(get<int>(d, "kv_b_dtype"));
  s.gate_proj = qweight(d, "gate_proj");
  s.up_proj = qweight(d, "up_proj");
  s.down_proj = qweight(d, "down_proj");
  s.moe = d.contains("router");
  if (s.moe) {
    s.router = router(d["router"].cast<py::dict>());
    s.w13 = qweight(d, "w13");
    s.w2 = qweight(d, "w2");
  }
  kimivl::validate(s);
  return s;
}

}  // namespace

void bind_decode_layer_ops(py::module_& m) {
  py::class_<kimivl::DecodeLayerSpec>(m, "DecodeLayer",
                                      "One decoder layer's weights and constants for "
                                      "decode_layers (pointers: the caller keeps the tensors).")
      .def(py::init(&layer_spec), py::arg("spec"));
  m.def(
      "decode_layers",
      [](const std::vector<const kimivl::DecodeLayerSpec*>& layers, int64_t x, int64_t cos,
         int64_t sin, int64_t cache, int cache_dtype, int64_t layer_stride, int64_t capacity,
         int64_t position, int num_threads) {
        kimivl::DecodeStep step;
        step.x = kimivl::ptr<void>(x);
        step.cos = kimivl::ptr<const float>(cos);
        step.sin = kimivl::ptr<const float>(sin);
        step.cache_dtype = static_cast<kimivl::DType>(cache_dtype);
        step.capacity = capacity;
        step.position = position;
        step.num_threads = num_threads;
        const int64_t elem = step.cache_dtype == kimivl::DType::kFloat32 ? 4 : 2;
        for (size_t i = 0; i < layers.size(); ++i) {
          step.cache = kimivl::ptr<void>(cache + static_cast<int64_t>(i) * layer_stride * elem);
          kimivl::decode_layer(*layers[i], step);
        }
      },
      py::arg("layers"), py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("cache"),
      py::arg("cache_dtype"), py::arg("layer_stride"), py::arg("capacity"), py::arg("position"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "One decode step (one token) through `layers` in order: x [hidden] updated in place, layer "
      "i's latent cache at cache + i * layer_stride elements ([capacity, rank + rope] rows).");
  m.def(
      "router_topk",
      [](const py::dict& spec, int64_t x, int64_t ids, int64_t weights, int num_threads) {
        const kimivl::RouterSpec r = router(spec);
        py::gil_scoped_release release;
        kimivl::router_topk(r, kimivl::ptr<const float>(x), kimivl::ptr<int32_t>(ids),
                            kimivl::ptr<float>(weights), num_threads);
      },
      py::arg("spec"), py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("num_threads"),
      "The fused layer's router for one token: x [hidden] fp32 -> ids [top_k] int32, weights "
      "[top_k] fp32 (ties in the choice go to the lower expert id).");
}
