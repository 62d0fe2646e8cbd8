// One CPU decode step (one token) of a whole decoder layer in one call: the glue between the
// quantized kernels (norms, RoPE, latent-cache write, router top-k, SiLU*mul, residuals) runs in
// C++ instead of ~80 dispatched torch ops. The math and every rounding point follow the torch
// path of kimivl_local/model/{layers,mla,moe,language}.py: activations are rounded to the model
// dtype (`act`) wherever torch would hold them in that dtype, so a bf16 model gives the same
// values up to fp32 summation order. Torch-free like every kernel: Python owns all memory and
// keeps the weights alive while a DecodeLayerSpec points at them.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu/qgemm.h"

namespace kimivl {

// Sigmoid router with noaux_tc group-limited top-k (model/moe.py Router), fp32.
struct RouterSpec {
  const float* weight = nullptr;  // [experts, hidden] fp32
  const float* bias = nullptr;    // [experts] fp32 e_score_correction_bias (choice only)
  int64_t experts = 0, hidden = 0, top_k = 0, n_group = 1, topk_group = 1;
  bool norm_topk_prob = true;
  float scaling = 1.0f;
};

struct DecodeLayerSpec {
  DType act = DType::kBFloat16;  // the model dtype (bf16 or fp32); norm weights are in it
  int64_t hidden = 0, heads = 0, nope = 0, rope = 0, v_dim = 0, rank = 0;
  float rms_eps = 1e-6f, kv_eps = 1e-6f, scale = 1.0f;
  const void* input_norm = nullptr;  // [hidden]
  const void* post_norm = nullptr;   // [hidden]
  const void* kv_norm = nullptr;     // [rank]
  QWeight q_proj, kv_a_proj, o_proj;
  const void* w_uk = nullptr;    // [heads, nope, rank] contiguous
  const void* w_uv_t = nullptr;  // [heads, rank, v_dim] contiguous
  DType kv_b_dtype = DType::kBFloat16;
  // The dense SwiGLU MLP of a dense layer, or the shared experts of an MoE layer.
  QWeight gate_proj, up_proj, down_proj;
  bool moe = false;
  RouterSpec router;
  QWeight w13, w2;  // routed experts [E, 2I, H], [E, H, I]
};

// Throws std::invalid_argument naming the field when the spec is inconsistent.
void validate(const DecodeLayerSpec& spec);

// Where one step reads and writes. x [hidden] in spec.act is updated in place; cos/sin [rope/2]
// fp32 are the RoPE angles of `position`; cache [capacity, rank + rope] (row-contiguous) gets the
// token's latent at row `position` and is attended over rows [0, position].
struct DecodeStep {
  void* x = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  void* cache = nullptr;
  DType cache_dtype = DType::kBFloat16;
  int64_t capacity = 0, position = 0;
  int num_threads = 1;
};

void decode_layer(const DecodeLayerSpec& spec, const DecodeStep& step);

// Expert choice and weights of one token: ids[top_k] (ascending choice rank) and weights[top_k].
// Ties in the choice go to the lower expert id (torch.topk on the CPU leaves them unspecified).
void router_topk(const RouterSpec& r, const float* x, int32_t* ids, float* weights,
                 int num_threads);

}  // namespace kimivl
