// MLA decode work item (one context split of one batch entry, all heads), templated on the
// vector type (instantiated once per ISA).
//
// The cache is streamed in chunks of kChunk tokens, each converted once to fp32 (zero-padded to a
// multiple of the vector width) and then used by every head: scores S[h, t] = q_h . [c_t | k_pe_t]
// as row dots, an online softmax per head, and O[h, :] += P[h, t] c_t as broadcast x vector
// tiles. A split leaves its running max m, sum l and unnormalised O in a partial record; combine()
// merges the splits of one batch entry with their log-sum-exp weights (flash-decoding).
#pragma once
#include <cmath>
#include <limits>

#include "cpu/attention.h"
#include "cpu/attention_simd.h"

namespace kimivl {
namespace {

template <class V>
struct MlaDecode {
  static constexpr int W = V::kLanes;
  static constexpr int64_t kChunk = 2 * kTileVecs * W;

  static int64_t depth(const MlaDecodeParams& p) { return round_up(p.rank + p.rope, W); }
  static int64_t width(const MlaDecodeParams& p) { return round_up(p.rank, W); }

  static int64_t scratch_floats(const MlaDecodeParams& p) {
    return (p.heads + kChunk) * depth(p) + p.heads * kChunk;  // q, cache chunk, scores
  }
  // [O (heads x width) | m (heads) | l (heads)], padded so consecutive records stay aligned.
  static int64_t partial_floats(const MlaDecodeParams& p) {
    return round_up(p.heads * (width(p) + 2), kAlignPad);
  }

  static void split(const MlaDecodeParams& p, int64_t b, int64_t t0, int64_t t1, float* partial,
                    float* scratch) {
    const int64_t heads = p.heads, kp = depth(p), rp = width(p), dim = p.rank + p.rope;
    float* qs = scratch;
    float* cf = qs + heads * kp;
    float* s = cf + kChunk * kp;
    float* o = partial;
    float* m = o + heads * rp;
    float* l = m + heads;

    // Scores in log2 units: scale * log2(e) folded into q, so the softmax is exp2(s - max).
    const float qscale = static_cast<float>(p.scale * 1.4426950408889634);
    for (int64_t h = 0; h < heads; ++h) {
      const float* ql = p.q_lat + b * p.q_lat_batch + h * p.q_lat_head;
      const float* qr = p.q_pe + b * p.q_pe_batch + h * p.q_pe_head;
      float* row = qs + h * kp;
      for (int64_t r = 0; r < p.rank; ++r) row[r] = qscale * ql[r];
      for (int64_t r = 0; r < p.rope; ++r) row[p.rank + r] = qscale * qr[r];
      std::fill(row + dim, row + kp, 0.0f);
    }
    std::fill(m, m + heads, -std::numeric_limits<float>::infinity());
    std::fill(l, l + heads, 0.0f);
    std::fill(o, o + heads * rp, 0.0f);
    for (int64_t t = 0; t < kChunk; ++t) std::fill(cf + t * kp + dim, cf + (t + 1) * kp, 0.0f);

    const int64_t row0 = b * p.cache_batch;
    for (int64_t c0 = t0; c0 < t1; c0 += kChunk) {
      const int64_t n = std::min(kChunk, t1 - c0), vecs = (n + W - 1) / W;
      for (int64_t t = 0; t < n; ++t) {
        const void* row = element(p.cache, p.cache_dtype, row0 + (c0 + t) * p.cache_row);
        load_row<V>(row, p.cache_dtype, dim, cf + t * kp);
      }
      dot_gemm<V>(heads, n, kp, qs, kp, cf, kp, s, kChunk);

      for (int64_t h = 0; h < heads; ++h) {
        float* row = s + h * kChunk;
        std::fill(row + n, row + vecs * W, -std::numeric_limits<float>::infinity());
        typename V::T mx = V::load(row);
        for (int64_t v = 1; v < vecs; ++v) mx = V::max(mx, V::load(row + v * W));
        const float m_blk = V::hmax(mx);
        if (m_blk > m[h] + kRescaleSlack) {  // always on the first chunk (m = -inf)
          const float alpha = exp2_scalar(m[h] - m_blk);  // 0 when m was -inf
          const typename V::T a = V::set1(alpha);
          l[h] *= alpha;
          for (float* x = o + h * rp; x < o + (h + 1) * rp; x += W)
            V::store(x, V::mul(a, V::load(x)));
          m[h] = m_blk;
        }
        const typename V::T m_vec = V::set1(m[h]);
        typename V::T sum = V::zero();
        for (int64_t v = 0; v < vecs; ++v) {
          const typename V::T e = V::exp2(V::sub(V::load(row + v * W), m_vec));
          V::store(row + v * W, e);
          sum = V::add(sum, e);
        }
        l[h] += V::hsum(sum);
      }
      bcast_gemm<V, true>(heads, rp / W, n, s, kChunk, 1, cf, kp, o, rp);
    }
  }

  static void combine(const MlaDecodeParams& p, int64_t b, int64_t h, const float* partials,
                      int64_t count) {
    const int64_t stride = partial_floats(p), rp = width(p), m_at = p.heads * rp + h;
    const int64_t l_at = m_at + p.heads;
    float m_max = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < count; ++i) m_max = std::max(m_max, partials[i * stride + m_at]);
    float total = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      const float* part = partials + i * stride;
      total += part[l_at] * exp2_scalar(part[m_at] - m_max);
    }
    float* out = p.out + b * p.out_batch + h * p.out_head;
    std::fill(out, out + p.rank, 0.0f);
    for (int64_t i = 0; i < count; ++i) {
      const float* part = partials + i * stride;
      const float w = exp2_scalar(part[m_at] - m_max) / total;
      const float* o = part + h * rp;
      int64_t r = 0;
      for (; r + W <= p.rank; r += W)
        V::store(out + r, V::fma(V::set1(w), V::load(o + r), V::load(out + r)));
      for (; r < p.rank; ++r) out[r] += w * o[r];
    }
  }

  static MlaDecodeKernel kernel() {
    return {kChunk, &scratch_floats, &partial_floats, &split, &combine};
  }
};

}  // namespace
}  // namespace kimivl
