// Python bindings of the CUDA attention kernels. Device pointers arrive as integers, strides in
// elements, dtypes as csrc/common.h codes and the stream as
// torch.cuda.current_stream().cuda_stream; kimivl_local/ops/attention.py and ops/mla.py check the
// tensors first. Launches are asynchronous (no device synchronization: CUDA-graph capturable).
// The GIL is released during the launch. Plain C++ (no CUDA headers: CMake gives .cpp files no
// CUDA include path); CUDA errors become std::runtime_error in the .cu launchers (cuda_common.cuh).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "cuda/mla_decode.cuh"
#include "cuda/varlen_attention.cuh"

namespace py = pybind11;

using Strides = std::array<int64_t, 2>;

void bind_cuda_attention_ops(py::module_& m) {
  m.def(
      "cuda_varlen_attention",
      [](int64_t q, int64_t k, int64_t v, int64_t out, int dtype, int64_t cu_seqlens,
         int64_t num_seqs, int64_t max_seqlen, int64_t heads, int64_t head_dim, int64_t v_dim,
         Strides q_strides, Strides k_strides, Strides v_strides, Strides out_strides, bool causal,
         double scale, int64_t stream) {
        kimivl::CudaVarlenParams p;
        p.q = kimivl::ptr<const void>(q);
        p.k = kimivl::ptr<const void>(k);
        p.v = kimivl::ptr<const void>(v);
        p.out = kimivl::ptr<void>(out);
        p.dtype = static_cast<kimivl::DType>(dtype);
        p.cu_seqlens = kimivl::ptr<const int32_t>(cu_seqlens);
        p.num_seqs = num_seqs;
        p.max_seqlen = max_seqlen;
        p.heads = heads;
        p.head_dim = head_dim;
        p.v_dim = v_dim;
        p.q_row = q_strides[0], p.q_head = q_strides[1];
        p.k_row = k_strides[0], p.k_head = k_strides[1];
        p.v_row = v_strides[0], p.v_head = v_strides[1];
        p.o_row = out_strides[0], p.o_head = out_strides[1];
        p.causal = causal;
        p.scale = static_cast<float>(scale);
        kimivl::cuda_varlen_attention(p, stream);
      },
      py::call_guard<py::gil_scoped_release>(), py::kw_only(), py::arg("q"), py::arg("k"),
      py::arg("v"), py::arg("out"), py::arg("dtype"), py::arg("cu_seqlens"), py::arg("num_seqs"),
      py::arg("max_seqlen"), py::arg("heads"), py::arg("head_dim"), py::arg("v_dim"),
      py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"),
      py::arg("causal"), py::arg("scale"), py::arg("stream"),
      "CUDA varlen attention: q/k [T, H, head_dim], v/out [T, H, v_dim] on the device (fp16, or "
      "bf16 on sm_80+; last dim contiguous, (token, head) strides in elements; dims <= 256), "
      "cu_seqlens int32 [num_seqs + 1] on the device, max_seqlen >= every length; launched on "
      "`stream` without synchronizing.");

  m.def(
      "cuda_mla_decode",
      [](int64_t q_lat, int64_t q_pe, int q_dtype, int64_t cache, int cache_dtype,
         int64_t seq_lens, int64_t out, int64_t ws_o, int64_t ws_ml, int64_t batch, int64_t heads,
         int64_t rank, int64_t rope, int64_t capacity, int64_t max_seq_len, int64_t num_splits,
         Strides q_lat_strides, Strides q_pe_strides, Strides cache_strides, Strides out_strides,
         double scale, int64_t stream) {
        kimivl::CudaMlaDecodeParams p;
        p.q_lat = kimivl::ptr<const void>(q_lat);
        p.q_pe = kimivl::ptr<const void>(q_pe);
        p.q_dtype = static_cast<kimivl::DType>(q_dtype);
        p.cache = kimivl::ptr<const void>(cache);
        p.cache_dtype = static_cast<kimivl::DType>(cache_dtype);
        p.seq_lens = kimivl::ptr<const int32_t>(seq_lens);
        p.out = kimivl::ptr<float>(out);
        p.ws_o = kimivl::ptr<float>(ws_o);
        p.ws_ml = kimivl::ptr<float>(ws_ml);
        p.batch = batch;
        p.heads = heads;
        p.rank = rank;
        p.rope = rope;
        p.capacity = capacity;
        p.max_seq_len = max_seq_len;
        p.num_splits = num_splits;
        p.q_lat_batch = q_lat_strides[0], p.q_lat_head = q_lat_strides[1];
        p.q_pe_batch = q_pe_strides[0], p.q_pe_head = q_pe_strides[1];
        p.cache_batch = cache_strides[0], p.cache_row = cache_strides[1];
        p.out_batch = out_strides[0], p.out_head = out_strides[1];
        p.scale = static_cast<float>(scale);
        return std::string(kimivl::cuda_mla_decode(p, stream));
      },
      py::call_guard<py::gil_scoped_release>(), py::kw_only(), py::arg("q_lat"), py::arg("q_pe"),
      py::arg("q_dtype"), py::arg("cache"), py::arg("cache_dtype"), py::arg("seq_lens"),
      py::arg("out"), py::arg("ws_o"), py::arg("ws_ml"), py::arg("batch"), py::arg("heads"),
      py::arg("rank"), py::arg("rope"), py::arg("capacity"), py::arg("max_seq_len"),
      py::arg("num_splits"), py::arg("q_lat_strides"), py::arg("q_pe_strides"),
      py::arg("cache_strides"), py::arg("out_strides"), py::arg("scale"), py::arg("stream"),
      "CUDA absorbed MLA decode (split-K + log-sum-exp merge): q_lat [B, H, rank], q_pe [B, H, "
      "rope] (fp32/bf16/fp16), cache [B, capacity, rank + rope] (fp32/bf16/fp16), seq_lens int32 "
      "[B] on the device, out fp32 [B, H, rank]; workspaces ws_o fp32 [B, num_splits, H, rank] "
      "and ws_ml fp32 [B, num_splits, H, 2] (contiguous); last dims contiguous, strides in "
      "elements. Returns the path taken ('tensor_core' or 'simt').");
}
