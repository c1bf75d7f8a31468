// Python module _gqsgd_cpu: the CPU FFI handlers as capsules, plus a host
// emulation of the CUDA launch grid for the tests.
//
// emulate_* run a kernel body exactly as a CUDA grid of `blocks` x `threads`
// would (thread t processes items t, t + blocks*threads, ...), so the index
// math, tail handling and packing of the GPU path run in the CPU test suite.
#include <algorithm>
#include <cstdint>
#include <string>

#include "gqsgd/jointsq_kernels.h"
#include "gqsgd/kernels.h"
#include "nanobind/nanobind.h"
#include "nanobind/ndarray.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdQuantizeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdDequantizeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdAverageCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdExpEncodeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdExpDecodeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdExpReduceCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdBlockMaxAbsCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdJointsqSelectCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdJointsqMeanClassmapCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdJointsqEncodeClassmapCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GqsgdHadamardCpu);

namespace gqsgd {
namespace {

template <typename T>
nb::capsule Capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>);
  return nb::capsule(reinterpret_cast<void*>(fn));
}

template <typename T>
using Vec = nb::ndarray<T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

struct Grid {
  int64_t blocks, threads;
};

template <typename Kernel>
void Launch(const Kernel& kernel, int64_t items, Grid grid) {
  const int64_t total = grid.blocks * grid.threads;
  for (int64_t t = 0; t < total; ++t) kernel(t, total, items);
}

Grid MakeGrid(int64_t blocks, int64_t threads) {
  if (blocks < 1 || threads < 1)
    throw nb::value_error("blocks and threads must be >= 1");
  return Grid{blocks, threads};
}

// The kernels' scale operand: one scale (shift kOneScale), or element i
// using data[i >> shift] (block scales). The pointer must outlive the call.
struct Scales {
  const float* data;
  int32_t shift;
};

Scales OneScale(const float& scale) { return Scales{&scale, kOneScale}; }

Scales BlockScales(const Vec<const float>& scales, int32_t shift, int64_t n) {
  if (shift < 0 || shift > kOneScale)
    throw nb::value_error("scale_shift must be in [0, 62]");
  if (static_cast<int64_t>(scales.shape(0)) <
      std::max<int64_t>(NumScaleBlocks(n, shift), 1)) {
    throw nb::value_error("scale has fewer elements than blocks");
  }
  return Scales{scales.data(), shift};
}

template <int kBits>
void EmulateQuantizeBits(Vec<const float> x, Scales scale,
                         Vec<const uint32_t> seed,
                         nb::ndarray<nb::c_contig, nb::device::cpu> codes,
                         int32_t levels, bool signed_codes, Grid grid) {
  const int64_t n = static_cast<int64_t>(x.shape(0));
  auto run = [&](auto signed_tag) {
    constexpr bool kSigned = decltype(signed_tag)::value;
    using K = QuantizeKernel<float, kBits, kSigned>;
    const int64_t words = NumWords(n, kSigned ? 1 : Lanes<kBits>::kCount);
    if (static_cast<int64_t>(codes.size()) != words ||
        codes.itemsize() != sizeof(typename K::Word)) {
      throw nb::value_error("codes has the wrong size or dtype");
    }
    K k{x.data(),    scale.data,
        seed.data(), static_cast<typename K::Word*>(codes.data()),
        n,           levels,
        scale.shift};
    Launch(k, words, grid);
  };
  if constexpr (kBits == 8) {
    if (signed_codes) return run(std::true_type{});
  }
  run(std::false_type{});
}

void EmulateQuantize(Vec<const float> x, Scales scale, Vec<const uint32_t> seed,
                     nb::ndarray<nb::c_contig, nb::device::cpu> codes,
                     int32_t levels, int32_t bits, bool signed_codes,
                     int64_t blocks, int64_t threads) {
  const Grid grid = MakeGrid(blocks, threads);
  switch (bits) {
    case 2:
      return EmulateQuantizeBits<2>(x, scale, seed, codes, levels, signed_codes,
                                    grid);
    case 3:
      return EmulateQuantizeBits<3>(x, scale, seed, codes, levels, signed_codes,
                                    grid);
    case 4:
      return EmulateQuantizeBits<4>(x, scale, seed, codes, levels, signed_codes,
                                    grid);
    case 5:
      return EmulateQuantizeBits<5>(x, scale, seed, codes, levels, signed_codes,
                                    grid);
    case 6:
      return EmulateQuantizeBits<6>(x, scale, seed, codes, levels, signed_codes,
                                    grid);
    case 7:
      return EmulateQuantizeBits<7>(x, scale, seed, codes, levels, signed_codes,
                                    grid);
    case 8:
      return EmulateQuantizeBits<8>(x, scale, seed, codes, levels, signed_codes,
                                    grid);
    default:
      throw nb::value_error("bits must be in [2, 8]");
  }
}

template <int kBits, bool kSigned>
void EmulateDequantizeBits(nb::ndarray<nb::c_contig, nb::device::cpu> codes,
                           Scales scale, Vec<float> out, int32_t offset,
                           Grid grid) {
  using K = DequantizeKernel<kBits, kSigned>;
  const int64_t n = static_cast<int64_t>(out.shape(0));
  const int64_t words = NumWords(n, K::kPerWord);
  if (static_cast<int64_t>(codes.size()) != words ||
      codes.itemsize() != sizeof(typename K::Word)) {
    throw nb::value_error("codes has the wrong size or dtype");
  }
  K k{static_cast<const typename K::Word*>(codes.data()),
      scale.data,
      out.data(),
      n,
      offset,
      scale.shift};
  Launch(k, words, grid);
}

void EmulateDequantize(nb::ndarray<nb::c_contig, nb::device::cpu> codes,
                       Scales scale, Vec<float> out, int32_t bits,
                       bool signed_codes, int32_t offset, int64_t blocks,
                       int64_t threads) {
  const Grid grid = MakeGrid(blocks, threads);
  if (signed_codes) {
    if (bits != 8) throw nb::value_error("signed_codes needs bits == 8");
    return EmulateDequantizeBits<8, true>(codes, scale, out, offset, grid);
  }
  switch (bits) {
    case 2:
      return EmulateDequantizeBits<2, false>(codes, scale, out, offset, grid);
    case 3:
      return EmulateDequantizeBits<3, false>(codes, scale, out, offset, grid);
    case 4:
      return EmulateDequantizeBits<4, false>(codes, scale, out, offset, grid);
    case 5:
      return EmulateDequantizeBits<5, false>(codes, scale, out, offset, grid);
    case 6:
      return EmulateDequantizeBits<6, false>(codes, scale, out, offset, grid);
    case 7:
      return EmulateDequantizeBits<7, false>(codes, scale, out, offset, grid);
    case 8:
      return EmulateDequantizeBits<8, false>(codes, scale, out, offset, grid);
    default:
      throw nb::value_error("bits must be in [2, 8]");
  }
}

// The butterfly's combine (AverageKernel) on packed words; with more than
// one thread in the grid this is the strided body the CUDA kernel runs.
template <int kBits>
void EmulateAverageBits(nb::ndarray<nb::c_contig, nb::device::cpu> a,
                        nb::ndarray<nb::c_contig, nb::device::cpu> b,
                        int32_t n_a, int32_t n_b, Vec<const uint32_t> seed,
                        nb::ndarray<nb::c_contig, nb::device::cpu> out,
                        Grid grid) {
  using K = AverageKernel<kBits>;
  using W = typename K::Word;
  const int64_t words = static_cast<int64_t>(a.size());
  for (const auto* arr : {&a, &b, &out}) {
    if (static_cast<int64_t>(arr->size()) != words ||
        arr->itemsize() != sizeof(W)) {
      throw nb::value_error(
          "a, b and out must have the same length and the word dtype");
    }
  }
  K k{static_cast<const W*>(a.data()),
      static_cast<const W*>(b.data()),
      &n_a,
      &n_b,
      seed.data(),
      static_cast<W*>(out.data())};
  Launch(k, words, grid);
}

void EmulateAverage(nb::ndarray<nb::c_contig, nb::device::cpu> a,
                    nb::ndarray<nb::c_contig, nb::device::cpu> b, int32_t n_a,
                    int32_t n_b, Vec<const uint32_t> seed,
                    nb::ndarray<nb::c_contig, nb::device::cpu> out,
                    int32_t bits, int64_t blocks, int64_t threads) {
  // The handlers' contract (RoundedAverage's exact range).
  if (n_a < 1 || n_b < 1 || int64_t{n_a} + n_b > int64_t{kMaxAverageCount}) {
    const std::string msg = "n_a and n_b must be >= 1 with n_a + n_b <= " +
                            std::to_string(kMaxAverageCount);
    throw nb::value_error(msg.c_str());
  }
  const Grid grid = MakeGrid(blocks, threads);
  switch (bits) {
    case 2:
      return EmulateAverageBits<2>(a, b, n_a, n_b, seed, out, grid);
    case 3:
      return EmulateAverageBits<3>(a, b, n_a, n_b, seed, out, grid);
    case 4:
      return EmulateAverageBits<4>(a, b, n_a, n_b, seed, out, grid);
    case 5:
      return EmulateAverageBits<5>(a, b, n_a, n_b, seed, out, grid);
    case 6:
      return EmulateAverageBits<6>(a, b, n_a, n_b, seed, out, grid);
    case 7:
      return EmulateAverageBits<7>(a, b, n_a, n_b, seed, out, grid);
    case 8:
      return EmulateAverageBits<8>(a, b, n_a, n_b, seed, out, grid);
    default:
      throw nb::value_error("bits must be in [2, 8]");
  }
}

void EmulateExpEncode(Vec<const float> x, Scales scale,
                      Vec<const uint32_t> seed, Vec<uint8_t> codes,
                      int32_t floor_code, int64_t blocks, int64_t threads) {
  if (codes.shape(0) != x.shape(0)) throw nb::value_error("codes must match x");
  ExpEncodeKernel<float> k{x.data(),     scale.data, seed.data(),
                           codes.data(), floor_code, scale.shift};
  Launch(k, static_cast<int64_t>(x.shape(0)), MakeGrid(blocks, threads));
}

void EmulateExpDecode(Vec<const uint8_t> codes, Scales scale, Vec<float> out,
                      int64_t blocks, int64_t threads) {
  if (out.shape(0) != codes.shape(0))
    throw nb::value_error("out must match codes");
  ExpDecodeKernel k{codes.data(), scale.data, out.data(), scale.shift};
  Launch(k, static_cast<int64_t>(codes.shape(0)), MakeGrid(blocks, threads));
}

void EmulateExpReduce(Vec<const uint8_t> a, Vec<const uint8_t> b,
                      Vec<const uint32_t> seed, Vec<uint8_t> out,
                      int64_t blocks, int64_t threads) {
  if (a.shape(0) != b.shape(0) || out.shape(0) != a.shape(0)) {
    throw nb::value_error("a, b and out must have the same length");
  }
  ExpReduceKernel k{a.data(), b.data(), seed.data(), out.data()};
  Launch(k, static_cast<int64_t>(a.shape(0)), MakeGrid(blocks, threads));
}

// Random bits at 64-bit element indices [start, start + len(out)).
void RandomBitsAt(Vec<const uint32_t> seed, int64_t start, uint32_t stream,
                  Vec<uint32_t> out, int64_t blocks, int64_t threads) {
  if (start < 0) throw nb::value_error("start must be >= 0");
  RandomBitsKernel k{seed.data(), start, stream, out.data()};
  Launch(k, static_cast<int64_t>(out.shape(0)), MakeGrid(blocks, threads));
}

}  // namespace
}  // namespace gqsgd

NB_MODULE(_gqsgd_cpu, m) {
  using gqsgd::Vec;
  m.def("registrations", []() {
    nb::dict d;
    d["gqsgd_quantize"] = gqsgd::Capsule(GqsgdQuantizeCpu);
    d["gqsgd_dequantize"] = gqsgd::Capsule(GqsgdDequantizeCpu);
    d["gqsgd_average"] = gqsgd::Capsule(GqsgdAverageCpu);
    d["gqsgd_exp_encode"] = gqsgd::Capsule(GqsgdExpEncodeCpu);
    d["gqsgd_exp_decode"] = gqsgd::Capsule(GqsgdExpDecodeCpu);
    d["gqsgd_exp_reduce"] = gqsgd::Capsule(GqsgdExpReduceCpu);
    // CPU only: on a GPU, XLA's own fused reduction is the fast path.
    d["gqsgd_block_max_abs"] = gqsgd::Capsule(GqsgdBlockMaxAbsCpu);
    // JointSQ's selection and decode-and-mean (jointsq_handlers.cc).
    d["gqsgd_jointsq_select"] = gqsgd::Capsule(GqsgdJointsqSelectCpu);
    d["gqsgd_jointsq_mean_classmap"] =
        gqsgd::Capsule(GqsgdJointsqMeanClassmapCpu);
    d["gqsgd_jointsq_encode_classmap"] =
        gqsgd::Capsule(GqsgdJointsqEncodeClassmapCpu);
    // CPU only: THC's Walsh-Hadamard transform (hadamard_handlers.cc); GPUs
    // keep the matrix products.
    d["gqsgd_hadamard"] = gqsgd::Capsule(GqsgdHadamardCpu);
    return d;
  });
  // emulate_quantize, emulate_dequantize, emulate_exp_encode and
  // emulate_exp_decode take a float scale, or a float32 vector of block
  // scales and scale_shift.
  m.def(
      "emulate_quantize",
      [](Vec<const float> x, float scale, Vec<const uint32_t> seed,
         nb::ndarray<nb::c_contig, nb::device::cpu> codes, int32_t levels,
         int32_t bits, bool signed_codes, int64_t blocks, int64_t threads) {
        gqsgd::EmulateQuantize(x, gqsgd::OneScale(scale), seed, codes, levels,
                               bits, signed_codes, blocks, threads);
      },
      nb::arg("x"), nb::arg("scale"), nb::arg("seed"), nb::arg("codes"),
      nb::arg("levels"), nb::arg("bits"), nb::arg("signed_codes"),
      nb::arg("blocks"), nb::arg("threads"));
  m.def(
      "emulate_quantize",
      [](Vec<const float> x, Vec<const float> scale, Vec<const uint32_t> seed,
         nb::ndarray<nb::c_contig, nb::device::cpu> codes, int32_t levels,
         int32_t bits, bool signed_codes, int64_t blocks, int64_t threads,
         int32_t scale_shift) {
        const int64_t n = static_cast<int64_t>(x.shape(0));
        gqsgd::EmulateQuantize(x, gqsgd::BlockScales(scale, scale_shift, n),
                               seed, codes, levels, bits, signed_codes, blocks,
                               threads);
      },
      nb::arg("x"), nb::arg("scale"), nb::arg("seed"), nb::arg("codes"),
      nb::arg("levels"), nb::arg("bits"), nb::arg("signed_codes"),
      nb::arg("blocks"), nb::arg("threads"), nb::arg("scale_shift"));
  m.def(
      "emulate_dequantize",
      [](nb::ndarray<nb::c_contig, nb::device::cpu> codes, float scale,
         Vec<float> out, int32_t bits, bool signed_codes, int32_t offset,
         int64_t blocks, int64_t threads) {
        gqsgd::EmulateDequantize(codes, gqsgd::OneScale(scale), out, bits,
                                 signed_codes, offset, blocks, threads);
      },
      nb::arg("codes"), nb::arg("scale"), nb::arg("out"), nb::arg("bits"),
      nb::arg("signed_codes"), nb::arg("offset"), nb::arg("blocks"),
      nb::arg("threads"));
  m.def(
      "emulate_dequantize",
      [](nb::ndarray<nb::c_contig, nb::device::cpu> codes,
         Vec<const float> scale, Vec<float> out, int32_t bits,
         bool signed_codes, int32_t offset, int64_t blocks, int64_t threads,
         int32_t scale_shift) {
        const int64_t n = static_cast<int64_t>(out.shape(0));
        gqsgd::EmulateDequantize(codes,
                                 gqsgd::BlockScales(scale, scale_shift, n), out,
                                 bits, signed_codes, offset, blocks, threads);
      },
      nb::arg("codes"), nb::arg("scale"), nb::arg("out"), nb::arg("bits"),
      nb::arg("signed_codes"), nb::arg("offset"), nb::arg("blocks"),
      nb::arg("threads"), nb::arg("scale_shift"));
  m.def("emulate_average", &gqsgd::EmulateAverage, nb::arg("a"), nb::arg("b"),
        nb::arg("n_a"), nb::arg("n_b"), nb::arg("seed"), nb::arg("out"),
        nb::arg("bits"), nb::arg("blocks"), nb::arg("threads"));
  m.def(
      "emulate_exp_encode",
      [](Vec<const float> x, float scale, Vec<const uint32_t> seed,
         Vec<uint8_t> codes, int32_t floor_code, int64_t blocks,
         int64_t threads) {
        gqsgd::EmulateExpEncode(x, gqsgd::OneScale(scale), seed, codes,
                                floor_code, blocks, threads);
      },
      nb::arg("x"), nb::arg("scale"), nb::arg("seed"), nb::arg("codes"),
      nb::arg("floor_code"), nb::arg("blocks"), nb::arg("threads"));
  m.def(
      "emulate_exp_encode",
      [](Vec<const float> x, Vec<const float> scale, Vec<const uint32_t> seed,
         Vec<uint8_t> codes, int32_t floor_code, int64_t blocks,
         int64_t threads, int32_t scale_shift) {
        const int64_t n = static_cast<int64_t>(x.shape(0));
        gqsgd::EmulateExpEncode(x, gqsgd::BlockScales(scale, scale_shift, n),
                                seed, codes, floor_code, blocks, threads);
      },
      nb::arg("x"), nb::arg("scale"), nb::arg("seed"), nb::arg("codes"),
      nb::arg("floor_code"), nb::arg("blocks"), nb::arg("threads"),
      nb::arg("scale_shift"));
  m.def(
      "emulate_exp_decode",
      [](Vec<const uint8_t> codes, float scale, Vec<float> out, int64_t blocks,
         int64_t threads) {
        gqsgd::EmulateExpDecode(codes, gqsgd::OneScale(scale), out, blocks,
                                threads);
      },
      nb::arg("codes"), nb::arg("scale"), nb::arg("out"), nb::arg("blocks"),
      nb::arg("threads"));
  m.def(
      "emulate_exp_decode",
      [](Vec<const uint8_t> codes, Vec<const float> scale, Vec<float> out,
         int64_t blocks, int64_t threads, int32_t scale_shift) {
        const int64_t n = static_cast<int64_t>(codes.shape(0));
        gqsgd::EmulateExpDecode(codes,
                                gqsgd::BlockScales(scale, scale_shift, n), out,
                                blocks, threads);
      },
      nb::arg("codes"), nb::arg("scale"), nb::arg("out"), nb::arg("blocks"),
      nb::arg("threads"), nb::arg("scale_shift"));
  m.def("emulate_exp_reduce", &gqsgd::EmulateExpReduce, nb::arg("a"),
        nb::arg("b"), nb::arg("seed"), nb::arg("out"), nb::arg("blocks"),
        nb::arg("threads"));
  // Whether JointSQ's mean kernel runs its AVX-512 path; without it the
  // XLA twin is faster, and impl="auto" takes the twin.
  m.def("jointsq_mean_vectorized",
        []() { return gqsgd::jointsq::UseAvx512(); });
  m.def("random_bits_at", &gqsgd::RandomBitsAt, nb::arg("seed"),
        nb::arg("start"), nb::arg("stream"), nb::arg("out"),
        nb::arg("blocks") = 1, nb::arg("threads") = 1);
}
