// CUDA absorbed MLA decode: split kernels (one CTA per (context chunk, batch entry), all heads
// together, so every cached row is read from memory once per step) and a log-sum-exp merge.
//
// Tensor-core path (bf16/fp16 cache, rank 512, rope 64, heads <= 16: Kimi-VL): the 16 heads are
// exactly the M = 16 of mma m16n8k16, so the step is a 16-row flash-attention tile with K = the
// 576-wide cached rows and V = their first 512 columns. 4 warps, 32-token tiles through shared
// memory (cp.async, 2 stages when the device allows 96 KB of shared memory per block, else 1).
// Warp w computes S for keys 8w..8w+7 of the tile (36 k-steps over the 576 dims), the 16x32 scores
// meet in shared memory, every warp runs the same online softmax on them and accumulates P.V for
// its own 128 output columns. q is rounded to the cache dtype for the MMA, as flash attention
// does with bf16 inputs; P is rounded to it for P.V; accumulation is fp32.
//
// SIMT path (fp32 cache, other shapes, unaligned caches, bf16 before sm_80): the same split and
// merge with fp32 arithmetic on CUDA cores; q and a tile of cached rows in shared memory as fp32.
#include <algorithm>
#include <string>

#include "cuda/cuda_common.cuh"
#include "cuda/mla_decode.cuh"
#include "cuda/varlen_attention_mma.cuh"

namespace kimivl {
namespace {

using attn::smem_stride;

struct MlaArgs {
  CudaMlaDecodeParams p;
  int64_t chunk;     // tokens per split (a multiple of 64)
  int64_t max_len;   // min(capacity, max_seq_len): lengths are clamped to it
  float scale_log2;  // scale * log2(e)
};

__device__ __forceinline__ float load_as_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// Element c < rank + rope of the concatenated query [q_lat | q_pe] of (b, h).
__device__ __forceinline__ float query_elem(const CudaMlaDecodeParams& p, int64_t b, int64_t h,
                                           int64_t c) {
  return c < p.rank ? load_as_float(p.q_lat, p.q_dtype, b * p.q_lat_batch + h * p.q_lat_head + c)
                    : load_as_float(p.q_pe, p.q_dtype,
                                    b * p.q_pe_batch + h * p.q_pe_head + (c - p.rank));
}

// This CTA's token range [t_begin, t_end) of entry b (empty when the split lies past the length).
__device__ __forceinline__ void split_range(const MlaArgs& a, int64_t b, int64_t split,
                                            int64_t* t_begin, int64_t* t_end) {
  const int64_t len = min(max((int64_t)a.p.seq_lens[b], (int64_t)0), a.max_len);
  *t_begin = split * a.chunk;
  *t_end = max(*t_begin, min(len, *t_begin + a.chunk));
}

// ---------------------------------------------------------------- tensor-core split kernel
constexpr int kTcRank = 512, kTcRope = 64, kTcDim = kTcRank + kTcRope;
constexpr int kTcHeads = 16, kTcTokens = 32, kTcWarps = 4, kTcThreads = kTcWarps * 32;
constexpr int kTcStride = smem_stride(kTcDim);  // 584 elements per shared-memory row
constexpr int kTcScoreStride = 40;              // floats per row of the 16 x 32 score tile
static_assert(kTcTokens == 8 * kTcWarps && kTcRank == 128 * kTcWarps, "warp split");

constexpr int tc_smem_bytes(int stages) {
  return 2 * kTcHeads * kTcStride + stages * 2 * kTcTokens * kTcStride +
         4 * kTcHeads * kTcScoreStride;
}

template <typename T, int kStages>
__global__ void __launch_bounds__(kTcThreads) mla_split_tc_kernel(const MlaArgs a) {
  using namespace attn;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);        // [16][kTcStride]
  T* const sC = sQ + kTcHeads * kTcStride;             // [kStages][32][kTcStride]
  float* const sS = reinterpret_cast<float*>(sC + kStages * kTcTokens * kTcStride);  // [16][40]
  const CudaMlaDecodeParams& p = a.p;
  const int64_t b = blockIdx.y, split = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  int64_t t_begin, t_end;
  split_range(a, b, split, &t_begin, &t_end);
  const int n_tiles = static_cast<int>((t_end - t_begin + kTcTokens - 1) / kTcTokens);
  const int64_t part = (b * p.num_splits + split) * p.heads;  // first (b, split, head) row
  if (n_tiles == 0) {  // past the entry's length: an empty partial (the merge skips its o)
    for (int h = threadIdx.x; h < p.heads; h += kTcThreads)
      p.ws_ml[(part + h) * 2] = -INFINITY, p.ws_ml[(part + h) * 2 + 1] = 0.f;
    return;
  }

  float o[kTcRank / kTcWarps / 8][4];
#pragma unroll
  for (int d = 0; d < kTcRank / kTcWarps / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  {
    // The queries of all heads, rounded to T; rows >= heads are zero (their outputs are dropped).
    for (int e = threadIdx.x; e < kTcHeads * kTcDim; e += kTcThreads) {
      const int h = e / kTcDim, c = e % kTcDim;
      sQ[h * kTcStride + c] = Pack<T>::one(h < p.heads ? query_elem(p, b, h, c) : 0.f);
    }
    const T* const cache = static_cast<const T*>(p.cache) + b * p.cache_batch;
    auto load = [&](int tile) {
      const int64_t t0 = t_begin + (int64_t)tile * kTcTokens;
      load_tile<T, kTcTokens, kTcDim, kTcStride, kTcThreads>(
          sC + (tile % kStages) * kTcTokens * kTcStride, cache + t0 * p.cache_row, p.cache_row,
          static_cast<int>(t_end - t0), kTcDim, true);
    };
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < n_tiles) load(st);
      cp_async_commit();
    }
    for (int j = 0; j < n_tiles; ++j) {
      if (j + kStages - 1 < n_tiles) load(j + kStages - 1);
      cp_async_commit();
      cp_async_wait<kStages - 1>();  // tile j has landed (and, first time round, sQ is written)
      __syncthreads();
      const T* const tile = sC + (j % kStages) * kTcTokens * kTcStride;
      const int64_t t0 = t_begin + (int64_t)j * kTcTokens;

      // Scores of keys 8w..8w+7 for the 16 heads; two k-steps per iteration, into two
      // accumulators so that consecutive MMAs do not wait on each other.
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll 6
      for (int ks = 0; ks < kTcDim / 16; ks += 2) {
        uint32_t bk[4], a0[4], a1[4];
        ldmatrix_x4(bk, tile + (8 * warp + lane % 8) * kTcStride + ks * 16 + (lane / 8) * 8);
        ldmatrix_x4(a0, sQ + (lane % 16) * kTcStride + ks * 16 + (lane / 16) * 8);
        ldmatrix_x4(a1, sQ + (lane % 16) * kTcStride + (ks + 1) * 16 + (lane / 16) * 8);
        mma16816<T>(acc[0], a0, bk[0], bk[1]);
        mma16816<T>(acc[1], a1, bk[2], bk[3]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = 8 * warp + 2 * tq + e % 2;
        sS[(g + (e / 2) * 8) * kTcScoreStride + key] =
            t0 + key < t_end ? (acc[0][e] + acc[1][e]) * a.scale_log2 : -INFINITY;
      }
      __syncthreads();

      // Every warp takes the whole 16 x 32 score tile in the accumulator layout of 4 n-tiles.
      float s[kTcTokens / 8][4];
#pragma unroll
      for (int n = 0; n < kTcTokens / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[n][e] = sS[(g + (e / 2) * 8) * kTcScoreStride + 8 * n + 2 * tq + e % 2];
      online_softmax(s, m, l, o);

      // O[:, 128w .. 128w + 127] += P . V, V = the first 512 columns of the cached rows.
#pragma unroll
      for (int kk = 0; kk < kTcTokens / 16; ++kk) {
        const uint32_t pa[4] = {Pack<T>::two(s[2 * kk][0], s[2 * kk][1]),
                                Pack<T>::two(s[2 * kk][2], s[2 * kk][3]),
                                Pack<T>::two(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                Pack<T>::two(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        const T* const vrow = tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kTcStride +
                              warp * (kTcRank / kTcWarps);
#pragma unroll
        for (int d2 = 0; d2 < kTcRank / kTcWarps / 16; ++d2) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, vrow + d2 * 16 + (lane / 16) * 8);
          mma16816<T>(o[2 * d2], pa, bv[0], bv[1]);
          mma16816<T>(o[2 * d2 + 1], pa, bv[2], bv[3]);
        }
      }
      __syncthreads();  // the tile's slot and sS are rewritten next iteration
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(l[r]);
    const int h = g + 8 * r;
    if (h >= p.heads) continue;
    float* const dst = p.ws_o + (part + h) * p.rank + warp * (kTcRank / kTcWarps);
#pragma unroll
    for (int d = 0; d < kTcRank / kTcWarps / 8; ++d)
      *reinterpret_cast<float2*>(dst + d * 8 + 2 * tq) = make_float2(o[d][2 * r], o[d][2 * r + 1]);
    if (warp == 0 && tq == 0) {
      p.ws_ml[(part + h) * 2] = m[r];
      p.ws_ml[(part + h) * 2 + 1] = total;
    }
  }
}

// ---------------------------------------------------------------- SIMT split kernel
constexpr int kSimtThreads = 256, kSimtWarps = kSimtThreads / 32;
constexpr int kSimtPerThread = 64;  // output elements per thread: heads * rank <= 16384

template <typename TC>
__global__ void __launch_bounds__(kSimtThreads) mla_split_simt_kernel(const MlaArgs a, int nt) {
  extern __shared__ __align__(16) float smem_f[];
  const CudaMlaDecodeParams& p = a.p;
  const int heads = static_cast<int>(p.heads), rank = static_cast<int>(p.rank);
  const int dim = static_cast<int>(p.rank + p.rope);
  float* const sQ = smem_f;                 // [heads][dim]
  float* const sT = sQ + heads * dim;       // [nt][dim]
  float* const sP = sT + nt * dim;          // [heads][nt]
  float* const sM = sP + heads * nt;        // [heads] running max (log2 units)
  float* const sL = sM + heads;             // [heads] running sum
  float* const sCorr = sL + heads;          // [heads] rescale factor of this tile
  const int64_t b = blockIdx.y, split = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t t_begin, t_end;
  split_range(a, b, split, &t_begin, &t_end);
  const int n_tiles = static_cast<int>((t_end - t_begin + nt - 1) / nt);
  const int64_t part = (b * p.num_splits + split) * p.heads;
  if (n_tiles == 0) {  // past the entry's length: an empty partial (the merge skips its o)
    for (int h = threadIdx.x; h < heads; h += kSimtThreads)
      p.ws_ml[(part + h) * 2] = -INFINITY, p.ws_ml[(part + h) * 2 + 1] = 0.f;
    return;
  }

  for (int e = threadIdx.x; e < heads * dim; e += kSimtThreads)
    sQ[e] = query_elem(p, b, e / dim, e % dim);
  for (int h = threadIdx.x; h < heads; h += kSimtThreads) sM[h] = -INFINITY, sL[h] = 0.f;
  float acc[kSimtPerThread];
#pragma unroll
  for (int i = 0; i < kSimtPerThread; ++i) acc[i] = 0.f;

  const TC* const cache = static_cast<const TC*>(p.cache) + b * p.cache_batch;
  for (int j = 0; j < n_tiles; ++j) {
    const int64_t t0 = t_begin + (int64_t)j * nt;
    const int rows = static_cast<int>(min((int64_t)nt, t_end - t0));
    for (int e = threadIdx.x; e < nt * dim; e += kSimtThreads) {
      const int r = e / dim, c = e % dim;
      sT[e] = r < rows ? attn::Pack<TC>::to_float(cache[(t0 + r) * p.cache_row + c]) : 0.f;
    }
    __syncthreads();
    for (int pr = warp; pr < heads * nt; pr += kSimtWarps) {
      const int h = pr / nt, r = pr % nt;
      float dot = 0.f;
      for (int c = lane; c < dim; c += 32) dot += sQ[h * dim + c] * sT[r * dim + c];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (lane == 0) sP[h * nt + r] = r < rows ? dot * a.scale_log2 : -INFINITY;
    }
    __syncthreads();
    for (int h = threadIdx.x; h < heads; h += kSimtThreads) {
      float mx = sM[h];
      for (int r = 0; r < nt; ++r) mx = fmaxf(mx, sP[h * nt + r]);
      const float base = mx == -INFINITY ? 0.f : mx;
      const float corr = exp2f(sM[h] - base);
      float sum = 0.f;
      for (int r = 0; r < nt; ++r) {
        const float e = exp2f(sP[h * nt + r] - base);
        sP[h * nt + r] = e;
        sum += e;
      }
      sL[h] = sL[h] * corr + sum;
      sM[h] = mx;
      sCorr[h] = corr;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSimtPerThread; ++i) {
      const int e = threadIdx.x + i * kSimtThreads;
      if (e < heads * rank) {
        const int h = e / rank, d = e % rank;
        float x = acc[i] * sCorr[h];
        for (int r = 0; r < nt; ++r) x += sP[h * nt + r] * sT[r * dim + d];
        acc[i] = x;
      }
    }
    __syncthreads();  // sT, sP are rewritten next tile
  }
  __syncthreads();  // the last tile's sM, sL are visible to every thread
#pragma unroll
  for (int i = 0; i < kSimtPerThread; ++i) {
    const int e = threadIdx.x + i * kSimtThreads;
    if (e < heads * rank) p.ws_o[part * p.rank + e] = acc[i];
  }
  for (int h = threadIdx.x; h < heads; h += kSimtThreads) {
    p.ws_ml[(part + h) * 2] = sM[h];
    p.ws_ml[(part + h) * 2 + 1] = sL[h];
  }
}

// ---------------------------------------------------------------- merge kernel
constexpr int kMergeThreads = 128;

// out[b, h, :] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s, M = max_s m_s; zeros when every
// split of the entry was empty, NaN when a split's sum is NaN. The o of a split with weight 0 is
// never read (empty splits do not write it). Dynamic shared memory: num_splits weights.
__global__ void __launch_bounds__(kMergeThreads) mla_merge_kernel(const MlaArgs a) {
  extern __shared__ float sW[];
  __shared__ float sTotal;
  const CudaMlaDecodeParams& p = a.p;
  const int64_t h = blockIdx.x, b = blockIdx.y, splits = p.num_splits;
  const int64_t first = b * splits * p.heads + h;  // partial (b, s, h) = first + s * heads
  float mx = -INFINITY;
  bool nan = false;  // a NaN score (NaN in the cache or q) poisons the entry, as on the CPU
  for (int64_t s = 0; s < splits; ++s) {
    mx = fmaxf(mx, p.ws_ml[(first + s * p.heads) * 2]);  // fmaxf skips NaN
    nan = nan || isnan(p.ws_ml[(first + s * p.heads) * 2 + 1]);
  }
  float* const dst = p.out + b * p.out_batch + h * p.out_head;
  if (nan || mx == -INFINITY) {  // uniform over the block
    for (int64_t d = threadIdx.x; d < p.rank; d += kMergeThreads) dst[d] = nan ? NAN : 0.f;
    return;
  }
  for (int64_t s = threadIdx.x; s < splits; s += kMergeThreads)
    sW[s] = exp2f(p.ws_ml[(first + s * p.heads) * 2] - mx);  // 0 for empty splits (m = -inf)
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int64_t s = 0; s < splits; ++s) total += sW[s] * p.ws_ml[(first + s * p.heads) * 2 + 1];
    sTotal = total;
  }
  __syncthreads();
  const float inv = 1.f / sTotal;  // > 0: the split holding the max has l >= 1
  for (int64_t d = threadIdx.x; d < p.rank; d += kMergeThreads) {
    float x = 0.f;
    for (int64_t s = 0; s < splits; ++s)
      if (sW[s] != 0.f) x += sW[s] * p.ws_o[(first + s * p.heads) * p.rank + d];
    dst[d] = x * inv;
  }
}

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
  return value;
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024)
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               "cudaFuncSetAttribute(mla_decode)");
}

template <typename T>
void launch_tc(const MlaArgs& a, int smem_optin, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.p.num_splits), static_cast<unsigned>(a.p.batch));
  if (smem_optin >= tc_smem_bytes(2)) {
    allow_smem(mla_split_tc_kernel<T, 2>, tc_smem_bytes(2));
    mla_split_tc_kernel<T, 2><<<grid, kTcThreads, tc_smem_bytes(2), stream>>>(a);
  } else {
    allow_smem(mla_split_tc_kernel<T, 1>, tc_smem_bytes(1));
    mla_split_tc_kernel<T, 1><<<grid, kTcThreads, tc_smem_bytes(1), stream>>>(a);
  }
  check_launch("mla_decode split kernel launch");
}

template <typename TC>
void launch_simt(const MlaArgs& a, int smem_optin, cudaStream_t stream) {
  const int64_t heads = a.p.heads, dim = a.p.rank + a.p.rope;
  const int64_t fixed = 4 * (heads * dim + 3 * heads), per_row = 4 * (dim + heads);
  // Tokens per tile: up to 16, as many as fit in the device's shared memory per block.
  const int64_t nt = std::min<int64_t>(16, (smem_optin - fixed) / per_row);
  check(nt >= 1, "cuda_mla_decode: heads * (rank + rope) = " + std::to_string(heads * dim) +
                     " is too large for the device's shared memory");
  const int bytes = static_cast<int>(fixed + nt * per_row);
  allow_smem(mla_split_simt_kernel<TC>, bytes);
  const dim3 grid(static_cast<unsigned>(a.p.num_splits), static_cast<unsigned>(a.p.batch));
  mla_split_simt_kernel<TC><<<grid, kSimtThreads, bytes, stream>>>(a, static_cast<int>(nt));
  check_launch("mla_decode split kernel launch");
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

const char* cuda_mla_decode(const CudaMlaDecodeParams& p, int64_t stream_handle) {
  const cudaStream_t stream = as_stream(stream_handle);
  const std::string op = "cuda_mla_decode: ";
  auto float_type = [](DType d) {
    return d == DType::kFloat32 || d == DType::kBFloat16 || d == DType::kFloat16;
  };
  check(float_type(p.q_dtype), op + "q dtype must be float32, bfloat16 or float16");
  check(float_type(p.cache_dtype), op + "cache dtype must be float32, bfloat16 or float16");
  check(p.q_lat && p.q_pe && p.cache && p.seq_lens && p.out && p.ws_o && p.ws_ml,
        op + "null data pointer");
  check(p.batch >= 1 && p.batch <= 65535,
        op + "batch must be in [1, 65535], got " + std::to_string(p.batch));
  check(p.heads >= 1 && p.rank >= 1 && p.rope >= 0, op + "heads, rank must be >= 1, rope >= 0");
  check(p.heads * p.rank <= kSimtThreads * kSimtPerThread,
        op + "heads * rank must be <= " + std::to_string(kSimtThreads * kSimtPerThread) +
            ", got " + std::to_string(p.heads * p.rank));
  check(p.capacity >= 1, op + "capacity must be >= 1");
  check(p.max_seq_len >= 1, op + "max_seq_len must be >= 1, got " + std::to_string(p.max_seq_len));
  check(p.num_splits >= 1 && p.num_splits <= 4096,
        op + "num_splits must be in [1, 4096], got " + std::to_string(p.num_splits));
  MlaArgs a;
  a.p = p;
  a.max_len = std::min(p.capacity, p.max_seq_len);
  const int64_t per_split = (a.max_len + p.num_splits - 1) / p.num_splits;
  a.chunk = (per_split + 63) / 64 * 64;
  a.scale_log2 = p.scale * 1.4426950408889634f;

  const int smem_optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  const bool tc = (p.cache_dtype == DType::kFloat16 ||
                   (p.cache_dtype == DType::kBFloat16 && major >= 8)) &&
                  p.rank == kTcRank && p.rope == kTcRope && p.heads <= kTcHeads &&
                  aligned16(p.cache) && p.cache_batch % 8 == 0 && p.cache_row % 8 == 0 &&
                  smem_optin >= tc_smem_bytes(1);
  if (tc) {
    if (p.cache_dtype == DType::kFloat16)
      launch_tc<__half>(a, smem_optin, stream);
    else
      launch_tc<__nv_bfloat16>(a, smem_optin, stream);
  } else if (p.cache_dtype == DType::kFloat16) {
    launch_simt<__half>(a, smem_optin, stream);
  } else if (p.cache_dtype == DType::kBFloat16) {
    launch_simt<__nv_bfloat16>(a, smem_optin, stream);
  } else {
    launch_simt<float>(a, smem_optin, stream);
  }
  const int merge_smem = static_cast<int>(4 * p.num_splits);
  mla_merge_kernel<<<dim3(static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch)),
                     kMergeThreads, merge_smem, stream>>>(a);
  check_launch("mla_decode merge kernel launch");
  return tc ? "tensor_core" : "simt";
}

}  // namespace kimivl
