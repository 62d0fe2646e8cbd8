// The pybind11 module kimivl_local._C. Torch-free by design (see docs/DESIGN.md): entry points
// take raw pointers as integers, sizes and dtype enums; Python owns all memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/cpu_features.h"
#ifdef KIMIVL_WITH_CUDA
#include "cuda/cuda_info.h"
#endif

namespace py = pybind11;

void bind_attention_ops(py::module_& m);  // ops_attention.cpp
void bind_vision_ops(py::module_& m);     // ops_vision.cpp
void bind_quant_ops(py::module_& m);      // ops_quant.cpp
void bind_decode_layer_ops(py::module_& m);  // ops_decode_layer.cpp
#ifdef KIMIVL_WITH_CUDA
void bind_cuda_quant_ops(py::module_& m);      // cuda/ops_cuda_quant.cpp
void bind_cuda_attention_ops(py::module_& m);  // cuda/ops_cuda_attention.cpp
#endif

namespace {

py::dict cpu_feature_dict() {
  const kimivl::CpuFeatures& f = kimivl::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512_vnni"] = f.avx512_vnni;
  d["avx512_bf16"] = f.avx512_bf16;
  d["avx_vnni"] = f.avx_vnni;
  d["avx512_vbmi"] = f.avx512_vbmi;
  d["amx_bf16"] = f.amx_bf16;
  d["amx_permitted"] = f.amx_permitted;
  return d;
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = KIMIVL_CXX_COMPILER;
  info["cuda_mode"] = KIMIVL_CUDA_MODE;  // KIMIVL_CUDA at build time, and why CUDA is (not) here
  info["cuda_note"] = KIMIVL_CUDA_NOTE;
  info["cpu_features"] = cpu_feature_dict();
  py::list isas;
  for (auto isa : {kimivl::Isa::kAmx, kimivl::Isa::kAvx512Vnni, kimivl::Isa::kAvx2,
                   kimivl::Isa::kPortable})
    if (kimivl::isa_supported(isa)) isas.append(kimivl::isa_name(isa));
  info["cpu_isas_supported"] = isas;
  try {
    info["cpu_isa_selected"] = kimivl::isa_name(kimivl::selected_isa());
  } catch (const std::exception& e) {
    info["cpu_isa_selected"] = py::none();
    info["cpu_isa_error"] = e.what();
  }
#ifdef KIMIVL_WITH_CUDA
  info["cuda"] = true;
  py::list archs;
  std::string all = KIMIVL_CUDA_ARCHS;
  for (size_t start = 0; start <= all.size();) {
    size_t end = all.find(',', start);
    if (end == std::string::npos) end = all.size();
    if (end > start) archs.append(all.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
  info["cuda_compiler_version"] = KIMIVL_CUDA_COMPILER_VERSION;
  info["cuda_runtime_version"] = kimivl::cuda_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_archs"] = py::list();
#endif
  return info;
}

py::list cuda_devices() {
  py::list out;
#ifdef KIMIVL_WITH_CUDA
  std::string error;
  for (const auto& dev : kimivl::cuda_devices(&error)) {
    py::dict d;
    d["index"] = dev.index;
    d["name"] = dev.name;
    d["sm"] = dev.sm;
    d["total_memory"] = dev.total_memory;
    out.append(d);
  }
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kimivl-local compiled kernels (CPU always, CUDA when built with it)";
  m.def("build_info", &build_info,
        "Compiler, CPU features detected at run time, selected CPU kernel path, and whether CUDA "
        "code was compiled and for which architectures.");
  m.def("cuda_devices", &cuda_devices,
        "CUDA devices visible to the extension's CUDA runtime (empty without CUDA or a driver).");
  bind_attention_ops(m);
  bind_vision_ops(m);
  bind_quant_ops(m);
  bind_decode_layer_ops(m);
#ifdef KIMIVL_WITH_CUDA
  bind_cuda_quant_ops(m);
  bind_cuda_attention_ops(m);
#endif
}
