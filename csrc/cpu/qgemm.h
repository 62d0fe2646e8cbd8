// Quantized-weight matmul and MoE expert block on the CPU: shared types and the dispatch entry
// points. Weight layout: kimivl_local/quant/cpu_layout.py (16-row blocks x 32-K chunks, one
// 32-bit lane per output row). Activations are quantized to int8 per 32-element block on the fly
// (except on the AMX path, which multiplies bf16, see qgemm_amx.h):
//   x_hat[k] = d[b] * qa[k],  d[b] = amax_b / 127,  qa = round_half_even(x * (127 / amax_b)),
// with ds[b] = d[b] * sum(qa over the block) kept beside it. For one output row and weight group
// with scale s and zero z (of the stored value v):
//   sum_k s * (v[k] - z) * x_hat[k] = s * (sum_b d[b] * sum_k v[k] qa[k]  -  z * sum_b ds[b]),
// so the hot loop is an exact int8 x (u8|s8) dot product per 32-K chunk; the zero point (and the
// unsigned-offset fix) costs one FMA per row and group.
#pragma once
#include <cstdint>

#include "common.h"

namespace kimivl {

// One [N, K] weight, or E of them stacked (expert e starts at e * expert_*_stride()).
struct QWeight {
  const uint8_t* q = nullptr;
  const uint16_t* scales = nullptr;  // bf16 or fp16 bits, [NB, G, 16]
  const int8_t* zeros = nullptr;     // [NB, G, 16]; null when symmetric
  DType scale_dtype = DType::kBFloat16;
  int bits = 4;
  int64_t n = 0, k = 0, kp = 0, group = 0;  // kp: K rounded up to 32; group divides kp

  int64_t nb() const { return (n + 15) / 16; }
  int64_t kc() const { return kp / 32; }
  int64_t groups() const { return kp / group; }
  int64_t chunk_bytes() const { return 64 * bits; }
  int64_t expert_q_stride() const { return nb() * kc() * chunk_bytes(); }
  int64_t expert_s_stride() const { return nb() * groups() * 16; }
};

// One quantized activation row: qa [kp], d and ds [kp / 32].
struct ActRow {
  const int8_t* q;
  const float* d;
  const float* ds;
};

// Quantized activation rows owned by the caller (storage sized rows * kp, rows * kp / 32).
struct ActRows {
  int8_t* q = nullptr;
  float* d = nullptr;
  float* ds = nullptr;
  int64_t kp = 0;
  ActRow row(int64_t i) const { return {q + i * kp, d + i * (kp / 32), ds + i * (kp / 32)}; }
};

struct QGemmArgs {
  QWeight w;
  ActRows act;  // m rows, already quantized
  int64_t m = 0;
  void* y = nullptr;  // [m, w.n]
  DType y_dtype = DType::kFloat32;
  int num_threads = 1;
};

struct MoeArgs {
  QWeight w13;  // [E, 2I, H]: gate rows 0..I-1, up rows I..2I-1
  QWeight w2;   // [E, H, I]
  int64_t tokens = 0;
  const int64_t* expert_offsets = nullptr;  // [E + 1] into the pairs, grouped by expert
  const int32_t* active = nullptr;          // experts with at least one pair
  int64_t n_active = 0;
  const int32_t* pair_token = nullptr;  // [P] token of each pair, grouped by expert
  const float* pair_weight = nullptr;   // [P] router weight of each pair
  ActRows x;                            // tokens rows of the input, quantized
  ActRows h;                            // P rows of silu(gate) * up, written by stage A
  float* acc = nullptr;                 // [tokens, 16 * w2.nb()] fp32 combine buffer
  void* y = nullptr;                    // [tokens, H]
  DType y_dtype = DType::kFloat32;
  int num_threads = 1;
};

// Shared by every ISA path (compiled once, baseline flags): the exact activation quantizer.
// Quantizes x[0..n) (n <= 32, the rest of the block is zero) into q[32], *d, *ds.
void quantize_block32(const float* x, int n, int8_t* q, float* d, float* ds);
// h = silu(g) * u for one 32-channel block, then quantize_block32.
void silu_mul_quantize_block32(const float* g, const float* u, int8_t* q, float* d, float* ds);
// Output rows: fp32 -> dst (fp32 or bf16).
void store_row(const float* src, int64_t n, void* dst, DType dtype);

// Entry points (qgemm.cpp): check arguments, quantize activations, run the selected ISA path.
void quant_matmul(const void* x, DType x_dtype, int64_t m, const QWeight& w, void* y, DType y_dtype,
                  int num_threads);
// quant_matmul of one input by up to kMaxQGemmMulti weights of the same in_features in one
// parallel region (the decode step's q_proj and kv_a_proj, gate and up): ys[i] [m, ws[i].n] gets
// exactly what quant_matmul(x, ..., ws[i], ys[i], ...) would write.
constexpr int kMaxQGemmMulti = 4;
void quant_matmul_multi(const void* x, DType x_dtype, int64_t m, const QWeight* ws, void* const* ys,
                        int count, DType y_dtype, int num_threads);
void moe_block(const void* x, DType x_dtype, int64_t tokens, const int32_t* topk_ids,
               const float* topk_weights, int64_t top_k, int64_t num_experts, const QWeight& w13,
               const QWeight& w2, void* y, DType y_dtype, int num_threads);

// Per-ISA kernels; each is compiled in its own file with its own flags.
#define KIMIVL_DECLARE_QGEMM_ISA(ns)                   \
  namespace ns {                                       \
  void qgemm(const QGemmArgs& args);                   \
  void qgemm_multi(const QGemmArgs* args, int count);  \
  void moe(const MoeArgs& args);                       \
  }
KIMIVL_DECLARE_QGEMM_ISA(portable)
KIMIVL_DECLARE_QGEMM_ISA(avx2)
KIMIVL_DECLARE_QGEMM_ISA(avx512)
#undef KIMIVL_DECLARE_QGEMM_ISA

// AMX bf16 tiles (qgemm_amx.h, compiled into the avx512 file) for calls of at least kAmxMinRows
// activation rows, and MoE calls of at least kAmxMinTokens tokens: every active expert's weights
// are dequantized once per call, which pays only with about 24 rows per expert (64 experts,
// top-6; measured crossover 160-256 tokens on a 2-core Sapphire Rapids). Fewer rows stay on
// avx512's VNNI kernel. The activations are not quantized: these take x itself.
constexpr int64_t kAmxMinRows = 16;
constexpr int64_t kAmxMinTokens = 256;
namespace avx512 {
void quant_matmul_amx(const void* x, DType x_dtype, int64_t m, const QWeight* ws, void* const* ys,
                      int count, DType y_dtype, int num_threads);
// args as for moe(), without the quantized x and h.
void moe_amx(const void* x, DType x_dtype, const MoeArgs& args);
}  // namespace avx512

}  // namespace kimivl
