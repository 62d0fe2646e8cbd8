// Argument checks, activation quantization, MoE routing and ISA dispatch (baseline flags; the
// quantizer is compiled once so every ISA path sees bit-identical activations).
#include "cpu/qgemm.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"
#include "cpu/qgemm_lowbit.h"

namespace kimivl {
namespace {

// (v + 1.5 * 2^23) - 1.5 * 2^23 rounds |v| < 2^22 to the nearest integer, ties to even, like
// torch.round; this file is built with -ffp-contract=off so x * id is rounded before the add.
constexpr float kRoundMagic = 12582912.0f;

// Waking a pool thread costs ~10-20 us; below ~40 us of one core's work (4M ops = 2M int8
// multiply-adds at decode speed) the caller runs alone.
constexpr double kOpsPerThread = 4e6;

int useful_threads(double ops, int num_threads) {
  return static_cast<int>(std::max(1.0, std::min<double>(num_threads, ops / kOpsPerThread)));
}

// Scratch for quantized activation rows (CPU scratch is per call; Python owns inputs and outputs).
// Not zero-filled: the quantizer and stage A write every element.
struct ActStorage {
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> d, ds;
  ActRows rows;
  ActStorage(int64_t n, int64_t kp)
      : q(new int8_t[n * kp]), d(new float[n * kp / 32]), ds(new float[n * kp / 32]) {
    rows = {q.get(), d.get(), ds.get(), kp};
  }
};

float load(const void* x, DType dt, int64_t i) {
  if (dt == DType::kFloat32) return static_cast<const float*>(x)[i];
  return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
}

void quantize_rows(const void* x, DType dt, int64_t n, int64_t k, const ActRows& out, int threads) {
  const int64_t kc = out.kp / 32;
  parallel_for(n, std::max<int64_t>(1, 16384 / out.kp), threads, [&](int64_t begin, int64_t end) {
    float buf[32];
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t c = 0; c < kc; ++c) {
        const int len = static_cast<int>(std::min<int64_t>(32, k - 32 * c));
        for (int i = 0; i < len; ++i) buf[i] = load(x, dt, row * k + 32 * c + i);
        quantize_block32(buf, len, out.q + row * out.kp + 32 * c, out.d + row * kc + c,
                         out.ds + row * kc + c);
      }
    }
  });
}

// The AMX path takes calls with enough rows on a CPU (and KIMIVL_ISA) that selects it.
bool use_amx(int64_t rows, int64_t min_rows) {
  return rows >= min_rows && selected_isa() == Isa::kAmx;
}

void check_weight(const QWeight& w, const char* name) {
  const std::string n(name);
  check(supported_bits(w.bits),
        n + ": bits must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(w.bits));
  check(w.q != nullptr && w.scales != nullptr, n + ": null qweight or scales");
  check(w.scale_dtype == DType::kBFloat16 || w.scale_dtype == DType::kFloat16,
        n + ": scales must be bfloat16 or float16");
  check(w.n > 0 && w.k > 0, n + ": empty weight");
  check(w.kp % 32 == 0 && w.kp >= w.k && w.kp - w.k < 32,
        n + ": kp must be in_features rounded up to 32, got " + std::to_string(w.kp));
  check(w.group > 0 && w.group % 32 == 0 && w.kp % w.group == 0,
        n + ": group_size must be a multiple of 32 dividing " + std::to_string(w.kp) + ", got " +
            std::to_string(w.group));
}

void check_float_dtype(DType dt, const char* name) {
  check(dt == DType::kFloat32 || dt == DType::kBFloat16,
        std::string(name) + " must be float32 or bfloat16");
}

void dispatch_qgemm(const QGemmArgs& args) {
  switch (selected_isa()) {
    case Isa::kAmx:
    case Isa::kAvx512Vnni: avx512::qgemm(args); break;
    case Isa::kAvx2: avx2::qgemm(args); break;
    default: portable::qgemm(args); break;
  }
}

void dispatch_moe(const MoeArgs& args) {
  switch (selected_isa()) {
    case Isa::kAmx:
    case Isa::kAvx512Vnni: avx512::moe(args); break;
    case Isa::kAvx2: avx2::moe(args); break;
    default: portable::moe(args); break;
  }
}

}  // namespace

void quantize_block32(const float* x, int n, int8_t* q, float* d, float* ds) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  if (!finite || amax == 0.0f) {  // NaN/Inf make the block's outputs NaN, as the matmul would
    for (int i = 0; i < 32; ++i) q[i] = 0;
    *d = *ds = finite ? 0.0f : NAN;
    return;
  }
  const float id = 127.0f / amax;
  int32_t sum = 0;
  for (int i = 0; i < n; ++i) {
    const float v = x[i] * id;
    const int32_t r = static_cast<int32_t>((v + kRoundMagic) - kRoundMagic);
    q[i] = static_cast<int8_t>(r);
    sum += r;
  }
  for (int i = n; i < 32; ++i) q[i] = 0;
  *d = amax / 127.0f;
  *ds = *d * static_cast<float>(sum);
}

void silu_mul_quantize_block32(const float* g, const float* u, int8_t* q, float* d, float* ds) {
  float h[32];
  for (int i = 0; i < 32; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  quantize_block32(h, 32, q, d, ds);
}

void store_row(const float* src, int64_t n, void* dst, DType dtype) {
  if (dtype == DType::kFloat32) {
    std::copy(src, src + n, static_cast<float*>(dst));
  } else {
    uint16_t* out = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(src[i]);
  }
}

void quant_matmul(const void* x, DType x_dtype, int64_t m, const QWeight& w, void* y, DType y_dtype,
                  int num_threads) {
  check_weight(w, "weight");
  check_float_dtype(x_dtype, "x");
  check_float_dtype(y_dtype, "y");
  check(m >= 0, "x: negative row count");
  if (m == 0) return;
  const int threads = useful_threads(2.0 * m * w.n * w.k, num_threads);
  if (use_amx(m, kAmxMinRows)) {
    void* const ys[1] = {y};
    return avx512::quant_matmul_amx(x, x_dtype, m, &w, ys, 1, y_dtype, threads);
  }
  ActStorage act(m, w.kp);
  quantize_rows(x, x_dtype, m, w.k, act.rows, num_threads);
  QGemmArgs args;
  args.w = w;
  args.act = act.rows;
  args.m = m;
  args.y = y;
  args.y_dtype = y_dtype;
  args.num_threads = threads;
  dispatch_qgemm(args);
}

void quant_matmul_multi(const void* x, DType x_dtype, int64_t m, const QWeight* ws, void* const* ys,
                        int count, DType y_dtype, int num_threads) {
  check(count >= 1 && count <= kMaxQGemmMulti,
        "quant_matmul_multi: 1 to " + std::to_string(kMaxQGemmMulti) + " weights, got " +
            std::to_string(count));
  double ops = 0.0;
  for (int i = 0; i < count; ++i) {
    check_weight(ws[i], "weight");
    check(ws[i].k == ws[0].k && ws[i].kp == ws[0].kp,
          "quant_matmul_multi: every weight must have the same in_features");
    ops += 2.0 * m * ws[i].n * ws[i].k;
  }
  check_float_dtype(x_dtype, "x");
  check_float_dtype(y_dtype, "y");
  check(m >= 0, "x: negative row count");
  if (m == 0) return;
  if (use_amx(m, kAmxMinRows))  // one parallel region per weight, as quant_matmul runs them
    return avx512::quant_matmul_amx(x, x_dtype, m, ws, ys, count, y_dtype,
                                    useful_threads(ops, num_threads));
  ActStorage act(m, ws[0].kp);
  quantize_rows(x, x_dtype, m, ws[0].k, act.rows, num_threads);
  QGemmArgs args[kMaxQGemmMulti];
  for (int i = 0; i < count; ++i) {
    args[i].w = ws[i];
    args[i].act = act.rows;
    args[i].m = m;
    args[i].y = ys[i];
    args[i].y_dtype = y_dtype;
    args[i].num_threads = useful_threads(ops, num_threads);
  }
  switch (selected_isa()) {
    case Isa::kAmx:
    case Isa::kAvx512Vnni: avx512::qgemm_multi(args, count); break;
    case Isa::kAvx2: avx2::qgemm_multi(args, count); break;
    default: portable::qgemm_multi(args, count); break;
  }
}

void moe_block(const void* x, DType x_dtype, int64_t tokens, const int32_t* topk_ids,
               const float* topk_weights, int64_t top_k, int64_t num_experts, const QWeight& w13,
               const QWeight& w2, void* y, DType y_dtype, int num_threads) {
  check_weight(w13, "w13");
  check_weight(w2, "w2");
  check_float_dtype(x_dtype, "x");
  check_float_dtype(y_dtype, "y");
  check(w13.n % 64 == 0 && w2.k == w13.n / 2 && w2.kp == w2.k,
        "w13 must be [E, 2I, H] and w2 [E, H, I] with I a multiple of 32");
  check(w2.n == w13.k, "w2 out_features must equal w13 in_features (the hidden size)");
  check(tokens >= 0 && top_k > 0 && num_experts > 0, "bad tokens, top_k or num_experts");
  if (tokens == 0) return;
  // Routing metadata: a stable counting sort of the token-expert pairs by expert.
  const int64_t pairs = tokens * top_k;
  std::vector<int64_t> offsets(num_experts + 1, 0);
  std::vector<int32_t> expert_of(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t e = topk_ids[p];
    check(e >= 0 && e < num_experts, "topk_ids: expert id " + std::to_string(e) +
                                         " outside [0, " + std::to_string(num_experts) + ")");
    expert_of[p] = static_cast<int32_t>(e);
    ++offsets[e + 1];
  }
  std::vector<int32_t> active;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] > 0) active.push_back(static_cast<int32_t>(e));
    offsets[e + 1] += offsets[e];
  }
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  std::vector<int32_t> pair_token(pairs);
  std::vector<float> pair_weight(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t slot = cursor[expert_of[p]]++;
    pair_token[slot] = static_cast<int32_t>(p / top_k);
    pair_weight[slot] = topk_weights[p];
  }
  std::unique_ptr<float[]> acc(new float[tokens * 16 * w2.nb()]);  // stage B zeroes its slices
  MoeArgs args;
  args.w13 = w13;
  args.w2 = w2;
  args.tokens = tokens;
  args.expert_offsets = offsets.data();
  args.active = active.data();
  args.n_active = static_cast<int64_t>(active.size());
  args.pair_token = pair_token.data();
  args.pair_weight = pair_weight.data();
  args.acc = acc.get();
  args.y = y;
  args.y_dtype = y_dtype;
  args.num_threads = useful_threads(2.0 * pairs * (w13.n * w13.k + w2.n * w2.k), num_threads);
  if (use_amx(tokens, kAmxMinTokens)) return avx512::moe_amx(x, x_dtype, args);
  ActStorage xq(tokens, w13.kp), hq(pairs, w2.kp);
  quantize_rows(x, x_dtype, tokens, w13.k, xq.rows, num_threads);
  args.x = xq.rows;
  args.h = hq.rows;
  dispatch_moe(args);
}

}  // namespace kimivl
