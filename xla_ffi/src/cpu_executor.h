// Runs a kernel body over [0, items) on XLA's intra-op thread pool.
//
// The caller and the pool's workers take chunks from one atomic counter, and
// the caller only waits for chunks that some thread has already started.
// Chunk processing never blocks, so this cannot deadlock even when every
// pool thread is itself inside one of our handlers (8 simulated devices
// running their SPMD programs on a 2-core machine).
#ifndef GQSGD_JAX_CPU_EXECUTOR_H_
#define GQSGD_JAX_CPU_EXECUTOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace gqsgd {

namespace ffi = xla::ffi;

// Below this many work items a single thread is faster than waking others.
inline constexpr int64_t kMinItemsPerChunk = 1 << 15;

struct CpuExecutor {
  ffi::ThreadPool* pool;  // null: run on the calling thread

  template <typename Kernel>
  ffi::Error Run(const Kernel& kernel, int64_t items) const {
    if (items <= 0) return ffi::Error::Success();
    const int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
    const int64_t chunks = std::min<int64_t>(
        threads * 4, (items + kMinItemsPerChunk - 1) / kMinItemsPerChunk);
    if (chunks <= 1) {
      kernel(0, 1, items);
      return ffi::Error::Success();
    }
    struct Shared {
      Kernel kernel;
      int64_t items, chunks;
      std::atomic<int64_t> next{0};
      std::atomic<int64_t> done{0};
      std::mutex mu;
      std::condition_variable cv;
      void Work() {
        for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
          const int64_t begin = items * c / chunks;
          const int64_t end = items * (c + 1) / chunks;
          kernel(begin, 1, end);
          if (done.fetch_add(1) + 1 == chunks) {
            std::lock_guard<std::mutex> lock(mu);
            cv.notify_all();
          }
        }
      }
    };
    auto shared = std::make_shared<Shared>();
    shared->kernel = kernel;
    shared->items = items;
    shared->chunks = chunks;
    for (int64_t t = 0; t < std::min(threads, chunks - 1); ++t) {
      pool->Schedule([shared] { shared->Work(); });
    }
    shared->Work();
    std::unique_lock<std::mutex> lock(shared->mu);
    shared->cv.wait(lock, [&] { return shared->done.load() == shared->chunks; });
    return ffi::Error::Success();
  }
};

}  // namespace gqsgd

#endif  // GQSGD_JAX_CPU_EXECUTOR_H_
