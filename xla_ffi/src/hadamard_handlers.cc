// CPU FFI handler of the orthonormal Walsh-Hadamard transform
// (gqsgd/hadamard_kernels.h) on XLA's intra-op thread pool.
#include <cstdint>
#include <string>

#include "cpu_executor.h"
#include "gqsgd/hadamard_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace gqsgd {
namespace hadamard {
namespace {

// x f32[..., 2^k] -> out of the same shape: the transform of each row (the
// last axis). The blocks of phase 1, then the strips of phase 2, are
// independent items for the pool; each item's arithmetic is fixed, so the
// bits do not depend on how they are shared out.
ffi::Error TransformHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto dims = x.dimensions();
  const int64_t n = static_cast<int64_t>(x.element_count());
  if (static_cast<int64_t>(out->element_count()) != n) {
    return ffi::Error::InvalidArgument(
        "hadamard: out must have as many elements as x");
  }
  if (n == 0) return ffi::Error::Success();
  const int64_t d = dims.size() == 0 ? 1 : dims.back();
  if (d < 1 || (d & (d - 1)) != 0 || d > (int64_t{1} << 40)) {
    return ffi::Error::InvalidArgument(
        "hadamard: the last axis must be a power of two, got " +
        std::to_string(d));
  }
  const int k = __builtin_ctzll(static_cast<uint64_t>(d));
  const int64_t rows = n / d;
  const CpuExecutor exec{&pool};
  const BlockKernel blocks{x.typed_data(), out->typed_data(), k};
  const int b = blocks.BlockLog2();
  ffi::Error status = exec.Run(blocks, rows << (k - b), int64_t{1} << b);
  if (status.failure() || k <= kBlockLog2) return status;
  // Phase 2 starts once every block is done (Run returns when all are).
  const int64_t width = StripWidth(k);
  const StripKernel strips{out->typed_data(), k};
  return exec.Run(strips, rows * ((int64_t{1} << kBlockLog2) / width),
                  width << (k - kBlockLog2));
}

}  // namespace
}  // namespace hadamard
}  // namespace gqsgd

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdHadamardCpu,
                              gqsgd::hadamard::TransformHandler,
                              ::xla::ffi::Ffi::Bind()
                                  .Ctx<::xla::ffi::ThreadPool>()
                                  .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()
                                  .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>());
