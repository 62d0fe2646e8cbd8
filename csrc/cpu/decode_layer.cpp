// The fused CPU decode layer (decode_layer.h). Small ops are scalar C++ on the calling thread (a
// few thousand values each); the projections, the absorbed attention and the experts go through
// the existing kernels' C++ entry points, which use the shared thread pool.
#include "cpu/decode_layer.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "cpu/attention.h"
#include "cpu/head_gemv.h"
#include "cpu/parallel.h"

namespace kimivl {
namespace {

constexpr int64_t kMlaMinSplit = 128;  // mla_decode.cpp's kMinSplit

// Round v to the activation dtype, as torch does when it stores a result in that dtype.
inline float rnd(float v, DType act) {
  return act == DType::kBFloat16 ? bf16_to_float(float_to_bf16(v)) : v;
}

float load(const void* p, DType dt, int64_t i) {
  if (dt == DType::kFloat32) return static_cast<const float*>(p)[i];
  return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

void store(void* p, DType dt, int64_t i, float v) {
  if (dt == DType::kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  }
}

// layers.py RMSNorm: fp32 statistics, normed value rounded to act, times the weight, rounded.
void rms_norm(const float* x, int64_t n, const void* weight, DType act, float eps, float* out) {
  double squares = 0.0;
  for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float rstd = 1.0f / std::sqrt(static_cast<float>(squares / n) + eps);
  for (int64_t i = 0; i < n; ++i)
    out[i] = rnd(load(weight, act, i) * rnd(x[i] * rstd, act), act);
}

// layers.py RopeTables.apply on one head: pairs (x[2j], x[2j+1]) rotated by angle j, evens then
// odds, every product and sum rounded to act (cos/sin first rounded to act, as the tables are).
void rope_rotate(const float* x, int64_t dim, const float* cos, const float* sin, DType act,
                 float* out) {
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float c = rnd(cos[j], act), s = rnd(sin[j], act);
    const float a = x[2 * j], b = x[2 * j + 1];
    out[j] = rnd(rnd(a * c, act) + rnd(b * -s, act), act);
    out[half + j] = rnd(rnd(b * c, act) + rnd(a * s, act), act);
  }
}

float silu(float v) { return v / (1.0f + std::exp(-v)); }

// y[n] = x[k] . W^T through the quantized matmul, rounded to act (torch's output dtype).
void project(const QWeight& w, const float* x, float* y, DType act, int threads) {
  quant_matmul(x, DType::kFloat32, 1, w, y, DType::kFloat32, threads);
  if (act != DType::kFloat32)
    for (int64_t i = 0; i < w.n; ++i) y[i] = rnd(y[i], act);
}

// project() for two weights of one input in one parallel region (one pool wake-up, not two).
void project2(const QWeight& w0, const QWeight& w1, const float* x, float* y0, float* y1, DType act,
              int threads) {
  const QWeight ws[2] = {w0, w1};
  void* const ys[2] = {y0, y1};
  quant_matmul_multi(x, DType::kFloat32, 1, ws, ys, 2, DType::kFloat32, threads);
  if (act != DType::kFloat32) {
    for (int64_t i = 0; i < w0.n; ++i) y0[i] = rnd(y0[i], act);
    for (int64_t i = 0; i < w1.n; ++i) y1[i] = rnd(y1[i], act);
  }
}

// 16 independent fp32 sums (the compiler vectorizes them without reassociating), then fp64.
float dot(const float* a, const float* b, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[i + j] * b[i + j];
  double sum = 0.0;
  for (float v : lanes) sum += v;
  for (; i < n; ++i) sum += static_cast<double>(a[i]) * b[i];
  return static_cast<float>(sum);
}

// Per-thread buffers of the caller; sized on first use, reused every step.
struct Scratch {
  std::vector<float> x, h, q, q_pe, kv, latent, q_lat, o_lat, attn, proj, gate, up, mid, routed;
  std::vector<float> router_weights;
  std::vector<int32_t> router_ids;
};

void resize(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// Indices of the `count` largest values, ties to the lower index, largest first.
void top_indices(const float* v, int64_t n, int64_t count, int32_t* out) {
  for (int64_t r = 0; r < count; ++r) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      bool taken = false;
      for (int64_t q = 0; q < r; ++q) taken = taken || out[q] == i;
      if (!taken && (best < 0 || v[i] > v[best])) best = i;
    }
    out[r] = static_cast<int32_t>(best);
  }
}

}  // namespace

void router_topk(const RouterSpec& r, const float* x, int32_t* ids, float* weights,
                 int num_threads) {
  std::vector<float> scores(r.experts), choice(r.experts);
  // 64 x 2048 fp32 (512 KB a layer): split over the pool when it is worth a wake-up.
  parallel_for(r.experts, 8, r.experts * r.hidden >= (1 << 17) ? num_threads : 1,
               [&](int64_t begin, int64_t end) {
                 for (int64_t e = begin; e < end; ++e) {
                   const float logit = dot(x, r.weight + e * r.hidden, r.hidden);
                   scores[e] = 1.0f / (1.0f + std::exp(-logit));
                 }
               });
  for (int64_t e = 0; e < r.experts; ++e) choice[e] = scores[e] + r.bias[e];
  if (r.n_group > 1) {  // keep the topk_group groups with the largest sum of their top two
    const int64_t size = r.experts / r.n_group;
    std::vector<float> group_scores(r.n_group);
    for (int64_t g = 0; g < r.n_group; ++g) {
      int32_t two[2];
      top_indices(choice.data() + g * size, size, 2, two);
      group_scores[g] = choice[g * size + two[0]] + choice[g * size + two[1]];
    }
    std::vector<int32_t> keep(r.topk_group);
    top_indices(group_scores.data(), r.n_group, r.topk_group, keep.data());
    for (int64_t g = 0; g < r.n_group; ++g)
      if (std::find(keep.begin(), keep.end(), g) == keep.end())
        std::fill(choice.begin() + g * size, choice.begin() + (g + 1) * size, 0.0f);
  }
  top_indices(choice.data(), r.experts, r.top_k, ids);
  float sum = 0.0f;
  for (int64_t j = 0; j < r.top_k; ++j) {
    weights[j] = scores[ids[j]];
    sum += weights[j];
  }
  const bool normalise = r.norm_topk_prob && r.top_k > 1;
  for (int64_t j = 0; j < r.top_k; ++j)
    weights[j] = (normalise ? weights[j] / (sum + 1e-20f) : weights[j]) * r.scaling;
}

void validate(const DecodeLayerSpec& s) {
  const std::string op = "decode_layer: ";
  check(s.act == DType::kFloat32 || s.act == DType::kBFloat16,
        op + "activations must be float32 or bfloat16");
  check(s.kv_b_dtype == DType::kFloat32 || s.kv_b_dtype == DType::kBFloat16,
        op + "kv_b_proj must be float32 or bfloat16");
  check(s.hidden > 0 && s.heads > 0 && s.nope > 0 && s.rank > 0 && s.v_dim > 0,
        op + "hidden, heads, nope, rank and v_dim must be >= 1");
  check(s.rope > 0 && s.rope % 2 == 0, op + "rope must be even and >= 2");
  check(s.input_norm && s.post_norm && s.kv_norm && s.w_uk && s.w_uv_t,
        op + "null norm or kv_b_proj pointer");
  auto shape = [&](const QWeight& w, int64_t n, int64_t k, const char* name) {
    check(w.q != nullptr && w.n == n && w.k == k,
          op + name + " must be a quantized [" + std::to_string(n) + ", " + std::to_string(k) +
              "] weight, got [" + std::to_string(w.n) + ", " + std::to_string(w.k) + "]");
  };
  shape(s.q_proj, s.heads * (s.nope + s.rope), s.hidden, "q_proj");
  shape(s.kv_a_proj, s.rank + s.rope, s.hidden, "kv_a_proj_with_mqa");
  shape(s.o_proj, s.hidden, s.heads * s.v_dim, "o_proj");
  shape(s.gate_proj, s.gate_proj.n, s.hidden, "gate_proj");
  shape(s.up_proj, s.gate_proj.n, s.hidden, "up_proj");
  shape(s.down_proj, s.hidden, s.gate_proj.n, "down_proj");
  if (!s.moe) return;
  const RouterSpec& r = s.router;
  check(r.weight && r.bias, op + "null router weight or bias");
  check(r.hidden == s.hidden, op + "router hidden size must equal the model's");
  check(r.experts >= 1 && r.top_k >= 1 && r.top_k <= r.experts,
        op + "router needs 1 <= top_k <= experts");
  check(r.n_group >= 1 && r.experts % r.n_group == 0 && r.topk_group >= 1 &&
            r.topk_group <= r.n_group && (r.n_group == 1 || r.experts / r.n_group >= 2),
        op + "router groups must split the experts evenly, at least 2 per group");
  check(s.w13.q != nullptr && s.w2.q != nullptr && s.w13.k == s.hidden && s.w2.n == s.hidden,
        op + "routed experts must be quantized [E, 2I, hidden] and [E, hidden, I]");
}

void decode_layer(const DecodeLayerSpec& s, const DecodeStep& st) {
  check(st.x && st.cos && st.sin && st.cache, "decode_layer: null step pointer");
  check(st.cache_dtype == DType::kFloat32 || st.cache_dtype == DType::kBFloat16,
        "decode_layer: cache must be float32 or bfloat16");
  check(st.position >= 0 && st.position < st.capacity,
        "decode_layer: position " + std::to_string(st.position) + " outside the cache capacity " +
            std::to_string(st.capacity));
  thread_local Scratch w;
  const DType act = s.act;
  const int threads = std::max(st.num_threads, 1);
  const int64_t hd = s.nope + s.rope, latent_dim = s.rank + s.rope;
  const int64_t inter = s.gate_proj.n;
  for (auto* v : {&w.x, &w.h, &w.routed, &w.proj}) resize(*v, s.hidden);
  resize(w.q, s.heads * hd);
  resize(w.q_pe, s.heads * s.rope);
  resize(w.kv, latent_dim);
  resize(w.latent, latent_dim);
  resize(w.q_lat, s.heads * s.rank);
  resize(w.o_lat, s.heads * s.rank);
  resize(w.attn, s.heads * s.v_dim);
  for (auto* v : {&w.gate, &w.up, &w.mid}) resize(*v, inter);
  float* x = w.x.data();
  for (int64_t i = 0; i < s.hidden; ++i) x[i] = load(st.x, act, i);

  // Attention (mla.py MLAttention.forward with a position, attend_cache).
  rms_norm(x, s.hidden, s.input_norm, act, s.rms_eps, w.h.data());
  project2(s.q_proj, s.kv_a_proj, w.h.data(), w.q.data(), w.kv.data(), act, threads);
  for (int64_t h = 0; h < s.heads; ++h)
    rope_rotate(w.q.data() + h * hd + s.nope, s.rope, st.cos, st.sin, act,
                w.q_pe.data() + h * s.rope);
  rms_norm(w.kv.data(), s.rank, s.kv_norm, act, s.kv_eps, w.latent.data());
  rope_rotate(w.kv.data() + s.rank, s.rope, st.cos, st.sin, act, w.latent.data() + s.rank);
  for (int64_t i = 0; i < latent_dim; ++i)
    store(st.cache, st.cache_dtype, st.position * latent_dim + i, w.latent[i]);
  head_gemv({w.q.data(), s.w_uk, s.kv_b_dtype, w.q_lat.data(), s.heads, s.nope, s.rank, hd,
             s.rank, threads});
  const int64_t seq_len = st.position + 1;
  MlaDecodeParams mla{};
  mla.q_lat = w.q_lat.data();
  mla.q_pe = w.q_pe.data();
  mla.cache = st.cache;
  mla.cache_dtype = st.cache_dtype;
  mla.seq_lens = &seq_len;
  mla.out = w.o_lat.data();
  mla.batch = 1;
  mla.heads = s.heads;
  mla.rank = s.rank;
  mla.rope = s.rope;
  mla.capacity = st.capacity;
  mla.q_lat_batch = s.heads * s.rank;
  mla.q_lat_head = s.rank;
  mla.q_pe_batch = s.heads * s.rope;
  mla.q_pe_head = s.rope;
  mla.cache_batch = st.capacity * latent_dim;
  mla.cache_row = latent_dim;
  mla.out_batch = s.heads * s.rank;
  mla.out_head = s.rank;
  mla.scale = s.scale;
  // mla_decode cuts a context into splits of at least 128 tokens; below 256 there is one split,
  // run on the caller anyway, and its only parallel region is the per-head merge, a few
  // microseconds of work: cheaper on the caller than a pool wake-up. Same results either way.
  mla.num_threads = seq_len < 2 * kMlaMinSplit ? 1 : threads;
  mla_decode(mla);
  head_gemv({w.o_lat.data(), s.w_uv_t, s.kv_b_dtype, w.attn.data(), s.heads, s.rank, s.v_dim,
             s.rank, s.v_dim, threads});
  for (int64_t i = 0; i < s.heads * s.v_dim; ++i) w.attn[i] = rnd(w.attn[i], act);
  project(s.o_proj, w.attn.data(), w.proj.data(), act, threads);
  for (int64_t i = 0; i < s.hidden; ++i) x[i] = rnd(x[i] + w.proj[i], act);

  // Feed-forward (layers.py SwiGLU; moe.py MoE: routed + shared, unweighted).
  rms_norm(x, s.hidden, s.post_norm, act, s.rms_eps, w.h.data());
  project2(s.gate_proj, s.up_proj, w.h.data(), w.gate.data(), w.up.data(), act, threads);
  for (int64_t i = 0; i < inter; ++i)
    w.mid[i] = rnd(rnd(silu(w.gate[i]), act) * w.up[i], act);
  project(s.down_proj, w.mid.data(), w.proj.data(), act, threads);
  if (s.moe) {
    const RouterSpec& r = s.router;
    w.router_ids.resize(r.top_k);
    w.router_weights.resize(r.top_k);
    router_topk(r, w.h.data(), w.router_ids.data(), w.router_weights.data(), threads);
    moe_block(w.h.data(), DType::kFloat32, 1, w.router_ids.data(), w.router_weights.data(),
              r.top_k, r.experts, s.w13, s.w2, w.routed.data(), DType::kFloat32, threads);
    for (int64_t i = 0; i < s.hidden; ++i)
      w.proj[i] = rnd(rnd(w.routed[i], act) + w.proj[i], act);
  }
  for (int64_t i = 0; i < s.hidden; ++i) store(st.x, act, i, rnd(x[i] + w.proj[i], act));
}

}  // namespace kimivl
