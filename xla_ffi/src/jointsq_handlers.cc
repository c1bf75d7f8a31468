// CPU FFI handlers of JointSQ's kernels (gqsgd/jointsq_kernels.h).
#include <cstdint>
#include <string>

#include "cpu_executor.h"
#include "gqsgd/jointsq_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace gqsgd {
namespace jointsq {
namespace {

// Runs body() compiled for the widest instruction set the CPU has, as the
// other CPU kernels (cpu_executor.h's RunChunk: x86-64-v4, v3 or baseline
// copies, everything inlined), on the calling thread: the simulated
// devices already run concurrently.
template <typename Body>
void OnHostIsa(const Body& body) {
  RunChunk([&](int64_t, int64_t, int64_t) { body(); }, 0, 1);
}

// squares f32[n] -> cls s32[n] (see SelectClasses).
ffi::Error SelectHandler(ffi::Buffer<ffi::F32> squares,
                         ffi::Result<ffi::Buffer<ffi::S32>> cls,
                         int64_t budget) {
  const int64_t n = static_cast<int64_t>(squares.element_count());
  if (static_cast<int64_t>(cls->element_count()) != n) {
    return ffi::Error::InvalidArgument(
        "cls must have as many elements as squares");
  }
  if (3 * n >= (int64_t{1} << 32) || budget < 0) {
    return ffi::Error::InvalidArgument(
        "jointsq_select needs 3 n < 2^32 and budget >= 0, got n = " +
        std::to_string(n) + ", budget = " + std::to_string(budget));
  }
  if (n > 0) {
    OnHostIsa([&] {
      SelectClasses(squares.typed_data(), n, budget, cls->typed_data());
    });
  }
  return ffi::Error::Success();
}

// chunk u8[W, G, P] -> out f32[G, n] (see MeanClassmap).
ffi::Error MeanClassmapHandler(ffi::Buffer<ffi::U8> chunk,
                               ffi::Result<ffi::Buffer<ffi::F32>> out,
                               int64_t numel) {
  const auto dims = chunk.dimensions();
  if (dims.size() != 3) {
    return ffi::Error::InvalidArgument("chunk must be uint8[W, G, P]");
  }
  const int64_t workers = dims[0], groups = dims[1], payload = dims[2];
  if (static_cast<int64_t>(out->element_count()) != groups * numel ||
      payload < 24 + (numel + 3) / 4 + 1 || workers < 1) {
    return ffi::Error::InvalidArgument(
        "jointsq_mean_classmap: out must be f32[G, numel] and each payload "
        "hold a header, the class map and a stream");
  }
  OnHostIsa([&] {
    MeanClassmap(chunk.typed_data(), workers, groups, payload, numel,
                 out->typed_data());
  });
  return ffi::Error::Success();
}

// v f32[n], cls s32[n], keys u32[6] -> payload u8[P], x_hat f32[n],
// counts s32[3] (see EncodeClassmap).
ffi::Error EncodeClassmapHandler(ffi::Buffer<ffi::F32> v,
                                 ffi::Buffer<ffi::S32> cls,
                                 ffi::Buffer<ffi::U32> keys,
                                 ffi::Result<ffi::Buffer<ffi::U8>> payload,
                                 ffi::Result<ffi::Buffer<ffi::F32>> x_hat,
                                 ffi::Result<ffi::Buffer<ffi::S32>> counts,
                                 int64_t cap4, int64_t cap2) {
  const int64_t n = static_cast<int64_t>(v.element_count());
  const int64_t bytes = static_cast<int64_t>(payload->element_count());
  if (static_cast<int64_t>(cls.element_count()) != n ||
      static_cast<int64_t>(x_hat->element_count()) != n ||
      keys.element_count() != 6 || counts->element_count() != 3 ||
      bytes < 24 + (n + 3) / 4 || n >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument(
        "jointsq_encode_classmap: v, cls and x_hat of n elements, keys "
        "u32[6], counts s32[3] and a payload of at least 24 + ceil(n / 4) "
        "bytes");
  }
  OnHostIsa([&] {
    EncodeClassmap(v.typed_data(), cls.typed_data(), n, keys.typed_data(), cap4,
                   cap2, payload->typed_data(), bytes, x_hat->typed_data(),
                   counts->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jointsq
}  // namespace gqsgd

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdJointsqSelectCpu,
                              gqsgd::jointsq::SelectHandler,
                              ::xla::ffi::Ffi::Bind()
                                  .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()
                                  .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()
                                  .Attr<int64_t>("budget"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdJointsqMeanClassmapCpu,
                              gqsgd::jointsq::MeanClassmapHandler,
                              ::xla::ffi::Ffi::Bind()
                                  .Arg<::xla::ffi::Buffer<::xla::ffi::U8>>()
                                  .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()
                                  .Attr<int64_t>("numel"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdJointsqEncodeClassmapCpu,
                              gqsgd::jointsq::EncodeClassmapHandler,
                              ::xla::ffi::Ffi::Bind()
                                  .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()
                                  .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()
                                  .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>()
                                  .Ret<::xla::ffi::Buffer<::xla::ffi::U8>>()
                                  .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()
                                  .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()
                                  .Attr<int64_t>("cap4")
                                  .Attr<int64_t>("cap2"));
