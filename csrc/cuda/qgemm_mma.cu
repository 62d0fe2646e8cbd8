// Tensor-core quantized matmul for many activation rows (prefill): dense y = x . W^T, and the
// two grouped GEMMs of the MoE block over M-tiles of token-expert pairs sorted by expert.
//
// Block tile 64 (rows of x) x 64 (weight rows) x 32 (K), 4 warps; warp w owns x rows
// [16w, 16w + 16) and all 64 weight rows as 8 mma.m16n8k16 tiles, so for the fused gate/up
// tile (weight rows 0-31 gate channels c0.., rows 32-63 the same up channels) each thread holds
// the gate and the up value of the same (row, channel) and applies SiLU*mul in registers.
// Per K-slice of 32 the block copies x (16-byte loads) and dequantizes the weight slice to
// shared memory as exact 16-bit integers u - zero (magic-number conversion, no scale), while the
// next slice's global loads are already in flight (register double buffering). The integer
// products accumulate in fp32 per quantization group and are multiplied by the group's scale
// into the fp32 result when the group ends (groups are multiples of 32, so a slice never spans
// two), so the only rounding before fp32 is none: x and u - zero are exact 16-bit operands.
// 2, 3, 5 and 6-bit weights take the int4 path's shape (one thread per weight row and slice),
// reading the slice's `bits` words and unpacking its 32 codes with shifts (qgemm_lowbit.cuh).
//
// Architectures: sm_80+ issue mma.sync.m16n8k16 (bf16 or fp16 operands, fp32 accumulators).
// sm_75 has no bf16 mma (and no m16n8k16 for fp16), so it computes exactly the same accumulator
// fragment with CUDA-core FMAs from the same shared-memory tiles: correct, slower.
#include <type_traits>

#include "cuda/qgemm_common.cuh"
#include "cuda/qgemm_lowbit.cuh"

namespace kimivl {
namespace {

using qg::XType;

constexpr int BM = kMmaTileM, BN = 64, BK = 32;
constexpr int SK = BK + 8;  // smem row stride (elements): 80 bytes, conflict-free fragment reads
constexpr int kThreads = 128;

enum class Mode { kDense, kGateUp, kDown };

struct MmaParams {
  CudaQWeight w;
  const void* a = nullptr;  // dense: x [m, K]; gate/up: x [T, K]; down: h [P, K] by position
  int64_t m = 0;            // dense rows
  void* out = nullptr;      // dense: y [m, N] (XT); gate/up: h [P, I] (XT); down: [P, N] fp32
  MoeTiles tiles;
  int top_k = 1;
};

template <typename XT>
__device__ __forceinline__ void mma_tile(float (&c)[4], const XT* a_tile, const XT* w_tile,
                                         int gid, int tq) {
  // a_tile: 16 rows x 16 k at stride SK; w_tile: 8 weight rows x 16 k at stride SK.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto ld = [](const XT* p) { return *reinterpret_cast<const uint32_t*>(p); };
  const uint32_t a0 = ld(a_tile + gid * SK + 2 * tq);
  const uint32_t a1 = ld(a_tile + (gid + 8) * SK + 2 * tq);
  const uint32_t a2 = ld(a_tile + gid * SK + 2 * tq + 8);
  const uint32_t a3 = ld(a_tile + (gid + 8) * SK + 2 * tq + 8);
  const uint32_t b0 = ld(w_tile + gid * SK + 2 * tq);
  const uint32_t b1 = ld(w_tile + gid * SK + 2 * tq + 8);
  if constexpr (std::is_same_v<XT, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  // The same fragment: c[i] = C[row gid + 8 (i >= 2)][col 2 tq + (i & 1)].
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const XT* ar = a_tile + (gid + (i >= 2 ? 8 : 0)) * SK;
    const XT* wr = w_tile + (2 * tq + (i & 1)) * SK;
    float s = c[i];
#pragma unroll
    for (int k = 0; k < 16; ++k) s = fmaf(static_cast<float>(ar[k]), static_cast<float>(wr[k]), s);
    c[i] = s;
  }
#endif
}

// One thread's share of a K-slice in registers: two 16-byte chunks of x and one weight vector
// (int4/int8) or one chunk of `BITS` words (2, 3, 5, 6 bits).
template <int BITS>
struct Stage {
  uint4 a[2];
  uint4 w;
  uint32_t lw[qg::is_lowbit(BITS) ? BITS : 1];
  int zero;
};

template <typename XT, int BITS, Mode MODE>
__global__ void __launch_bounds__(kThreads) mma_kernel(MmaParams p) {
  __shared__ __align__(16) XT As[BM * SK];
  __shared__ __align__(16) XT Ws[BN * SK];
  __shared__ int64_t a_off[BM];  // element offset of each x row in the tile, -1: none
  __shared__ float Ss[BN];       // the ending group's scale of each weight row of the tile

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gid = lane / 4, tq = lane % 4;
  const CudaQWeight& w = p.w;

  // Rows of the tile and the expert.
  int64_t row_begin, row_end, e = 0;
  if constexpr (MODE == Mode::kDense) {
    row_begin = static_cast<int64_t>(blockIdx.y) * BM;
    row_end = row_begin + BM < p.m ? row_begin + BM : p.m;
  } else {
    const int tile = blockIdx.y;
    if (tile >= *p.tiles.num_tiles) return;  // uniform over the block, before any barrier
    e = p.tiles.tile_expert[tile];
    row_begin = p.tiles.tile_start[tile];
    row_end = p.tiles.tile_end[tile];
  }
  const int rows = static_cast<int>(row_end - row_begin);  // 1..64
  const int64_t kdim = w.k;
  if (tid < BM) {
    int64_t off = -1;
    if (tid < rows) {
      const int64_t pos = row_begin + tid;
      if constexpr (MODE == Mode::kGateUp)
        off = static_cast<int64_t>(p.tiles.sorted_pairs[pos] / p.top_k) * kdim;
      else
        off = pos * kdim;
    }
    a_off[tid] = off;
  }

  // Weight rows of the tile: smem row i -> global row wrow(i), valid if wok(i).
  const int64_t inter = w.n / 2;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * (BN / 2);  // gate/up channels
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const auto wrow = [&](int i) -> int64_t {
    if constexpr (MODE == Mode::kGateUp)
      return i < BN / 2 ? c0 + i : inter + c0 + (i - BN / 2);
    else
      return n0 + i;
  };
  const auto wok = [&](int i) -> bool {
    if constexpr (MODE == Mode::kGateUp)
      return c0 + (i < BN / 2 ? i : i - BN / 2) < inter;
    else
      return n0 + i < w.n;
  };

  const uint32_t* q = w.q + e * w.expert_q_stride();
  const uint16_t* sc = w.scales + e * w.expert_s_stride();
  const uint8_t* zp = w.zeros ? w.zeros + e * w.expert_s_stride() : nullptr;
  const int64_t wpr = w.words_per_row(), groups = w.groups();
  const XT* a_base = static_cast<const XT*>(p.a);
  __syncthreads();  // a_off visible

  // Which weight vector this thread loads: int4 one 32-k vector of row tid (tid < 64), 2, 3,
  // 5, 6 bits the slice's chunk of row tid the same way; int8 half a slice (16 k) of row tid / 2.
  constexpr bool kWholeSlice = BITS != 8;
  constexpr int kPairs = kWholeSlice ? 16 : 8;  // element pairs a thread writes per slice
  const int w_row = kWholeSlice ? tid : tid / 2;
  const int w_half = kWholeSlice ? 0 : tid % 2;
  const bool w_loader = kWholeSlice ? tid < BN : true;
  const bool w_valid = w_loader && wok(w_row);
  const int64_t w_grow = w_valid ? wrow(w_row) : 0;

  const auto load = [&](int64_t kt, Stage<BITS>& st) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int chunk = tid + i * kThreads;  // 256 chunks of 8 elements: row chunk / 4
      const int r = chunk / 4, part = chunk % 4;
      const int64_t k = kt * BK + part * 8;
      const int64_t off = a_off[r];
      st.a[i] = off >= 0 && k < kdim ? qg::ldg16(a_base + off + k) : make_uint4(0, 0, 0, 0);
    }
    st.w = make_uint4(0, 0, 0, 0);
    st.zero = 0;
    if (w_valid) {
      if constexpr (qg::is_lowbit(BITS)) {
        qg::load_chunk<BITS>(q + w_grow * wpr + kt * BITS, st.lw);
      } else {
        const int64_t vec = BITS == 4 ? kt : 2 * kt + w_half;
        st.w = qg::ldg16(q + w_grow * wpr + vec * 4);
      }
      const int64_t g = kt * BK / w.group;
      st.zero = zp ? zp[w_grow * groups + g] : (1 << (BITS - 1));
    }
  };

  const auto store = [&](const Stage<BITS>& st) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int chunk = tid + i * kThreads;
      *reinterpret_cast<uint4*>(&As[(chunk / 4) * SK + (chunk % 4) * 8]) = st.a[i];
    }
    if (!w_loader) return;
    uint32_t out[kPairs];  // 32 or 16 elements as pairs
    const uint32_t words[4] = {st.w.x, st.w.y, st.w.z, st.w.w};
    if (!w_valid) {
#pragma unroll
      for (int i = 0; i < kPairs; ++i) out[i] = 0;
    } else if constexpr (qg::is_lowbit(BITS)) {
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const int lo = static_cast<int>(qg::lowbit_code<BITS>(st.lw, 2 * i)) - st.zero;
        const int hi = static_cast<int>(qg::lowbit_code<BITS>(st.lw, 2 * i + 1)) - st.zero;
        out[i] = qg::int_pair<XT>(lo, hi);
      }
    } else if constexpr (BITS == 4) {
      if constexpr (std::is_same_v<XT, __half>) {
        const __half2 bias = qg::int_bias_f16(st.zero);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            out[4 * j + i] = qg::as_u32(qg::int4_pair_f16(words[j], i, bias));
      } else {
        const __nv_bfloat162 bias = qg::int4_bias_bf16(st.zero);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            out[4 * j + i] = qg::as_u32(qg::int4_pair_bf16(words[j], i, bias));
      }
    } else {
      if constexpr (std::is_same_v<XT, __half>) {
        const __half2 bias = qg::int_bias_f16(st.zero);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < 2; ++i)
            out[2 * j + i] = qg::as_u32(qg::int8_pair_f16(words[j], i, bias));
      } else {
        // |u - zero| <= 255 needs 8 significant bits: exact in bf16, via an exact fp32.
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int b0 = static_cast<int>((words[j] >> (16 * i)) & 0xff);
            const int b1 = static_cast<int>((words[j] >> (16 * i + 8)) & 0xff);
            const float lo = static_cast<float>(b0 - st.zero);
            const float hi = static_cast<float>(b1 - st.zero);
            out[2 * j + i] = qg::as_u32(__floats2bfloat162_rn(lo, hi));
          }
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(&Ws[w_row * SK + w_half * 16]);
#pragma unroll
    for (int i = 0; i < kPairs / 4; ++i)
      dst[i] = make_uint4(out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]);
  };

  float acc[8][4], part[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = part[j][i] = 0.0f;

  const int64_t kt_count = w.kp / BK;
  const bool warp_active = warp * 16 < rows;  // uniform per warp
  Stage<BITS> st;
  load(0, st);
  store(st);
  __syncthreads();
  for (int64_t kt = 0; kt < kt_count; ++kt) {
    if (kt + 1 < kt_count) load(kt + 1, st);
    if (warp_active) {
#pragma unroll
      for (int ks = 0; ks < BK / 16; ++ks)
#pragma unroll
        for (int j = 0; j < 8; ++j)
          mma_tile<XT>(part[j], &As[warp * 16 * SK + ks * 16], &Ws[j * 8 * SK + ks * 16], gid, tq);
    }
    const int64_t k_end = (kt + 1) * BK;
    if (k_end % w.group == 0 || kt + 1 == kt_count) {  // the group ends (uniform): scale into acc
      const int64_t g = kt * BK / w.group;
      if (tid < BN)
        Ss[tid] = wok(tid) ? qg::scale_to_float(sc[wrow(tid) * groups + g], w.scale_bf16) : 0.0f;
      __syncthreads();  // Ss visible; the previous group's readers passed the barrier below
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float s = Ss[j * 8 + 2 * tq + c];  // smem weight row of accumulator column c
          acc[j][c] = fmaf(s, part[j][c], acc[j][c]);
          acc[j][c + 2] = fmaf(s, part[j][c + 2], acc[j][c + 2]);
          part[j][c] = part[j][c + 2] = 0.0f;
        }
    }
    __syncthreads();  // everyone is done reading this slice
    if (kt + 1 < kt_count) {
      store(st);
      __syncthreads();
    }
  }

  // Epilogue: accumulator (j, i) is x row warp*16 + gid + 8 (i >= 2), smem weight row
  // j*8 + 2 tq + (i & 1).
  if (!warp_active) return;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * 16 + gid + 8 * half;
    if (r >= rows) continue;
    const int64_t pos = row_begin + r;
    if constexpr (MODE == Mode::kGateUp) {
      XT* h = static_cast<XT*>(p.out);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t ch = c0 + j * 8 + 2 * tq + c;
          if (ch < inter)
            h[pos * inter + ch] = XType<XT>::from_float(
                qg::silu_mul(acc[j][2 * half + c], acc[j + 4][2 * half + c]));
        }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t n = n0 + j * 8 + 2 * tq + c;
          if (n >= w.n) continue;
          const float v = acc[j][2 * half + c];
          if constexpr (MODE == Mode::kDense)
            static_cast<XT*>(p.out)[pos * w.n + n] = XType<XT>::from_float(v);
          else
            static_cast<float*>(p.out)[int64_t{p.tiles.sorted_pairs[pos]} * w.n + n] = v;
        }
    }
  }
}

template <Mode MODE>
void launch(const MmaParams& p, DType x_dtype, dim3 grid, cudaStream_t stream) {
  with_bits(p.w.bits, [&](auto b) {
    if (x_dtype == DType::kBFloat16)
      mma_kernel<__nv_bfloat16, decltype(b)::value, MODE><<<grid, kThreads, 0, stream>>>(p);
    else
      mma_kernel<__half, decltype(b)::value, MODE><<<grid, kThreads, 0, stream>>>(p);
  });
  check_launch("mma_kernel");
}

}  // namespace

void launch_mma_dense(const void* x, DType x_dtype, int64_t m, const CudaQWeight& w, void* y,
                      int64_t stream) {
  MmaParams p;
  p.w = w;
  p.a = x;
  p.m = m;
  p.out = y;
  const dim3 grid(static_cast<unsigned>((w.n + BN - 1) / BN),
                  static_cast<unsigned>((m + BM - 1) / BM));
  launch<Mode::kDense>(p, x_dtype, grid, as_stream(stream));
}

void launch_mma_moe_gate_up(const void* x, DType x_dtype, int64_t top_k, const CudaQWeight& w13,
                            const MoeTiles& tiles, void* h, int64_t stream) {
  MmaParams p;
  p.w = w13;
  p.a = x;
  p.out = h;
  p.tiles = tiles;
  p.top_k = static_cast<int>(top_k);
  const int64_t inter = w13.n / 2;
  const dim3 grid(static_cast<unsigned>((inter + BN / 2 - 1) / (BN / 2)),
                  static_cast<unsigned>(tiles.max_tiles));
  launch<Mode::kGateUp>(p, x_dtype, grid, as_stream(stream));
}

void launch_mma_moe_down(const void* h, DType x_dtype, const CudaQWeight& w2,
                         const MoeTiles& tiles, float* out_pairs, int64_t stream) {
  MmaParams p;
  p.w = w2;
  p.a = h;
  p.out = out_pairs;
  p.tiles = tiles;
  const dim3 grid(static_cast<unsigned>((w2.n + BN - 1) / BN),
                  static_cast<unsigned>(tiles.max_tiles));
  launch<Mode::kDown>(p, x_dtype, grid, as_stream(stream));
}

}  // namespace kimivl
