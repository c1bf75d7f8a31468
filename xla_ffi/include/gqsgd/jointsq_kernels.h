// JointSQ's CPU kernels (gqsgd_jax/_src/baselines/jointsq.py): the exact
// greedy's classes in three passes over the elements, and the mean of the W
// gathered class-map payloads of a step in one pass.
//
// Each is the twin of an XLA formulation in jointsq.py, bit for bit, with
// XLA:CPU's arithmetic: float32 IEEE operations with subnormal results and
// operands read as zero (FTZ/DAZ), here flushed explicitly.
//
// Plain single-threaded loops, called once per simulated device, which run
// concurrently; the bit casts, the flush, the counter hash and the
// stochastic rounding are math.h's.
#ifndef GQSGD_JAX_JOINTSQ_KERNELS_H_
#define GQSGD_JAX_JOINTSQ_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "gqsgd/kernels.h"
#include "gqsgd/math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace gqsgd {
namespace jointsq {

// jointsq.PROFIT_DENSITY as float32 and ITEM_WEIGHT.
inline constexpr double kDensity[3] = {
    (1 - 1.0 / 16) / 2,
    (1.0 / 16 - 1.0 / 256) / 2,
    (1.0 / 256 - 1.0 / 65536) / 4,
};
inline constexpr int64_t kWeight[3] = {2, 2, 4};
inline constexpr uint32_t kTinyBits = 0x00800000u;  // FLT_MIN
inline constexpr uint32_t kInfBits = 0x7F800000u;

// Profit of item t of an element with square s: the product XLA computes
// (jnp.float32(d) * squares), flushed.
inline float Profit(int t, float s) {
  return FlushSubnormal(static_cast<float>(kDensity[t]) * s);
}

// The smallest non-negative float s (as bits, at most +inf) with
// Profit(t, s) >= tau: items of type t at or above tau are exactly the
// elements with square >= it (the rounded product is monotone in s).
inline uint32_t SquareAtLeast(int t, float tau) {
  uint32_t lo = 0, hi = kInfBits;  // Profit(t, BitsFloat(hi)) = inf >= tau
  if (Profit(t, BitsFloat(lo)) >= tau) return lo;
  while (hi - lo > 1) {  // Profit(lo) < tau <= Profit(hi)
    const uint32_t mid = lo + (hi - lo) / 2;
    if (Profit(t, BitsFloat(mid)) >= tau) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return hi;
}

// Histogram of the squares' bits, 2^kBucketShift values a bucket; bits
// above +inf's (never from _squares) share the last bucket.
inline constexpr int kBucketShift = 15;
inline constexpr int64_t kBuckets = (kInfBits >> kBucketShift) + 1;

// The exact greedy's classes (jointsq._threshold_classes): cls[j] in 0..3,
// the items element j takes.
//
// squares: jointsq._squares, non-negative and flushed. The item (j, t) has
// profit Profit(t, sq[j]) and weight kWeight[t]; W(tau) is the weight of
// the items with profit >= tau. If W(FLT_MIN) <= budget every item with a
// positive profit is taken; else p*, the largest float tau >= FLT_MIN with
// W(tau) > budget (an item's profit), and the items above it are taken,
// then those equal to it in item order (t, then j) while their weights fit
// (the longest prefix of the items sorted by profit that fits).
//
// 1. A histogram of the squares' bits (S[k]: squares in buckets >= k)
//    bounds W(tau) from below (the buckets wholly above each type's square
//    threshold) and above (also the buckets that hold the thresholds), and
//    so p* within [tau_a, tau_b); the same pass computes W(FLT_MIN).
// 2. One pass counts W(tau_b) and collects the candidate items, profit in
//    [tau_a, tau_b); sorted by profit descending, then item index, they
//    give p* and the ties that fit.
// 3. One pass writes each element's class from its square and the three
//    square thresholds of "profit > p*", then the ties taken are added.
inline void SelectClasses(const float* squares, int64_t n, int64_t budget,
                          int32_t* cls) {
  const float tiny = BitsFloat(kTinyBits);
  uint32_t thresholds[3];
  for (int t = 0; t < 3; ++t) thresholds[t] = SquareAtLeast(t, tiny);
  thread_local std::vector<int32_t> suffix;  // reused: no page faults
  // kBuckets + 1 counts, then kZeroSlots counters of the zeros.
  constexpr int64_t kZeroSlots = 8;
  suffix.assign(kBuckets + 1 + kZeroSlots, 0);
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(squares);
  // W(FLT_MIN), as 32-bit partial counts (vectorizes).
  auto weight_at = [&](const uint32_t* at) {
    int64_t w = 0;
    for (int64_t j0 = 0; j0 < n; j0 += int64_t{1} << 24) {
      const int64_t j1 = std::min(n, j0 + (int64_t{1} << 24));
      uint32_t part = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const uint32_t s = bits[j];
        part += 2 * (s >= at[0]) + 2 * (s >= at[1]) + 4 * (s >= at[2]);
      }
      w += part;
    }
    return w;
  };
  const int64_t all = weight_at(thresholds);
  {
    // Zeros (most elements of a sparse gradient) stay out of the buckets
    // (bucket 0 is never counted: every threshold is a normal float), in
    // rotating counters past them: without a branch, which mispredicts
    // where zeros and values mix, and without a chain of increments of one
    // counter where most are zeros.
    int32_t* hist = suffix.data();
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t s = bits[j];
      const uint32_t zero_slot = kBuckets + 1 + (j & (kZeroSlots - 1));
      ++hist[Select(s == 0, zero_slot, std::min(s, kInfBits) >> kBucketShift)];
    }
  }
  for (int64_t k = kBuckets - 1; k >= 0; --k) suffix[k] += suffix[k + 1];
  // Squares >= b (bits), bounded below by the buckets wholly >= b and above
  // by the buckets that hold any value >= b.
  auto count_lo = [&](uint32_t b) {
    const int64_t k = (static_cast<int64_t>(std::min(b, kInfBits)) +
                       (int64_t{1} << kBucketShift) - 1) >>
                      kBucketShift;
    return static_cast<int64_t>(suffix[std::min(k, kBuckets)]);
  };
  auto count_hi = [&](uint32_t b) {
    return static_cast<int64_t>(suffix[std::min(b, kInfBits) >> kBucketShift]);
  };
  auto weight_bound = [&](uint32_t tau, bool upper) {
    int64_t w = 0;
    for (int t = 0; t < 3; ++t) {
      const uint32_t b = SquareAtLeast(t, BitsFloat(tau));
      w += kWeight[t] * (upper ? count_hi(b) : count_lo(b));
    }
    return w;
  };

  std::vector<uint32_t> ties;  // elements whose tied item is taken
  if (all > budget) {
    // tau_a: the largest tau with a lower bound > budget (FLT_MIN if none),
    // so p* >= tau_a; tau_b: the smallest with an upper bound <= budget,
    // so p* < tau_b (the upper bound at FLT_MIN is >= W > budget).
    uint32_t lo = kTinyBits, hi = kInfBits;
    if (weight_bound(lo, false) > budget) {
      while (hi - lo > 1) {
        const uint32_t mid = lo + (hi - lo) / 2;
        (weight_bound(mid, false) > budget ? lo : hi) = mid;
      }
    }
    const uint32_t tau_a = lo;
    lo = kTinyBits;
    hi = kInfBits;
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      (weight_bound(mid, true) <= budget ? hi : lo) = mid;
    }
    const uint32_t tau_b = std::max(hi, tau_a + 1);
    uint32_t at_a[3], at_b[3];
    for (int t = 0; t < 3; ++t) {
      at_a[t] = SquareAtLeast(t, BitsFloat(tau_a));
      at_b[t] = SquareAtLeast(t, BitsFloat(tau_b));
    }
    // Pass 2: W(tau_b) and the candidates, (~profit bits, item index t n
    // + j) as one sort key. Type 0 has the smallest square thresholds.
    int64_t w = weight_at(at_b);
    thread_local std::vector<uint64_t> cand;
    cand.clear();
    // In [at_a, at_b) as one unsigned compare each. The candidates are
    // few: a branch-free test over 256 elements, then a scan of the rare
    // chunks that hold any.
    const uint32_t width[3] = {at_b[0] - at_a[0], at_b[1] - at_a[1],
                               at_b[2] - at_a[2]};
    constexpr int64_t kChunk = 256;
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t j1 = std::min(n, j0 + kChunk);
      uint32_t any = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const uint32_t s = bits[j];
        any |= static_cast<uint32_t>(s - at_a[0] < width[0]) |
               static_cast<uint32_t>(s - at_a[1] < width[1]) |
               static_cast<uint32_t>(s - at_a[2] < width[2]);
      }
      if (any == 0) continue;
      for (int64_t j = j0; j < j1; ++j) {
        const uint32_t s = bits[j];
        for (int t = 0; t < 3; ++t) {
          if (s - at_a[t] < width[t]) {
            const uint32_t p = FloatBits(Profit(t, squares[j]));
            cand.push_back((static_cast<uint64_t>(~p) << 32) |
                           static_cast<uint64_t>(t * n + j));
          }
        }
      }
    }
    std::sort(cand.begin(), cand.end());
    auto profit_of = [&](size_t i) {
      return ~static_cast<uint32_t>(cand[i] >> 32);
    };
    auto weight_of = [&](size_t i) {
      return kWeight[static_cast<int64_t>(cand[i] & 0xFFFFFFFFu) / n];
    };
    // By profit, descending: the first profit whose "all items >= it"
    // overflows the budget is p* (one always does: W(tau_a) > budget).
    uint32_t cut = tau_a;
    size_t i = 0, tie_end = 0;
    while (i < cand.size()) {
      const uint32_t p = profit_of(i);
      size_t e = i;
      int64_t group = 0;
      for (; e < cand.size() && profit_of(e) == p; ++e) group += weight_of(e);
      if (w + group > budget) {
        cut = p;
        tie_end = e;
        break;
      }
      w += group;
      i = e;
    }
    for (int t = 0; t < 3; ++t) {
      thresholds[t] = SquareAtLeast(t, BitsFloat(cut + 1));  // profit > p*
    }
    // The tied items in item order while they fit the room left.
    int64_t used = w;
    for (; i < tie_end; ++i) {
      used += weight_of(i);
      if (used > budget) break;
      ties.push_back(static_cast<uint32_t>((cand[i] & 0xFFFFFFFFu) % n));
    }
  }
  const uint32_t a0 = thresholds[0], a1 = thresholds[1], a2 = thresholds[2];
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t s = FloatBits(squares[j]);
    cls[j] = static_cast<int32_t>(s >= a0) + static_cast<int32_t>(s >= a1) +
             static_cast<int32_t>(s >= a2);
  }
  for (const uint32_t j : ties) ++cls[j];
}

// Classes on the wire (8, 4, 2 bits) and their levels s = 2^(b-1) - 1.
inline constexpr int kLevels[3] = {127, 7, 1};
// A class's scale is norm * f32(1 / s), as the twin (jointsq._inverse_levels).
inline constexpr float kInverseLevels[3] = {static_cast<float>(1.0 / 127),
                                            static_cast<float>(1.0 / 7), 1.0f};

inline int32_t FloorDiv(int32_t a, int32_t b) {
  const int32_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

inline int32_t WrapAdd(int32_t a, int32_t b) {
  return static_cast<int32_t>(static_cast<uint32_t>(a) +
                              static_cast<uint32_t>(b));
}

// The elements of each class c = 1..3 in a class map of `bytes` bytes
// (added to m[c]): per 64-bit word of 32 fields, with h the fields' high
// bits and l their low bits, class 3 is h & l, class 2 h & ~l, class 1
// ~h & l.
inline void CountClasses(const uint8_t* map, int64_t bytes, int64_t m[4]) {
  constexpr uint64_t kLow = 0x5555555555555555ull;
  int64_t c1 = 0, c2 = 0, c3 = 0;
  const auto add = [&](uint64_t x) {
    const uint64_t h = (x >> 1) & kLow, l = x & kLow;
    c1 += __builtin_popcountll(~h & l);
    c2 += __builtin_popcountll(h & ~l);
    c3 += __builtin_popcountll(h & l);
  };
  int64_t b = 0;
  for (; b + 8 <= bytes; b += 8) {
    uint64_t x;
    std::memcpy(&x, map + b, 8);
    add(x);
  }
  uint64_t tail = 0;  // the last bytes, the rest of the word class 0
  std::memcpy(&tail, map + b, bytes - b);
  add(tail);
  m[1] += c1;
  m[2] += c2;
  m[3] += c3;
}

// One payload's elements of class c (1..3) in index order: their decoded
// values from v[c] (a block's, or the whole payload's) and a cursor.
struct Decoded {
  const uint8_t* map;
  const float* v[4];
  int64_t at[4];
};

// m offset-binary codes of kBits (s = 2^(kBits-1) - 1) -> float(code - s) *
// scale: kernels.h's DequantizeKernel on one thread.
template <int kBits>
void Dequantize(const uint8_t* in, int64_t m, float scale, float* v) {
  const DequantizeKernel<kBits, false> k{in, &scale, v, m,
                                         (1 << (kBits - 1)) - 1};
  k(0, 1, NumWords(m, Lanes<kBits>::kCount));
}

// Class c's values of one payload: the element of class c and rank k reads
// stream[clip(offset_c + (k >> l_c))], lane k & (2^l_c - 1) (element 0 in
// the high lane), and is float(code - s_c) * scale_c: the twin's
// _element_values, including its clip for inconsistent counts.
inline void DecodeClass(const uint8_t* stream, int64_t stream_bytes,
                        int32_t offset, int r, float scale, int64_t m,
                        float* v) {
  const int bits = 8 >> r, lanes_log2 = r, level = kLevels[r];
  const int64_t lanes = int64_t{1} << lanes_log2;
  if (offset >= 0 && offset + (m + lanes - 1) / lanes <= stream_bytes) {
    // In bounds (always for a payload from encode): the dequantize
    // kernel's host loop, (code - s_c) * scale over 8/4/2-bit byte lanes.
    const uint8_t* in = stream + offset;
    switch (r) {
      case 0:
        return Dequantize<8>(in, m, scale, v);
      case 1:
        return Dequantize<4>(in, m, scale, v);
      default:
        return Dequantize<2>(in, m, scale, v);
    }
  }
  for (int64_t k = 0; k < m; ++k) {
    const int32_t rank = static_cast<int32_t>(k);
    int64_t at = WrapAdd(offset, rank >> lanes_log2);
    at = std::min<int64_t>(std::max<int64_t>(at, 0), stream_bytes - 1);
    const int shift =
        ((1 << lanes_log2) - 1 - (rank & ((1 << lanes_log2) - 1))) * bits;
    const int code = (stream[at] >> shift) & ((1 << bits) - 1);
    v[k] = static_cast<float>(code - level) * scale;
  }
}

// sums[0..16 words) += each element's value from the payload (0 where class
// 0), flushed: portable.
inline void AddWords(Decoded& d, int64_t w0, int64_t w1, int64_t map_bytes,
                     float* sums) {
  for (int64_t i = w0; i < w1; ++i) {
    float* t = sums + (i - w0) * 16;
    for (int b = 0; b < 4; ++b) {
      const int64_t at = 4 * i + b;
      const uint8_t byte = at < map_bytes ? d.map[at] : 0;
      if (byte == 0) continue;
      for (int q = 0; q < 4; ++q) {
        const int c = (byte >> (6 - 2 * q)) & 3;
        if (c == 0) continue;
        float& x = t[4 * b + q];
        x = FlushSubnormal(x + d.v[c][d.at[c]++]);
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define GQSGD_JOINTSQ_AVX512 1
// AddWords with AVX-512: per 16 elements, each element's class from its
// 2-bit field of the four class-map bytes (one variable shift per lane), and
// three masked expands place each class's next values in its elements'
// lanes.
__attribute__((target("avx512f,avx512vl,popcnt"))) inline void AddWordsAvx512(
    Decoded& d, int64_t w0, int64_t w1, int64_t map_bytes, float* sums) {
  const __m512i exponent = _mm512_set1_epi32(0x7F800000);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i three = _mm512_set1_epi32(3);
  // Element 4 b + q: bits 8 b + 6 - 2 q of the four bytes read little-endian.
  const __m512i fields = _mm512_setr_epi32(6, 4, 2, 0, 14, 12, 10, 8, 22, 20,
                                           18, 16, 30, 28, 26, 24);
  const int64_t full = std::min(w1, map_bytes / 4);
  const float *v1 = d.v[1], *v2 = d.v[2], *v3 = d.v[3];
  int64_t at1 = d.at[1], at2 = d.at[2], at3 = d.at[3];
  for (int64_t i = w0; i < w1; ++i) {
    uint32_t bytes = 0;
    if (i < full) {
      std::memcpy(&bytes, d.map + 4 * i, 4);
    } else {
      for (int b = 0; b < 4; ++b) {
        const int64_t at = 4 * i + b;
        if (at < map_bytes) bytes |= uint32_t{d.map[at]} << (8 * b);
      }
    }
    if (bytes == 0) continue;
    const __m512i c = _mm512_and_si512(
        _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(bytes)), fields),
        three);
    const __mmask16 k1 = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(1));
    const __mmask16 k2 = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(2));
    const __mmask16 k3 = _mm512_cmpeq_epi32_mask(c, three);
    // Register expands of unaligned loads (the values are padded by 16):
    // expand-loads from memory are slow on some CPUs (Zen 4).
    // (The empty asm keeps the compiler from folding a load back in.)
    __m512 l1 = _mm512_loadu_ps(v1 + at1), l2 = _mm512_loadu_ps(v2 + at2),
           l3 = _mm512_loadu_ps(v3 + at3);
    asm("" : "+v"(l1), "+v"(l2), "+v"(l3));
    // (An expand costs as much as the rest of the step: skipped for a class
    // absent from the 16 elements, as the 8- and 4-bit classes mostly are.)
    __m512 x = _mm512_maskz_expand_ps(k1, l1);
    if (k2 != 0) x = _mm512_mask_expand_ps(x, k2, l2);
    if (k3 != 0) x = _mm512_mask_expand_ps(x, k3, l3);
    at1 += __builtin_popcount(k1);
    at2 += __builtin_popcount(k2);
    at3 += __builtin_popcount(k3);
    float* t = sums + (i - w0) * 16;
    __m512 y = _mm512_add_ps(_mm512_loadu_ps(t), x);
    const __m512i bits = _mm512_castps_si512(y);
    const __mmask16 normal = _mm512_test_epi32_mask(bits, exponent);
    y = _mm512_castsi512_ps(
        _mm512_mask_blend_epi32(normal, _mm512_and_si512(bits, sign), bits));
    _mm512_storeu_ps(t, y);
  }
  d.at[1] = at1;
  d.at[2] = at2;
  d.at[3] = at3;
}
#else
#define GQSGD_JOINTSQ_AVX512 0
#endif

// Whether MeanClassmap and EncodeClassmap use AVX-512 (F, BW, VL, with
// BMI2: every AVX-512 CPU but Xeon Phi); GQSGD_JAX_CPU_ISA=baseline or
// x86-64-v3 turns it off, as for the other kernels.
inline bool UseAvx512() {
#if GQSGD_JOINTSQ_AVX512
  static const bool use = [] {
    const char* cap = std::getenv("GQSGD_JAX_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "x86-64-v4") != 0 && cap[0] != 0) {
      return false;
    }
    return __builtin_cpu_supports("avx512f") != 0 &&
           __builtin_cpu_supports("avx512bw") != 0 &&
           __builtin_cpu_supports("avx512vl") != 0 &&
           __builtin_cpu_supports("bmi2") != 0;
  }();
  return use;
#else
  return false;
#endif
}

// The mean of W class-map payloads of G tensors (jointsq._mean with the
// "classmap" index): chunk uint8[W, G, P] -> out f32[G, n], the workers'
// decoded values added in worker order (each sum flushed, as XLA:CPU's),
// then times 1/W. A payload with a NaN norm decodes to NaN everywhere.
//
// Block by block of 4096 elements, each payload's codes of the block are
// decoded per class (as many as the block's class-map bytes count) into
// small buffers, and every worker's values are added in its elements'
// lanes: the values and the block's sums stay in cache. Only the selected
// elements cost work.
inline void MeanClassmap(const uint8_t* chunk, int64_t workers, int64_t groups,
                         int64_t payload, int64_t n, float* out) {
  constexpr int64_t kHeader = 24;
  const int64_t map_bytes = (n + 3) / 4;
  const int64_t stream_bytes = payload - kHeader - map_bytes;
  const int64_t words = (n + 15) / 16;
  constexpr int64_t kBlockWords = 256;
  constexpr int64_t kBlock = kBlockWords * 16;  // elements
  // A block's values per worker and class (padded by 16 for the vector
  // loads): W x 3 x 4 Ki floats stay in L2 with the block's sums, where
  // whole decoded payloads (W x n floats) went out to memory and back.
  constexpr int64_t kSlot = kBlock + 32;
  // Whole payloads, n + 48 values per worker, only for a payload whose
  // counts point outside its stream (never from encode): the twin's clip.
  thread_local std::vector<float> values;
  std::vector<Decoded> ds(workers);
  // Per worker and wire class r: the class's codes, scale, and the rank of
  // its next code.
  struct Codes {
    const uint8_t* at;
    float scale;
    int64_t next;
  };
  std::vector<Codes> codes(workers * 3);
  const bool avx512 = UseAvx512();
  // Times 1/W in f32, as the twin (XLA:CPU's rewrite of a division by W).
  const float inverse = static_cast<float>(1.0 / static_cast<double>(workers));
  for (int64_t g = 0; g < groups; ++g) {
    float* o = out + g * n;
    bool nan = false, in_bounds = true;
    for (int64_t w = 0; w < workers && !nan; ++w) {
      const uint8_t* p = chunk + (w * groups + g) * payload;
      float norms[3];
      int32_t counts[3];
      std::memcpy(norms, p, 12);
      std::memcpy(counts, p + 12, 12);
      for (int r = 0; r < 3; ++r) nan |= norms[r] != norms[r];
      ds[w].map = p + kHeader;
      int64_t m[4] = {0, 0, 0, 0};
      CountClasses(ds[w].map, map_bytes, m);
      int32_t offset[3];
      offset[0] = 0;
      offset[1] = counts[0];
      offset[2] = WrapAdd(counts[0], FloorDiv(WrapAdd(counts[1], 1), 2));
      for (int r = 0; r < 3; ++r) {
        const int c = 3 - r;  // wire order: classes 3, 2, 1 (8, 4, 2 bits)
        const bool ok = norms[r] >= BitsFloat(kTinyBits);
        const int64_t lanes = int64_t{1} << r;
        in_bounds &= offset[r] >= 0 &&
                     offset[r] + (m[c] + lanes - 1) / lanes <= stream_bytes;
        codes[3 * w + r] =
            Codes{p + kHeader + map_bytes + offset[r],
                  ok ? FlushSubnormal(norms[r] * kInverseLevels[r]) : 0.0f, 0};
      }
    }
    if (nan) {
      std::fill(o, o + n, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    if (!in_bounds) {
      const int64_t per_worker = n + 48;
      if (static_cast<int64_t>(values.size()) < workers * per_worker) {
        values.resize(workers * per_worker);
      }
      for (int64_t w = 0; w < workers; ++w) {
        const uint8_t* p = chunk + (w * groups + g) * payload;
        int64_t m[4] = {0, 0, 0, 0};
        CountClasses(ds[w].map, map_bytes, m);
        float* base = values.data() + w * per_worker;
        for (int r = 0; r < 3; ++r) {
          const int c = 3 - r;
          const Codes& k = codes[3 * w + r];
          DecodeClass(p + kHeader + map_bytes, stream_bytes,
                      static_cast<int32_t>(k.at - (p + kHeader + map_bytes)), r,
                      k.scale, m[c], base);
          ds[w].v[c] = base;
          ds[w].at[c] = 0;
          base += m[c] + 16;
        }
      }
    } else if (static_cast<int64_t>(values.size()) < workers * 3 * kSlot) {
      values.resize(workers * 3 * kSlot);
    }
    for (int64_t w0 = 0; w0 < words; w0 += kBlockWords) {
      const int64_t w1 = std::min(words, w0 + kBlockWords);
      alignas(64) float sums[kBlockWords * 16];
      std::fill(sums, sums + (w1 - w0) * 16, 0.0f);
      for (int64_t w = 0; w < workers; ++w) {
        Decoded& d = ds[w];
        if (in_bounds) {
          // This block's codes of each class, from a byte boundary: the
          // values start `skip` codes before the next one.
          int64_t m[4] = {0, 0, 0, 0};
          const int64_t b0 = 4 * w0, b1 = std::min(map_bytes, 4 * w1);
          CountClasses(d.map + b0, b1 - b0, m);
          for (int r = 0; r < 3; ++r) {
            const int c = 3 - r;
            Codes& k = codes[3 * w + r];
            float* slot = values.data() + (3 * w + r) * kSlot;
            const int64_t skip = k.next & ((int64_t{1} << r) - 1);
            if (m[c] > 0) {
              const uint8_t* in = k.at + (k.next >> r);
              switch (r) {
                case 0:
                  Dequantize<8>(in, m[c] + skip, k.scale, slot);
                  break;
                case 1:
                  Dequantize<4>(in, m[c] + skip, k.scale, slot);
                  break;
                default:
                  Dequantize<2>(in, m[c] + skip, k.scale, slot);
              }
            }
            d.v[c] = slot + skip;
            d.at[c] = 0;
            k.next += m[c];
          }
        }
#if GQSGD_JOINTSQ_AVX512
        if (avx512) {
          AddWordsAvx512(d, w0, w1, map_bytes, sums);
          continue;
        }
#endif
        AddWords(d, w0, w1, map_bytes, sums);
      }
      const int64_t e0 = w0 * 16, e1 = std::min(n, w1 * 16);
      for (int64_t e = e0; e < e1; ++e)
        o[e] = FlushSubnormal(sums[e - e0] * inverse);
    }
    (void)avx512;
  }
}

// What the first pass of EncodeClassmap finds: elements and max |v| (over
// the finite values) per class, and whether any value is not finite.
struct ClassSummary {
  int32_t count[4];
  float norm[4];
  bool bad;
};

// Pass 1, portable: the class map (element 0 in the high bits) and the
// summary, in registers, four elements (a class-map byte) at a time.
inline ClassSummary MapClasses(const float* v, const int32_t* cls, int64_t n,
                               uint8_t* map) {
  const int64_t map_bytes = (n + 3) / 4;
  int32_t c1 = 0, c2 = 0, c3 = 0;
  float m1 = 0, m2 = 0, m3 = 0;
  uint32_t nonfinite = 0;
  for (int64_t b = 0; b < map_bytes; ++b) {
    uint32_t byte = 0;
    for (int q = 0; q < 4; ++q) {
      const int64_t j = 4 * b + q;
      const bool in = j < n;
      const int c = in ? cls[j] & 3 : 0;
      const float x = in ? v[j] : 0.0f;
      const uint32_t e = FloatBits(x) & kInfBits;
      nonfinite |= static_cast<uint32_t>(e == kInfBits);
      // |x|, flushed; 0 if not finite.
      const float a = (e == 0 || e == kInfBits) ? 0.0f : std::fabs(x);
      c1 += c == 1;
      c2 += c == 2;
      c3 += c == 3;
      m1 = std::max(m1, c == 1 ? a : 0.0f);
      m2 = std::max(m2, c == 2 ? a : 0.0f);
      m3 = std::max(m3, c == 3 ? a : 0.0f);
      byte |= static_cast<uint32_t>(c) << (6 - 2 * q);
    }
    map[b] = static_cast<uint8_t>(byte);
  }
  return ClassSummary{{static_cast<int32_t>(n) - c1 - c2 - c3, c1, c2, c3},
                      {0.0f, m1, m2, m3},
                      nonfinite != 0};
}

// A class's dither key, code scale s_c / norm_c and value scale
// flush(norm_c * f32(1 / s_c)) (both 0 for an empty or sub-tiny class), by
// class c = 0..3 (class 0: nothing sent).
struct ClassGrids {
  uint32_t key_a[4], key_b[4];
  float code_scale[4], value_scale[4];
  int32_t levels[4];
};

// Pass 2, portable: codes into the stream and x_hat (zeroed before), only
// the selected elements (by class-map byte), each class's rank in a
// register. offset[r]: the stream byte of class 3 - r's first code.
inline void WriteCodes(const float* v, const uint8_t* map, int64_t n,
                       const ClassGrids& g, const int64_t offset[3],
                       uint8_t* stream, int64_t size, float* x_hat) {
  const int64_t map_bytes = (n + 3) / 4;
  int32_t r1 = 0, r2 = 0, r3 = 0;
  for (int64_t b = 0; b < map_bytes; ++b) {
    const uint32_t byte = map[b];
    if (byte == 0) continue;
    for (int q = 0; q < 4; ++q) {
      const int c = (byte >> (6 - 2 * q)) & 3;
      if (c == 0) continue;
      const int64_t j = 4 * b + q;
      const int r = 3 - c;
      const int32_t k = c == 3 ? r3 : (c == 2 ? r2 : r1);
      r3 += c == 3;
      r2 += c == 2;
      r1 += c == 1;
      const float x = v[j];
      const bool finite = (FloatBits(x) & kInfBits) != kInfBits;
      const uint32_t random = RandomBits(StreamKey{g.key_a[c], g.key_b[c]}, k);
      // math.h's rounding of reference.stochastic_round; a subnormal
      // product rounds to 0 as a flushed one would.
      const int32_t q_code =
          StochasticRound(FlushSubnormal(finite ? x : 0.0f), g.code_scale[c],
                          g.levels[c], random);
      x_hat[j] = static_cast<float>(q_code) * g.value_scale[c];
      const int lanes_log2 = r, bits = 8 >> r;
      const int64_t at = offset[r] + (k >> lanes_log2);
      const int shift =
          ((1 << lanes_log2) - 1 - (k & ((1 << lanes_log2) - 1))) * bits;
      if (at >= 0 && at < size) {
        stream[at] = static_cast<uint8_t>(
            stream[at] +
            static_cast<uint8_t>(static_cast<uint32_t>(q_code + g.levels[c])
                                 << shift));
      }
    }
  }
}

#if GQSGD_JOINTSQ_AVX512
#define GQSGD_JOINTSQ_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,popcnt,bmi,bmi2")))

// The bytes of (lo, hi) (16 bytes, little-endian) whose bit is set in
// `keep`, in order, to out[0 .. popcount(keep)); writes 16 bytes from out.
GQSGD_JOINTSQ_AVX512_TARGET inline void SelectBytes(uint64_t lo, uint64_t hi,
                                                    uint32_t keep,
                                                    uint8_t* out) {
  constexpr uint64_t kByteLows = 0x0101010101010101ull;
  const uint64_t a = _pext_u64(lo, _pdep_u64(keep & 0xFF, kByteLows) * 0xFF);
  const uint64_t b = _pext_u64(hi, _pdep_u64(keep >> 8, kByteLows) * 0xFF);
  std::memcpy(out, &a, 8);
  std::memcpy(out + __builtin_popcount(keep & 0xFF), &b, 8);
}

// math.h's Mix32 on 16 lanes.
GQSGD_JOINTSQ_AVX512_TARGET inline __m512i Mix32x16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x21f0aaad));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x735a2d97));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
}

// The lanes of 16 elements inside n (the tail of the last block masked).
GQSGD_JOINTSQ_AVX512_TARGET inline __mmask16 Inside(int64_t j, int64_t n) {
  return n - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << (n - j)) - 1);
}

// A per-class constant in each lane by the lane's class (0 in class 0).
template <typename T>
GQSGD_JOINTSQ_AVX512_TARGET inline __m512i ByClass(const T (&of)[4],
                                                   __mmask16 k1, __mmask16 k2,
                                                   __mmask16 k3) {
  int32_t bits[4];
  for (int c = 0; c < 4; ++c) std::memcpy(&bits[c], &of[c], 4);
  __m512i x = _mm512_maskz_mov_epi32(k1, _mm512_set1_epi32(bits[1]));
  x = _mm512_mask_mov_epi32(x, k2, _mm512_set1_epi32(bits[2]));
  return _mm512_mask_mov_epi32(x, k3, _mm512_set1_epi32(bits[3]));
}

// MapClasses on 16 elements a step: masked maxima and popcounts; each
// class (shifted to its field) narrowed to a byte, four bytes OR-ed into
// one class-map byte.
GQSGD_JOINTSQ_AVX512_TARGET inline ClassSummary MapClassesAvx512(
    const float* v, const int32_t* cls, int64_t n, uint8_t* map) {
  const int64_t map_bytes = (n + 3) / 4;
  const __m512i three = _mm512_set1_epi32(3);
  const __m512i exponent = _mm512_set1_epi32(static_cast<int>(kInfBits));
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i fields =
      _mm512_setr_epi32(6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0);
  __m512 m1 = _mm512_setzero_ps(), m2 = m1, m3 = m1;
  int64_t c1 = 0, c2 = 0, c3 = 0;
  __mmask16 nonfinite = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = Inside(j, n);
    const __m512i c =
        _mm512_and_si512(_mm512_maskz_loadu_epi32(in, cls + j), three);
    const __m512i bits = _mm512_maskz_loadu_epi32(in, v + j);
    const __mmask16 inf =
        _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
    nonfinite |= inf;
    // |x| of the normal finite values, else 0 (flushed, or not finite).
    const __mmask16 usable = _mm512_test_epi32_mask(bits, exponent) & ~inf;
    const __m512 a =
        _mm512_castsi512_ps(_mm512_maskz_and_epi32(usable, bits, magnitude));
    const __mmask16 k1 = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(1));
    const __mmask16 k2 = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(2));
    const __mmask16 k3 = _mm512_cmpeq_epi32_mask(c, three);
    c1 += __builtin_popcount(k1);
    c2 += __builtin_popcount(k2);
    c3 += __builtin_popcount(k3);
    m1 = _mm512_mask_max_ps(m1, k1, m1, a);
    m2 = _mm512_mask_max_ps(m2, k2, m2, a);
    m3 = _mm512_mask_max_ps(m3, k3, m3, a);
    const __m128i lanes = _mm512_cvtepi32_epi8(_mm512_sllv_epi32(c, fields));
    __m128i folded = _mm_or_si128(lanes, _mm_srli_epi32(lanes, 8));
    folded = _mm_or_si128(folded, _mm_srli_epi32(folded, 16));
    const int64_t at = j / 4, count = std::min<int64_t>(4, map_bytes - at);
    _mm_mask_storeu_epi8(map + at, static_cast<__mmask16>((1u << count) - 1),
                         _mm_cvtepi32_epi8(folded));
  }
  // Maxima of non-negative numbers: exact in any order.
  return ClassSummary{
      {static_cast<int32_t>(n - c1 - c2 - c3), static_cast<int32_t>(c1),
       static_cast<int32_t>(c2), static_cast<int32_t>(c3)},
      {0.0f, _mm512_reduce_max_ps(m1), _mm512_reduce_max_ps(m2),
       _mm512_reduce_max_ps(m3)},
      nonfinite != 0};
}

// WriteCodes on 16 elements a step, every lane computed (no branch on an
// element's class): each lane's rank in its class by an expand of
// consecutive integers into the class's lanes, the dither, the rounding and
// x_hat as math.h's on 16 lanes; the codes of each class gathered in its
// lanes' order. Class 3's bytes go straight into the stream, the 4- and 2-bit
// classes' codes into byte arrays first, packed at the end (with the
// padding lanes: the zero code up to the region's capacity, 0 beyond).
GQSGD_JOINTSQ_AVX512_TARGET inline void WriteCodesAvx512(
    const float* v, const int32_t* cls, int64_t n, const ClassGrids& g,
    const int32_t count[4], int64_t cap4, int64_t cap2, const int64_t offset[3],
    uint8_t* stream, int64_t size, float* x_hat) {
  const int32_t k4 = count[2], k2 = count[1];
  // Slack: each step stores 16 bytes, and the padding lanes.
  thread_local std::vector<uint8_t> scratch;
  const int64_t four_at = 0, two_at = k4 + 32;
  if (static_cast<int64_t>(scratch.size()) < two_at + k2 + 32) {
    scratch.resize(two_at + k2 + 32);
  }
  uint8_t* four = scratch.data() + four_at;
  uint8_t* two = scratch.data() + two_at;
  const __m512i three = _mm512_set1_epi32(3);
  const __m512i exponent = _mm512_set1_epi32(static_cast<int>(kInfBits));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i iota =
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  float lim[4];
  for (int c = 0; c < 4; ++c) lim[c] = static_cast<float>(g.levels[c]);
  int32_t r1 = 0, r2 = 0, r3 = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = Inside(j, n);
    const __m512i c =
        _mm512_and_si512(_mm512_maskz_loadu_epi32(in, cls + j), three);
    const __mmask16 k1 = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(1));
    const __mmask16 k2 = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(2));
    const __mmask16 k3 = _mm512_cmpeq_epi32_mask(c, three);
    // (Expands skipped for absent classes, as in AddWordsAvx512.)
    __m512i rank = _mm512_maskz_expand_epi32(
        k1, _mm512_add_epi32(iota, _mm512_set1_epi32(r1)));
    if (k2 != 0) {
      rank = _mm512_mask_expand_epi32(
          rank, k2, _mm512_add_epi32(iota, _mm512_set1_epi32(r2)));
    }
    if (k3 != 0) {
      rank = _mm512_mask_expand_epi32(
          rank, k3, _mm512_add_epi32(iota, _mm512_set1_epi32(r3)));
    }
    // RandomBits(key, rank): the rank's high word is 0 (n < 2^31).
    const __m512i random = Mix32x16(
        _mm512_add_epi32(_mm512_xor_si512(rank, ByClass(g.key_a, k1, k2, k3)),
                         ByClass(g.key_b, k1, k2, k3)));
    // StochasticRound(FlushSubnormal(finite ? x : 0), ...): a non-finite x
    // reads 0, a subnormal one keeps only its sign.
    const __m512i bits = _mm512_maskz_loadu_epi32(in, v + j);
    const __m512i e = _mm512_and_si512(bits, exponent);
    const __mmask16 normal = _mm512_test_epi32_mask(bits, exponent) &
                             _mm512_cmpneq_epi32_mask(e, exponent);
    const __mmask16 finite = _mm512_cmpneq_epi32_mask(e, exponent);
    const __m512 x = _mm512_castsi512_ps(_mm512_mask_blend_epi32(
        normal, _mm512_maskz_and_epi32(finite, bits, sign), bits));
    const __m512 bound = _mm512_castsi512_ps(ByClass(lim, k1, k2, k3));
    __m512 y = _mm512_mul_ps(
        x, _mm512_castsi512_ps(ByClass(g.code_scale, k1, k2, k3)));
    y = _mm512_min_ps(bound, y);  // y > lim ? lim : y
    y = _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), bound), y);
    y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);
    const __m512 fl =
        _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512i threshold = _mm512_cvttps_epu32(
        _mm512_mul_ps(_mm512_sub_ps(y, fl), _mm512_set1_ps(16777216.0f)));
    __m512i q = _mm512_cvttps_epi32(fl);
    q = _mm512_mask_add_epi32(
        q, _mm512_cmplt_epu32_mask(_mm512_srli_epi32(random, 8), threshold), q,
        _mm512_set1_epi32(1));
    _mm512_mask_storeu_ps(
        x_hat + j, in,
        _mm512_maskz_mul_ps(
            k1 | k2 | k3, _mm512_cvtepi32_ps(q),
            _mm512_castsi512_ps(ByClass(g.value_scale, k1, k2, k3))));
    // Offset-binary codes, each class's in its lanes' order.
    const __m512i u = _mm512_add_epi32(q, ByClass(g.levels, k1, k2, k3));
    // Each class's codes as bytes in its lanes' order (two 64-bit pexts of
    // the 16 code bytes: a register compress per class took twice as long).
    const __m128i code_bytes = _mm512_cvtepi32_epi8(u);
    const uint64_t lo = static_cast<uint64_t>(_mm_cvtsi128_si64(code_bytes));
    const uint64_t hi = static_cast<uint64_t>(_mm_extract_epi64(code_bytes, 1));
    const int n3 = __builtin_popcount(k3);
    if (k3 != 0) {
      uint8_t class3[16];
      SelectBytes(lo, hi, k3, class3);
      const int64_t room = std::clamp<int64_t>(size - r3, 0, n3);
      std::memcpy(stream + offset[0] + r3, class3, room);
    }
    SelectBytes(lo, hi, k2, four + r2);
    SelectBytes(lo, hi, k1, two + r1);
    r1 += __builtin_popcount(k1);
    r2 += __builtin_popcount(k2);
    r3 += n3;
  }
  // Lanes past a class's count in its last byte: the zero code (s) up to
  // the region's capacity, 0 beyond.
  four[k4] = static_cast<uint8_t>(k4 < cap4 ? kLevels[1] : 0);
  for (int64_t i = k2; i < k2 + 3; ++i) {
    two[i] = static_cast<uint8_t>(i < cap2 ? kLevels[2] : 0);
  }
  for (int64_t i = 0; i < (int64_t{k4} + 1) / 2; ++i) {
    const int64_t at = offset[1] + i;
    if (at < size)
      stream[at] = static_cast<uint8_t>(four[2 * i] << 4 | four[2 * i + 1]);
  }
  for (int64_t i = 0; i < (int64_t{k2} + 3) / 4; ++i) {
    const int64_t at = offset[2] + i;
    if (at < size) {
      stream[at] = static_cast<uint8_t>(two[4 * i] << 6 | two[4 * i + 1] << 4 |
                                        two[4 * i + 2] << 2 | two[4 * i + 3]);
    }
  }
}
#endif

// One tensor's class-map payload from its values and classes (jointsq.encode
// after the selection, "classmap" index): v f32[n] (any values: a non-finite
// one makes the norms and x_hat NaN), cls s32[n] in 0..3, keys u32[6] the
// dither stream keys (a, b) of the classes in wire order (8, 4, 2 bits) ->
// payload u8[P], x_hat f32[n], counts s32[3].
//
// Header (norms, counts), the class map (element 0 in the high bits), and
// the code stream: each class's offset-binary codes in index order, the
// lanes past a class's count in its last byte holding the code of a zero
// up to the region's capacity (cap4, cap2), 0 beyond. Element j of class c
// and rank k gets q = StochasticRound(v, s_c / norm_c, s_c,
// RandomBits({a_c, b_c}, k)) and x_hat = q * flush(norm_c * f32(1 / s_c)).
//
// Two passes over the elements: the class map and each class's count and
// norm, then the codes. With AVX-512 both run 16 elements a step without
// a branch on the classes (the portable second pass skips unselected
// elements, and mispredicts on them).
inline void EncodeClassmap(const float* v, const int32_t* cls, int64_t n,
                           const uint32_t* keys, int64_t cap4, int64_t cap2,
                           uint8_t* payload, int64_t payload_bytes,
                           float* x_hat, int32_t* counts_out) {
  constexpr int64_t kHeader = 24;
  const int64_t map_bytes = (n + 3) / 4;
  const int64_t size = payload_bytes - kHeader - map_bytes;  // stream
  uint8_t* map = payload + kHeader;
  uint8_t* stream = map + map_bytes;
  std::memset(payload, 0, payload_bytes);
  const bool avx512 = UseAvx512();
  ClassSummary s;
#if GQSGD_JOINTSQ_AVX512
  if (avx512) {
    s = MapClassesAvx512(v, cls, n, map);
  } else {
    s = MapClasses(v, cls, n, map);
  }
#else
  s = MapClasses(v, cls, n, map);
#endif
  // Wire order r = 0, 1, 2: classes 3, 2, 1.
  const int32_t k8 = s.count[3], k4 = s.count[2], k2 = s.count[1];
  const int64_t offset[3] = {0, k8, int64_t{k8} + (int64_t{k4} + 1) / 2};
  ClassGrids g{};
  for (int r = 0; r < 3; ++r) {
    const int c = 3 - r;
    const bool ok = s.norm[c] >= BitsFloat(kTinyBits);
    g.key_a[c] = keys[2 * r];
    g.key_b[c] = keys[2 * r + 1];
    g.code_scale[c] =
        FlushSubnormal(ok ? static_cast<float>(kLevels[r]) / s.norm[c] : 0.0f);
    g.value_scale[c] =
        ok ? FlushSubnormal(s.norm[c] * kInverseLevels[r]) : 0.0f;
    g.levels[c] = kLevels[r];
  }
#if GQSGD_JOINTSQ_AVX512
  if (avx512) {
    WriteCodesAvx512(v, cls, n, g, s.count, cap4, cap2, offset, stream, size,
                     x_hat);
  }
#endif
  if (!avx512) {
    std::fill(x_hat, x_hat + n, 0.0f);
    WriteCodes(v, map, n, g, offset, stream, size, x_hat);
    // The zero codes after a class's last code in its last byte.
    if ((k4 % 2) == 1 && k4 < cap4) {
      const int64_t at = k8 + k4 / 2;
      if (at < size) stream[at] = static_cast<uint8_t>(stream[at] + kLevels[1]);
    }
    const int32_t used2 = k2 % 4;
    if (used2 != 0) {
      int pad = 0;
      for (int lane = used2; lane < 4; ++lane) {
        if (k2 - used2 + lane < cap2) pad += kLevels[2] << (2 * (3 - lane));
      }
      const int64_t at = offset[2] + k2 / 4;
      if (at < size) stream[at] = static_cast<uint8_t>(stream[at] + pad);
    }
  }
  float norms[3] = {s.norm[3], s.norm[2], s.norm[1]};
  if (s.bad) {
    for (float& x : norms) x = std::numeric_limits<float>::quiet_NaN();
    std::fill(x_hat, x_hat + n, std::numeric_limits<float>::quiet_NaN());
  }
  const int32_t counts[3] = {k8, k4, k2};
  std::memcpy(payload, norms, 12);
  std::memcpy(payload + 12, counts, 12);
  std::memcpy(counts_out, counts, 12);
}

}  // namespace jointsq
}  // namespace gqsgd

#endif  // GQSGD_JAX_JOINTSQ_KERNELS_H_
