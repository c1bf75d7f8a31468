// Runs a kernel body over [0, items) on XLA's intra-op thread pool.
//
// The caller and the pool's workers take chunks from one atomic counter, and
// the caller only waits for chunks that some thread has already started.
// Chunk processing never blocks, so this cannot deadlock even when every
// pool thread is itself inside one of our handlers (8 simulated devices
// running their SPMD programs on a 2-core machine).
//
// Each chunk runs through RunChunk, which on x86-64 picks a copy of the
// kernel compiled for the widest instruction set the CPU has (x86-64-v4:
// AVX-512, v3: AVX2, else the baseline). The wheel itself stays portable: no
// -march flag, only per-function target attributes. Set GQSGD_JAX_CPU_ISA to
// "baseline", "x86-64-v3" or "x86-64-v4" to cap the choice (the bit-identity
// check runs every level that way); a level the CPU lacks is never used.
#ifndef GQSGD_JAX_CPU_EXECUTOR_H_
#define GQSGD_JAX_CPU_EXECUTOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

// GCC >= 12 on x86-64 Linux: target attributes with ISA levels and
// __builtin_cpu_supports("x86-64-v3"). Elsewhere only the baseline copy.
#if !defined(GQSGD_CPU_DISPATCH)
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    !defined(__clang__) && __GNUC__ >= 12
#define GQSGD_CPU_DISPATCH 1
#else
#define GQSGD_CPU_DISPATCH 0
#endif
#endif

namespace gqsgd {

namespace ffi = xla::ffi;

// Items per chunk, at least: below this a single thread is faster than
// waking others.
inline constexpr int64_t kMinItemsPerChunk = 1 << 15;
// Chunks per thread: a few, so that a thread slowed down by other work on
// the machine does not hold up the whole call.
inline constexpr int64_t kChunksPerThread = 4;

enum class Isa { kBaseline = 0, kV3 = 3, kV4 = 4 };

// flatten inlines the kernel body (and the math.h functions) into each copy,
// so every copy is compiled for its own target.
template <typename Kernel>
__attribute__((flatten)) void RunChunkBaseline(const Kernel& kernel,
                                               int64_t begin, int64_t end) {
  kernel(begin, 1, end);
}

#if GQSGD_CPU_DISPATCH
template <typename Kernel>
__attribute__((target("arch=x86-64-v3"),
               flatten)) void RunChunkV3(const Kernel& kernel, int64_t begin,
                                         int64_t end) {
  kernel(begin, 1, end);
}

template <typename Kernel>
__attribute__((target("arch=x86-64-v4"), flatten)) void RunChunkV4(
    const Kernel& kernel, int64_t begin, int64_t end) {
  kernel(begin, 1, end);
}
#endif

// The instruction-set level of the kernel copies, decided once per process.
inline Isa HostIsa() {
  static const Isa isa = [] {
#if GQSGD_CPU_DISPATCH
    __builtin_cpu_init();
    Isa best = __builtin_cpu_supports("x86-64-v4")   ? Isa::kV4
               : __builtin_cpu_supports("x86-64-v3") ? Isa::kV3
                                                     : Isa::kBaseline;
    if (const char* cap = std::getenv("GQSGD_JAX_CPU_ISA")) {
      const Isa want = std::strcmp(cap, "x86-64-v4") == 0   ? Isa::kV4
                       : std::strcmp(cap, "x86-64-v3") == 0 ? Isa::kV3
                                                            : Isa::kBaseline;
      best = std::min(best, want);
    }
    return best;
#else
    return Isa::kBaseline;
#endif
  }();
  return isa;
}

template <typename Kernel>
void RunChunk(const Kernel& kernel, int64_t begin, int64_t end) {
#if GQSGD_CPU_DISPATCH
  switch (HostIsa()) {
    case Isa::kV4:
      return RunChunkV4(kernel, begin, end);
    case Isa::kV3:
      return RunChunkV3(kernel, begin, end);
    case Isa::kBaseline:
      break;
  }
#endif
  RunChunkBaseline(kernel, begin, end);
}

struct CpuExecutor {
  ffi::ThreadPool* pool;  // null: run on the calling thread

  // `elements_per_item`: how many elements one item touches (a whole block
  // for a per-block reduction), so that the chunking sees the real work.
  template <typename Kernel>
  ffi::Error Run(const Kernel& kernel, int64_t items,
                 int64_t elements_per_item = 1) const {
    if (items <= 0) return ffi::Error::Success();
    const int64_t threads =
        pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
    const int64_t min_items =
        std::max<int64_t>(1, kMinItemsPerChunk / elements_per_item);
    const int64_t chunks = std::min<int64_t>(
        threads * kChunksPerThread, (items + min_items - 1) / min_items);
    if (chunks <= 1) {
      RunChunk(kernel, 0, items);
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
          RunChunk(kernel, begin, end);
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
    shared->cv.wait(lock,
                    [&] { return shared->done.load() == shared->chunks; });
    return ffi::Error::Success();
  }
};

}  // namespace gqsgd

#endif  // GQSGD_JAX_CPU_EXECUTOR_H_
