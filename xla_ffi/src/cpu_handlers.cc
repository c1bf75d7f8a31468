// CPU FFI handlers: the shared handler bodies on XLA's intra-op thread pool.
#include "cpu_executor.h"
#include "gqsgd/handlers.h"
#include "xla/ffi/api/ffi.h"

namespace gqsgd {
namespace handlers {

CpuExecutor Exec(ffi::ThreadPool& pool) { return CpuExecutor{&pool}; }

ffi::Error QuantizeHandler(ffi::ThreadPool pool, ffi::AnyBuffer x,
                           ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::U32> seed,
                           ffi::Result<ffi::AnyBuffer> codes, int32_t levels,
                           int32_t bits, bool signed_codes,
                           int32_t scale_shift) {
  return QuantizeImpl(Exec(pool), x, scale, seed, codes, levels, bits,
                      signed_codes, scale_shift);
}

ffi::Error DequantizeHandler(ffi::ThreadPool pool, ffi::AnyBuffer codes,
                             ffi::Buffer<ffi::F32> scale,
                             ffi::Result<ffi::Buffer<ffi::F32>> out,
                             int32_t bits, bool signed_codes, int32_t offset,
                             int32_t scale_shift) {
  return DequantizeImpl(Exec(pool), codes, scale, out, bits, signed_codes,
                        offset, scale_shift);
}

ffi::Error AverageHandler(ffi::ThreadPool pool, ffi::AnyBuffer a,
                          ffi::AnyBuffer b, ffi::Buffer<ffi::S32> n_a,
                          ffi::Buffer<ffi::S32> n_b, ffi::Buffer<ffi::U32> seed,
                          ffi::Result<ffi::AnyBuffer> out, int32_t bits) {
  // On the host the counts are readable, so out-of-range counts are an error
  // rather than a silently biased average.
  GQSGD_RETURN_IF_ERROR(CheckCount(n_a.element_count(), 1, "n_a"));
  GQSGD_RETURN_IF_ERROR(CheckCount(n_b.element_count(), 1, "n_b"));
  GQSGD_RETURN_IF_ERROR(
      CheckAverageCounts(*n_a.typed_data(), *n_b.typed_data()));
  return AverageImpl(Exec(pool), a, b, n_a, n_b, seed, out, bits);
}

ffi::Error ExpEncodeHandler(ffi::ThreadPool pool, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::U32> seed,
                            ffi::Result<ffi::Buffer<ffi::U8>> codes,
                            int32_t floor_code, int32_t scale_shift) {
  return ExpEncodeImpl(Exec(pool), x, scale, seed, codes, floor_code,
                       scale_shift);
}

ffi::Error ExpDecodeHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> codes,
                            ffi::Buffer<ffi::F32> scale,
                            ffi::Result<ffi::Buffer<ffi::F32>> out,
                            int32_t scale_shift) {
  return ExpDecodeImpl(Exec(pool), codes, scale, out, scale_shift);
}

ffi::Error ExpReduceHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> a,
                            ffi::Buffer<ffi::U8> b, ffi::Buffer<ffi::U32> seed,
                            ffi::Result<ffi::Buffer<ffi::U8>> out) {
  return ExpReduceImpl(Exec(pool), a, b, seed, out);
}

ffi::Error BlockMaxAbsHandler(ffi::ThreadPool pool, ffi::AnyBuffer x,
                              ffi::Result<ffi::Buffer<ffi::F32>> out,
                              int32_t shift) {
  return BlockMaxAbsImpl(Exec(pool), x, out, shift);
}

}  // namespace handlers
}  // namespace gqsgd

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdQuantizeCpu,
                              gqsgd::handlers::QuantizeHandler,
                              GQSGD_BIND_QUANTIZE(xla::ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdDequantizeCpu,
                              gqsgd::handlers::DequantizeHandler,
                              GQSGD_BIND_DEQUANTIZE(xla::ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdAverageCpu, gqsgd::handlers::AverageHandler,
                              GQSGD_BIND_AVERAGE(xla::ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdExpEncodeCpu,
                              gqsgd::handlers::ExpEncodeHandler,
                              GQSGD_BIND_EXP_ENCODE(xla::ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdExpDecodeCpu,
                              gqsgd::handlers::ExpDecodeHandler,
                              GQSGD_BIND_EXP_DECODE(xla::ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdExpReduceCpu,
                              gqsgd::handlers::ExpReduceHandler,
                              GQSGD_BIND_EXP_REDUCE(xla::ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GqsgdBlockMaxAbsCpu,
                              gqsgd::handlers::BlockMaxAbsHandler,
                              GQSGD_BIND_BLOCK_MAX_ABS(xla::ffi::ThreadPool));
