// Python bindings of the CPU attention kernels. Pointers arrive as integers and strides in
// elements (see docs/DESIGN.md); kimivl_local/ops/attention.py and ops/mla.py check the tensors
// first. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "cpu/attention.h"
#include "cpu/head_gemv.h"

namespace py = pybind11;

using Strides = std::array<int64_t, 2>;

void bind_attention_ops(py::module_& m) {
  m.def(
      "varlen_attention",
      [](int64_t q, int64_t k, int64_t v, int64_t out, int dtype, int64_t cu_seqlens,
         int64_t num_seqs, int64_t total_tokens, int64_t heads, int64_t head_dim, int64_t v_dim,
         Strides q_strides, Strides k_strides, Strides v_strides, Strides out_strides, bool causal,
         double scale, int num_threads) {
        kimivl::VarlenAttentionParams p;
        p.q = kimivl::ptr<const void>(q);
        p.k = kimivl::ptr<const void>(k);
        p.v = kimivl::ptr<const void>(v);
        p.out = kimivl::ptr<void>(out);
        p.dtype = static_cast<kimivl::DType>(dtype);
        p.cu_seqlens = kimivl::ptr<const int64_t>(cu_seqlens);
        p.num_seqs = num_seqs;
        p.total_tokens = total_tokens;
        p.heads = heads;
        p.head_dim = head_dim;
        p.v_dim = v_dim;
        p.q_row = q_strides[0], p.q_head = q_strides[1];
        p.k_row = k_strides[0], p.k_head = k_strides[1];
        p.v_row = v_strides[0], p.v_head = v_strides[1];
        p.o_row = out_strides[0], p.o_head = out_strides[1];
        p.causal = causal;
        p.scale = static_cast<float>(scale);
        p.num_threads = num_threads;
        kimivl::varlen_attention(p);
      },
      py::call_guard<py::gil_scoped_release>(), py::kw_only(), py::arg("q"), py::arg("k"),
      py::arg("v"), py::arg("out"), py::arg("dtype"), py::arg("cu_seqlens"), py::arg("num_seqs"),
      py::arg("total_tokens"), py::arg("heads"), py::arg("head_dim"), py::arg("v_dim"),
      py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"),
      py::arg("causal"), py::arg("scale"), py::arg("num_threads"),
      "Varlen attention over packed sequences: q/k/v/out [T, H, D] (fp32 or bf16, last dim "
      "contiguous, (token, head) strides in elements), cu_seqlens int64 [num_seqs + 1].");

  m.def(
      "mla_decode",
      [](int64_t q_lat, int64_t q_pe, int64_t cache, int cache_dtype, int64_t seq_lens,
         int64_t out, int64_t batch, int64_t heads, int64_t rank, int64_t rope, int64_t capacity,
         Strides q_lat_strides, Strides q_pe_strides, Strides cache_strides, Strides out_strides,
         double scale, int num_threads) {
        kimivl::MlaDecodeParams p;
        p.q_lat = kimivl::ptr<const float>(q_lat);
        p.q_pe = kimivl::ptr<const float>(q_pe);
        p.cache = kimivl::ptr<const void>(cache);
        p.cache_dtype = static_cast<kimivl::DType>(cache_dtype);
        p.seq_lens = kimivl::ptr<const int64_t>(seq_lens);
        p.out = kimivl::ptr<float>(out);
        p.batch = batch;
        p.heads = heads;
        p.rank = rank;
        p.rope = rope;
        p.capacity = capacity;
        p.q_lat_batch = q_lat_strides[0], p.q_lat_head = q_lat_strides[1];
        p.q_pe_batch = q_pe_strides[0], p.q_pe_head = q_pe_strides[1];
        p.cache_batch = cache_strides[0], p.cache_row = cache_strides[1];
        p.out_batch = out_strides[0], p.out_head = out_strides[1];
        p.scale = static_cast<float>(scale);
        p.num_threads = num_threads;
        kimivl::mla_decode(p);
      },
      py::call_guard<py::gil_scoped_release>(), py::kw_only(), py::arg("q_lat"), py::arg("q_pe"),
      py::arg("cache"), py::arg("cache_dtype"), py::arg("seq_lens"), py::arg("out"),
      py::arg("batch"), py::arg("heads"), py::arg("rank"), py::arg("rope"), py::arg("capacity"),
      py::arg("q_lat_strides"), py::arg("q_pe_strides"), py::arg("cache_strides"),
      py::arg("out_strides"), py::arg("scale"), py::arg("num_threads"),
      "Absorbed MLA decode: q_lat [B, H, rank] and q_pe [B, H, rope] fp32, cache [B, capacity, "
      "rank + rope] fp32 or bf16 (last dim contiguous), seq_lens int64 [B], out fp32 [B, H, "
      "rank]; (batch, head/token) strides in elements.");

  m.def(
      "head_gemv",
      [](int64_t x, int64_t w, int w_dtype, int64_t y, int64_t heads, int64_t k, int64_t n,
         int64_t x_head, int64_t y_head, int num_threads) {
        kimivl::HeadGemvParams p;
        p.x = kimivl::ptr<const float>(x);
        p.w = kimivl::ptr<const void>(w);
        p.w_dtype = static_cast<kimivl::DType>(w_dtype);
        p.y = kimivl::ptr<float>(y);
        p.heads = heads, p.k = k, p.n = n, p.x_head = x_head, p.y_head = y_head;
        p.num_threads = num_threads;
        kimivl::head_gemv(p);
      },
      py::call_guard<py::gil_scoped_release>(), py::kw_only(), py::arg("x"), py::arg("w"),
      py::arg("w_dtype"), py::arg("y"), py::arg("heads"), py::arg("k"), py::arg("n"),
      py::arg("x_head"), py::arg("y_head"), py::arg("num_threads"),
      "y[h, :] = x[h, :] . w[h] for x fp32 [H, K], w [H, K, N] fp32 or bf16 (contiguous), "
      "y fp32 [H, N]; row strides in elements.");
}
