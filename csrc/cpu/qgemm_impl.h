// The tiling and threading of the quantized matmul and the MoE block, shared by every ISA path.
// Each ISA file defines `Kernel` (the 16-row block micro-kernel for int4 and int8) and
// `LowbitKernel` (2, 3, 5 and 6 bits) in an anonymous namespace inside kimivl::KIMIVL_QGEMM_NS,
// then includes this header: the templates are instantiated per ISA with
// that file's flags and have internal linkage, so the linker never merges kernels of two ISAs.
//
// Kernel::block<Bits, MR>(q, s, z, w, rows, out) must set out[m][r] (m < MR, r < 16) to
// sum_k W[16b + r][k] * x_hat_m[k] for the row block b whose bytes start at q, s and z, for MR up
// to the kernel's kMaxRows (LowbitKernel's may be smaller than Kernel's).
#include <algorithm>
#include <type_traits>

#include "cpu/parallel.h"
#include "cpu/qgemm.h"

#ifndef KIMIVL_QGEMM_NS
#error "define KIMIVL_QGEMM_NS (the ISA namespace) before including qgemm_impl.h"
#endif

namespace kimivl {
namespace KIMIVL_QGEMM_NS {
namespace {

template <int Bits>
using KernelFor = std::conditional_t<Bits == 4 || Bits == 8, Kernel, LowbitKernel>;

// Activation rows per tile of the loops below (weights unpacked once per tile, then reused).
constexpr int kMaxRows = std::max(Kernel::kMaxRows, LowbitKernel::kMaxRows);

// K's block<Bits, mr> for a run-time 1 <= mr <= MR.
template <typename K, int Bits, int MR>
void block_rows(const uint8_t* q, const uint16_t* s, const int8_t* z, const QWeight& w,
                const ActRow* rows, int mr, float (*out)[16]) {
  if constexpr (MR > 1) {
    if (mr < MR) return block_rows<K, Bits, MR - 1>(q, s, z, w, rows, mr, out);
  }
  K::template block<Bits, MR>(q, s, z, w, rows, out);
}

// f(std::integral_constant<int, bits>) for a width the layout has (qgemm.cpp checked it).
template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

// Row block b of expert e of w, for `mr` activation rows.
template <int Bits>
void run_block(const QWeight& w, int64_t e, int64_t b, const ActRow* rows, int mr,
               float (*out)[16]) {
  const uint8_t* q = w.q + e * w.expert_q_stride() + b * w.kc() * w.chunk_bytes();
  const int64_t s_off = e * w.expert_s_stride() + b * w.groups() * 16;
  const uint16_t* s = w.scales + s_off;
  const int8_t* z = w.zeros ? w.zeros + s_off : nullptr;
  using K = KernelFor<Bits>;
  for (int m0 = 0; m0 < mr; m0 += K::kMaxRows)
    block_rows<K, Bits, K::kMaxRows>(q, s, z, w, rows + m0, std::min(K::kMaxRows, mr - m0),
                                     out + m0);
}

int64_t element_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// The kernels prefetch 4 KB ahead inside a contiguous run of blocks; where the next run starts
// elsewhere (up after gate, the next expert), its first 4 KB are requested here, one step early.
void prefetch_run(const QWeight& w, int64_t e, int64_t b) {
  const uint8_t* q = w.q + e * w.expert_q_stride() + b * w.kc() * w.chunk_bytes();
  const char* p = reinterpret_cast<const char*>(q);
  for (int line = 0; line < 64; ++line) __builtin_prefetch(p + 64 * line);
}

// Row blocks per work item: enough items for dynamic balancing, up to 4 blocks so one
// activation tile is reused from L1 across them.
int64_t blocks_per_item(int64_t nb, int threads, int64_t items_per_thread) {
  return std::max<int64_t>(1, std::min<int64_t>(4, nb / (items_per_thread * threads)));
}

// One matmul's work items: (64-row activation tile, run of `bpi` row blocks), tile-major.
struct QGemmItems {
  int64_t nt = 0, bpi = 1, count = 0;
};

QGemmItems qgemm_items(const QGemmArgs& a) {
  QGemmItems items;
  items.bpi = blocks_per_item(a.w.nb(), a.num_threads, 8);
  items.nt = (a.w.nb() + items.bpi - 1) / items.bpi;
  items.count = (a.m + 63) / 64 * items.nt;
  return items;
}

template <int Bits>
void qgemm_item(const QGemmArgs& a, const QGemmItems& items, int64_t item) {
  const QWeight& w = a.w;
  const int64_t nb = w.nb(), tile_m = 64, nt = items.nt, bpi = items.bpi;
  char* y = static_cast<char*>(a.y);
  const int64_t esize = element_size(a.y_dtype);
  float out[kMaxRows][16];
  ActRow rows[kMaxRows];
  const int64_t m0 = (item / nt) * tile_m, m1 = std::min(a.m, m0 + tile_m);
  const int64_t b0 = (item % nt) * bpi, b1 = std::min(nb, b0 + bpi);
  for (int64_t r = m0; r < m1; r += kMaxRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, m1 - r));
    for (int i = 0; i < mr; ++i) rows[i] = a.act.row(r + i);
    for (int64_t b = b0; b < b1; ++b) {
      run_block<Bits>(w, 0, b, rows, mr, out);
      const int64_t cols = std::min<int64_t>(16, w.n - 16 * b);
      for (int i = 0; i < mr; ++i)
        store_row(out[i], cols, y + ((r + i) * w.n + 16 * b) * esize, a.y_dtype);
    }
  }
}

template <int Bits>
void qgemm_bits(const QGemmArgs& a) {
  const QGemmItems items = qgemm_items(a);
  parallel_for(items.count, 1, a.num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) qgemm_item<Bits>(a, items, item);
  });
}

// Stage A: items are (active expert, 32 intermediate channels); each computes the gate and up
// blocks of those channels for all of the expert's tokens and writes h = silu(gate) * up as one
// quantized 32-block per pair, ready for the down projection.
template <int Bits>
void moe_gate_up(const MoeArgs& a) {
  const QWeight& w = a.w13;
  const int64_t inter = w.n / 2, cbs = inter / 32, up = inter / 16;
  parallel_for(a.n_active * cbs, 1, a.num_threads, [&](int64_t begin, int64_t end) {
    float out[4][kMaxRows][16];
    ActRow rows[kMaxRows];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = a.active[item / cbs], cb = item % cbs;
      const int64_t p1 = a.expert_offsets[e + 1];
      prefetch_run(w, e, 2 * cb);
      prefetch_run(w, e, up + 2 * cb);
      for (int64_t p = a.expert_offsets[e]; p < p1; p += kMaxRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, p1 - p));
        for (int i = 0; i < mr; ++i) rows[i] = a.x.row(a.pair_token[p + i]);
        run_block<Bits>(w, e, 2 * cb, rows, mr, out[0]);
        run_block<Bits>(w, e, 2 * cb + 1, rows, mr, out[1]);
        run_block<Bits>(w, e, up + 2 * cb, rows, mr, out[2]);
        run_block<Bits>(w, e, up + 2 * cb + 1, rows, mr, out[3]);
        for (int i = 0; i < mr; ++i) {
          float gate[32], upv[32];
          std::copy(out[0][i], out[0][i] + 16, gate);
          std::copy(out[1][i], out[1][i] + 16, gate + 16);
          std::copy(out[2][i], out[2][i] + 16, upv);
          std::copy(out[3][i], out[3][i] + 16, upv + 16);
          const int64_t row = p + i, chunk = row * (inter / 32) + cb;
          silu_mul_quantize_block32(gate, upv, a.h.q + row * inter + 32 * cb, a.h.d + chunk,
                                    a.h.ds + chunk);
        }
      }
    }
  });
}

// Stage B: items are blocks of output columns; each loops over the active experts and their
// pairs, so the router-weighted sum over top-k is accumulated in fp32 with no two items ever
// writing the same element.
template <int Bits>
void moe_down(const MoeArgs& a) {
  const QWeight& w = a.w2;
  const int64_t nb = w.nb(), width = 16 * nb;
  const int64_t bpi = blocks_per_item(nb, a.num_threads, 4);
  const int64_t nt = (nb + bpi - 1) / bpi;
  char* y = static_cast<char*>(a.y);
  const int64_t esize = element_size(a.y_dtype);
  parallel_for(nt, 1, a.num_threads, [&](int64_t begin, int64_t end) {
    float out[kMaxRows][16];
    ActRow rows[kMaxRows];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b0 = item * bpi, b1 = std::min(nb, b0 + bpi);
      for (int64_t t = 0; t < a.tokens; ++t)
        std::fill(a.acc + t * width + 16 * b0, a.acc + t * width + 16 * b1, 0.0f);
      prefetch_run(w, a.active[0], b0);
      for (int64_t ai = 0; ai < a.n_active; ++ai) {
        const int64_t e = a.active[ai], p1 = a.expert_offsets[e + 1];
        if (ai + 1 < a.n_active) prefetch_run(w, a.active[ai + 1], b0);
        for (int64_t p = a.expert_offsets[e]; p < p1; p += kMaxRows) {
          const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, p1 - p));
          for (int i = 0; i < mr; ++i) rows[i] = a.h.row(p + i);
          for (int64_t b = b0; b < b1; ++b) {
            run_block<Bits>(w, e, b, rows, mr, out);
            for (int i = 0; i < mr; ++i) {
              float* dst = a.acc + a.pair_token[p + i] * width + 16 * b;
              const float wt = a.pair_weight[p + i];
              for (int r = 0; r < 16; ++r) dst[r] += wt * out[i][r];
            }
          }
        }
      }
      const int64_t cols = std::min(w.n, 16 * b1) - 16 * b0;
      for (int64_t t = 0; t < a.tokens; ++t)
        store_row(a.acc + t * width + 16 * b0, cols, y + (t * w.n + 16 * b0) * esize, a.y_dtype);
    }
  });
}

}  // namespace

void qgemm(const QGemmArgs& args) {
  with_bits(args.w.bits, [&](auto b) { qgemm_bits<decltype(b)::value>(args); });
}

// The items of every matmul, back to back, in one parallel region (one pool wake-up).
void qgemm_multi(const QGemmArgs* args, int count) {
  QGemmItems items[kMaxQGemmMulti];
  int64_t first[kMaxQGemmMulti + 1] = {0};
  for (int i = 0; i < count; ++i) {
    items[i] = qgemm_items(args[i]);
    first[i + 1] = first[i] + items[i].count;
  }
  parallel_for(first[count], 1, args[0].num_threads, [&](int64_t begin, int64_t end) {
    int i = 0;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first[i + 1]) ++i;
      const int64_t local = item - first[i];
      with_bits(args[i].w.bits,
                [&](auto b) { qgemm_item<decltype(b)::value>(args[i], items[i], local); });
    }
  });
}

void moe(const MoeArgs& args) {
  with_bits(args.w13.bits, [&](auto b) { moe_gate_up<decltype(b)::value>(args); });
  with_bits(args.w2.bits, [&](auto b) { moe_down<decltype(b)::value>(args); });
}

}  // namespace KIMIVL_QGEMM_NS
}  // namespace kimivl
