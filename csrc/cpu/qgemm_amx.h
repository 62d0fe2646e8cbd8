// AMX int8 prefill path of the quantized matmul and the MoE block (Isa::kAmx, M >= 16 rows).
// Included at the end of qgemm_avx512.cpp, so it is compiled with that file's flags plus
// -mamx-tile -mamx-int8 and uses its helpers (part_slot, load_scales16, load_zeros16).
//
// Weights: the CPU layout's 32-K chunk of a 16-row block is 8 slots of 16 rows x 4 K bytes, which
// is exactly 8 rows of the VNNI-by-4 B tile TDPBSUD/TDPBSSD take. int8 blocks are used in place;
// narrower widths are unpacked once per (expert, row block) into a per-thread panel of unsigned
// codes (kp * 16 bytes, L2-resident) and reused for all of that expert's rows.
// Activations: int8 rows with one scale per 128 K where K (rounded up to 32) allows
// (ActRows::block_chunks = 4; qgemm.cpp quantizes them so for this path), else per 32 K as on the
// VNNI path. The tiles accumulate int32 products (K = 64 each, or 32 for odd spans) over a span of
// chunks sharing one activation scale within one weight group, then one store and fp32 rescale by
// the row's scale per span, then the weight group's scale and zero in the VNNI kernel's order.
// Per 32 K every chunk needs its own store and rescale, which left the tile unit idle and this
// path at the VNNI path's speed; per 128 K it is 1.1-1.3x faster for prefill, at about twice the
// activation rounding error on rows with outliers (bench/results/cpu-xeon-2core-2026-12-08-amx.md),
// so selected_isa() never picks it on its own. The MoE down projection's input h stays per 32
// (stage A quantizes it per 32 channels), so stage B runs per-chunk spans.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <utility>

#include "cpu/parallel.h"
#include "cpu/qgemm.h"
#include "cpu/qgemm_lowbit.h"

namespace kimivl {
namespace avx512 {
namespace {

// Tiles 0-3: int32 results (M-tile i, N-block j -> tile 2i + j); 4-5: 16 activation rows x KT K;
// 6-7: KT / 32 chunks of a weight block (KT / 4 rows of 4 K x 16 output rows).
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the tile configuration for this thread and releases the tile state when done.
class TileScope {
 public:
  explicit TileScope(int kt) {
    TileConfig cfg;
    for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    for (int t = 4; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(kt);
    for (int t = 6; t < 8; ++t) cfg.rows[t] = static_cast<uint8_t>(kt / 4), cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

constexpr int64_t kChunkTileBytes = 512;  // 8 rows x 64 bytes: one 32-K chunk of a row block

template <int Bits, int... S>
inline void unpack_chunk(const __m512i* planes, uint8_t* dst, std::integer_sequence<int, S...>) {
  constexpr int lo = low_part_bits(Bits), hi = high_part_bits(Bits);
  auto slot = [&](auto s) {
    constexpr int slot_index = decltype(s)::value;
    __m512i v = part_slot<lo, 0, slot_index>(planes);
    if constexpr (hi > 0) v = _mm512_or_si512(v, part_slot<hi, lo, slot_index>(planes + lo));
    _mm512_storeu_si512(dst + 64 * slot_index, v);
  };
  (slot(std::integral_constant<int, S>()), ...);
}

// Row block b of expert e as kc chunk tiles of 512 bytes: the weights themselves for int8
// (already signed bytes in tile order), else unsigned codes unpacked into `buf`.
template <int Bits>
const uint8_t* weight_panel(const QWeight& w, int64_t e, int64_t b, uint8_t* buf) {
  const uint8_t* q = w.q + e * w.expert_q_stride() + b * w.kc() * w.chunk_bytes();
  if constexpr (Bits == 8) {
    return q;
  } else {
    for (int64_t c = 0; c < w.kc(); ++c, q += 64 * Bits) {
      __m512i planes[Bits];
      for (int i = 0; i < Bits; ++i) planes[i] = _mm512_loadu_si512(q + 64 * i);
      unpack_chunk<Bits>(planes, buf + c * kChunkTileBytes, std::make_integer_sequence<int, 8>());
    }
    return buf;
  }
}

// Per-thread scratch: weight panels and the fp32 results of one 32 x 32 output tile.
struct AmxScratch {
  std::unique_ptr<uint8_t[]> panels;
  int64_t panel_bytes;
  alignas(64) int32_t t[2][4][16][16];  // two chunks' int32 results
  alignas(64) float acc[32][32];
  alignas(64) float out[32][32];
  AmxScratch(const QWeight& w, int n_panels)
      : panels(new uint8_t[n_panels * w.kc() * kChunkTileBytes]),
        panel_bytes(w.kc() * kChunkTileBytes) {}
  uint8_t* panel(int i) { return panels.get() + i * panel_bytes; }
};

// One weight row block's panel and its scales and zeros.
struct BlockRef {
  const uint8_t* panel;
  const uint16_t* s;
  const int8_t* z;
};

template <int Bits>
BlockRef block_ref(const QWeight& w, int64_t e, int64_t b, uint8_t* buf) {
  const int64_t s_off = e * w.expert_s_stride() + b * w.groups() * 16;
  return {weight_panel<Bits>(w, e, b, buf), w.scales + s_off, w.zeros ? w.zeros + s_off : nullptr};
}

// acc[16 i + r][16 j ..] += d[r] * (int32 tile 2i + j) for the `valid` rows of M-tile i.
inline void rescale_tile(const int32_t (*t)[16], const ActRow* rows, int valid, int64_t c,
                         float (*acc)[32], int col) {
  for (int r = 0; r < valid; ++r) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(t[r]));
    const __m512 a = _mm512_load_ps(acc[r] + col);
    _mm512_store_ps(acc[r] + col, _mm512_fmadd_ps(_mm512_set1_ps(rows[r].d[c]), v, a));
  }
}

// Signed activations times unsigned codes, or times signed int8 weights.
#define KIMIVL_TILE_DOT(dst, x, wt)                   \
  if constexpr (Bits == 8) _tile_dpbssd(dst, x, wt); \
  else _tile_dpbsud(dst, x, wt);

template <int MT, int NT>
inline void zero_products() {
  _tile_zero(0);
  if constexpr (NT == 2) _tile_zero(1);
  if constexpr (MT == 2) {
    _tile_zero(2);
    if constexpr (NT == 2) _tile_zero(3);
  }
}

// Adds the int32 products of K = KT from chunk c on to tiles 0-3 (M-tile i, block j -> 2i + j).
template <int Bits, int MT, int NT>
inline void add_products(const int8_t* a, int64_t kp, const BlockRef* blk, int64_t c) {
  _tile_loadd(4, a + 32 * c, kp);
  if constexpr (MT == 2) _tile_loadd(5, a + 16 * kp + 32 * c, kp);
  _tile_loadd(6, blk[0].panel + c * kChunkTileBytes, 64);
  if constexpr (NT == 2) _tile_loadd(7, blk[1].panel + c * kChunkTileBytes, 64);
  KIMIVL_TILE_DOT(0, 4, 6);
  if constexpr (NT == 2) KIMIVL_TILE_DOT(1, 4, 7);
  if constexpr (MT == 2) {
    KIMIVL_TILE_DOT(2, 5, 6);
    if constexpr (NT == 2) KIMIVL_TILE_DOT(3, 5, 7);
  }
}
#undef KIMIVL_TILE_DOT

template <int MT, int NT>
inline void store_products(int32_t (*t)[16][16]) {
  _tile_stored(0, t[0], 64);
  if constexpr (NT == 2) _tile_stored(1, t[1], 64);
  if constexpr (MT == 2) {
    _tile_stored(2, t[2], 64);
    if constexpr (NT == 2) _tile_stored(3, t[3], 64);
  }
}

// out[r][16 j + n] = sum_k W_j[n][k] * x_hat_r[k] for r < valid (<= 16 MT) and the NT blocks
// `blk`; the int8 activation rows start at `a` with stride kp (rows past `valid` are read but
// their results dropped, so the buffer needs 16 MT - valid rows of slack).
// The tiles accumulate over a span of `span` chunks (a multiple of KT / 32) that share one
// activation scale and lie in one weight group, then are stored and rescaled once. Software-
// pipelined: span s's int32 results go to buffer s % 2 and are rescaled while the tile unit
// computes span s + 1 (reading a tile store back at once stalls on store forwarding).
template <int Bits, int MT, int NT, int KT>
void tile_product(const QWeight& w, const int8_t* a, const ActRow* rows, int valid,
                  const BlockRef* blk, int64_t span, AmxScratch& sc) {
  const int64_t gc = w.group / 32, spans = w.kc() / span, kp = w.kp;
  const int valid0 = std::min(valid, 16), valid1 = valid - valid0;
  const __m512 zconst = _mm512_set1_ps(Bits == 8 ? 0.0f : static_cast<float>(stored_zero(Bits)));
  for (int r = 0; r < valid; ++r)
    for (int col = 0; col < 16 * NT; col += 16) {
      _mm512_store_ps(sc.out[r] + col, _mm512_setzero_ps());
      _mm512_store_ps(sc.acc[r] + col, _mm512_setzero_ps());
    }
  // Rescale span sp from its buffer; at the end of a group, fold the group into out.
  auto finish_span = [&](int64_t sp) {
    int32_t(*t)[16][16] = sc.t[sp & 1];
    const int64_t c = sp * span;
    for (int j = 0; j < NT; ++j) {
      rescale_tile(t[j], rows, valid0, c, sc.acc, 16 * j);
      if constexpr (MT == 2) rescale_tile(t[2 + j], rows + 16, valid1, c, sc.acc + 16, 16 * j);
    }
    if ((c + span) % gc != 0) return;
    const int64_t g = c / gc;
    __m512 s[NT], zs[NT];
    for (int j = 0; j < NT; ++j) {
      s[j] = load_scales16(blk[j].s + 16 * g, w.scale_dtype);
      zs[j] = _mm512_mul_ps(s[j], blk[j].z ? load_zeros16(blk[j].z + 16 * g) : zconst);
    }
    for (int r = 0; r < valid; ++r) {
      float corr = 0.0f;  // activation-only zero-point term, as in the VNNI kernel
      for (int64_t cc = g * gc; cc < (g + 1) * gc; ++cc) corr += rows[r].ds[cc];
      const __m512 vcorr = _mm512_set1_ps(corr);
      for (int j = 0; j < NT; ++j) {
        float* y = sc.out[r] + 16 * j;
        float* acc = sc.acc[r] + 16 * j;
        const __m512 prev = _mm512_load_ps(y);
        _mm512_store_ps(y, _mm512_fmadd_ps(s[j], _mm512_load_ps(acc),
                                           _mm512_fnmadd_ps(zs[j], vcorr, prev)));
        _mm512_store_ps(acc, _mm512_setzero_ps());
      }
    }
  };
  for (int64_t sp = 0; sp < spans; ++sp) {
    zero_products<MT, NT>();
    for (int64_t c = sp * span; c < (sp + 1) * span; c += KT / 32)
      add_products<Bits, MT, NT>(a, kp, blk, c);
    if (sp > 0) finish_span(sp - 1);
    store_products<MT, NT>(sc.t[sp & 1]);
  }
  finish_span(spans - 1);
}

// tile_product for a run-time number of rows (1..32) and blocks (1..2).
template <int Bits, int KT>
void tile_product_any(const QWeight& w, const int8_t* a, const ActRow* rows, int valid,
                      const BlockRef* blk, int nt, int64_t span, AmxScratch& sc) {
  if (valid > 16) {
    if (nt == 2) tile_product<Bits, 2, 2, KT>(w, a, rows, valid, blk, span, sc);
    else tile_product<Bits, 2, 1, KT>(w, a, rows, valid, blk, span, sc);
  } else {
    if (nt == 2) tile_product<Bits, 1, 2, KT>(w, a, rows, valid, blk, span, sc);
    else tile_product<Bits, 1, 1, KT>(w, a, rows, valid, blk, span, sc);
  }
}

// Chunks per accumulation span: those sharing one activation scale within one weight group.
int64_t span_chunks(const QWeight& w, const ActRows& act) {
  return std::gcd(act.block_chunks, w.group / 32);
}

// f(std::integral_constant<int, KT>()) with K = 64 tile products where the span allows.
template <typename F>
void with_tile_k(int64_t span, F&& f) {
  if (span % 2 == 0) f(std::integral_constant<int, 64>());
  else f(std::integral_constant<int, 32>());
}

// Items are pairs of row blocks (32 output columns); each unpacks its blocks once and runs every
// activation row through them, 32 rows at a time.
template <int Bits>
void qgemm_amx_bits(const QGemmArgs& a) {
  const QWeight& w = a.w;
  const int64_t nb = w.nb(), items = (nb + 1) / 2;
  char* y = static_cast<char*>(a.y);
  const int64_t esize = a.y_dtype == DType::kFloat32 ? 4 : 2;
  const int64_t span = span_chunks(w, a.act);
  with_tile_k(span, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    parallel_for(items, 1, a.num_threads, [&](int64_t begin, int64_t end) {
      TileScope tiles(KT);
      AmxScratch sc(w, 2);
      ActRow rows[32];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b0 = 2 * item;
        const int nt = static_cast<int>(std::min<int64_t>(2, nb - b0));
        BlockRef blk[2];
        for (int j = 0; j < nt; ++j) blk[j] = block_ref<Bits>(w, 0, b0 + j, sc.panel(j));
        const int64_t cols = std::min<int64_t>(16 * nt, w.n - 16 * b0);
        for (int64_t m0 = 0; m0 < a.m; m0 += 32) {
          const int valid = static_cast<int>(std::min<int64_t>(32, a.m - m0));
          for (int i = 0; i < valid; ++i) rows[i] = a.act.row(m0 + i);
          tile_product_any<Bits, KT>(w, rows[0].q, rows, valid, blk, nt, span, sc);
          for (int i = 0; i < valid; ++i)
            store_row(sc.out[i], cols, y + ((m0 + i) * w.n + 16 * b0) * esize, a.y_dtype);
        }
      }
    });
  });
}

// Stage A: items are (active expert, 32 intermediate channels), as on the VNNI path; the input
// rows were gathered into pair order (`xg`) so an expert's rows are one strided tile source.
template <int Bits>
void moe_gate_up_amx(const MoeArgs& a, const int8_t* xg) {
  const QWeight& w = a.w13;
  const int64_t inter = w.n / 2, cbs = inter / 32, up = inter / 16;
  const int64_t span = span_chunks(w, a.x);
  with_tile_k(span, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    parallel_for(a.n_active * cbs, 1, a.num_threads, [&](int64_t begin, int64_t end) {
      TileScope tiles(KT);
      AmxScratch sc(w, 4);
      alignas(64) float gate[32][32];
      ActRow rows[32];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t e = a.active[item / cbs], cb = item % cbs;
        const BlockRef g[2] = {block_ref<Bits>(w, e, 2 * cb, sc.panel(0)),
                               block_ref<Bits>(w, e, 2 * cb + 1, sc.panel(1))};
        const BlockRef u[2] = {block_ref<Bits>(w, e, up + 2 * cb, sc.panel(2)),
                               block_ref<Bits>(w, e, up + 2 * cb + 1, sc.panel(3))};
        const int64_t p1 = a.expert_offsets[e + 1];
        for (int64_t p = a.expert_offsets[e]; p < p1; p += 32) {
          const int valid = static_cast<int>(std::min<int64_t>(32, p1 - p));
          for (int i = 0; i < valid; ++i) rows[i] = a.x.row(a.pair_token[p + i]);
          tile_product_any<Bits, KT>(w, xg + p * w.kp, rows, valid, g, 2, span, sc);
          for (int i = 0; i < valid; ++i) std::memcpy(gate[i], sc.out[i], sizeof(gate[i]));
          tile_product_any<Bits, KT>(w, xg + p * w.kp, rows, valid, u, 2, span, sc);
          for (int i = 0; i < valid; ++i) {
            const int64_t row = p + i, chunk = row * (inter / 32) + cb;
            silu_mul_quantize_block32(gate[i], sc.out[i], a.h.q + row * inter + 32 * cb,
                                      a.h.d + chunk, a.h.ds + chunk);
          }
        }
      }
    });
  });
}

// Stage B: items are pairs of output row blocks; each loops over the active experts, unpacks the
// expert's two blocks once and accumulates its pairs' router-weighted results in fp32.
template <int Bits>
void moe_down_amx(const MoeArgs& a) {
  const QWeight& w = a.w2;
  const int64_t nb = w.nb(), width = 16 * nb, items = (nb + 1) / 2;
  char* y = static_cast<char*>(a.y);
  const int64_t esize = a.y_dtype == DType::kFloat32 ? 4 : 2;
  const int64_t span = span_chunks(w, a.h);  // h is quantized per 32 channels: span 1
  parallel_for(items, 1, a.num_threads, [&](int64_t begin, int64_t end) {
    TileScope tiles(32);
    AmxScratch sc(w, 2);
    ActRow rows[32];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b0 = 2 * item;
      const int nt = static_cast<int>(std::min<int64_t>(2, nb - b0));
      for (int64_t t = 0; t < a.tokens; ++t)
        std::fill(a.acc + t * width + 16 * b0, a.acc + t * width + 16 * (b0 + nt), 0.0f);
      for (int64_t ai = 0; ai < a.n_active; ++ai) {
        const int64_t e = a.active[ai], p1 = a.expert_offsets[e + 1];
        BlockRef blk[2];
        for (int j = 0; j < nt; ++j) blk[j] = block_ref<Bits>(w, e, b0 + j, sc.panel(j));
        for (int64_t p = a.expert_offsets[e]; p < p1; p += 32) {
          const int valid = static_cast<int>(std::min<int64_t>(32, p1 - p));
          for (int i = 0; i < valid; ++i) rows[i] = a.h.row(p + i);
          tile_product_any<Bits, 32>(w, rows[0].q, rows, valid, blk, nt, span, sc);
          for (int i = 0; i < valid; ++i) {
            float* dst = a.acc + a.pair_token[p + i] * width + 16 * b0;
            const float wt = a.pair_weight[p + i];
            for (int col = 0; col < 16 * nt; ++col) dst[col] += wt * sc.out[i][col];
          }
        }
      }
      const int64_t cols = std::min(w.n, 16 * (b0 + nt)) - 16 * b0;
      for (int64_t t = 0; t < a.tokens; ++t)
        store_row(a.acc + t * width + 16 * b0, cols, y + (t * w.n + 16 * b0) * esize, a.y_dtype);
    }
  });
}

}  // namespace

void qgemm_amx(const QGemmArgs& args) {
  with_bits(args.w.bits, [&](auto b) { qgemm_amx_bits<decltype(b)::value>(args); });
}

void moe_amx(const MoeArgs& args) {
  // Stage A's tiles read an expert's input rows as one strided block: gather them in pair order
  // (with a tile's worth of zeroed slack rows after the last).
  const int64_t pairs = args.expert_offsets[args.active[args.n_active - 1] + 1];
  const int64_t kp = args.w13.kp;
  std::unique_ptr<int8_t[]> xg(new int8_t[(pairs + kAmxSlackRows) * kp]);
  std::memset(xg.get() + pairs * kp, 0, kAmxSlackRows * kp);
  parallel_for(pairs, std::max<int64_t>(1, 65536 / kp), args.num_threads,
               [&](int64_t begin, int64_t end) {
                 for (int64_t p = begin; p < end; ++p)
                   std::memcpy(xg.get() + p * kp, args.x.q + args.pair_token[p] * kp, kp);
               });
  with_bits(args.w13.bits, [&](auto b) { moe_gate_up_amx<decltype(b)::value>(args, xg.get()); });
  with_bits(args.w2.bits, [&](auto b) { moe_down_amx<decltype(b)::value>(args); });
}

}  // namespace avx512
}  // namespace kimivl
