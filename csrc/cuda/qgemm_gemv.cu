// GEMV-style quantized matmul for few activation rows (decode): y = x . W^T with x of at most
// 8 rows per block, and the two decode launches of the MoE block (gate/up + SiLU*mul for every
// token-expert pair; down + router-weighted sum over the top-k for every token).
//
// Work split. A block is 8 warps. Each warp owns R = 2 weight rows (for the MoE gate/up kernel:
// gate row c and up row I + c, so SiLU*mul happens in the epilogue) and a K range; `ks` warps
// (1, 2, 4 or 8: split-K inside the block, chosen so that small-N weights still fill the GPU)
// share the same rows and split K; their partial sums meet in shared memory in a fixed order,
// so results are deterministic. Each lane streams 16-byte weight vectors of its rows (32 int4 or
// 16 int8 weights of one group: group sizes are multiples of 32), converts them with the
// magic-number trick to exact fp16 integers u - zero, widens them to fp32 and multiplies with
// the activations (read as 16-byte / 8-byte vectors, L1-resident since every warp reads the same
// x); the group's scale multiplies the vector's partial sum. All accumulation is fp32.
// 2, 3, 5 and 6-bit weights run the same loop with a 32-k chunk (`bits` words of one row and
// group) as a lane's step instead of a 16-byte vector: its codes unpack with shifts and masks
// and convert exactly through fp32 (qgemm_lowbit.cuh).
#include <atomic>

#include "cuda/qgemm_common.cuh"
#include "cuda/qgemm_lowbit.cuh"

namespace kimivl {
namespace {

using qg::XType;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int R = 2;  // weight rows per warp

// The weight of one expert (or the only one): base pointers already offset.
struct WPtr {
  const uint32_t* q;
  const uint16_t* s;
  const uint8_t* z;
};

__device__ __forceinline__ WPtr expert_ptr(const CudaQWeight& w, int64_t e) {
  return {w.q + e * w.expert_q_stride(), w.scales + e * w.expert_s_stride(),
          w.zeros ? w.zeros + e * w.expert_s_stride() : nullptr};
}

// part[r][m] += the N weights wf[r] times one activation load of row m (N values, two per
// 32-bit word of xw), in fp32, pairs in order.
template <typename XT, int N, int MT>
__device__ __forceinline__ void dot_load(const float (&wf)[R][N], const uint32_t (&xw)[N / 2],
                                         int m, float (&part)[R][MT]) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float2 xf = XType<XT>::pair(xw[i]);
#pragma unroll
    for (int r = 0; r < R; ++r)
      part[r][m] = fmaf(wf[r][2 * i], xf.x, fmaf(wf[r][2 * i + 1], xf.y, part[r][m]));
  }
}

// acc[r][m] += scale[r] * part[r][m]: one group's partial sums, scaled once.
template <int MT>
__device__ __forceinline__ void add_scaled(const float (&scale)[R], const float (&part)[R][MT],
                                           float (&acc)[R][MT]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(scale[r], part[r][m], acc[r][m]);
}

// Per-lane partial dot products of weight rows rows[r] (valid when ok[r]) with activation rows
// a[m] (nullptr: absent) over the 16-byte vectors [v0, v1) of each row; acc[r][m] += result.
// K % 8 == 0 (checked on the host), so an activation vector of 8 (int4) or 4 (int8) elements
// lies entirely below K or entirely at/above it; the latter (KP padding) reads as zero.
template <typename XT, int BITS, int MT>
__device__ __forceinline__ void accumulate_vectors(const CudaQWeight& w, const WPtr& wp,
                                                   const int64_t (&rows)[R], const bool (&ok)[R],
                                                   const XT* const (&a)[MT], int64_t v0,
                                                   int64_t v1, int lane, float (&acc)[R][MT]) {
  constexpr int kPerVec = 128 / BITS;  // weights per 16-byte vector: 32 or 16
  constexpr int kPerWord = 32 / BITS;  // 8 or 4
  const int64_t wpr = w.words_per_row();
  const int64_t groups = w.groups();
  const int default_zero = 1 << (BITS - 1);
#pragma unroll 2
  for (int64_t v = v0 + lane; v < v1; v += 32) {
    const int64_t k0 = v * kPerVec;
    const int64_t g = k0 / w.group;
    uint4 wv[R];
    float scale[R];
    __half2 bias[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (ok[r]) {
        wv[r] = qg::ldg16(wp.q + rows[r] * wpr + v * 4);
        scale[r] = qg::scale_to_float(wp.s[rows[r] * groups + g], w.scale_bf16);
        bias[r] = qg::int_bias_f16(wp.z ? wp.z[rows[r] * groups + g] : default_zero);
      } else {
        wv[r] = make_uint4(0, 0, 0, 0);
        scale[r] = 0.0f;
        bias[r] = qg::int_bias_f16(0);
      }
    }
    float part[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) part[r][m] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // the 4 words of the vector
      float wf[R][kPerWord];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t word = j == 0 ? wv[r].x : j == 1 ? wv[r].y : j == 2 ? wv[r].z : wv[r].w;
#pragma unroll
        for (int i = 0; i < kPerWord / 2; ++i) {
          const __half2 h = BITS == 4 ? qg::int4_pair_f16(word, i, bias[r])
                                      : qg::int8_pair_f16(word, i, bias[r]);
          const float2 f = __half22float2(h);
          wf[r][2 * i] = f.x;
          wf[r][2 * i + 1] = f.y;
        }
      }
      const int64_t kk = k0 + j * kPerWord;  // first k of this word
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (a[m] == nullptr || kk >= w.k) continue;
        uint32_t xw[kPerWord / 2];
        if constexpr (BITS == 4) {
          const uint4 xv = qg::ldg16(a[m] + kk);
          xw[0] = xv.x, xw[1] = xv.y, xw[2] = xv.z, xw[3] = xv.w;
        } else {
          const uint2 xv = __ldg(reinterpret_cast<const uint2*>(a[m] + kk));
          xw[0] = xv.x, xw[1] = xv.y;
        }
        dot_load<XT, kPerWord, MT>(wf, xw, m, part);
      }
    }
    add_scaled<MT>(scale, part, acc);
  }
}

// accumulate_vectors for 2, 3, 5 and 6 bits: the steps [c0, c1) are 32-k chunks; each chunk
// is four 8-k pieces, one 16-byte activation load each (K % 8 == 0: a piece lies entirely below
// K or entirely in the KP padding, which is skipped).
template <typename XT, int BITS, int MT>
__device__ __forceinline__ void accumulate_chunks(const CudaQWeight& w, const WPtr& wp,
                                                  const int64_t (&rows)[R], const bool (&ok)[R],
                                                  const XT* const (&a)[MT], int64_t c0,
                                                  int64_t c1, int lane, float (&acc)[R][MT]) {
  const int64_t wpr = w.words_per_row();
  const int64_t groups = w.groups();
  const int default_zero = 1 << (BITS - 1);
  for (int64_t c = c0 + lane; c < c1; c += 32) {
    const int64_t k0 = c * 32;
    const int64_t g = k0 / w.group;
    uint32_t wv[R][BITS];
    float scale[R], bias[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (ok[r]) {
        qg::load_chunk<BITS>(wp.q + rows[r] * wpr + c * BITS, wv[r]);
        scale[r] = qg::scale_to_float(wp.s[rows[r] * groups + g], w.scale_bf16);
        bias[r] = qg::lowbit_bias(wp.z ? wp.z[rows[r] * groups + g] : default_zero);
      } else {
#pragma unroll
        for (int i = 0; i < BITS; ++i) wv[r][i] = 0;
        scale[r] = 0.0f;
        bias[r] = qg::lowbit_bias(0);
      }
    }
    float part[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) part[r][m] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // 8-k pieces
      const int64_t kk = k0 + 8 * j;
      if (kk >= w.k) break;  // this piece and the rest of the chunk are KP padding
      float wf[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < 8; ++i)
          wf[r][i] = qg::code_minus_zero(qg::lowbit_code<BITS>(wv[r], 8 * j + i), bias[r]);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (a[m] == nullptr) continue;
        const uint4 xv = qg::ldg16(a[m] + kk);
        const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w};
        dot_load<XT, 8, MT>(wf, xw, m, part);
      }
    }
    add_scaled<MT>(scale, part, acc);
  }
}

// The lane's share of rows x activations over its steps [v0, v1) (steps_per_row() units).
template <typename XT, int BITS, int MT>
__device__ __forceinline__ void accumulate(const CudaQWeight& w, const WPtr& wp,
                                           const int64_t (&rows)[R], const bool (&ok)[R],
                                           const XT* const (&a)[MT], int64_t v0, int64_t v1,
                                           int lane, float (&acc)[R][MT]) {
  if constexpr (qg::is_lowbit(BITS))
    accumulate_chunks<XT, BITS, MT>(w, wp, rows, ok, a, v0, v1, lane, acc);
  else
    accumulate_vectors<XT, BITS, MT>(w, wp, rows, ok, a, v0, v1, lane, acc);
}

// This warp's rows-group and K split; every warp of a rows-group covers [v0, v1).
struct Split {
  int group;  // rows-group within the block, < kWarps / ks
  int64_t v0, v1;
};

__device__ __forceinline__ Split warp_split(int ks, int64_t vectors) {
  const int warp = threadIdx.x / 32;
  const int64_t per = (vectors + ks - 1) / ks;
  const int64_t v0 = (warp % ks) * per;
  return {warp / ks, v0, v0 + per < vectors ? v0 + per : vectors};
}

// Sum acc over the lanes of each warp, then over the ks warps of each rows-group, in a fixed
// order; returns true in the threads that hold a final value, with it in *out and its index
// (rows-group * R * MT + r * MT + m) in *index.
template <int MT>
__device__ __forceinline__ bool block_reduce(float (&acc)[R][MT], int ks, float* out,
                                             int* index) {
  __shared__ float red[kWarps][R * MT];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = qg::warp_sum(acc[r][m]);
      if (lane == 0) red[warp][r * MT + m] = v;
    }
  __syncthreads();
  const int t = threadIdx.x;
  const int groups = kWarps / ks;
  if (t >= groups * R * MT) return false;
  const int group = t / (R * MT), slot = t % (R * MT);
  float sum = 0.0f;
  for (int s = 0; s < ks; ++s) sum += red[group * ks + s][slot];
  *out = sum;
  *index = t;
  return true;
}

// ---- dense: y[m, n] for up to 8 rows of x per block (blockIdx.y selects the 8-row chunk) ----

template <typename XT, int BITS, int MT>
__global__ void __launch_bounds__(kThreads)
    gemv_dense_kernel(CudaQWeight w, const XT* __restrict__ x, int64_t m_rows,
                      XT* __restrict__ y, int ks) {
  const Split sp = warp_split(ks, w.steps_per_row());
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * (kWarps / ks) + sp.group) * R;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 8;
  int64_t rows[R];
  bool ok[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = row0 + r, ok[r] = row0 + r < w.n;
  const XT* a[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) a[m] = m0 + m < m_rows ? x + (m0 + m) * w.k : nullptr;
  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
  accumulate<XT, BITS, MT>(w, expert_ptr(w, 0), rows, ok, a, sp.v0, sp.v1, threadIdx.x % 32,
                           acc);
  float sum;
  int index;
  if (!block_reduce<MT>(acc, ks, &sum, &index)) return;
  const int group = index / (R * MT), r = index / MT % R, m = index % MT;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * (kWarps / ks) + group) * R + r;
  if (row < w.n && m0 + m < m_rows) y[(m0 + m) * w.n + row] = XType<XT>::from_float(sum);
}

// ---- MoE gate/up: h[p, c] = silu(gate_e[c] . x[t]) * (up_e[c] . x[t]) for pair p = t*k + j --

template <typename XT, int BITS>
__global__ void __launch_bounds__(kThreads)
    gemv_gate_up_kernel(CudaQWeight w13, const XT* __restrict__ x,
                        const int32_t* __restrict__ ids, int top_k, int experts,
                        XT* __restrict__ h, int ks) {
  const int64_t p = blockIdx.y;
  const int e = ids[p];
  if (e < 0 || e >= experts) return;  // uniform over the block; its h row is never read
  const int64_t inter = w13.n / 2;
  const Split sp = warp_split(ks, w13.steps_per_row());
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kWarps / ks) + sp.group;
  const int64_t rows[R] = {c, inter + c};
  const bool ok[R] = {c < inter, c < inter};
  const XT* a[1] = {x + (p / top_k) * w13.k};
  float acc[R][1] = {{0.0f}, {0.0f}};
  accumulate<XT, BITS, 1>(w13, expert_ptr(w13, e), rows, ok, a, sp.v0, sp.v1, threadIdx.x % 32,
                          acc);
  // Reduce gate and up separately, then one thread per channel combines them.
  __shared__ float red[kWarps][R];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float g = qg::warp_sum(acc[0][0]), u = qg::warp_sum(acc[1][0]);
  if (lane == 0) red[warp][0] = g, red[warp][1] = u;
  __syncthreads();
  const int t = threadIdx.x;
  if (t >= kWarps / ks) return;
  float gs = 0.0f, us = 0.0f;
  for (int s = 0; s < ks; ++s) gs += red[t * ks + s][0], us += red[t * ks + s][1];
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * (kWarps / ks) + t;
  if (ch < inter) h[p * inter + ch] = XType<XT>::from_float(qg::silu_mul(gs, us));
}

// ---- MoE down: y[t, n] = sum_j weight[t, j] * (down_e[n] . h[t*k + j]) ----------------------

template <typename XT, int BITS>
__global__ void __launch_bounds__(kThreads)
    gemv_down_kernel(CudaQWeight w2, const XT* __restrict__ h, const int32_t* __restrict__ ids,
                     const float* __restrict__ topk_weights, int top_k, int experts,
                     XT* __restrict__ y, int ks) {
  const int64_t t = blockIdx.y;
  const Split sp = warp_split(ks, w2.steps_per_row());
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * (kWarps / ks) + sp.group) * R;
  int64_t rows[R];
  bool ok[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = row0 + r, ok[r] = row0 + r < w2.n;
  float total[R][1] = {{0.0f}, {0.0f}};
  for (int j = 0; j < top_k; ++j) {  // in order: deterministic
    const int64_t p = t * top_k + j;
    const int e = ids[p];
    if (e < 0 || e >= experts) continue;
    const XT* a[1] = {h + p * w2.k};
    float acc[R][1] = {{0.0f}, {0.0f}};
    accumulate<XT, BITS, 1>(w2, expert_ptr(w2, e), rows, ok, a, sp.v0, sp.v1, threadIdx.x % 32,
                            acc);
    const float wt = topk_weights[p];
#pragma unroll
    for (int r = 0; r < R; ++r) total[r][0] = fmaf(wt, acc[r][0], total[r][0]);
  }
  float sum;
  int index;
  if (!block_reduce<1>(total, ks, &sum, &index)) return;
  const int group = index / R, r = index % R;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * (kWarps / ks) + group) * R + r;
  if (row < w2.n) y[t * w2.n + row] = XType<XT>::from_float(sum);
}

// K splits per rows-group: grow while the grid has fewer than two blocks per SM, keeping at
// least one step (16-byte vector or 32-k chunk) per lane per split.
int choose_splits(int64_t row_groups, int64_t grid_y, int64_t vectors) {
  const int64_t target = 2 * static_cast<int64_t>(sm_count());
  int ks = 1;
  while (ks < kWarps) {
    const int64_t per_block = kWarps / ks;
    const int64_t blocks = (row_groups + per_block - 1) / per_block * grid_y;
    if (blocks >= target || vectors / (2 * ks) < 32) break;
    ks *= 2;
  }
  return ks;
}

template <typename XT, int BITS>
void dense_for(const void* x, int64_t m, const CudaQWeight& w, void* y, cudaStream_t stream) {
  const int64_t row_groups = (w.n + R - 1) / R;
  const int64_t chunks = (m + 7) / 8;
  const int ks = choose_splits(row_groups, chunks, w.steps_per_row());
  const int64_t per_block = kWarps / ks;
  const dim3 grid(static_cast<unsigned>((row_groups + per_block - 1) / per_block),
                  static_cast<unsigned>(chunks));
  const auto* xp = static_cast<const XT*>(x);
  auto* yp = static_cast<XT*>(y);
  const int64_t mt = m < 8 ? m : 8;  // every chunk but the last has 8 rows
  if (mt <= 1)
    gemv_dense_kernel<XT, BITS, 1><<<grid, kThreads, 0, stream>>>(w, xp, m, yp, ks);
  else if (mt <= 2)
    gemv_dense_kernel<XT, BITS, 2><<<grid, kThreads, 0, stream>>>(w, xp, m, yp, ks);
  else if (mt <= 4)
    gemv_dense_kernel<XT, BITS, 4><<<grid, kThreads, 0, stream>>>(w, xp, m, yp, ks);
  else
    gemv_dense_kernel<XT, BITS, 8><<<grid, kThreads, 0, stream>>>(w, xp, m, yp, ks);
  check_launch("gemv_dense_kernel");
}

template <typename XT, int BITS>
void gate_up_for(const void* x, int64_t tokens, const int32_t* ids, int64_t top_k,
                 int64_t experts, const CudaQWeight& w13, void* h, cudaStream_t stream) {
  const int64_t pairs = tokens * top_k;
  const int64_t inter = w13.n / 2;
  const int ks = choose_splits(inter, pairs, w13.steps_per_row());
  const dim3 grid(static_cast<unsigned>((inter + kWarps / ks - 1) / (kWarps / ks)),
                  static_cast<unsigned>(pairs));
  gemv_gate_up_kernel<XT, BITS><<<grid, kThreads, 0, stream>>>(
      w13, static_cast<const XT*>(x), ids, static_cast<int>(top_k), static_cast<int>(experts),
      static_cast<XT*>(h), ks);
  check_launch("gemv_gate_up_kernel");
}

template <typename XT, int BITS>
void down_for(int64_t tokens, const int32_t* ids, const float* topk_weights, int64_t top_k,
              int64_t experts, const CudaQWeight& w2, const void* h, void* y,
              cudaStream_t stream) {
  const int64_t row_groups = (w2.n + R - 1) / R;
  const int ks = choose_splits(row_groups, tokens, w2.steps_per_row());
  const dim3 grid(static_cast<unsigned>((row_groups + kWarps / ks - 1) / (kWarps / ks)),
                  static_cast<unsigned>(tokens));
  gemv_down_kernel<XT, BITS><<<grid, kThreads, 0, stream>>>(
      w2, static_cast<const XT*>(h), ids, topk_weights, static_cast<int>(top_k),
      static_cast<int>(experts), static_cast<XT*>(y), ks);
  check_launch("gemv_down_kernel");
}

// The two launches, each instantiated for its own weight's width.
template <typename XT>
void moe_for(const void* x, int64_t tokens, const int32_t* ids, const float* topk_weights,
             int64_t top_k, int64_t experts, const CudaQWeight& w13, const CudaQWeight& w2,
             void* h, void* y, cudaStream_t stream) {
  with_bits(w13.bits, [&](auto b) {
    gate_up_for<XT, decltype(b)::value>(x, tokens, ids, top_k, experts, w13, h, stream);
  });
  with_bits(w2.bits, [&](auto b) {
    down_for<XT, decltype(b)::value>(tokens, ids, topk_weights, top_k, experts, w2, h, y,
                                     stream);
  });
}

}  // namespace

int sm_count() {
  static std::atomic<int> cached[64];
  int device = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  if (device < 0 || device >= 64) device = 63;
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    cuda_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

void launch_gemv_dense(const void* x, DType x_dtype, int64_t m, const CudaQWeight& w, void* y,
                       int64_t stream) {
  const cudaStream_t s = as_stream(stream);
  with_bits(w.bits, [&](auto b) {
    if (x_dtype == DType::kBFloat16)
      dense_for<__nv_bfloat16, decltype(b)::value>(x, m, w, y, s);
    else
      dense_for<__half, decltype(b)::value>(x, m, w, y, s);
  });
}

void launch_gemv_moe(const void* x, DType x_dtype, int64_t tokens, const int32_t* topk_ids,
                     const float* topk_weights, int64_t top_k, int64_t experts,
                     const CudaQWeight& w13, const CudaQWeight& w2, void* h, void* y,
                     int64_t stream) {
  const cudaStream_t s = as_stream(stream);
  if (x_dtype == DType::kBFloat16)
    moe_for<__nv_bfloat16>(x, tokens, topk_ids, topk_weights, top_k, experts, w13, w2, h, y, s);
  else
    moe_for<__half>(x, tokens, topk_ids, topk_weights, top_k, experts, w13, w2, h, y, s);
}

}  // namespace kimivl
