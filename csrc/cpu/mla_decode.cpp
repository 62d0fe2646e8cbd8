// MLA decode: argument checks, flash-decoding split plan and threading; the per-ISA kernels do
// the math.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "cpu/attention.h"
#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

namespace kimivl {
namespace {

MlaDecodeKernel select_kernel() {
#ifdef KIMIVL_X86_KERNELS
  if (selected_isa() != Isa::kPortable && isa_supported(Isa::kAvx2))
    return mla_decode_kernel_avx2();
#endif
  return mla_decode_kernel_portable();
}

void validate(const MlaDecodeParams& p) {
  const std::string op = "mla_decode: ";
  check(p.cache_dtype == DType::kFloat32 || p.cache_dtype == DType::kBFloat16,
        op + "cache dtype must be float32 or bfloat16");
  check(p.q_lat && (p.q_pe || p.rope == 0) && p.cache && p.seq_lens && p.out,
        op + "null data pointer");
  check(p.batch >= 1 && p.heads >= 1 && p.rank >= 1 && p.rope >= 0 && p.capacity >= 1,
        op + "batch, heads, rank and capacity must be >= 1 and rope >= 0");
  for (int64_t b = 0; b < p.batch; ++b)
    check(p.seq_lens[b] >= 1 && p.seq_lens[b] <= p.capacity,
          op + "seq_lens[" + std::to_string(b) + "] = " + std::to_string(p.seq_lens[b]) +
              " must be in [1, capacity = " + std::to_string(p.capacity) + "]");
}

// Each split covers at least this many tokens, so its fixed costs (scaling q, the partial record,
// the merge) stay a few percent of its work.
constexpr int64_t kMinSplit = 128;

}  // namespace

void mla_decode(const MlaDecodeParams& p) {
  validate(p);
  const MlaDecodeKernel kernel = select_kernel();
  // Flash-decoding: cut every context into splits so that there are about four work items per
  // thread even at batch 1 (dynamic scheduling evens out unequal lengths).
  const int threads = std::max(p.num_threads, 1);
  const int64_t want = (4 * threads + p.batch - 1) / p.batch;
  std::vector<int64_t> first(p.batch + 1, 0), split_len(p.batch);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t len = p.seq_lens[b];
    int64_t n = std::max<int64_t>(1, std::min(want, len / kMinSplit));
    if (n > threads) n -= n % threads;  // equal splits then keep every thread busy to the end
    split_len[b] = ((len + n - 1) / n + kernel.chunk - 1) / kernel.chunk * kernel.chunk;
    first[b + 1] = first[b] + (len + split_len[b] - 1) / split_len[b];
  }
  const int64_t items = first[p.batch], part_floats = kernel.partial_floats(p);
  // Every split writes its whole record, so the buffer is left uninitialised.
  std::unique_ptr<float[]> partial_buffer(new float[items * part_floats + kAlignPad]);
  float* partials = align64(partial_buffer.get());
  const auto scratch_floats = static_cast<size_t>(kernel.scratch_floats(p) + kAlignPad);
  parallel_for(items, 1, threads, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    if (scratch.size() < scratch_floats) scratch.resize(scratch_floats);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
      const int64_t t0 = (i - first[b]) * split_len[b];
      kernel.split(p, b, t0, std::min(p.seq_lens[b], t0 + split_len[b]),
                   partials + i * part_floats, align64(scratch.data()));
    }
  });
  parallel_for(p.batch * p.heads, 4, threads, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.heads;
      kernel.combine(p, b, i % p.heads, partials + first[b] * part_floats,
                     first[b + 1] - first[b]);
    }
  });
}

}  // namespace kimivl
