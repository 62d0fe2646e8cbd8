#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace kimivl {
namespace {

struct Job {
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0, grain = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};
  std::exception_ptr error;
  std::mutex error_mutex;

  void run() {
    for (;;) {
      const int64_t begin = next.fetch_add(grain);
      if (begin >= n) return;
      try {
        (*fn)(begin, std::min(n, begin + grain));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(n);  // stop handing out work
      }
    }
  }
};

thread_local bool in_worker = false;  // nested parallel_for calls run serially

// A decode step runs a dozen parallel regions a layer, a few microseconds apart. Sleeping on the
// condition variable between them costs a futex wake and a reschedule each (~10-20 us, more than
// a small projection takes), so both sides first poll the shared state for KIMIVL_SPIN_US
// microseconds (default 100), then sleep. KIMIVL_SPIN_US=0 never polls: where other programs
// keep every core busy, a polling helper can take the core the caller needs.
// A value that is not a whole number of microseconds up to kMaxSpinUs is named in one warning
// and the default used: read on first use, possibly on a pool thread, where throwing would abort.
constexpr long kDefaultSpinUs = 100, kMaxSpinUs = 100000;

long parse_spin_us(const char* env) {
  if (env == nullptr || env[0] == '\0') return kDefaultSpinUs;
  long us = 0;
  for (const char* c = env; *c != '\0'; ++c) {
    if (*c < '0' || *c > '9' || (us = us * 10 + (*c - '0')) > kMaxSpinUs) {
      std::fprintf(stderr,
                   "kimivl-local: warning: KIMIVL_SPIN_US=%s is not a whole number of "
                   "microseconds from 0 to %ld; using %ld\n",
                   env, kMaxSpinUs, kDefaultSpinUs);
      return kDefaultSpinUs;
    }
  }
  return us;
}

std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds us(parse_spin_us(std::getenv("KIMIVL_SPIN_US")));
  return us;
}

template <typename Ready>
void spin_until(Ready ready) {
  if (spin_time().count() == 0) return;
  const auto until = std::chrono::steady_clock::now() + spin_time();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (ready()) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    if (std::chrono::steady_clock::now() >= until) return;
  }
}

class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  void run(Job& job, int helpers) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one job at a time, across callers
    std::unique_lock<std::mutex> lock(mutex_);
    grow(helpers);
    job_ = &job;
    wanted_ = helpers;
    ++generation_;
    job.active.store(helpers);
    lock.unlock();
    wake_.notify_all();
    job.run();
    spin_until([&] { return job.active.load(std::memory_order_acquire) == 0; });
    lock.lock();
    done_.wait(lock, [&] { return job.active.load() == 0; });
    job_ = nullptr;
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      const int index = static_cast<int>(threads_.size());
      threads_.emplace_back([this, index] { worker(index); });
    }
  }

  void worker(int index) {
    in_worker = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      lock.unlock();
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      lock.lock();
      wake_.wait(lock, [&] { return stop_ || (generation_ != seen && index < wanted_); });
      if (stop_) return;
      seen = generation_;
      Job* job = job_;
      lock.unlock();
      job->run();
      lock.lock();
      if (job->active.fetch_sub(1) == 1) done_.notify_all();
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  Job* job_ = nullptr;
  int wanted_ = 0;
  std::atomic<uint64_t> generation_{0};  // written under mutex_, also read while spinning
  bool stop_ = false;
};

}  // namespace

void parallel_for(int64_t n, int64_t grain, int num_threads,
                  const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int helpers = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), chunks)) - 1;
  Job job;
  job.fn = &fn;
  job.n = n;
  job.grain = grain;
  if (helpers <= 0 || in_worker) {
    job.run();
  } else {
    Pool::get().run(job, helpers);
  }
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace kimivl
