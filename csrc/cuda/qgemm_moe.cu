// Entry points of the CUDA quantized matmul and MoE block (qgemm.cuh): argument checks, path
// choice, the workspace layout, and the MoE routing and combine kernels.
//
// MoE, decode (tokens <= 8, or path kGemv): two launches and no routing. Launch 1 runs one grid
// row per token-expert pair, reading the expert id on the device: h[p] = silu(gate x) * (up x)
// in x's dtype. Launch 2 runs one grid row per token and loops over its top-k pairs in order,
// summing weight * (down h[p]) in fp32: the combine is fused, deterministic, with no atomics.
//
// MoE, prefill (path kMma): four launches, all sized by host-known bounds so nothing reads back:
//   1. route (one block): count pairs per expert in shared memory, exclusive-scan into expert
//      offsets, cut each expert's pairs into M-tiles of 64 (tile list + count on the device),
//      scatter pair indices into expert order with shared-memory atomic cursors;
//   2. gate/up grouped GEMM over the tiles (grid: max_tiles, the bound ceil(P/64) + min(E, P);
//      blocks past the device-side tile count exit), SiLU*mul fused, h in sorted order;
//   3. down grouped GEMM, each pair's fp32 row written at its pair index;
//   4. combine: y[t] = sum_j weight[t, j] * out[t*k + j] in order (deterministic: the order in
//      which the scatter placed pairs within an expert does not change any value).
#include <climits>
#include <string>

#include "cuda/qgemm_common.cuh"

namespace kimivl {
namespace {

using qg::XType;

constexpr int kRouteThreads = 1024;
constexpr int64_t kMaxRouteExperts = 1024;  // shared memory: 3 ints per expert
constexpr int64_t kMaxGridY = 65535;

__global__ void __launch_bounds__(kRouteThreads)
    moe_route_kernel(const int32_t* __restrict__ ids, int64_t pairs, int experts,
                     int32_t* __restrict__ sorted, int32_t* __restrict__ tile_expert,
                     int32_t* __restrict__ tile_start, int32_t* __restrict__ tile_end,
                     int32_t* __restrict__ num_tiles) {
  extern __shared__ int32_t route_smem[];
  int32_t* count = route_smem;                // [E] pairs per expert
  int32_t* cursor = route_smem + experts;     // [E] next free sorted position
  int32_t* tile_off = route_smem + 2 * experts;  // [E] first tile of the expert
  const int tid = threadIdx.x;
  for (int e = tid; e < experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int64_t i = tid; i < pairs; i += blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < experts) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (tid == 0) {  // E <= 1024 serial steps
    int32_t run = 0, tiles = 0;
    for (int e = 0; e < experts; ++e) {
      cursor[e] = run;
      tile_off[e] = tiles;
      run += count[e];
      tiles += (count[e] + kMmaTileM - 1) / kMmaTileM;
    }
    *num_tiles = tiles;
  }
  __syncthreads();
  for (int e = tid; e < experts; e += blockDim.x) {
    const int32_t start = cursor[e], n = count[e];
    for (int32_t t = 0; t * kMmaTileM < n; ++t) {
      const int32_t idx = tile_off[e] + t;
      tile_expert[idx] = e;
      tile_start[idx] = start + t * kMmaTileM;
      tile_end[idx] = start + ((t + 1) * kMmaTileM < n ? (t + 1) * kMmaTileM : n);
    }
  }
  __syncthreads();  // cursor[e] is read above before the scatter moves it
  for (int64_t i = tid; i < pairs; i += blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < experts) sorted[atomicAdd(&cursor[e], 1)] = static_cast<int32_t>(i);
  }
}

template <typename XT>
__global__ void __launch_bounds__(256)
    moe_combine_kernel(const float* __restrict__ out_pairs, const int32_t* __restrict__ ids,
                       const float* __restrict__ topk_weights, int top_k, int experts,
                       int64_t hidden, XT* __restrict__ y) {
  const int64_t t = blockIdx.x;
  for (int64_t n = threadIdx.x; n < hidden; n += blockDim.x) {
    float s = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const int64_t p = t * top_k + j;
      const int e = ids[p];
      if (e >= 0 && e < experts) s = fmaf(topk_weights[p], out_pairs[p * hidden + n], s);
    }
    y[t * hidden + n] = XType<XT>::from_float(s);
  }
}

QPath resolve(QPath path, int64_t rows) {
  if (path != QPath::kAuto) return path;
  return rows <= kGemvMaxRows ? QPath::kGemv : QPath::kMma;
}

void check_weight(const CudaQWeight& w, const char* name) {
  const std::string n = name;
  check(w.q != nullptr && w.scales != nullptr, n + ": null weight pointer");
  check(w.bits == 2 || w.bits == 3 || w.bits == 4 || w.bits == 5 || w.bits == 6 || w.bits == 8,
        n + ": bits must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(w.bits));
  check(w.n > 0 && w.k > 0, n + ": empty weight");
  check(w.kp % 32 == 0 && w.kp >= w.k && w.kp < w.k + 32, n + ": kp must be K rounded up to 32");
  check(w.group >= 32 && w.group % 32 == 0 && w.kp % w.group == 0,
        n + ": group must be a multiple of 32 dividing kp");
  check(w.k % 8 == 0, n + ": the CUDA kernels need in_features % 8 == 0, got " +
                          std::to_string(w.k));
  check(reinterpret_cast<uintptr_t>(w.q) % 16 == 0, n + ": qweight must be 16-byte aligned");
}

void check_x_dtype(DType t) {
  check(t == DType::kBFloat16 || t == DType::kFloat16,
        "the CUDA quantized kernels take bfloat16 or float16 activations");
}

// Workspace layout; every piece 256-byte aligned. Returns the total size; with base != null,
// also the pieces.
struct MoeBuffers {
  int32_t* sorted = nullptr;
  int32_t* tile_expert = nullptr;
  int32_t* tile_start = nullptr;
  int32_t* tile_end = nullptr;
  int32_t* num_tiles = nullptr;
  void* h = nullptr;
  float* out_pairs = nullptr;
  int64_t max_tiles = 0;
};

int64_t layout(int64_t tokens, int64_t top_k, int64_t experts, int64_t hidden, int64_t inter,
               QPath path, char* base, MoeBuffers* b) {
  const int64_t pairs = tokens * top_k;
  int64_t at = 0;
  const auto take = [&](int64_t bytes) {
    const int64_t start = at;
    at += (bytes + 255) / 256 * 256;
    return base ? base + start : nullptr;
  };
  MoeBuffers out;
  out.h = take(pairs * inter * 2);  // x's dtype: bf16 or fp16
  if (path == QPath::kMma) {
    out.max_tiles = (pairs + kMmaTileM - 1) / kMmaTileM + (experts < pairs ? experts : pairs);
    out.sorted = reinterpret_cast<int32_t*>(take(pairs * 4));
    out.tile_expert = reinterpret_cast<int32_t*>(take(out.max_tiles * 4));
    out.tile_start = reinterpret_cast<int32_t*>(take(out.max_tiles * 4));
    out.tile_end = reinterpret_cast<int32_t*>(take(out.max_tiles * 4));
    out.num_tiles = reinterpret_cast<int32_t*>(take(4));
    out.out_pairs = reinterpret_cast<float*>(take(pairs * hidden * 4));
  }
  if (b) *b = out;
  return at;
}

}  // namespace

void cuda_quant_matmul(const void* x, DType x_dtype, int64_t m, const CudaQWeight& w, void* y,
                       QPath path, int64_t stream) {
  check_x_dtype(x_dtype);
  check_weight(w, "w");
  check(m >= 0, "x: negative row count");
  check(reinterpret_cast<uintptr_t>(x) % 16 == 0, "x must be 16-byte aligned");
  if (m == 0) return;
  path = resolve(path, m);
  if (path == QPath::kGemv) {
    check((m + 7) / 8 <= kMaxGridY, "quant_matmul: too many rows for the GEMV path");
    launch_gemv_dense(x, x_dtype, m, w, y, stream);
  } else {
    check((m + kMmaTileM - 1) / kMmaTileM <= kMaxGridY,
          "quant_matmul: too many rows for one launch (" + std::to_string(m) + ")");
    launch_mma_dense(x, x_dtype, m, w, y, stream);
  }
}

int64_t cuda_moe_workspace_bytes(int64_t tokens, int64_t top_k, int64_t experts, int64_t hidden,
                                 int64_t inter, QPath path) {
  return layout(tokens, top_k, experts, hidden, inter, resolve(path, tokens), nullptr, nullptr);
}

void cuda_moe_block(const void* x, DType x_dtype, int64_t tokens, const int32_t* topk_ids,
                    const float* topk_weights, int64_t top_k, int64_t experts,
                    const CudaQWeight& w13, const CudaQWeight& w2, void* y, void* workspace,
                    int64_t workspace_bytes, QPath path, int64_t stream) {
  check_x_dtype(x_dtype);
  check_weight(w13, "w13");
  check_weight(w2, "w2");
  const int64_t hidden = w13.k, inter = w2.k;
  check(w13.n == 2 * inter && w2.n == hidden,
        "moe_block: w13 must be [E, 2I, H] and w2 [E, H, I]");
  check(top_k >= 1 && experts >= 1 && tokens >= 0, "moe_block: bad top_k, experts or tokens");
  check(reinterpret_cast<uintptr_t>(x) % 16 == 0, "x must be 16-byte aligned");
  if (tokens == 0) return;
  const int64_t pairs = tokens * top_k;
  check(pairs <= INT_MAX, "moe_block: too many token-expert pairs");
  path = resolve(path, tokens);
  const int64_t need = layout(tokens, top_k, experts, hidden, inter, path, nullptr, nullptr);
  check(workspace_bytes >= need && reinterpret_cast<uintptr_t>(workspace) % 256 == 0,
        "moe_block: workspace must be 256-byte aligned and hold " + std::to_string(need) +
            " bytes, got " + std::to_string(workspace_bytes));
  MoeBuffers b;
  layout(tokens, top_k, experts, hidden, inter, path, static_cast<char*>(workspace), &b);
  const cudaStream_t s = as_stream(stream);
  if (path == QPath::kGemv) {
    check(pairs <= kMaxGridY && tokens <= kMaxGridY,
          "moe_block: too many tokens for the GEMV path");
    launch_gemv_moe(x, x_dtype, tokens, topk_ids, topk_weights, top_k, experts, w13, w2, b.h, y,
                    stream);
    return;
  }
  check(experts <= kMaxRouteExperts, "moe_block: at most 1024 experts");
  check(b.max_tiles <= kMaxGridY, "moe_block: too many tokens for one launch");
  moe_route_kernel<<<1, kRouteThreads, 3 * experts * sizeof(int32_t), s>>>(
      topk_ids, pairs, static_cast<int>(experts), b.sorted, b.tile_expert, b.tile_start,
      b.tile_end, b.num_tiles);
  check_launch("moe_route_kernel");
  MoeTiles tiles;
  tiles.sorted_pairs = b.sorted;
  tiles.tile_expert = b.tile_expert;
  tiles.tile_start = b.tile_start;
  tiles.tile_end = b.tile_end;
  tiles.num_tiles = b.num_tiles;
  tiles.max_tiles = b.max_tiles;
  launch_mma_moe_gate_up(x, x_dtype, top_k, w13, tiles, b.h, stream);
  launch_mma_moe_down(b.h, x_dtype, w2, tiles, b.out_pairs, stream);
  if (x_dtype == DType::kBFloat16)
    moe_combine_kernel<__nv_bfloat16><<<static_cast<unsigned>(tokens), 256, 0, s>>>(
        b.out_pairs, topk_ids, topk_weights, static_cast<int>(top_k), static_cast<int>(experts),
        hidden, static_cast<__nv_bfloat16*>(y));
  else
    moe_combine_kernel<__half><<<static_cast<unsigned>(tokens), 256, 0, s>>>(
        b.out_pairs, topk_ids, topk_weights, static_cast<int>(top_k), static_cast<int>(experts),
        hidden, static_cast<__half*>(y));
  check_launch("moe_combine_kernel");
}

}  // namespace kimivl
