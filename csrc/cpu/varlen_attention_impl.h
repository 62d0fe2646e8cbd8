// Varlen attention work item, templated on the vector type (instantiated once per ISA).
//
// One item = one head of a range of query blocks (kBlockQ queries each) of one sequence. Its keys
// and values are converted once to contiguous fp32 rows (Kp [L, D], Vp [L, Dv]; just the rows
// the range needs when causal) and shared by its blocks. In a block, queries run along the vector
// lanes: Qt [D, kBlockQ] (pre-scaled, transposed), scores St [keys, kBlockQ], output Ot [Dv,
// kBlockQ]. So every head dim (72, 192/128, anything) has no vector tail, the softmax max/sum over
// keys are lane-wise (no horizontal reductions), and both products are broadcast x vector tiles.
// Keys stream in blocks of kBlockK with an online softmax (running max m, sum l per query), so a
// thread's memory is O(kBlockQ * (D + Dv + kBlockK) + L * (D + Dv)) whatever the batch.
#pragma once
#include <cmath>
#include <limits>

#include "cpu/attention.h"
#include "cpu/attention_simd.h"

namespace kimivl {
namespace {

template <class V>
struct VarlenAttention {
  static constexpr int W = V::kLanes;
  static constexpr int64_t kBlockQ = 4 * kTileVecs * W;  // four column panels of the tiles
  static constexpr int64_t kBlockK = 64;

  // Qt, St, Ot, m, l and one fp32 query row for a block, then Kp and Vp of the longest sequence.
  static int64_t block_floats(const VarlenAttentionParams& p) {
    return kBlockQ * (p.head_dim + kBlockK + p.v_dim + 2) + round_up(p.head_dim, kAlignPad);
  }
  static int64_t scratch_floats(const VarlenAttentionParams& p, int64_t max_len) {
    return block_floats(p) + max_len * (p.head_dim + p.v_dim);
  }

  static void run(const VarlenAttentionParams& p, int64_t seq, int64_t h, int64_t q_begin,
                  int64_t q_end, float* scratch) {
    const int64_t start = p.cu_seqlens[seq], len = p.cu_seqlens[seq + 1] - start;
    const int64_t d = p.head_dim, dv = p.v_dim;
    float* kp = scratch + block_floats(p);
    float* vp = kp + len * d;
    int64_t packed = 0;  // rows of Kp and Vp filled so far
    for (int64_t q0 = q_begin; q0 < q_end; q0 += kBlockQ) {
      const int64_t kend = p.causal ? std::min(q0 + kBlockQ, len) : len;
      for (; packed < kend; ++packed) {
        const int64_t t = start + packed;
        load_row<V>(element(p.k, p.dtype, t * p.k_row + h * p.k_head), p.dtype, d,
                    kp + packed * d);
        load_row<V>(element(p.v, p.dtype, t * p.v_row + h * p.v_head), p.dtype, dv,
                    vp + packed * dv);
      }
      block(p, start, len, q0, h, kp, vp, scratch);
    }
  }

  // Queries [q0, q0 + kBlockQ) of the sequence at rows [start, start + len), one head.
  static void block(const VarlenAttentionParams& p, int64_t start, int64_t len, int64_t q0,
                    int64_t h, const float* kp, const float* vp, float* scratch) {
    const int64_t d = p.head_dim, dv = p.v_dim;
    const int64_t nq = std::min(kBlockQ, len - q0), vecs = (nq + W - 1) / W;
    float* qt = scratch;
    float* st = qt + d * kBlockQ;
    float* ot = st + kBlockK * kBlockQ;
    float* m = ot + dv * kBlockQ;
    float* l = m + kBlockQ;
    float* qrow = l + kBlockQ;

    // Scores in log2 units: scale * log2(e) folded into q, so the softmax is exp2(s - max).
    const float qscale = static_cast<float>(p.scale * 1.4426950408889634);
    const int64_t qrow0 = (start + q0) * p.q_row + h * p.q_head;
    for (int64_t i = 0; i < vecs * W; ++i) {
      if (i < nq) load_row<V>(element(p.q, p.dtype, qrow0 + i * p.q_row), p.dtype, d, qrow);
      for (int64_t c = 0; c < d; ++c) qt[c * kBlockQ + i] = i < nq ? qscale * qrow[c] : 0.0f;
    }
    std::fill(ot, ot + dv * kBlockQ, 0.0f);
    std::fill(m, m + kBlockQ, -std::numeric_limits<float>::infinity());
    std::fill(l, l + kBlockQ, 0.0f);

    const typename V::T neg_inf = V::set1(-std::numeric_limits<float>::infinity());
    const typename V::T slack = V::set1(kRescaleSlack);
    const int64_t kend = p.causal ? q0 + nq : len;  // keys any query of the block may see
    for (int64_t k0 = 0; k0 < kend; k0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - k0);
      const float* kf = kp + k0 * d;
      const float* vf = vp + k0 * dv;
      // St[j, i] = k_j . q_i
      bcast_gemm<V, false>(nk, vecs, d, kf, d, 1, qt, kBlockQ, st, kBlockQ);

      const bool mask = p.causal && k0 + nk - 1 > q0;  // some key lies after some query
      for (int64_t c = 0; c < vecs; ++c) {
        float* col = st + c * W;
        const typename V::T qpos = V::add(V::iota(), V::set1(static_cast<float>(q0 + c * W)));
        typename V::T m_run = V::load(m + c * W), m_blk = neg_inf;
        for (int64_t j = 0; j < nk; ++j) {
          typename V::T s = V::load(col + j * kBlockQ);
          if (mask) {
            s = V::where_gt(V::set1(static_cast<float>(k0 + j)), qpos, neg_inf, s);
            V::store(col + j * kBlockQ, s);
          }
          m_blk = V::max(m_blk, s);
        }
        typename V::T l_run = V::load(l + c * W);
        if (V::any_gt(m_blk, V::add(m_run, slack))) {  // always on the first block (m = -inf)
          const typename V::T m_new = V::max(m_run, m_blk);
          const typename V::T alpha = V::exp2(V::sub(m_run, m_new));  // 0 when m was -inf
          l_run = V::mul(l_run, alpha);
          for (int64_t e = 0; e < dv; ++e)
            V::store(ot + e * kBlockQ + c * W, V::mul(V::load(ot + e * kBlockQ + c * W), alpha));
          m_run = m_new;
          V::store(m + c * W, m_run);
        }
        for (int64_t j = 0; j < nk; ++j) {
          const typename V::T e = V::exp2(V::sub(V::load(col + j * kBlockQ), m_run));
          V::store(col + j * kBlockQ, e);
          l_run = V::add(l_run, e);
        }
        V::store(l + c * W, l_run);
      }
      // Ot[e, i] += sum_j v_j[e] * P[j, i]
      bcast_gemm<V, true>(dv, vecs, nk, vf, 1, dv, st, kBlockQ, ot, kBlockQ);
    }

    const int64_t orow0 = (start + q0) * p.o_row + h * p.o_head;
    for (int64_t i = 0; i < nq; ++i) {
      const float inv = 1.0f / l[i];
      for (int64_t e = 0; e < dv; ++e) {
        const float x = ot[e * kBlockQ + i] * inv;
        const int64_t off = orow0 + i * p.o_row + e;
        if (p.dtype == DType::kBFloat16)
          static_cast<uint16_t*>(p.out)[off] = float_to_bf16(x);
        else
          static_cast<float*>(p.out)[off] = x;
      }
    }
  }

  static VarlenKernel kernel() { return {kBlockQ, &scratch_floats, &run}; }
};

}  // namespace
}  // namespace kimivl
