// FFI handler bodies, written once for both platforms.
//
// Each Impl is a template over an executor that runs a kernel body over
// `items` work items: CpuExecutor (cpu_handlers.cc, XLA's intra-op thread
// pool) or CudaExecutor (cuda_handlers.cu, a grid-stride launch on XLA's
// stream). The files that bind them to XLA_FFI_DEFINE_HANDLER_SYMBOL differ
// only in the execution context they ask XLA for.
#ifndef GQSGD_JAX_HANDLERS_H_
#define GQSGD_JAX_HANDLERS_H_

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "gqsgd/kernels.h"
#include "xla/ffi/api/ffi.h"

namespace gqsgd {

namespace ffi = xla::ffi;

#define GQSGD_RETURN_IF_ERROR(expr)  \
  do {                               \
    ffi::Error _err = (expr);        \
    if (_err.failure()) return _err; \
  } while (0)

template <int kBits>
using BitsTag = std::integral_constant<int, kBits>;

// Calls f(BitsTag<bits>{}) for bits in [2, 8].
template <typename F>
ffi::Error DispatchBits(int32_t bits, F&& f) {
  switch (bits) {
    case 2:
      return f(BitsTag<2>{});
    case 3:
      return f(BitsTag<3>{});
    case 4:
      return f(BitsTag<4>{});
    case 5:
      return f(BitsTag<5>{});
    case 6:
      return f(BitsTag<6>{});
    case 7:
      return f(BitsTag<7>{});
    case 8:
      return f(BitsTag<8>{});
    default:
      return ffi::Error::InvalidArgument("bits must be in [2, 8], got " +
                                         std::to_string(bits));
  }
}

// Calls f(T{}) with T the storage type of a supported float input.
template <typename F>
ffi::Error DispatchFloat(ffi::DataType dtype, F&& f) {
  switch (dtype) {
    case ffi::DataType::F32:
      return f(float{});
    case ffi::DataType::BF16:
      return f(BF16{});
    case ffi::DataType::F16:
      return f(F16{});
    default:
      return ffi::Error::InvalidArgument(
          "input dtype must be float32, bfloat16 or float16");
  }
}

inline ffi::Error CheckDtype(ffi::DataType got, ffi::DataType want,
                             const char* what) {
  if (got == want) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(what) +
                                     " has the wrong dtype for bits");
}

inline ffi::Error CheckCount(int64_t got, int64_t want, const char* what) {
  if (got == want) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      std::string(what) + " has " + std::to_string(got) +
      " elements, expected " + std::to_string(want));
}

// The scale vector must cover n elements in blocks of 2^shift.
inline ffi::Error CheckScales(int64_t scales, int64_t n, int32_t shift) {
  if (shift < 0 || shift > kOneScale) {
    return ffi::Error::InvalidArgument("scale_shift must be in [0, 62], got " +
                                       std::to_string(shift));
  }
  if (scales >= NumScaleBlocks(n, shift) && scales >= 1)
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      "scale has " + std::to_string(scales) + " elements, expected " +
      std::to_string(NumScaleBlocks(n, shift)) + " block scales");
}

template <int kBits, bool kSigned>
constexpr ffi::DataType WordDtype() {
  return kSigned
             ? ffi::DataType::S8
             : (Lanes<kBits>::kByte ? ffi::DataType::U8 : ffi::DataType::U32);
}

inline int32_t MaxLevels(int32_t bits, bool signed_codes) {
  return signed_codes ? 127 : ((1 << bits) - 1) / 2;
}

// (a) x (f32/bf16/f16), scale f32[blocks], seed u32[2] -> codes.
template <typename Exec>
ffi::Error QuantizeImpl(Exec exec, ffi::AnyBuffer x,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::U32> seed,
                        ffi::Result<ffi::AnyBuffer> codes, int32_t levels,
                        int32_t bits, bool signed_codes, int32_t scale_shift) {
  if (signed_codes && bits != 8)
    return ffi::Error::InvalidArgument("signed codes need bits=8");
  GQSGD_RETURN_IF_ERROR(CheckCount(seed.element_count(), 2, "seed"));
  if (levels < 1 || levels > MaxLevels(bits, signed_codes)) {
    return ffi::Error::InvalidArgument("levels out of range for bits: " +
                                       std::to_string(levels));
  }
  const int64_t n = static_cast<int64_t>(x.element_count());
  GQSGD_RETURN_IF_ERROR(CheckScales(scale.element_count(), n, scale_shift));
  return DispatchFloat(x.element_type(), [&](auto in_tag) {
    using In = decltype(in_tag);
    return DispatchBits(bits, [&](auto bits_tag) -> ffi::Error {
      constexpr int kBits = decltype(bits_tag)::value;
      auto run = [&](auto signed_tag) -> ffi::Error {
        constexpr bool kSigned = decltype(signed_tag)::value;
        using K = QuantizeKernel<In, kBits, kSigned>;
        const int64_t words = NumWords(n, kSigned ? 1 : Lanes<kBits>::kCount);
        GQSGD_RETURN_IF_ERROR(CheckDtype(codes->element_type(),
                                         WordDtype<kBits, kSigned>(), "codes"));
        GQSGD_RETURN_IF_ERROR(
            CheckCount(codes->element_count(), words, "codes"));
        K k{static_cast<const In*>(x.untyped_data()),
            scale.typed_data(),
            seed.typed_data(),
            static_cast<typename K::Word*>(codes->untyped_data()),
            n,
            levels,
            scale_shift};
        return exec.Run(k, words);
      };
      if constexpr (kBits == 8) {
        if (signed_codes) return run(std::true_type{});
      }
      return run(std::false_type{});
    });
  });
}

// (b) codes, scale f32[blocks] -> out f32[n].
template <typename Exec>
ffi::Error DequantizeImpl(Exec exec, ffi::AnyBuffer codes,
                          ffi::Buffer<ffi::F32> scale,
                          ffi::Result<ffi::Buffer<ffi::F32>> out, int32_t bits,
                          bool signed_codes, int32_t offset,
                          int32_t scale_shift) {
  if (signed_codes && bits != 8)
    return ffi::Error::InvalidArgument("signed codes need bits=8");
  const int64_t n = static_cast<int64_t>(out->element_count());
  GQSGD_RETURN_IF_ERROR(CheckScales(scale.element_count(), n, scale_shift));
  return DispatchBits(bits, [&](auto bits_tag) -> ffi::Error {
    constexpr int kBits = decltype(bits_tag)::value;
    auto run = [&](auto signed_tag) -> ffi::Error {
      constexpr bool kSigned = decltype(signed_tag)::value;
      using K = DequantizeKernel<kBits, kSigned>;
      const int64_t words = NumWords(n, K::kPerWord);
      GQSGD_RETURN_IF_ERROR(CheckDtype(codes.element_type(),
                                       WordDtype<kBits, kSigned>(), "codes"));
      GQSGD_RETURN_IF_ERROR(CheckCount(codes.element_count(), words, "codes"));
      K k{static_cast<const typename K::Word*>(codes.untyped_data()),
          scale.typed_data(),
          out->typed_data(),
          n,
          offset,
          scale_shift};
      return exec.Run(k, words);
    };
    if constexpr (kBits == 8) {
      if (signed_codes) return run(std::true_type{});
    }
    return run(std::false_type{});
  });
}

// The worker counts RoundedAverage serves: n_a, n_b >= 1 and
// n_a + n_b <= kMaxAverageCount. Only the CPU handler can call it (on a GPU
// the counts live on the device; ops.average checks static counts).
inline ffi::Error CheckAverageCounts(int32_t n_a, int32_t n_b) {
  const int64_t den = int64_t{n_a} + n_b;
  if (n_a >= 1 && n_b >= 1 && den <= int64_t{kMaxAverageCount})
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      "n_a and n_b must be >= 1 with n_a + n_b <= " +
      std::to_string(kMaxAverageCount) + " (worker counts), got n_a=" +
      std::to_string(n_a) + ", n_b=" + std::to_string(n_b));
}

// (e) a, b packed words, n_a, n_b s32[], seed u32[2] -> averaged words.
template <typename Exec>
ffi::Error AverageImpl(Exec exec, ffi::AnyBuffer a, ffi::AnyBuffer b,
                       ffi::Buffer<ffi::S32> n_a, ffi::Buffer<ffi::S32> n_b,
                       ffi::Buffer<ffi::U32> seed,
                       ffi::Result<ffi::AnyBuffer> out, int32_t bits) {
  GQSGD_RETURN_IF_ERROR(CheckCount(seed.element_count(), 2, "seed"));
  GQSGD_RETURN_IF_ERROR(CheckCount(n_a.element_count(), 1, "n_a"));
  GQSGD_RETURN_IF_ERROR(CheckCount(n_b.element_count(), 1, "n_b"));
  const int64_t words = static_cast<int64_t>(a.element_count());
  GQSGD_RETURN_IF_ERROR(CheckCount(b.element_count(), words, "b"));
  GQSGD_RETURN_IF_ERROR(CheckCount(out->element_count(), words, "out"));
  return DispatchBits(bits, [&](auto bits_tag) -> ffi::Error {
    constexpr int kBits = decltype(bits_tag)::value;
    using K = AverageKernel<kBits>;
    constexpr ffi::DataType dt = WordDtype<kBits, false>();
    GQSGD_RETURN_IF_ERROR(CheckDtype(a.element_type(), dt, "a"));
    GQSGD_RETURN_IF_ERROR(CheckDtype(b.element_type(), dt, "b"));
    GQSGD_RETURN_IF_ERROR(CheckDtype(out->element_type(), dt, "out"));
    using W = typename K::Word;
    K k{static_cast<const W*>(a.untyped_data()),
        static_cast<const W*>(b.untyped_data()),
        n_a.typed_data(),
        n_b.typed_data(),
        seed.typed_data(),
        static_cast<W*>(out->untyped_data())};
    return exec.Run(k, words);
  });
}

// (c) x, scale f32[blocks], seed u32[2] -> exponent codes u8[n].
template <typename Exec>
ffi::Error ExpEncodeImpl(Exec exec, ffi::AnyBuffer x,
                         ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::U32> seed,
                         ffi::Result<ffi::Buffer<ffi::U8>> codes,
                         int32_t floor_code, int32_t scale_shift) {
  GQSGD_RETURN_IF_ERROR(CheckCount(seed.element_count(), 2, "seed"));
  if (floor_code < 1 || floor_code > 127) {
    return ffi::Error::InvalidArgument("floor_code must be in [1, 127]");
  }
  const int64_t n = static_cast<int64_t>(x.element_count());
  GQSGD_RETURN_IF_ERROR(CheckCount(codes->element_count(), n, "codes"));
  GQSGD_RETURN_IF_ERROR(CheckScales(scale.element_count(), n, scale_shift));
  return DispatchFloat(x.element_type(), [&](auto in_tag) {
    using In = decltype(in_tag);
    ExpEncodeKernel<In> k{static_cast<const In*>(x.untyped_data()),
                          scale.typed_data(),
                          seed.typed_data(),
                          codes->typed_data(),
                          floor_code,
                          scale_shift};
    return exec.Run(k, n);
  });
}

// (c) codes u8[n], scale f32[blocks] -> out f32[n].
template <typename Exec>
ffi::Error ExpDecodeImpl(Exec exec, ffi::Buffer<ffi::U8> codes,
                         ffi::Buffer<ffi::F32> scale,
                         ffi::Result<ffi::Buffer<ffi::F32>> out,
                         int32_t scale_shift) {
  const int64_t n = static_cast<int64_t>(codes.element_count());
  GQSGD_RETURN_IF_ERROR(CheckCount(out->element_count(), n, "out"));
  GQSGD_RETURN_IF_ERROR(CheckScales(scale.element_count(), n, scale_shift));
  ExpDecodeKernel k{codes.typed_data(), scale.typed_data(), out->typed_data(),
                    scale_shift};
  return exec.Run(k, n);
}

// (d) a, b u8[n], seed u32[2] -> reduced u8[n].
template <typename Exec>
ffi::Error ExpReduceImpl(Exec exec, ffi::Buffer<ffi::U8> a,
                         ffi::Buffer<ffi::U8> b, ffi::Buffer<ffi::U32> seed,
                         ffi::Result<ffi::Buffer<ffi::U8>> out) {
  GQSGD_RETURN_IF_ERROR(CheckCount(seed.element_count(), 2, "seed"));
  const int64_t n = static_cast<int64_t>(a.element_count());
  GQSGD_RETURN_IF_ERROR(CheckCount(b.element_count(), n, "b"));
  GQSGD_RETURN_IF_ERROR(CheckCount(out->element_count(), n, "out"));
  ExpReduceKernel k{a.typed_data(), b.typed_data(), seed.typed_data(),
                    out->typed_data()};
  return exec.Run(k, n);
}

// (f) x (f32/bf16/f16) -> out f32[ceil(n / 2^shift)], each block's max-abs.
template <typename Exec>
ffi::Error BlockMaxAbsImpl(Exec exec, ffi::AnyBuffer x,
                           ffi::Result<ffi::Buffer<ffi::F32>> out,
                           int32_t shift) {
  if (shift < 0 || shift > 30) {
    return ffi::Error::InvalidArgument("shift must be in [0, 30], got " +
                                       std::to_string(shift));
  }
  const int64_t n = static_cast<int64_t>(x.element_count());
  const int64_t blocks = NumScaleBlocks(n, shift);
  GQSGD_RETURN_IF_ERROR(CheckCount(out->element_count(), blocks, "out"));
  return DispatchFloat(x.element_type(), [&](auto in_tag) {
    using In = decltype(in_tag);
    BlockMaxAbsKernel<In> k{static_cast<const In*>(x.untyped_data()),
                            out->typed_data(), n, shift};
    return exec.Run(k, blocks, int64_t{1} << shift);
  });
}

// Binds the handler signatures once; Ctx is the platform's execution context.
#define GQSGD_BIND_QUANTIZE(CTX)                              \
  ::xla::ffi::Ffi::Bind()                                     \
      .Ctx<CTX>()                                             \
      .Arg<::xla::ffi::AnyBuffer>()               /* x */     \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>() /* scale */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>() /* seed */  \
      .Ret<::xla::ffi::AnyBuffer>()               /* codes */ \
      .Attr<int32_t>("levels")                                \
      .Attr<int32_t>("bits")                                  \
      .Attr<bool>("signed_codes")                             \
      .Attr<int32_t>("scale_shift")

#define GQSGD_BIND_DEQUANTIZE(CTX)                            \
  ::xla::ffi::Ffi::Bind()                                     \
      .Ctx<CTX>()                                             \
      .Arg<::xla::ffi::AnyBuffer>()               /* codes */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>() /* scale */ \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>() /* out */   \
      .Attr<int32_t>("bits")                                  \
      .Attr<bool>("signed_codes")                             \
      .Attr<int32_t>("offset")                                \
      .Attr<int32_t>("scale_shift")

#define GQSGD_BIND_AVERAGE(CTX)                              \
  ::xla::ffi::Ffi::Bind()                                    \
      .Ctx<CTX>()                                            \
      .Arg<::xla::ffi::AnyBuffer>()               /* a */    \
      .Arg<::xla::ffi::AnyBuffer>()               /* b */    \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>() /* n_a */  \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>() /* n_b */  \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>() /* seed */ \
      .Ret<::xla::ffi::AnyBuffer>()               /* out */  \
      .Attr<int32_t>("bits")

#define GQSGD_BIND_EXP_ENCODE(CTX)                            \
  ::xla::ffi::Ffi::Bind()                                     \
      .Ctx<CTX>()                                             \
      .Arg<::xla::ffi::AnyBuffer>()               /* x */     \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>() /* scale */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>() /* seed */  \
      .Ret<::xla::ffi::Buffer<::xla::ffi::U8>>()  /* codes */ \
      .Attr<int32_t>("floor_code")                            \
      .Attr<int32_t>("scale_shift")

#define GQSGD_BIND_EXP_DECODE(CTX)                            \
  ::xla::ffi::Ffi::Bind()                                     \
      .Ctx<CTX>()                                             \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U8>>()  /* codes */ \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>() /* scale */ \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>() /* out */   \
      .Attr<int32_t>("scale_shift")

#define GQSGD_BIND_EXP_REDUCE(CTX)                           \
  ::xla::ffi::Ffi::Bind()                                    \
      .Ctx<CTX>()                                            \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U8>>()  /* a */    \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U8>>()  /* b */    \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>() /* seed */ \
      .Ret<::xla::ffi::Buffer<::xla::ffi::U8>>()  /* out */

#define GQSGD_BIND_BLOCK_MAX_ABS(CTX)                       \
  ::xla::ffi::Ffi::Bind()                                   \
      .Ctx<CTX>()                                           \
      .Arg<::xla::ffi::AnyBuffer>()               /* x */   \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>() /* out */ \
      .Attr<int32_t>("shift")

}  // namespace gqsgd

#endif  // GQSGD_JAX_HANDLERS_H_
