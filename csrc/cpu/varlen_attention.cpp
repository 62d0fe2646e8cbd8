// Varlen attention: argument checks, work planning and threading; the per-ISA kernels do the math.
#include <algorithm>
#include <string>
#include <vector>

#include "cpu/attention.h"
#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

namespace kimivl {
namespace {

VarlenKernel select_kernel() {
#ifdef KIMIVL_X86_KERNELS
  if (selected_isa() >= Isa::kAvx512Vnni) return varlen_kernel_avx512();
  if (selected_isa() != Isa::kPortable && isa_supported(Isa::kAvx2)) return varlen_kernel_avx2();
#endif
  return varlen_kernel_portable();
}

void validate(const VarlenAttentionParams& p) {
  const std::string op = "varlen_attention: ";
  check(p.dtype == DType::kFloat32 || p.dtype == DType::kBFloat16,
        op + "dtype must be float32 or bfloat16");
  check(p.q && p.k && p.v && p.out && p.cu_seqlens, op + "null data pointer");
  check(p.num_seqs >= 1, op + "num_seqs must be >= 1, got " + std::to_string(p.num_seqs));
  check(p.heads >= 1 && p.head_dim >= 1 && p.v_dim >= 1,
        op + "heads, head_dim and v_dim must be >= 1");
  // Query and key positions are compared as floats in the causal mask: exact below 2^24.
  check(p.total_tokens >= 0 && p.total_tokens < (int64_t{1} << 24),
        op + "total_tokens must be in [0, 2^24), got " + std::to_string(p.total_tokens));
  check(p.cu_seqlens[0] == 0 && p.cu_seqlens[p.num_seqs] == p.total_tokens,
        op + "cu_seqlens must start at 0 and end at total_tokens = " +
            std::to_string(p.total_tokens));
  for (int64_t s = 0; s < p.num_seqs; ++s)
    check(p.cu_seqlens[s + 1] >= p.cu_seqlens[s], op + "cu_seqlens must be non-decreasing");
}

}  // namespace

void varlen_attention(const VarlenAttentionParams& p) {
  validate(p);
  const VarlenKernel kernel = select_kernel();
  // Work items: (sequence, head, range of query blocks). A thread converts a head's keys and
  // values once for all the blocks of its range, so ranges are as long as the thread count
  // allows: about four items per thread. Longest sequences first; within a causal sequence,
  // later (costlier) ranges first, so dynamic scheduling evens out the tail.
  struct Item {
    int64_t seq, head, q_begin, q_end;
  };
  std::vector<int64_t> order(p.num_seqs);
  for (int64_t s = 0; s < p.num_seqs; ++s) order[s] = s;
  auto len = [&](int64_t s) { return p.cu_seqlens[s + 1] - p.cu_seqlens[s]; };
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return len(a) > len(b); });
  const int64_t nonempty = std::count_if(order.begin(), order.end(),
                                         [&](int64_t s) { return len(s) > 0; });
  const int64_t pairs = std::max<int64_t>(nonempty * p.heads, 1);  // (sequence, head) pairs
  const int64_t want = (4 * std::max(p.num_threads, 1) + pairs - 1) / pairs;  // ranges per pair
  std::vector<Item> items;
  for (int64_t s : order) {
    const int64_t blocks = (len(s) + kernel.block_q - 1) / kernel.block_q;
    if (blocks == 0) continue;
    const int64_t per_range = (blocks + std::min(want, blocks) - 1) / std::min(want, blocks);
    const int64_t ranges = (blocks + per_range - 1) / per_range;
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t r = 0; r < ranges; ++r) {
        const int64_t b = p.causal ? ranges - 1 - r : r;
        items.push_back({s, h, b * per_range * kernel.block_q,
                         std::min(len(s), (b + 1) * per_range * kernel.block_q)});
      }
  }
  const int64_t max_len = order.empty() ? 0 : len(order[0]);
  const auto scratch_floats = static_cast<size_t>(kernel.scratch_floats(p, max_len) + kAlignPad);
  parallel_for(static_cast<int64_t>(items.size()), 1, p.num_threads,
               [&](int64_t begin, int64_t end) {
                 thread_local std::vector<float> scratch;
                 if (scratch.size() < scratch_floats) scratch.resize(scratch_floats);
                 for (int64_t i = begin; i < end; ++i) {
                   const Item& it = items[i];
                   kernel.run(p, it.seq, it.head, it.q_begin, it.q_end, align64(scratch.data()));
                 }
               });
}

}  // namespace kimivl
