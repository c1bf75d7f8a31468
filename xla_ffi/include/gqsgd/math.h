// Per-element arithmetic shared by the CPU handlers, the CUDA kernels and the
// host emulation of the CUDA launch grid. Every function here has an exact
// pure-jnp twin in gqsgd_jax/_src/reference.py: integer operations, single
// IEEE multiplications and conversions only, so both produce the same bits.
// Nothing here may call libm (fminf, ldexpf, ...): besides being slower on
// the CPU (they block vectorization), their NaN rules differ from XLA's. The
// one exception is Floor, an exact operation that compilers inline.
#ifndef GQSGD_JAX_MATH_H_
#define GQSGD_JAX_MATH_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GQSGD_HD __host__ __device__ __forceinline__
#else
#define GQSGD_HD inline
#endif

namespace gqsgd {

// ---------------------------------------------------------------------------
// Bit casts and input conversions.

GQSGD_HD uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

GQSGD_HD float BitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Storage types for the 16-bit inputs: we only ever widen them, which is
// exact, so raw bit patterns are all we need (no cuda_fp16.h on the host).
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

// Subnormal f32/bf16 values read as (signed) zero. XLA:CPU computes with
// denormals-are-zero and flush-to-zero while CUDA keeps subnormals; flushing
// every float operand explicitly makes the kernels return the same bits on
// both platforms and in the pure-XLA twins.
GQSGD_HD float FlushSubnormal(float x) {
  const uint32_t u = FloatBits(x);
  return BitsFloat((u & 0x7f800000u) == 0 ? (u & 0x80000000u) : u);
}

GQSGD_HD float ToFloat(float x) { return FlushSubnormal(x); }
GQSGD_HD float ToFloat(BF16 x) {
  return FlushSubnormal(BitsFloat(uint32_t{x.bits} << 16));
}
GQSGD_HD float ToFloat(F16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  // Subnormal half: man * 2^-24, exact in f32.
  const float sub = static_cast<float>(man) * 5.9604644775390625e-8f;
  const uint32_t sub_bits = FloatBits(sub) | sign;
  const uint32_t inf_nan = sign | 0x7f800000u | (man << 13);
  const uint32_t normal = sign | ((exp + 112u) << 23) | (man << 13);
  return BitsFloat(exp == 0 ? sub_bits : (exp == 0x1fu ? inf_nan : normal));
}

// floor(y) for |y| < 2^31 (callers clamp first; NaN is not allowed).
// floor is exact, so every implementation returns the same bits. On x86
// with -fno-trapping-math GCC inlines __builtin_floorf as one vrndscaleps
// (AVX-512) / vroundps (AVX2, SSE4.1) or an SSE2 sequence, which vectorize;
// a truncation plus correction would cost four more instructions per vector.
GQSGD_HD float Floor(float y) {
#if defined(__CUDA_ARCH__)
  return floorf(y);
#else
  return __builtin_floorf(y);
#endif
}

// c ? a : b as bit masks. The selects of the kernels use it where GCC would
// otherwise not vectorize (it fails on selects between booleans of different
// widths, then emits branches that mispredict on random bits).
GQSGD_HD uint32_t Select(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

// ---------------------------------------------------------------------------
// Counter-based random bits.
//
// bits(seed, stream, i) for a 64-bit element index i = (hi, lo): one round
// of Wellons' lowbias32 integer hash (a full-avalanche 32-bit mix) of the
// index keyed by the stream, Mix32((lo ^ a) + (b ^ hi * golden)). For a
// fixed key and hi the map lo -> bits is a bijection, so no two elements of
// a 2^32-element piece share a draw, and over a uniformly random key a
// draw is exactly uniform. (A second round, as the stream keys have, cost
// 16 % of the quantize kernel's CPU time on AVX-512, two more multiplies
// per element (benchmarks/results/kernels_history.md); the statistics
// tests, neighbours' correlation included, hold with one.) Only 32-bit
// multiplies, so jnp (without x64) computes the same bits (the twin cuts
// its indices at the multiples of 2^32).

GQSGD_HD uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

struct StreamKey {
  uint32_t a;
  uint32_t b;
};

// One independent stream per (seed, stream id). Kernels that need several
// random words per element use stream ids 0, 1, ...
// For each stream id, (seed0, seed1) -> (a, b) is a bijection of the 64-bit
// seed (Mix32 is invertible: b gives seed1 once a is known, then a gives
// seed0), so two distinct seeds never share a key: b must not be a function
// of a alone, which would leave only 2^32 distinct streams.
GQSGD_HD StreamKey MakeStreamKey(uint32_t seed0, uint32_t seed1,
                                 uint32_t stream) {
  const uint32_t a = Mix32(Mix32(seed0 + 0x9e3779b9u * (stream + 1u)) ^ seed1);
  const uint32_t b = Mix32(Mix32(seed1 + 0x7feb352du * (stream + 1u)) + a);
  return StreamKey{a, b};
}

GQSGD_HD uint32_t RandomBits(StreamKey key, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  const uint32_t lo = static_cast<uint32_t>(i);
  const uint32_t hi = static_cast<uint32_t>(i >> 32);
  return Mix32((lo ^ key.a) + (key.b ^ (hi * 0x9e3779b9u)));
}

// ---------------------------------------------------------------------------
// Standard dithering: stochastic rounding of y = x * scale to an integer in
// [-levels, levels].
//
// The clamp is what makes the integer all-reduce overflow-free: x * (s / M)
// can exceed s by one ulp when |x| == M, and one rounding up would then
// carry into the neighbouring lane. NaN maps to 0; the transforms detect
// non-finite buckets from the global norm and decode them to NaN.
// Rounding: floor(y) + [r24 < floor(frac * 2^24)], i.e. P(up) = frac rounded
// to a multiple of 2^-24 (|bias| below 2^-24 of a step).

GQSGD_HD int32_t StochasticRound(float x, float scale, int32_t levels,
                                 uint32_t random) {
  const float lim = static_cast<float>(levels);
  float y = x * scale;
  y = y > lim ? lim : y;
  y = y < -lim ? -lim : y;
  y = (y == y) ? y : 0.0f;
  const float fl = Floor(y);
  const float frac = y - fl;  // exact, in [0, 1)
  const uint32_t threshold = static_cast<uint32_t>(frac * 16777216.0f);
  return static_cast<int32_t>(fl) + ((random >> 8) < threshold ? 1 : 0);
}

// Largest n_a + n_b that RoundedAverage serves: worker counts up to 2^16.
// Keep in sync with ops.MAX_AVERAGE_COUNT.
constexpr uint32_t kMaxAverageCount = 65536;

// Stochastic rounding of the weighted average (n_a*a + n_b*b) / (n_a + n_b)
// of two codes a, b < 256, with 32-bit integers only (the XLA twin has no
// 64-bit types). Needs n_a, n_b >= 1 and den = n_a + n_b <= 2^16 (checked
// by the callers); then num = n_a*a + n_b*b <= 255 * 2^16 < 2^24.
// Exact probability up to 2^-24: P(up) = ceil(rem * 2^24 / den) / 2^24.
//
// Floor: num / den in float, which vectorizes (integer division does not).
// num and den are exact floats (< 2^24) and the division is correctly
// rounded. A non-integer quotient k + rem/den (< 256) lies at least
// 1/den >= 2^-16 below k + 1, more than half a float spacing there
// (<= 2^-17), so it cannot round up to k + 1: truncation is the exact floor.
//
// Round up iff r * den < rem * 2^24 (r = random >> 8, 24 bits), i.e. iff
// floor(r * den / 2^24) < rem. r * den reaches 2^40, so r is split as
// r_hi * 2^16 + r_lo and the floor taken in two exact steps (nested floors):
// floor((r_hi * den + floor(r_lo * den / 2^16)) / 2^8), where
// r_lo * den <= (2^16 - 1) * 2^16 and r_hi * den < 2^24 fit 32 bits.
GQSGD_HD uint32_t RoundedAverage(uint32_t a, uint32_t b, uint32_t n_a,
                                 uint32_t n_b, uint32_t random) {
  const uint32_t num = n_a * a + n_b * b;
  const uint32_t den = n_a + n_b;
  const uint32_t fl = static_cast<uint32_t>(
      static_cast<int32_t>(static_cast<float>(static_cast<int32_t>(num)) /
                           static_cast<float>(static_cast<int32_t>(den))));
  const uint32_t rem = num - fl * den;
  const uint32_t r_hi = random >> 24;
  const uint32_t r_lo = (random >> 8) & 0xffffu;
  const uint32_t scaled = (r_hi * den + ((r_lo * den) >> 16)) >> 8;
  return fl + (scaled < rem ? 1u : 0u);
}

// ---------------------------------------------------------------------------
// Exponential dithering: byte = sign << 7 | e, value = ±2^-e,
// e in [1, 127], byte & 0x7f == 0 means zero.

// Encodes v = x * scale; callers choose scale so that |v| <= 1/2 (larger
// magnitudes are clamped to 1/2 = code 1, never wrapped to zero).
// Normal path: |v| = (1 + m/2^23) * 2^(ef-127) lies between 2^-(127-ef) and
// 2^-(126-ef); the upper power is taken with probability m/2^23 (exact).
// Floor path: below the floor level 2^-c (c = floor_code), v rounds
// stochastically between 0 and 2^-c with probability |v| * 2^c: unbiased,
// unlike the reference's clamp (B-GQ-4). XLA:CPU flushes subnormals to zero,
// so when v itself is not a normal float its magnitude is read from
// (x * 2^64) * scale, which is normal down to |v| = 2^-190 and has the same
// rounding as x * scale; below that the probability (< 2^-63) is dropped.
GQSGD_HD uint8_t ExpEncode(float x, float scale, int32_t floor_code,
                           uint32_t random) {
  const uint32_t u = FloatBits(x * scale);
  const uint32_t sign = (u >> 24) & 0x80u;
  uint32_t mag = u & 0x7fffffffu;
  const bool is_nan = mag > 0x7f800000u;
  mag = mag > 0x3f000000u ? 0x3f000000u : mag;  // clamp |v| <= 1/2
  const uint32_t ef_v = mag >> 23;
  const uint32_t u64 =
      FloatBits((x * 18446744073709551616.0f) * scale) & 0x7fffffffu;
  const uint32_t ef64 = u64 >> 23;
  // |v| = (1 + m / 2^23) * 2^(ef - 127), with ef <= 0 read from v * 2^64.
  const bool use64 = ef_v == 0;
  const bool lost = use64 & ((ef64 == 0) | (ef64 == 0xff));  // < 2^-190 or inf
  const int32_t ef = static_cast<int32_t>(Select(use64, ef64 - 64u, ef_v));
  const uint32_t m = Select(use64, u64, mag) & 0x7fffffu;
  // Normal path.
  const int32_t code_normal = 127 - ef - ((random >> 9) < m ? 1 : 0);
  // Floor path: |v| * 2^c = (m | 2^23) * 2^-sh with sh >= 24.
  const bool small = (126 - ef) >= floor_code;
  const uint32_t mant = m | 0x800000u;
  const int32_t sh = 150 - floor_code - ef;
  // Shift counts are clamped to [0, 31] (C++ shifts by >= 32 are undefined);
  // the clamped values are only used where the select discards them.
  const int32_t sh_left = 32 - sh;
  const int32_t sh_right = sh - 32;
  const uint32_t left = mant
                        << (sh_left < 0 ? 0 : (sh_left > 31 ? 31 : sh_left));
  const uint32_t right =
      mant >> (sh_right < 0 ? 0 : (sh_right > 31 ? 31 : sh_right));
  const uint32_t p32 = Select(sh <= 32, left, Select(sh_right < 32, right, 0u));
  const uint32_t code_small =
      Select(random < p32, static_cast<uint32_t>(floor_code), 0u);
  const uint32_t code =
      Select(is_nan | lost, 0u,
             Select(small, code_small, static_cast<uint32_t>(code_normal)));
  return static_cast<uint8_t>(Select(code == 0, 0u, code | sign));
}

// Decodes a byte to ±2^-e * scale by exponent arithmetic (no ldexpf).
// (A subnormal scale has exponent field 0 and decodes to zero.)
// Results below the f32 normal range flush to zero (documented); a
// non-finite scale (non-finite bucket) decodes to NaN.
GQSGD_HD float ExpDecode(uint8_t byte, float scale) {
  const uint32_t us = FloatBits(scale);
  const int32_t ef_s = static_cast<int32_t>((us >> 23) & 0xffu);
  const int32_t e = byte & 0x7f;
  const int32_t ef = ef_s - e;
  const uint32_t sign =
      ((static_cast<uint32_t>(byte) & 0x80u) << 24) ^ (us & 0x80000000u);
  const uint32_t value =
      (e == 0 || ef < 1)
          ? 0u
          : (sign | (static_cast<uint32_t>(ef) << 23) | (us & 0x7fffffu));
  return BitsFloat(ef_s == 0xff ? 0x7fc00000u : value);
}

// True with probability 2^-t, from 64 random bits: "the first t bits are all
// zero". Exact for t <= 64; for t > 64 the event is treated as impossible.
GQSGD_HD bool GeometricTail(uint32_t t, uint32_t r0, uint32_t r1) {
  const uint32_t mask0 = t >= 32 ? 0xffffffffu : ((1u << t) - 1u);
  const uint32_t t1 = t > 32 ? t - 32 : 0u;
  const uint32_t mask1 = t1 >= 32 ? 0xffffffffu : ((1u << t1) - 1u);
  return t <= 64 && (r0 & mask0) == 0 && (r1 & mask1) == 0;
}

// Pairwise stochastic reduce of two exponential codes: "exact add,
// then unbiased rounding to a bracketing power of two", symmetric in (a, b).
// A doubling of code 1 would overflow; the transforms size the scale so it
// cannot happen (headroom 2^(D+1)); here it saturates instead of wrapping to
// zero (B-GQ-3).
GQSGD_HD uint8_t ExpReduce(uint8_t a, uint8_t b, uint32_t r0, uint32_t r1) {
  const uint32_t ea = a & 0x7fu;
  const uint32_t eb = b & 0x7fu;
  const uint32_t sa = a & 0x80u;
  const uint32_t sb = b & 0x80u;
  const bool a_dom = ea <= eb;
  const uint32_t e_big = a_dom ? ea : eb;
  const uint32_t e_small = a_dom ? eb : ea;
  const uint32_t s_big = a_dom ? sa : sb;
  const bool same = sa == sb;
  const uint32_t t = e_small - e_big;
  const uint32_t tt = same ? t : t - 1u;  // opposite signs: t >= 1 here
  const bool event = GeometricTail(tt, r0, r1);
  const uint32_t doubled = e_big > 1u ? e_big - 1u : 1u;
  const uint32_t e_res =
      same ? (event ? doubled : e_big) : (event ? e_big + 1u : e_big);
  const bool cancel = !same && t == 0;
  const uint32_t general = cancel ? 0u : (s_big | e_res);
  const uint32_t res = ea == 0 ? (eb == 0 ? 0u : b) : (eb == 0 ? a : general);
  return static_cast<uint8_t>(res);
}

}  // namespace gqsgd

#endif  // GQSGD_JAX_MATH_H_
