// A small persistent thread pool for the CPU kernels (no OpenMP: torch's wheel bundles its own
// runtime, and two OpenMP runtimes in one process oversubscribe the cores).
#pragma once
#include <cstdint>
#include <functional>

namespace kimivl {

// Calls fn(begin, end) over [0, n) split into chunks of `grain` items, handed out dynamically to
// up to `num_threads` threads (the caller is one of them). Returns when all chunks are done.
// The first exception thrown by fn is rethrown in the caller.
void parallel_for(int64_t n, int64_t grain, int num_threads,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace kimivl
