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
//
// On the host, a call with stride 1 (a CPU worker's chunk, or a one-thread
// emulated grid) takes a contiguous path (Contiguous) written for the
// auto-vectorizer: blocks of kHostBlock elements with a 32-bit element
// counter, no per-element bounds checks, the random bits, codes and packing
// in separate passes over small stack buffers. It computes the same math.h
// functions on the same indices, so the bits are those of the strided loop
// (Strided), which the GPU and every other grid run.
#ifndef GQSGD_JAX_KERNELS_H_
#define GQSGD_JAX_KERNELS_H_

#include <algorithm>
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

// Block scales: the quantize/dequantize/exponential kernels read their scale
// from a vector, element i using scale[i >> scale_shift] (blocks of
// 2^scale_shift elements; the block size is static, the scales are an
// operand). kOneScale makes every index < 2^62 read scale[0]: the single
// scale of a bucket.
inline constexpr int32_t kOneScale = 62;

// Number of scales that n elements in blocks of 2^shift need.
GQSGD_HD int64_t NumScaleBlocks(int64_t n, int32_t shift) {
  return n <= 0 ? 0 : ((n - 1) >> shift) + 1;
}

#if !defined(__CUDA_ARCH__)
// Calls f(j_begin, j_end, scale) for the runs of [0, count) that share one
// block scale, element j being global index base + j. The inner loops of f
// stay free of per-element scale lookups and vectorize as before.
template <typename F>
inline void ForScaleRuns(int64_t base, uint32_t count, const float* scale,
                         int32_t shift, F&& f) {
  for (uint32_t j = 0; j < count;) {
    const int64_t blk = (base + j) >> shift;
    const int64_t next = (blk + 1) << shift;
    const uint32_t stop =
        static_cast<uint32_t>(std::min<int64_t>(count, next - base));
    f(j, stop, FlushSubnormal(scale[blk]));
    j = stop;
  }
}
#endif

#if !defined(__CUDA_ARCH__)
// Elements per block of the host loops: the stack buffers (a few uint32 per
// element) stay in L1.
inline constexpr int64_t kHostBlock = 1024;

// The host loops hash a 32-bit element counter: for the elements
// [first, first + count) of one block, sets *key_lo and *lo so that
// RandomBits(key, first + j) == RandomBits(*key_lo, *lo + j). This folds the
// high index word into the key exactly as RandomBits does (keep in sync with
// math.h). Returns false if the block straddles a multiple of 2^32, which
// the caller then runs through the generic loop.
inline bool HostBlockKey(StreamKey key, int64_t first, int64_t count,
                         StreamKey* key_lo, uint32_t* lo) {
  const uint64_t i = static_cast<uint64_t>(first);
  const uint32_t hi = static_cast<uint32_t>(i >> 32);
  if (static_cast<uint32_t>((i + static_cast<uint64_t>(count) - 1) >> 32) != hi)
    return false;
  *key_lo = StreamKey{key.a, key.b ^ (hi * 0x9e3779b9u)};
  *lo = static_cast<uint32_t>(i);
  return true;
}
#endif

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

#if !defined(__CUDA_ARCH__)
// Packs words * kCount codes (each < 2^kBits), element 0 in the high lane.
template <int kBits>
inline void PackLanes(const uint32_t* c, int64_t words,
                      typename Lanes<kBits>::Word* out) {
  using L = Lanes<kBits>;
  for (int64_t w = 0; w < words; ++w) {
    uint32_t word = 0;
    GQSGD_UNROLL
    for (int k = 0; k < L::kCount; ++k)
      word |= c[w * L::kCount + k] << ((L::kCount - 1 - k) * kBits);
    out[w] = static_cast<typename L::Word>(word);
  }
}

// Byte words (1, 2, 4 bits) from one byte per code: the kCount codes of a
// word are read as one integer p (code k in bits 8k..8k+7; compilers merge
// the byte loads into one) and shifted into place, which vectorizes to a
// few shifts and one narrowing store per vector; the generic loop above
// gathers with a stride of kCount instead.
template <int kBits>
inline void PackByteLanes(const uint8_t* c, int64_t words, uint8_t* out) {
  using L = Lanes<kBits>;
  static_assert(L::kByte, "byte words only");
  for (int64_t w = 0; w < words; ++w) {
    uint64_t p = 0;
    GQSGD_UNROLL
    for (int k = 0; k < L::kCount; ++k)
      p |= static_cast<uint64_t>(c[w * L::kCount + k]) << (8 * k);
    uint64_t word = 0;
    GQSGD_UNROLL
    for (int k = 0; k < L::kCount; ++k) {
      // Code k goes from bit 8k to bit (kCount - 1 - k) * kBits; the other
      // codes shifted along land above bit 7 or below bit 0 (codes are
      // below 2^kBits), so the low byte is exactly the packed word.
      const int from = 8 * k;
      const int to = (L::kCount - 1 - k) * kBits;
      word |= to >= from ? (p << (to - from)) : (p >> (from - to));
    }
    out[w] = static_cast<uint8_t>(word);
  }
}

// Inverse of PackLanes: all lanes of `words` words.
template <int kBits>
inline void UnpackLanes(const typename Lanes<kBits>::Word* in, int64_t words,
                        uint32_t* c) {
  using L = Lanes<kBits>;
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t word = in[w];
    GQSGD_UNROLL
    for (int k = 0; k < L::kCount; ++k)
      c[w * L::kCount + k] = (word >> ((L::kCount - 1 - k) * kBits)) & L::kMask;
  }
}
#endif

// (a) Stochastic-rounding quantize of x * scale to [-levels, levels].
// kSigned: int8 codes q. Otherwise offset-binary codes q + levels packed in
// lanes of kBits (padding lanes of the last word are zero).
template <typename In, int kBits, bool kSigned>
struct QuantizeKernel {
  using L = Lanes<kBits>;
  using Word =
      typename std::conditional<kSigned, int8_t, typename L::Word>::type;
  static constexpr int kPerWord = kSigned ? 1 : L::kCount;
  const In* x;
  const float* scale;
  const uint32_t* seed;
  Word* codes;
  int64_t n;  // number of elements
  int32_t levels;
  int32_t scale_shift = kOneScale;  // element i uses scale[i >> scale_shift]

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
#if !defined(__CUDA_ARCH__)
    if (stride == 1) return Contiguous(first, end);
#endif
    Strided(first, stride, end);
  }

  GQSGD_HD void Strided(int64_t first, int64_t stride, int64_t end) const {
    const StreamKey key = MakeStreamKey(seed[0], seed[1], 0);
    const int32_t offset = kSigned ? 0 : levels;
    for (int64_t w = first; w < end; w += stride) {
      uint32_t word = 0;
      GQSGD_UNROLL
      for (int k = 0; k < kPerWord; ++k) {
        const int64_t i = w * kPerWord + k;
        const bool valid = i < n;
        const int64_t at = valid ? i : 0;
        const float v = valid ? ToFloat(x[at]) : 0.0f;
        const float s = FlushSubnormal(scale[at >> scale_shift]);
        const int32_t q = StochasticRound(v, s, levels, RandomBits(key, i));
        const uint32_t c =
            valid ? (static_cast<uint32_t>(q + offset) & L::kMask) : 0u;
        word |= c << ((kPerWord - 1 - k) * kBits);
      }
      codes[w] = static_cast<Word>(word);
    }
  }

#if !defined(__CUDA_ARCH__)
  // Words [first, end): full words in blocks (codes, then packing), the
  // partial last word through Strided.
  void Contiguous(int64_t first, int64_t end) const {
    constexpr int64_t kBlockWords = kHostBlock / kPerWord;
    // Locals, not members: stores through the byte-sized code pointers may
    // alias anything, which would force a reload every iteration.
    const float* const sc = scale;
    const int32_t sh = scale_shift;
    const StreamKey key = MakeStreamKey(seed[0], seed[1], 0);
    const int32_t lv = levels;
    const uint32_t offset = kSigned ? 0u : static_cast<uint32_t>(lv);
    const In* const xs = x;
    Word* const out = codes;
    const int64_t full = std::min(end, n / kPerWord);
    for (int64_t w0 = first; w0 < full; w0 += kBlockWords) {
      const int64_t words = std::min(full - w0, kBlockWords);
      const uint32_t count = static_cast<uint32_t>(words * kPerWord);
      StreamKey k;
      uint32_t lo;
      if (!HostBlockKey(key, w0 * kPerWord, count, &k, &lo)) {
        Strided(w0, 1, w0 + words);
        continue;
      }
      const In* xb = xs + w0 * kPerWord;
      if constexpr (kPerWord == 1) {
        Word* ob = out + w0;
        ForScaleRuns(w0, count, sc, sh, [&](uint32_t j0, uint32_t j1, float s) {
          for (uint32_t j = j0; j < j1; ++j) {
            const int32_t q =
                StochasticRound(ToFloat(xb[j]), s, lv, RandomBits(k, lo + j));
            ob[j] = static_cast<Word>((static_cast<uint32_t>(q) + offset) &
                                      L::kMask);
          }
        });
      } else {
        // One byte per code where the words are bytes (see PackByteLanes).
        using Code =
            typename std::conditional<L::kByte, uint8_t, uint32_t>::type;
        Code c[kBlockWords * kPerWord];
        ForScaleRuns(w0 * kPerWord, count, sc, sh,
                     [&](uint32_t j0, uint32_t j1, float s) {
                       for (uint32_t j = j0; j < j1; ++j) {
                         const int32_t q = StochasticRound(
                             ToFloat(xb[j]), s, lv, RandomBits(k, lo + j));
                         c[j] = static_cast<Code>(
                             (static_cast<uint32_t>(q) + offset) & L::kMask);
                       }
                     });
        if constexpr (L::kByte) {
          PackByteLanes<kBits>(c, words, out + w0);
        } else {
          PackLanes<kBits>(c, words, out + w0);
        }
      }
    }
    if (std::max(first, full) < end) Strided(std::max(first, full), 1, end);
  }
#endif
};

// (b) Unpack + dequantize: out = (code - offset) * scale. For a psum of W
// offset-binary codes, offset = W * levels and scale = M / (levels * W)
// (worker-count correction); for a butterfly root, offset = levels.
template <int kBits, bool kSigned>
struct DequantizeKernel {
  using L = Lanes<kBits>;
  using Word =
      typename std::conditional<kSigned, int8_t, typename L::Word>::type;
  static constexpr int kPerWord = kSigned ? 1 : L::kCount;
  const Word* codes;
  const float* scale;
  float* out;
  int64_t n;  // number of elements
  int32_t offset;
  int32_t scale_shift = kOneScale;  // element i uses scale[i >> scale_shift]

  GQSGD_HD static int32_t Lane(uint32_t word, int k) {
    return kSigned ? static_cast<int32_t>(static_cast<int8_t>(word & 0xffu))
                   : static_cast<int32_t>(
                         (word >> ((kPerWord - 1 - k) * kBits)) & L::kMask);
  }

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
#if !defined(__CUDA_ARCH__)
    if (stride == 1) return Contiguous(first, end);
#endif
    Strided(first, stride, end);
  }

  GQSGD_HD void Strided(int64_t first, int64_t stride, int64_t end) const {
    for (int64_t w = first; w < end; w += stride) {
      const uint32_t word = static_cast<uint32_t>(codes[w]);
      GQSGD_UNROLL
      for (int k = 0; k < kPerWord; ++k) {
        const int64_t i = w * kPerWord + k;
        if (i < n) {
          out[i] = static_cast<float>(Lane(word, k) - offset) *
                   FlushSubnormal(scale[i >> scale_shift]);
        }
      }
    }
  }

#if !defined(__CUDA_ARCH__)
  // Full words without bounds checks (packed lanes unpacked block by block),
  // the partial last word through Strided.
  void Contiguous(int64_t first, int64_t end) const {
    constexpr int64_t kBlockWords = kHostBlock / kPerWord;
    const float* const sc = scale;
    const int32_t sh = scale_shift;
    const int32_t off = offset;
    const Word* const in = codes;
    float* const o = out;
    const int64_t full = std::min(end, n / kPerWord);
    if constexpr (kPerWord == 1) {
      for (int64_t w0 = first; w0 < full; w0 += kHostBlock) {
        const uint32_t count =
            static_cast<uint32_t>(std::min(full - w0, kHostBlock));
        const Word* ib = in + w0;
        float* ob = o + w0;
        ForScaleRuns(w0, count, sc, sh, [&](uint32_t j0, uint32_t j1, float s) {
          for (uint32_t j = j0; j < j1; ++j) {
            ob[j] = static_cast<float>(Lane(static_cast<uint32_t>(ib[j]), 0) -
                                       off) *
                    s;
          }
        });
      }
    } else {
      uint32_t c[kBlockWords * kPerWord];
      for (int64_t w0 = first; w0 < full; w0 += kBlockWords) {
        const int64_t words = std::min(full - w0, kBlockWords);
        UnpackLanes<kBits>(in + w0, words, c);
        float* ob = o + w0 * kPerWord;
        ForScaleRuns(
            w0 * kPerWord, static_cast<uint32_t>(words * kPerWord), sc, sh,
            [&](uint32_t j0, uint32_t j1, float s) {
              for (uint32_t j = j0; j < j1; ++j) {
                ob[j] =
                    static_cast<float>(static_cast<int32_t>(c[j]) - off) * s;
              }
            });
      }
    }
    if (std::max(first, full) < end) Strided(std::max(first, full), 1, end);
  }
#endif
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
#if !defined(__CUDA_ARCH__)
    if (stride == 1) return Contiguous(first, end);
#endif
    Strided(first, stride, end);
  }

  GQSGD_HD void Strided(int64_t first, int64_t stride, int64_t end) const {
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
        const uint32_t c =
            RoundedAverage((wa >> shift) & L::kMask, (wb >> shift) & L::kMask,
                           na, nb, RandomBits(key, w * L::kCount + k));
        word |= (c & L::kMask) << shift;
      }
      out[w] = static_cast<Word>(word);
    }
  }

#if !defined(__CUDA_ARCH__)
  // Lane-major: for each lane, one loop over the words of the block (element
  // index w * kCount + lane) that ORs its codes into the packed result.
  // Every loop is contiguous in w, so it vectorizes for any lane count
  // (interleaved unpacking does not for the 10-lane words of 3 bits).
  void Contiguous(int64_t first, int64_t end) const {
    constexpr int64_t kBlockWords = kHostBlock / L::kCount;
    const uint32_t na = static_cast<uint32_t>(*n_a);
    const uint32_t nb = static_cast<uint32_t>(*n_b);
    const StreamKey key = MakeStreamKey(seed[0], seed[1], 0);
    const Word* const as = a;
    const Word* const bs = b;
    Word* const o = out;
    uint32_t acc[kBlockWords];
    for (int64_t w0 = first; w0 < end; w0 += kBlockWords) {
      const int64_t words = std::min(end - w0, kBlockWords);
      StreamKey k;
      uint32_t lo;
      if (!HostBlockKey(key, w0 * L::kCount, words * L::kCount, &k, &lo)) {
        Strided(w0, 1, w0 + words);
        continue;
      }
      const uint32_t nw = static_cast<uint32_t>(words);
      for (uint32_t w = 0; w < nw; ++w) acc[w] = 0;
      GQSGD_UNROLL
      for (int lane = 0; lane < L::kCount; ++lane) {
        const int shift = (L::kCount - 1 - lane) * kBits;
        for (uint32_t w = 0; w < nw; ++w) {
          const uint32_t i = lo + w * L::kCount + static_cast<uint32_t>(lane);
          const uint32_t ca =
              (static_cast<uint32_t>(as[w0 + w]) >> shift) & L::kMask;
          const uint32_t cb =
              (static_cast<uint32_t>(bs[w0 + w]) >> shift) & L::kMask;
          acc[w] |=
              (RoundedAverage(ca, cb, na, nb, RandomBits(k, i)) & L::kMask)
              << shift;
        }
      }
      for (uint32_t w = 0; w < nw; ++w) o[w0 + w] = static_cast<Word>(acc[w]);
    }
  }
#endif
};

// (c) Exponential-dithering encode of x * scale to sign + exponent bytes.
template <typename In>
struct ExpEncodeKernel {
  const In* x;
  const float* scale;
  const uint32_t* seed;
  uint8_t* codes;
  int32_t floor_code;
  int32_t scale_shift = kOneScale;  // element i uses scale[i >> scale_shift]

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
#if !defined(__CUDA_ARCH__)
    if (stride == 1) return Contiguous(first, end);
#endif
    Strided(first, stride, end);
  }

  GQSGD_HD void Strided(int64_t first, int64_t stride, int64_t end) const {
    const StreamKey key = MakeStreamKey(seed[0], seed[1], 0);
    for (int64_t i = first; i < end; i += stride) {
      const float s = FlushSubnormal(scale[i >> scale_shift]);
      codes[i] = ExpEncode(ToFloat(x[i]), s, floor_code, RandomBits(key, i));
    }
  }

#if !defined(__CUDA_ARCH__)
  // Per block: the random bits, then the codes (measured slightly faster
  // than one fused loop).
  void Contiguous(int64_t first, int64_t end) const {
    const float* const sc = scale;
    const int32_t sh = scale_shift;
    const StreamKey key = MakeStreamKey(seed[0], seed[1], 0);
    const int32_t fc = floor_code;
    const In* const xs = x;
    uint8_t* const out = codes;
    uint32_t r[kHostBlock];
    for (int64_t i0 = first; i0 < end; i0 += kHostBlock) {
      const uint32_t count =
          static_cast<uint32_t>(std::min(end - i0, kHostBlock));
      StreamKey k;
      uint32_t lo;
      if (!HostBlockKey(key, i0, count, &k, &lo)) {
        Strided(i0, 1, i0 + count);
        continue;
      }
      for (uint32_t j = 0; j < count; ++j) r[j] = RandomBits(k, lo + j);
      ForScaleRuns(i0, count, sc, sh, [&](uint32_t j0, uint32_t j1, float s) {
        for (uint32_t j = j0; j < j1; ++j)
          out[i0 + j] = ExpEncode(ToFloat(xs[i0 + j]), s, fc, r[j]);
      });
    }
  }
#endif
};

// (c) Exponential-dithering decode: ±2^-e * scale.
struct ExpDecodeKernel {
  const uint8_t* codes;
  const float* scale;
  float* out;
  int32_t scale_shift = kOneScale;  // element i uses scale[i >> scale_shift]

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
#if !defined(__CUDA_ARCH__)
    if (stride == 1) return Contiguous(first, end);
#endif
    for (int64_t i = first; i < end; i += stride) {
      out[i] = ExpDecode(codes[i], FlushSubnormal(scale[i >> scale_shift]));
    }
  }

#if !defined(__CUDA_ARCH__)
  // The same math over runs of one scale with a unit stride the compiler
  // can see: the loop above (runtime stride, a scale load per element) ran
  // scalar, slower than the XLA twin (18.7 vs 8.4 ms per 16 M).
  void Contiguous(int64_t first, int64_t end) const {
    const uint8_t* const in = codes;
    float* const o = out;
    for (int64_t i0 = first; i0 < end; i0 += kHostBlock) {
      const uint32_t count =
          static_cast<uint32_t>(std::min(end - i0, kHostBlock));
      const uint8_t* ib = in + i0;
      float* ob = o + i0;
      ForScaleRuns(i0, count, scale, scale_shift,
                   [&](uint32_t j0, uint32_t j1, float s) {
                     for (uint32_t j = j0; j < j1; ++j) {
                       ob[j] = ExpDecode(ib[j], s);
                     }
                   });
    }
  }
#endif
};

// (d) Pairwise stochastic reduce of two exponential code buffers.
struct ExpReduceKernel {
  const uint8_t* a;
  const uint8_t* b;
  const uint32_t* seed;
  uint8_t* out;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
#if !defined(__CUDA_ARCH__)
    if (stride == 1) return Contiguous(first, end);
#endif
    Strided(first, stride, end);
  }

  GQSGD_HD void Strided(int64_t first, int64_t stride, int64_t end) const {
    const StreamKey k0 = MakeStreamKey(seed[0], seed[1], 0);
    const StreamKey k1 = MakeStreamKey(seed[0], seed[1], 1);
    for (int64_t i = first; i < end; i += stride) {
      out[i] = ExpReduce(a[i], b[i], RandomBits(k0, i), RandomBits(k1, i));
    }
  }

#if !defined(__CUDA_ARCH__)
  void Contiguous(int64_t first, int64_t end) const {
    const StreamKey key0 = MakeStreamKey(seed[0], seed[1], 0);
    const StreamKey key1 = MakeStreamKey(seed[0], seed[1], 1);
    const uint8_t* const as = a;
    const uint8_t* const bs = b;
    uint8_t* const o = out;
    for (int64_t i0 = first; i0 < end; i0 += kHostBlock) {
      const uint32_t count =
          static_cast<uint32_t>(std::min(end - i0, kHostBlock));
      StreamKey k0, k1;
      uint32_t lo;
      if (!HostBlockKey(key0, i0, count, &k0, &lo) ||
          !HostBlockKey(key1, i0, count, &k1, &lo)) {
        Strided(i0, 1, i0 + count);
        continue;
      }
      for (uint32_t j = 0; j < count; ++j) {
        o[i0 + j] = ExpReduce(as[i0 + j], bs[i0 + j], RandomBits(k0, lo + j),
                              RandomBits(k1, lo + j));
      }
    }
  }
#endif
};

// Random bits of stream 0 at indices [start, start + n): lets the tests check
// the 64-bit index math beyond 2^32 elements without allocating them.
struct RandomBitsKernel {
  const uint32_t* seed;
  int64_t start;
  uint32_t stream;
  uint32_t* out;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
#if !defined(__CUDA_ARCH__)
    if (stride == 1) return Contiguous(first, end);
#endif
    Strided(first, stride, end);
  }

  GQSGD_HD void Strided(int64_t first, int64_t stride, int64_t end) const {
    const StreamKey key = MakeStreamKey(seed[0], seed[1], stream);
    for (int64_t i = first; i < end; i += stride)
      out[i] = RandomBits(key, start + i);
  }

#if !defined(__CUDA_ARCH__)
  // Exercises HostBlockKey, including blocks that straddle 2^32.
  void Contiguous(int64_t first, int64_t end) const {
    const StreamKey key = MakeStreamKey(seed[0], seed[1], stream);
    for (int64_t i0 = first; i0 < end; i0 += kHostBlock) {
      const uint32_t count =
          static_cast<uint32_t>(std::min(end - i0, kHostBlock));
      StreamKey k;
      uint32_t lo;
      if (!HostBlockKey(key, start + i0, count, &k, &lo)) {
        Strided(i0, 1, i0 + count);
        continue;
      }
      for (uint32_t j = 0; j < count; ++j) out[i0 + j] = RandomBits(k, lo + j);
    }
  }
#endif
};

// |x| as the bits of a float32, subnormals not yet flushed (the caller
// flushes the max, which is the max of the flushed values).
GQSGD_HD uint32_t AbsBits(float x) { return FloatBits(x) & 0x7fffffffu; }
GQSGD_HD uint32_t AbsBits(BF16 x) {
  return (uint32_t{x.bits} << 16) & 0x7fffffffu;
}
// A half widens to a normal float32 (or zero), so nothing to flush.
GQSGD_HD uint32_t AbsBits(F16 x) { return FloatBits(ToFloat(x)) & 0x7fffffffu; }

// (f) Max-abs of each block of 2^shift elements (the last block may be
// short): +inf for a block holding any NaN or Inf, and subnormals read as
// zero (as ToFloat reads them). One item per block. The max runs on the bits
// of |x|: for non-negative floats their order as unsigned integers is their
// order as floats, and every NaN and Inf sorts above the largest finite
// value, so an integer max (which vectorizes) never drops a NaN, as XLA:CPU's
// float max does.
template <typename In>
struct BlockMaxAbsKernel {
  const In* x;
  float* out;
  int64_t n;
  int32_t shift;

  GQSGD_HD void operator()(int64_t first, int64_t stride, int64_t end) const {
    for (int64_t b = first; b < end; b += stride) {
      const int64_t lo = b << shift;
      const int64_t size = int64_t{1} << shift;
      const int64_t len = n - lo < size ? n - lo : size;
      const In* p = x + lo;
      uint32_t m = 0;
      for (int64_t i = 0; i < len; ++i) {
        const uint32_t a = AbsBits(p[i]);
        m = a > m ? a : m;
      }
      m = m >= 0x7f800000u ? 0x7f800000u : (m < 0x00800000u ? 0u : m);
      out[b] = BitsFloat(m);
    }
  }
};

// Number of packed words for n elements.
GQSGD_HD int64_t NumWords(int64_t n, int64_t per_word) {
  return (n + per_word - 1) / per_word;
}

}  // namespace gqsgd

#endif  // GQSGD_JAX_KERNELS_H_
