// CUDA quantized matmul and MoE expert block: the host-side interface shared by the kernels
// (qgemm_*.cu) and their pybind11 glue (ops_cuda_quant.cpp). Plain C++ on purpose: the glue is
// compiled by the host compiler without the CUDA headers, so the stream crosses as an integer.
//
// Weight layout: kimivl_local/quant/cuda_layout.py. Row n of an [N, K] weight is KP * bits / 32
// 32-bit words along K (KP = K rounded up to 32), `bits` words per 32 k; int4 words hold 8 k in
// the nibble order [0, 2, 4, 6, 1, 3, 5, 7]; 2, 3, 5 and 6 bits split each code into parts of
// 4, 2 or 1 bits stored in plain order (qgemm_lowbit.cuh); values are unsigned codes u with
// W = scale * (u - zero) per (row, group); scales [N, G] bf16/fp16, zeros [N, G] uint8 (null:
// the constant 2^(bits-1)).
#pragma once
#include <cstdint>

#include "common.h"

// Member functions run on both sides; the glue (.cpp) sees plain C++.
#ifdef __CUDACC__
#define KIMIVL_HD __host__ __device__
#else
#define KIMIVL_HD
#endif

namespace kimivl {

struct CudaQWeight {
  const uint32_t* q = nullptr;       // [E?][N][words_per_row()]
  const uint16_t* scales = nullptr;  // [E?][N][groups()] bf16 or fp16 bits
  const uint8_t* zeros = nullptr;    // [E?][N][groups()] or null (symmetric)
  bool scale_bf16 = true;
  int bits = 4;
  int64_t n = 0, k = 0, kp = 0, group = 0;

  KIMIVL_HD int64_t words_per_row() const { return kp * bits / 32; }
  KIMIVL_HD int64_t vectors_per_row() const { return kp * bits / 128; }  // 16-byte vectors
  // The GEMV loop's unit along a row: a 16-byte vector (4, 8 bits) or a 32-k chunk of `bits`
  // words (2, 3, 5, 6 bits, whose chunks are not whole vectors).
  KIMIVL_HD int64_t steps_per_row() const {
    return bits == 4 || bits == 8 ? vectors_per_row() : kp / 32;
  }
  KIMIVL_HD int64_t groups() const { return kp / group; }
  KIMIVL_HD int64_t expert_q_stride() const { return n * words_per_row(); }  // in words
  KIMIVL_HD int64_t expert_s_stride() const { return n * groups(); }         // in elements
};

// Kernel path: kAuto picks the GEMV path for at most kGemvMaxRows rows (tokens for the MoE
// block) and the tensor-core path above; the others force one (tests run both on every shape).
enum class QPath : int { kAuto = 0, kGemv = 1, kMma = 2 };
constexpr int64_t kGemvMaxRows = 8;

// y[m, N] = x[m, K] . W^T; x, y in `x_dtype` (bf16 or fp16), contiguous, 16-byte aligned,
// K % 8 == 0 (checked by kimivl_local/ops before the call, and again here).
void cuda_quant_matmul(const void* x, DType x_dtype, int64_t m, const CudaQWeight& w, void* y,
                       QPath path, int64_t stream);

// Bytes of device workspace cuda_moe_block needs for these sizes and this path (resolved from
// kAuto the same way cuda_moe_block resolves it).
int64_t cuda_moe_workspace_bytes(int64_t tokens, int64_t top_k, int64_t experts, int64_t hidden,
                                 int64_t inter, QPath path);

// Routed experts: y[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]),
// e = topk_ids[t, j]; w13 stacked [E, 2I, H] (gate rows 0..I-1, up rows I..2I-1), w2 [E, H, I].
// Pairs whose id is outside [0, E) contribute nothing (checking them would need a host sync).
// `workspace` holds cuda_moe_workspace_bytes(...) bytes, 256-byte aligned.
void cuda_moe_block(const void* x, DType x_dtype, int64_t tokens, const int32_t* topk_ids,
                    const float* topk_weights, int64_t top_k, int64_t experts,
                    const CudaQWeight& w13, const CudaQWeight& w2, void* y, void* workspace,
                    int64_t workspace_bytes, QPath path, int64_t stream);

// Launchers (one per .cu file); arguments already checked.
void launch_gemv_dense(const void* x, DType x_dtype, int64_t m, const CudaQWeight& w, void* y,
                       int64_t stream);
void launch_mma_dense(const void* x, DType x_dtype, int64_t m, const CudaQWeight& w, void* y,
                      int64_t stream);
void launch_gemv_moe(const void* x, DType x_dtype, int64_t tokens, const int32_t* topk_ids,
                     const float* topk_weights, int64_t top_k, int64_t experts,
                     const CudaQWeight& w13, const CudaQWeight& w2, void* h, void* y,
                     int64_t stream);

// Tensor-core MoE: per M-tile of sorted token-expert pairs (written by the routing kernel).
struct MoeTiles {
  const int32_t* sorted_pairs = nullptr;  // [P] pair index t * top_k + j, grouped by expert
  const int32_t* tile_expert = nullptr;   // [max_tiles]
  const int32_t* tile_start = nullptr;    // [max_tiles] first sorted position of the tile
  const int32_t* tile_end = nullptr;      // [max_tiles] one past its last
  const int32_t* num_tiles = nullptr;     // [1] tiles actually used (<= max_tiles)
  int64_t max_tiles = 0;                  // the grid size: ceil(P / 64) + min(E, P)
};
constexpr int kMmaTileM = 64;
void launch_mma_moe_gate_up(const void* x, DType x_dtype, int64_t top_k, const CudaQWeight& w13,
                            const MoeTiles& tiles, void* h, int64_t stream);
void launch_mma_moe_down(const void* h, DType x_dtype, const CudaQWeight& w2,
                         const MoeTiles& tiles, float* out_pairs, int64_t stream);

// Streaming multiprocessors of the current device (cached per device; no stream work, so it
// is safe during graph capture).
int sm_count();

}  // namespace kimivl
