// Kernel bodies shared by the CPU handlers, the CUDA kernels and the host
// emulation of the CUDA launch grid.
//
// Each kernel is a struct of raw pointers and scalars with
//   operator()(first, stride, end)
// that processes items first, first + stride, ... < end. A CUDA thread calls
// it with (global thread id, total threads, n): a grid-stride loop. A CPU
// worker calls it with (begin, 1, end) on its chunk. The host emulation calls
// it for every thread of a given grid, so the index math, tail handling and
// packing that run on a GPU are exercised by the CPU test suite.
//
// Scalar operands (scales, seeds, counts) are device pointers on a GPU: they
// change every step, so they are operands, never attributes. They are read
// once per call of operator(), not once per element.
#ifndef GQSGD_JAX_KERNELS_H_
#define GQSGD_JAX_KERNELS_H_

#include <cstdint>
#include <type_traits>

#include "gqsgd/math.h"

#if defined(__CUDACC__)
#define GQSGD_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define GQSGD_UNROLL _Pragma("clang loop unroll(full)")
#else
#define GQSGD_UNROLL _Pragma("GCC unroll 16")
#endif

namespace gqsgd {

// Packed lane layout: a word holds kLanes codes of kBits bits; element k of a
// word sits at bit (kLanes - 1 - k) * kBits, i.e. even index -> high nibble
// for 4-bit codes (the reference's layout). Words are uint8 when kBits
// divides 8, else uint32 with floor(32 / kBits) lanes.
template <int kBits>
struct Lanes {
  static constexpr bool kByte = (8 % kBits) == 0;
  static constexpr int kCount = kByte ? 8 / kBits : 32 / kBits;
  static constexpr uint32_t kMask = (1u << kBits) - 1u;
  using Word = typename std::conditional<kByte, uint8_t, uint32_t>::type;
};

// (a) Stochastic-rounding quantize of x * scale to [-levels, levels].
// kSigned: int8 codes q. Otherwise offset-binary codes q + levels packed in
// lanes of kBits (padding lanes of the last word are zero).
template <typename In, int kBits, bool kSigned>
struct QuantizeKernel {
  using L = Lanes<kBits>;
  using Word = typename std::conditional<kSigned, int8_t, typename L::Word>::type;
  const In* x;
  const float* scale;
  const uint32_t* seed;
  Word* codes;
  int64_t n;  // number of elements
  int32_t levels;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
    const float s = *scale;
    const StreamKey key = MakeStreamKey(seed[0], seed[1], 0);
    const int32_t offset = kSigned ? 0 : levels;
    for (int64_t w = first; w < end; w += stride) {
      uint32_t word = 0;
GQSGD_UNROLL
      for (int k = 0; k < (kSigned ? 1 : L::kCount); ++k) {
        const int64_t i = w * (kSigned ? 1 : L::kCount) + k;
        const bool valid = i < n;
        const float v = valid ? ToFloat(x[valid ? i : 0]) : 0.0f;
        const int32_t q = StochasticRound(v, s, levels, RandomBits(key, i));
        const uint32_t c = valid ? (static_cast<uint32_t>(q + offset) & L::kMask) : 0u;
        word |= c << ((kSigned ? 0 : (L::kCount - 1 - k)) * kBits);
      }
      codes[w] = static_cast<Word>(word);
    }
  }
};

// (b) Unpack + dequantize: out = (code - offset) * scale. For a psum of W
// offset-binary codes, offset = W * levels and scale = M / (levels * W)
// (worker-count correction); for a butterfly root, offset = levels.
template <int kBits, bool kSigned>
struct DequantizeKernel {
  using L = Lanes<kBits>;
  using Word = typename std::conditional<kSigned, int8_t, typename L::Word>::type;
  static constexpr int kPerWord = kSigned ? 1 : L::kCount;
  const Word* codes;
  const float* scale;
  float* out;
  int64_t n;  // number of elements
  int32_t offset;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
    const float s = *scale;
    for (int64_t w = first; w < end; w += stride) {
      const uint32_t word = static_cast<uint32_t>(codes[w]);
GQSGD_UNROLL
      for (int k = 0; k < kPerWord; ++k) {
        const int64_t i = w * kPerWord + k;
        const int32_t c =
            kSigned ? static_cast<int32_t>(static_cast<int8_t>(word & 0xffu))
                    : static_cast<int32_t>((word >> ((kPerWord - 1 - k) * kBits)) & L::kMask);
        if (i < n) out[i] = static_cast<float>(c - offset) * s;
      }
    }
  }
};

// (e) Requantizing weighted average of two packed-lane buffers:
// SR((n_a * a + n_b * b) / (n_a + n_b)) lane by lane (butterfly combine).
template <int kBits>
struct AverageKernel {
  using L = Lanes<kBits>;
  using Word = typename L::Word;
  const Word* a;
  const Word* b;
  const int32_t* n_a;
  const int32_t* n_b;
  const uint32_t* seed;
  Word* out;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
    const uint32_t na = static_cast<uint32_t>(*n_a);
    const uint32_t nb = static_cast<uint32_t>(*n_b);
    const StreamKey key = MakeStreamKey(seed[0], seed[1], 0);
    for (int64_t w = first; w < end; w += stride) {
      const uint32_t wa = a[w];
      const uint32_t wb = b[w];
      uint32_t word = 0;
GQSGD_UNROLL
      for (int k = 0; k < L::kCount; ++k) {
        const int shift = (L::kCount - 1 - k) * kBits;
        const uint32_t c = RoundedAverage((wa >> shift) & L::kMask, (wb >> shift) & L::kMask,
                                          na, nb, RandomBits(key, w * L::kCount + k));
        word |= (c & L::kMask) << shift;
      }
      out[w] = static_cast<Word>(word);
    }
  }
};

// (c) Exponential-dithering encode of x * scale to sign + exponent bytes.
template <typename In>
struct ExpEncodeKernel {
  const In* x;
  const float* scale;
  const uint32_t* seed;
  uint8_t* codes;
  int32_t floor_code;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
    const float s = *scale;
    const StreamKey key = MakeStreamKey(seed[0], seed[1], 0);
    for (int64_t i = first; i < end; i += stride) {
      codes[i] = ExpEncode(ToFloat(x[i]), s, floor_code, RandomBits(key, i));
    }
  }
};

// (c) Exponential-dithering decode: ±2^-e * scale.
struct ExpDecodeKernel {
  const uint8_t* codes;
  const float* scale;
  float* out;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
    const float s = *scale;
    for (int64_t i = first; i < end; i += stride) out[i] = ExpDecode(codes[i], s);
  }
};

// (d) Pairwise stochastic reduce of two exponential code buffers.
struct ExpReduceKernel {
  const uint8_t* a;
  const uint8_t* b;
  const uint32_t* seed;
  uint8_t* out;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
    const StreamKey k0 = MakeStreamKey(seed[0], seed[1], 0);
    const StreamKey k1 = MakeStreamKey(seed[0], seed[1], 1);
    for (int64_t i = first; i < end; i += stride) {
      out[i] = ExpReduce(a[i], b[i], RandomBits(k0, i), RandomBits(k1, i));
    }
  }
};

// Random bits of stream 0 at indices [start, start + n): lets the tests check
// the 64-bit index math beyond 2^32 elements without allocating them.
struct RandomBitsKernel {
  const uint32_t* seed;
  int64_t start;
  uint32_t stream;
  uint32_t* out;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
    const StreamKey key = MakeStreamKey(seed[0], seed[1], stream);
    for (int64_t i = first; i < end; i += stride) out[i] = RandomBits(key, start + i);
  }
};

// Number of packed words for n elements.
GQSGD_HD int64_t NumWords(int64_t n, int64_t per_word) { return (n + per_word - 1) / per_word; }

}  // namespace gqsgd

#endif  // GQSGD_JAX_KERNELS_H_
