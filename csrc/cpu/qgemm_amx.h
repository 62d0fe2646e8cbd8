// AMX bf16 prefill path of the quantized matmul and the MoE block (Isa::kAmx, enough rows).
// Included at the end of qgemm_avx512.cpp, so it is compiled with that file's flags (with
// -mavx512vbmi -mavx512bf16 -mamx-tile -mamx-bf16, which only this path uses) and uses its helpers
// (part_slot, load_scales16, load_zeros16).
//
// Weights: each 16-row block is dequantized once per call (per expert and block in the MoE) into
// a per-thread panel of bf16 B tiles, one per 32-K chunk: tile row p holds k = 2p, 2p + 1 of the
// 16 rows. s * (v - z) is exact in fp32 (an 8- or 11-bit scale times a code difference of at
// most 10 bits), so the panel is the dequantized weight rounded once to bf16.
// Activations: rounded once to bf16 (the MoE's h = silu(gate) * up too). The tiles then
// accumulate fp32 products over the whole K with no rescaling, unlike int8 tiles, where every
// weight group and activation block needs a tile store and an fp32 rescale: with per-32
// activation scales that store left the tile unit idle and int8 AMX no faster than VNNI.
// Error: bf16 rounding of both operands, a relative 2^-9 per element, with fp32 accumulation:
// about 0.2% of the exact product against the VNNI path's 0.5% (its int8 activation step is
// amax / 127 per 32 K; tests/test_qgemm_amx.py).
// Decode (fewer rows) stays on the VNNI kernel: there the weights are read once per row anyway
// and dequantizing them to bf16 would cost more than the products.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

#include "cpu/attention_simd.h"
#include "cpu/parallel.h"
#include "cpu/qgemm.h"
#include "cpu/qgemm_lowbit.h"

namespace kimivl {
namespace avx512 {
namespace {

// Tiles 0-3: fp32 results (M-tile i, N-block j -> tile 2i + j); 4-5: 16 activation rows x 32 K;
// 6-7: one 32-K chunk of a weight block (16 K pairs x 16 output rows). All 16 rows x 64 bytes.
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the tile configuration for this thread and releases the tile state when done.
class TileScope {
 public:
  TileScope() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

constexpr int64_t kChunkTile = 512;  // bf16 values of one chunk's B tile (16 rows x 32)

// A per-thread panel of dequantized weight blocks, `blocks` of kc chunk tiles each.
class Panel {
 public:
  Panel(int64_t kc, int blocks) : kc_(kc), v_(new uint16_t[blocks * kc * kChunkTile]) {}
  uint16_t* block(int i) { return v_.get() + i * kc_ * kChunkTile; }

 private:
  int64_t kc_;
  std::unique_ptr<uint16_t[]> v_;
};

// Rows 8h .. 8h + 7 of a 16-row vector, each twice (for a k pair): the lanes of half h of a
// B-tile row.
inline __m512 pairs_of_half(__m512 v16, int h) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row = _mm512_add_epi32(_mm512_set1_epi32(8 * h), _mm512_srli_epi32(lane, 1));
  return _mm512_permutexvar_ps(row, v16);
}

// vpermb indices (one per 32-bit lane, in its low byte) that zero-extend, for lane i, code byte
// 4 (8h + i / 2) + 2p + i % 2 of a slot: row 8h + i / 2, k = 4s + 2p + i % 2.
inline __m512i code_index(int h, int p) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row = _mm512_add_epi32(_mm512_set1_epi32(8 * h), _mm512_srli_epi32(lane, 1));
  return _mm512_add_epi32(_mm512_slli_epi32(row, 2),
                          _mm512_add_epi32(_mm512_set1_epi32(2 * p),
                                           _mm512_and_si512(lane, _mm512_set1_epi32(1))));
}

// Slot `codes` (16 rows x 4 K unsigned codes, row r at bytes 4r..4r+3) times the group's scale
// and zero (s, nzs = -z s for rows 0-7 and 8-15, each twice), as B-tile rows 2s (k = 4s, 4s + 1)
// and 2s + 1 (k = 4s + 2, 4s + 3) of the chunk tile: vpermb spreads each code into the 32-bit
// lane of its place in the tile row, so the two bf16 packs are the rows themselves.
inline void dequantize_slot(__m512i codes, const __m512* s, const __m512* nzs,
                            uint16_t* tile_rows) {
  constexpr __mmask64 kLowBytes = 0x1111111111111111ull;
  for (int p = 0; p < 2; ++p) {
    __m512 f[2];
    for (int h = 0; h < 2; ++h) {
      const __m512i wide = _mm512_maskz_permutexvar_epi8(kLowBytes, code_index(h, p), codes);
      f[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(wide), s[h], nzs[h]);
    }
    _mm512_storeu_si512(tile_rows + 32 * p, (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]));
  }
}

// The 8 slots of one chunk (Bits planes of the CPU layout) as its bf16 B tile.
template <int Bits, int... S>
inline void dequantize_chunk(const __m512i* planes, const __m512* s, const __m512* nzs,
                             uint16_t* tile, std::integer_sequence<int, S...>) {
  constexpr int lo = low_part_bits(Bits), hi = high_part_bits(Bits);
  auto slot = [&](auto sl) {
    constexpr int slot_index = decltype(sl)::value;
    if constexpr (Bits == 8) {  // signed bytes as unsigned codes q + 128 (the zero moved too)
      const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
      dequantize_slot(_mm512_xor_si512(planes[slot_index], flip), s, nzs, tile + 64 * slot_index);
    } else {
      __m512i v = part_slot<lo, 0, slot_index>(planes);
      if constexpr (hi > 0) v = _mm512_or_si512(v, part_slot<hi, lo, slot_index>(planes + lo));
      dequantize_slot(v, s, nzs, tile + 64 * slot_index);
    }
  };
  (slot(std::integral_constant<int, S>()), ...);
}

// Row block b of expert e of w as kc bf16 chunk tiles at dst.
template <int Bits>
void dequantize_block(const QWeight& w, int64_t e, int64_t b, uint16_t* dst) {
  const uint8_t* q = w.q + e * w.expert_q_stride() + b * w.kc() * w.chunk_bytes();
  const int64_t s_off = e * w.expert_s_stride() + b * w.groups() * 16, gc = w.group / 32;
  // Codes are unsigned: 8-bit weights get 128 added (dequantize_chunk), and so does their zero.
  const __m512 zconst = _mm512_set1_ps(static_cast<float>(stored_zero(Bits)));
  const __m512 zoffset = _mm512_set1_ps(Bits == 8 ? 128.0f : 0.0f);
  __m512 s[2], nzs[2];
  for (int64_t c = 0; c < w.kc(); ++c, q += 64 * Bits, dst += kChunkTile) {
    if (c % gc == 0) {
      const int64_t g = c / gc;
      const __m512 s16 = load_scales16(w.scales + s_off + 16 * g, w.scale_dtype);
      const __m512 z16 = _mm512_add_ps(
          w.zeros ? load_zeros16(w.zeros + s_off + 16 * g) : zconst, zoffset);
      const __m512 nzs16 = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z16), s16);
      for (int h = 0; h < 2; ++h) s[h] = pairs_of_half(s16, h), nzs[h] = pairs_of_half(nzs16, h);
    }
    __m512i planes[Bits];
    for (int i = 0; i < Bits; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(q + kPrefetchBytes + 64 * i), _MM_HINT_T0);
      planes[i] = _mm512_loadu_si512(q + 64 * i);
    }
    dequantize_chunk<Bits>(planes, s, nzs, dst, std::make_integer_sequence<int, 8>());
  }
}

// out[r][16 j + n] = sum_k W_j[n][k] * a_r[k] for 16 MT rows of bf16 activations at `a` (`lda`
// values apart) and the NT panels `b`, accumulated in fp32 over all kc chunks.
template <int MT, int NT>
inline void tile_product(const uint16_t* a, int64_t lda, const uint16_t* const* b, int64_t kc,
                         float (*out)[32]) {
  const int64_t stride = 2 * lda;
  _tile_zero(0);
  if constexpr (NT == 2) _tile_zero(1);
  if constexpr (MT == 2) {
    _tile_zero(2);
    if constexpr (NT == 2) _tile_zero(3);
  }
  for (int64_t c = 0; c < kc; ++c) {
    _tile_loadd(4, a + 32 * c, stride);
    if constexpr (MT == 2) _tile_loadd(5, a + 16 * lda + 32 * c, stride);
    _tile_loadd(6, b[0] + c * kChunkTile, 64);
    if constexpr (NT == 2) _tile_loadd(7, b[1] + c * kChunkTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) {
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out[0], 128);
  if constexpr (NT == 2) _tile_stored(1, out[0] + 16, 128);
  if constexpr (MT == 2) {
    _tile_stored(2, out[16], 128);
    if constexpr (NT == 2) _tile_stored(3, out[16] + 16, 128);
  }
}

// tile_product for 1..32 rows (rows past `valid` up to the tile are computed from the caller's
// slack and ignored) and 1..2 panels.
inline void tile_product_any(const uint16_t* a, int64_t lda, int valid, const uint16_t* const* b,
                             int nt, int64_t kc, float (*out)[32]) {
  if (valid > 16) {
    if (nt == 2) tile_product<2, 2>(a, lda, b, kc, out);
    else tile_product<2, 1>(a, lda, b, kc, out);
  } else {
    if (nt == 2) tile_product<1, 2>(a, lda, b, kc, out);
    else tile_product<1, 1>(a, lda, b, kc, out);
  }
}

// Rows of activations as bf16 (the K tail zero) and kSlackRows zeroed rows after the last, so a
// 32-row tile pair may always be loaded. The row stride is kp + 32: at a multiple of 4 KB (K =
// 2048) a tile's 16 rows would fall in one L1 set and evict each other on every load.
constexpr int64_t kSlackRows = 16;
class Bf16Rows {
 public:
  Bf16Rows(int64_t rows, int64_t kp)
      : stride_(kp + 32), v_(new uint16_t[(rows + kSlackRows) * stride_]) {
    std::fill(row(rows), row(rows + kSlackRows), uint16_t{0});
  }
  uint16_t* row(int64_t i) { return v_.get() + i * stride_; }
  const uint16_t* row(int64_t i) const { return v_.get() + i * stride_; }
  int64_t stride() const { return stride_; }

 private:
  int64_t stride_;
  std::unique_ptr<uint16_t[]> v_;
};

// One row of n values (fp32 or bf16) as bf16 into dst[0..kp), zero past n.
inline void row_to_bf16(const void* x, DType dt, int64_t n, int64_t kp, uint16_t* dst) {
  if (dt == DType::kBFloat16) {
    std::memcpy(dst, x, n * 2);
  } else {
    const float* src = static_cast<const float*>(x);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          (__m256i)(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i))));
    for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  }
  std::fill(dst + n, dst + kp, uint16_t{0});
}

Bf16Rows to_bf16_rows(const void* x, DType dt, int64_t m, int64_t k, int64_t kp, int threads) {
  Bf16Rows rows(m, kp);
  const int64_t esize = dt == DType::kFloat32 ? 4 : 2;
  parallel_for(m, std::max<int64_t>(1, 16384 / kp), threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      row_to_bf16(static_cast<const char*>(x) + i * k * esize, dt, k, kp, rows.row(i));
  });
  return rows;
}

// store_row with the bf16 conversion 16 values at a time (round to nearest even, as
// float_to_bf16; denormals flush to zero).
inline void store_out_row(const float* src, int64_t n, void* dst, DType dtype) {
  if (dtype == DType::kFloat32) return store_row(src, n, dst, dtype);
  uint16_t* out = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  for (; i < n; ++i) out[i] = float_to_bf16(src[i]);
}

// h = silu(g) * u for 32 channels, as bf16. silu(g) = g / (1 + e^-g) for g >= 0 and
// g e^g / (1 + e^g) below, so the exponential (attention_simd.h's exp2) never overflows.
inline void silu_mul_bf16(const float* g, const float* u, uint16_t* h) {
  constexpr float kLog2e = 1.4426950408889634f;
  __m512 out[2];
  for (int i = 0; i < 2; ++i) {
    const __m512 gv = _mm512_loadu_ps(g + 16 * i);
    const __m512 t = VecAvx512::exp2(_mm512_mul_ps(_mm512_abs_ps(gv), _mm512_set1_ps(-kLog2e)));
    const __mmask16 neg = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mul_ps(gv, neg, gv, t);
    const __m512 silu = _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), t));
    out[i] = _mm512_mul_ps(silu, _mm512_loadu_ps(u + 16 * i));
  }
  _mm512_storeu_si512(h, (__m512i)_mm512_cvtne2ps_pbh(out[1], out[0]));
}

// Work items cover `per` consecutive units of n (row blocks, or 32-channel blocks of the MoE's
// intermediate size) of `unit_blocks` weight blocks each: as many as keep the item's panel within
// 512 KB (half of the smallest L2 with AMX), up to 8 blocks, so each activation tile loaded serves
// that many products and activations are re-read n / per times; but no fewer than 4 items per
// thread.
int64_t units_per_item(int64_t n, int64_t unit_blocks, int64_t kc, int64_t parts, int threads) {
  constexpr int64_t kPanelBudget = 512 * 1024;
  auto fits = [&](int64_t per) {
    const int64_t blocks = per * unit_blocks;
    return blocks <= 8 && blocks * kc * kChunkTile * 2 <= kPanelBudget &&
           parts * ((n + per - 1) / per) >= 4 * threads;
  };
  int64_t per = 8;
  while (per > 1 && !fits(per)) per /= 2;
  return per;
}

// y[m, n] = x_bf16 @ W^T for one weight: items of up to 8 row blocks, dequantized once, then
// every 32-row activation tile through them.
template <int Bits>
void qgemm_bits(const Bf16Rows& x, int64_t m, const QWeight& w, void* y, DType y_dtype,
                int threads) {
  const int64_t nb = w.nb(), per = units_per_item(nb, 1, w.kc(), 1, threads);
  const int64_t items = (nb + per - 1) / per;
  const int64_t esize = y_dtype == DType::kFloat32 ? 4 : 2;
  parallel_for(items, 1, threads, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    Panel panel(w.kc(), static_cast<int>(per));
    alignas(64) float out[32][32];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b0 = item * per, nblk = std::min(per, nb - b0);
      for (int64_t j = 0; j < nblk; ++j) dequantize_block<Bits>(w, 0, b0 + j, panel.block(j));
      for (int64_t m0 = 0; m0 < m; m0 += 32) {
        const int valid = static_cast<int>(std::min<int64_t>(32, m - m0));
        for (int64_t j = 0; j < nblk; j += 2) {
          const int nt = static_cast<int>(std::min<int64_t>(2, nblk - j));
          const uint16_t* b[2] = {panel.block(j), panel.block(j + nt - 1)};
          tile_product_any(x.row(m0), x.stride(), valid, b, nt, w.kc(), out);
          const int64_t col = 16 * (b0 + j), cols = std::min<int64_t>(16 * nt, w.n - col);
          for (int i = 0; i < valid; ++i)
            store_out_row(out[i], cols, static_cast<char*>(y) + ((m0 + i) * w.n + col) * esize,
                          y_dtype);
        }
      }
    }
  });
}

// Stage A: items are (active expert, up to 2 blocks of 32 intermediate channels); the gate's and
// up's blocks are dequantized once and the expert's input rows (gathered in pair order in xg) run
// through them 32 at a time; h = silu(gate) * up goes to hb as bf16.
template <int Bits>
void moe_gate_up(const MoeArgs& a, const Bf16Rows& xg, Bf16Rows& hb) {
  const QWeight& w = a.w13;
  const int64_t inter = w.n / 2, cbs = inter / 32, up = inter / 16, kc = w.kc();
  const int64_t per = units_per_item(cbs, 4, kc, a.n_active, a.num_threads);
  const int64_t groups = (cbs + per - 1) / per;
  parallel_for(a.n_active * groups, 1, a.num_threads, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    Panel panel(kc, static_cast<int>(4 * per));  // gate blocks 0 .. 2 per - 1, then up's
    alignas(64) float gate[32][32], upv[32][32];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = a.active[item / groups], cb0 = item % groups * per;
      const int64_t ncb = std::min(per, cbs - cb0);
      for (int64_t j = 0; j < 2 * ncb; ++j) {
        dequantize_block<Bits>(w, e, 2 * cb0 + j, panel.block(j));
        dequantize_block<Bits>(w, e, up + 2 * cb0 + j, panel.block(2 * per + j));
      }
      const int64_t p1 = a.expert_offsets[e + 1];
      for (int64_t p = a.expert_offsets[e]; p < p1; p += 32) {
        const int valid = static_cast<int>(std::min<int64_t>(32, p1 - p));
        for (int64_t c = 0; c < ncb; ++c) {
          const uint16_t* g[2] = {panel.block(2 * c), panel.block(2 * c + 1)};
          const uint16_t* u[2] = {panel.block(2 * per + 2 * c), panel.block(2 * per + 2 * c + 1)};
          tile_product_any(xg.row(p), xg.stride(), valid, g, 2, kc, gate);
          tile_product_any(xg.row(p), xg.stride(), valid, u, 2, kc, upv);
          for (int i = 0; i < valid; ++i)
            silu_mul_bf16(gate[i], upv[i], hb.row(p + i) + 32 * (cb0 + c));
        }
      }
    }
  });
}

// Stage B: items are up to 8 output row blocks; each loops over the active experts, dequantizes
// the expert's blocks once and adds its pairs' router-weighted results into acc in fp32.
template <int Bits>
void moe_down(const MoeArgs& a, const Bf16Rows& hb) {
  const QWeight& w = a.w2;
  const int64_t nb = w.nb(), width = 16 * nb, kc = w.kc();
  const int64_t per = units_per_item(nb, 1, kc, 1, a.num_threads), items = (nb + per - 1) / per;
  const int64_t esize = a.y_dtype == DType::kFloat32 ? 4 : 2;
  parallel_for(items, 1, a.num_threads, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    Panel panel(kc, static_cast<int>(per));
    alignas(64) float out[32][32];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b0 = item * per, nblk = std::min(per, nb - b0);
      for (int64_t t = 0; t < a.tokens; ++t)
        std::fill(a.acc + t * width + 16 * b0, a.acc + t * width + 16 * (b0 + nblk), 0.0f);
      for (int64_t ai = 0; ai < a.n_active; ++ai) {
        const int64_t e = a.active[ai], p1 = a.expert_offsets[e + 1];
        for (int64_t j = 0; j < nblk; ++j) dequantize_block<Bits>(w, e, b0 + j, panel.block(j));
        for (int64_t p = a.expert_offsets[e]; p < p1; p += 32) {
          const int valid = static_cast<int>(std::min<int64_t>(32, p1 - p));
          for (int64_t j = 0; j < nblk; j += 2) {
            const int nt = static_cast<int>(std::min<int64_t>(2, nblk - j));
            const uint16_t* b[2] = {panel.block(j), panel.block(j + nt - 1)};
            tile_product_any(hb.row(p), hb.stride(), valid, b, nt, kc, out);
            for (int i = 0; i < valid; ++i) {
              float* dst = a.acc + a.pair_token[p + i] * width + 16 * (b0 + j);
              const __m512 wt = _mm512_set1_ps(a.pair_weight[p + i]);
              for (int col = 0; col < 16 * nt; col += 16)
                _mm512_storeu_ps(dst + col, _mm512_fmadd_ps(wt, _mm512_load_ps(out[i] + col),
                                                            _mm512_loadu_ps(dst + col)));
            }
          }
        }
      }
      const int64_t cols = std::min(w.n, 16 * (b0 + nblk)) - 16 * b0;
      for (int64_t t = 0; t < a.tokens; ++t)
        store_out_row(a.acc + t * width + 16 * b0, cols,
                      static_cast<char*>(a.y) + (t * w.n + 16 * b0) * esize, a.y_dtype);
    }
  });
}

}  // namespace

void quant_matmul_amx(const void* x, DType x_dtype, int64_t m, const QWeight* ws, void* const* ys,
                      int count, DType y_dtype, int num_threads) {
  const Bf16Rows xb = to_bf16_rows(x, x_dtype, m, ws[0].k, ws[0].kp, num_threads);
  for (int i = 0; i < count; ++i)
    with_bits(ws[i].bits, [&](auto b) {
      qgemm_bits<decltype(b)::value>(xb, m, ws[i], ys[i], y_dtype, num_threads);
    });
}

void moe_amx(const void* x, DType x_dtype, const MoeArgs& args) {
  const QWeight &w13 = args.w13, &w2 = args.w2;
  const Bf16Rows xb = to_bf16_rows(x, x_dtype, args.tokens, w13.k, w13.kp, args.num_threads);
  // Stage A's tiles read an expert's input rows as one strided block: gather them in pair order.
  const int64_t pairs = args.expert_offsets[args.active[args.n_active - 1] + 1];
  Bf16Rows xg(pairs, w13.kp), hb(pairs, w2.kp);
  parallel_for(pairs, std::max<int64_t>(1, 32768 / w13.kp), args.num_threads,
               [&](int64_t begin, int64_t end) {
                 for (int64_t p = begin; p < end; ++p)
                   std::memcpy(xg.row(p), xb.row(args.pair_token[p]), 2 * w13.kp);
               });
  with_bits(w13.bits, [&](auto b) { moe_gate_up<decltype(b)::value>(args, xg, hb); });
  with_bits(w2.bits, [&](auto b) { moe_down<decltype(b)::value>(args, hb); });
}

}  // namespace avx512
}  // namespace kimivl
