// CUDA varlen attention forward (FlashAttention-2 algorithm) for float16 / bfloat16.
//
// One CTA per (query tile of kBlockM rows, head, sequence); the sequence bounds come from
// cu_seqlens on the device, tiles past a sequence's end exit at once. Each of the kBlockM / 16
// warps owns 16 query rows: Q is staged through shared memory once into registers (A fragments),
// then K/V tiles of kBlockN keys stream through shared memory (cp.async on sm_80+; K of the next
// tile loads while P.V of this one runs). Inputs whose pointers or strides are not 16-byte
// multiples (or head dims not multiples of 8) load element by element, same results.
// S = Q.K^T and O += P.V run on tensor cores (mma m16n8k16, fp32 accumulation), the softmax is
// online in fp32 registers (exp2 with scale * log2 e folded in); P is rounded to the input dtype
// for P.V, as in FlashAttention. Output rows are written once, normalized, in the input dtype.
// Causal: key tiles wholly above the diagonal are never visited; only tiles that cross the diagonal
// or the sequence end are masked.
//
// Head dims: the kernel is instantiated for padded (Dqk, Dv) = (80, 72) [MoonViT 72: QK^T pads the
// MMA K dimension 72 -> 80, P.V needs no padding since 72 = 9 x n8], (128, 128), (192, 128) [MLA
// prefill] and (256, 256); any head_dim <= 256 and v_dim <= 256 runs in the smallest that fits,
// zero padded in shared memory. Shared memory stays under 48 KB for all of them.
#include <algorithm>
#include <string>

#include "cuda/cuda_common.cuh"
#include "cuda/varlen_attention.cuh"
#include "cuda/varlen_attention_mma.cuh"

namespace kimivl {
namespace {

using attn::smem_stride;

template <int kDqk_, int kDv_, int kBlockM_, int kBlockN_>
struct VarlenConfig {
  static constexpr int kDqk = kDqk_, kDv = kDv_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static_assert(kDqk % 16 == 0 && kDv % 8 == 0 && kBlockM % 16 == 0 && kBlockN % 16 == 0, "tile");
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStrideQK = smem_stride(kDqk);
  static constexpr int kStrideV = smem_stride(kDv);
  // Q is staged in the same memory that K and V use afterwards.
  static constexpr int kElemsQ = kBlockM * kStrideQK;
  static constexpr int kElemsK = kBlockN * kStrideQK;
  static constexpr int kElemsKV = kElemsK + kBlockN * kStrideV;
  static constexpr int kSmemBytes = 2 * (kElemsQ > kElemsKV ? kElemsQ : kElemsKV);
  static_assert(kSmemBytes <= 48 * 1024, "shared memory over the default 48 KB");
};

struct KernelArgs {
  CudaVarlenParams p;
  float scale_log2;  // scale * log2(e)
  bool vec_in;       // 16-byte chunks for q, k, v (see load_tile)
  bool vec_out;      // 4-byte pair stores for out
};

template <typename T, typename C>
__global__ void __launch_bounds__(C::kThreads)
    varlen_fwd_kernel(const KernelArgs args) {
  using namespace attn;
  constexpr int kDqk = C::kDqk, kDv = C::kDv, kBlockM = C::kBlockM, kBlockN = C::kBlockN;
  constexpr int kSQ = C::kStrideQK, kSV = C::kStrideV, kThreads = C::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);
  T* const sK = sQ;
  T* const sV = sQ + C::kElemsK;
  const CudaVarlenParams& p = args.p;

  const int seq = blockIdx.z, head = blockIdx.y;
  // Last query tiles first: under a causal mask they are the costliest, so they start earliest.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int start = p.cu_seqlens[seq];
  const int len = p.cu_seqlens[seq + 1] - start;
  const int m0 = m_block * kBlockM;
  if (m0 >= len) return;
  const int keys = p.causal ? min(len, m0 + kBlockM) : len;  // keys this tile can see
  const int n_tiles = (keys + kBlockN - 1) / kBlockN;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const T* const q = static_cast<const T*>(p.q) + (int64_t)(start + m0) * p.q_row + head * p.q_head;
  const T* const k = static_cast<const T*>(p.k) + (int64_t)start * p.k_row + head * p.k_head;
  const T* const v = static_cast<const T*>(p.v) + (int64_t)start * p.v_row + head * p.v_head;
  const int dqk = static_cast<int>(p.head_dim), dv = static_cast<int>(p.v_dim);

  // Q tile -> registers (A fragments of the warp's 16 rows, kDqk / 16 k-steps).
  load_tile<T, kBlockM, kDqk, kSQ, kThreads>(sQ, q, p.q_row, len - m0, dqk, args.vec_in);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[kDqk / 16][4];
#pragma unroll
  for (int ks = 0; ks < kDqk / 16; ++ks)
    ldmatrix_x4(qf[ks], sQ + (warp * 16 + lane % 16) * kSQ + ks * 16 + (lane / 16) * 8);
  __syncthreads();  // sQ is overwritten by K and V below

  load_tile<T, kBlockN, kDqk, kSQ, kThreads>(sK, k, p.k_row, len, dqk, args.vec_in);
  cp_async_commit();
  load_tile<T, kBlockN, kDv, kSV, kThreads>(sV, v, p.v_row, len, dv, args.vec_in);
  cp_async_commit();

  float o[kDv / 8][4];
#pragma unroll
  for (int d = 0; d < kDv / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int row0 = m0 + warp * 16 + g;  // this thread's rows: row0 and row0 + 8 (sequence-relative)

  for (int nb = 0; nb < n_tiles; ++nb) {
    const int n0 = nb * kBlockN;
    // Groups in flight here: K(nb), V(nb). Wait for K(nb).
    cp_async_wait<1>();
    __syncthreads();
    float s[kBlockN / 8][4];
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kDqk / 16; ++ks) {
#pragma unroll
      for (int n2 = 0; n2 < kBlockN / 16; ++n2) {
        // Matrices: keys n2*16+0..7 at k-cols ks*16+{0,8}, keys n2*16+8..15 at the same.
        uint32_t b[4];
        ldmatrix_x4(b, sK + (n2 * 16 + lane % 8 + (lane / 16) * 8) * kSQ + ks * 16 +
                           ((lane / 8) % 2) * 8);
        mma16816<T>(s[2 * n2], qf[ks], b[0], b[1]);
        mma16816<T>(s[2 * n2 + 1], qf[ks], b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with sK
    if (nb + 1 < n_tiles)
      load_tile<T, kBlockN, kDqk, kSQ, kThreads>(sK, k + (int64_t)(n0 + kBlockN) * p.k_row,
                                                 p.k_row, len - n0 - kBlockN, dqk, args.vec_in);
    cp_async_commit();  // always commit (possibly empty) so the group count stays in step

    const bool mask = n0 + kBlockN > len || (p.causal && n0 + kBlockN - 1 > m0);
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + n * 8 + 2 * tq + (e % 2), row = row0 + (e / 2) * 8;
        s[n][e] *= args.scale_log2;
        if (mask && (col >= len || (p.causal && col > row))) s[n][e] = -INFINITY;
      }
    online_softmax(s, m, l, o);

    // Groups in flight: V(nb), K(nb + 1). Wait for V(nb).
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {Pack<T>::two(s[2 * kk][0], s[2 * kk][1]),
                             Pack<T>::two(s[2 * kk][2], s[2 * kk][3]),
                             Pack<T>::two(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Pack<T>::two(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      // Key rows kk*16 + 0..15 (lanes 0..7: +0..7, lanes 8..15: +8..15, repeated for lanes 16..31).
      const T* vrow = sV + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kSV;
#pragma unroll
      for (int d2 = 0; d2 < kDv / 16; ++d2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vrow + d2 * 16 + (lane / 16) * 8);
        mma16816<T>(o[2 * d2], a, b[0], b[1]);
        mma16816<T>(o[2 * d2 + 1], a, b[2], b[3]);
      }
      if constexpr (kDv % 16 != 0) {
        uint32_t b[2];
        ldmatrix_x2_trans(b, vrow + kDv - 8);
        mma16816<T>(o[kDv / 8 - 1], a, b[0], b[1]);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (nb + 1 < n_tiles)
      load_tile<T, kBlockN, kDv, kSV, kThreads>(sV, v + (int64_t)(n0 + kBlockN) * p.v_row,
                                                p.v_row, len - n0 - kBlockN, dv, args.vec_in);
    cp_async_commit();
  }

  // Normalize and store rows row0, row0 + 8 (those inside the sequence), columns < v_dim.
  T* const out = static_cast<T*>(p.out) + (int64_t)start * p.o_row + head * p.o_head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(l[r]);
    const float inv = total > 0.f ? 1.f / total : 0.f;
    const int row = row0 + r * 8;
    if (row >= len) continue;
    T* const orow = out + (int64_t)row * p.o_row;
#pragma unroll
    for (int d = 0; d < kDv / 8; ++d) {
      const int col = d * 8 + 2 * tq;
      const float x0 = o[d][2 * r] * inv, x1 = o[d][2 * r + 1] * inv;
      if (args.vec_out && col + 1 < dv) {
        *reinterpret_cast<uint32_t*>(orow + col) = Pack<T>::two(x0, x1);
      } else {
        if (col < dv) orow[col] = Pack<T>::one(x0);
        if (col + 1 < dv) orow[col + 1] = Pack<T>::one(x1);
      }
    }
  }
}

template <typename T, typename C>
void launch(const KernelArgs& args, cudaStream_t stream) {
  const CudaVarlenParams& p = args.p;
  const dim3 grid(static_cast<unsigned>((p.max_seqlen + C::kBlockM - 1) / C::kBlockM),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.num_seqs));
  varlen_fwd_kernel<T, C><<<grid, C::kThreads, C::kSmemBytes, stream>>>(args);
  check_launch("varlen_attention kernel launch");
}

template <typename T>
void dispatch_dims(const KernelArgs& args, cudaStream_t stream) {
  const int64_t dqk = args.p.head_dim, dv = args.p.v_dim;
  if (dqk <= 80 && dv <= 72)
    launch<T, VarlenConfig<80, 72, 64, 64>>(args, stream);
  else if (dqk <= 128 && dv <= 128)
    launch<T, VarlenConfig<128, 128, 64, 64>>(args, stream);
  else if (dqk <= 192 && dv <= 128)
    launch<T, VarlenConfig<192, 128, 64, 64>>(args, stream);
  else
    launch<T, VarlenConfig<256, 256, 64, 32>>(args, stream);
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

void cuda_varlen_attention(const CudaVarlenParams& p, int64_t stream_handle) {
  const cudaStream_t stream = as_stream(stream_handle);
  const std::string op = "cuda_varlen_attention: ";
  check(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16,
        op + "dtype must be float16 or bfloat16");
  check(p.q && p.k && p.v && p.out && p.cu_seqlens, op + "null data pointer");
  check(p.num_seqs >= 1 && p.num_seqs <= 65535,
        op + "num_seqs must be in [1, 65535], got " + std::to_string(p.num_seqs));
  check(p.heads >= 1 && p.heads <= 65535,
        op + "heads must be in [1, 65535], got " + std::to_string(p.heads));
  check(p.head_dim >= 1 && p.head_dim <= 256 && p.v_dim >= 1 && p.v_dim <= 256,
        op + "head_dim and v_dim must be in [1, 256], got " + std::to_string(p.head_dim) +
            " and " + std::to_string(p.v_dim));
  check(p.max_seqlen >= 0 && p.max_seqlen < (int64_t{1} << 31),
        op + "max_seqlen must be in [0, 2^31), got " + std::to_string(p.max_seqlen));
  if (p.dtype == DType::kBFloat16) {
    int device = 0, major = 0;
    cuda_check(cudaGetDevice(&device), "cudaGetDevice");
    cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
               "cudaDeviceGetAttribute");
    check(major >= 8, op + "bfloat16 needs compute capability 8.0 or newer (use float16)");
  }
  if (p.max_seqlen == 0) return;
  KernelArgs args{p, p.scale * 1.4426950408889634f, false, false};
  const bool strides8 = p.q_row % 8 == 0 && p.q_head % 8 == 0 && p.k_row % 8 == 0 &&
                        p.k_head % 8 == 0 && p.v_row % 8 == 0 && p.v_head % 8 == 0;
  args.vec_in = strides8 && p.head_dim % 8 == 0 && p.v_dim % 8 == 0 && aligned(p.q, 16) &&
                aligned(p.k, 16) && aligned(p.v, 16);
  args.vec_out = p.o_row % 2 == 0 && p.o_head % 2 == 0 && aligned(p.out, 4);
  if (p.dtype == DType::kFloat16)
    dispatch_dims<__half>(args, stream);
  else
    dispatch_dims<__nv_bfloat16>(args, stream);
}

}  // namespace kimivl
