// The orthonormal fast Walsh-Hadamard transform on the host: THC's rotation
// (gqsgd_jax/_src/baselines/hadamard.py) over rows of 2^k floats, in natural
// (Sylvester) order. XLA:CPU runs the matrix-product formulation as one
// memory pass per 6 bits; this runs a 2^23 row in about two.
//
// The arithmetic is fixed, so the bits do not depend on the thread count,
// the chunking or the instruction set of the kernel copy: radix-2 stages
// s = 0 .. k-1 in order, stage s taking each pair (a, b) = (x[i], x[i + 2^s])
// (bit s of i clear) to
//   (a m + b m, a m - b m),  m = 1/2 on even s, none on odd s,
// except that the last stage of an odd k takes m = f32(2^-1/2). The product
// of the m is 2^-k/2, exactly for even k. Halving the operands before the
// sum keeps every intermediate within ||x|| (the norm after stage s is
// ||x|| 2^-1/2 for even s, ||x|| for odd s and the last), so no input of a
// finite norm overflows.
// Blocking and register passes only regroup these operations (each element
// goes through the same ones in the same order), and FMA contraction is off
// (CMakeLists.txt), so the result is bit for bit that of a plain radix-2
// loop (tests/hadamard_kernels_test.py's numpy reference), NaN payloads
// aside (only NaN-ness is specified). The kernel runs with IEEE subnormals
// (no FTZ/DAZ, whatever the calling thread's MXCSR says), as that reference
// does; the quantizers that read its output flush subnormals themselves.
//
// Two phases over memory for k > kBlockLog2:
//  1. BlockKernel: stages 0 .. kBlockLog2-1 within each block of 2^kBlockLog2
//     consecutive floats (32 KiB, in L1), reading the input and writing the
//     output once.
//  2. StripKernel: the remaining k - kBlockLog2 stages act on the columns of
//     the [2^(k - kBlockLog2), 2^kBlockLog2] view. A strip of StripWidth
//     columns goes through its stages in a contiguous buffer (in L2: the
//     view's rows are 32 KiB apart, which would map a strip onto a few
//     cache sets), gathered by the first pass and scattered by the last.
// Rows of at most 2^kBlockLog2 floats take phase 1 alone.
//
// Inside a block or a buffer the stages run as passes of up to three stages
// (radix-8 in registers), each a loop over columns that the compiler
// vectorizes; the four stages within 16 consecutive floats run as two
// passes of two (LanePass), which it vectorizes with permutes.
#ifndef GQSGD_JAX_HADAMARD_KERNELS_H_
#define GQSGD_JAX_HADAMARD_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <new>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "gqsgd/kernels.h"  // GQSGD_UNROLL

#if defined(__clang__)
#define GQSGD_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define GQSGD_IVDEP _Pragma("GCC ivdep")
#endif

namespace gqsgd {
namespace hadamard {

// Phase 1's block: 2^13 floats, 32 KiB, within every x86 core's L1.
inline constexpr int kBlockLog2 = 13;
// Stages within 16 floats (one AVX-512 vector), run by LanePass.
inline constexpr int kLaneLog2 = 4;
// f32(2^-1/2): the last stage's multiplier for odd k.
inline constexpr float kInvSqrt2 = 0.70710678118654752440f;

// The multiplier of stage s of a 2^k transform (even s only).
inline float StageScale(int s, int k) { return s == k - 1 ? kInvSqrt2 : 0.5f; }

// Stages of v[0 .. 2^kR), stage t pairing v[j] and v[j + 2^t]; bit t of
// kMask: stage t multiplies its operands by m[t] first.
template <int kR, int kMask>
inline void Butterflies(float* v, const float* m) {
  GQSGD_UNROLL
  for (int t = 0; t < kR; ++t) {
    const int half = 1 << t;
    if ((kMask >> t) & 1) {
      GQSGD_UNROLL
      for (int j = 0; j < (1 << kR); ++j) v[j] *= m[t];
    }
    GQSGD_UNROLL
    for (int j = 0; j < (1 << kR); ++j) {
      if (j & half) continue;
      const float a = v[j], b = v[j + half];
      v[j] = a + b;
      v[j + half] = a - b;
    }
  }
}

// Even stages multiply: the mask of kR stages starting at an even or odd s.
template <int kR>
inline constexpr int kEvenMask = 0b0101 & ((1 << kR) - 1);
template <int kR>
inline constexpr int kOddMask = 0b1010 & ((1 << kR) - 1);

// dst = src / 2 (exact for normal results): the multiplier of stages 0 and
// 2, never the last of an odd k.
inline void Halve(const float* src, float* dst, int64_t n) {
  GQSGD_IVDEP
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * 0.5f;
}

// Stages t0 and t0 + 1, without multipliers, on groups of 4 2^t0 floats in
// place; kHalveAfter: the results halved (the operands of the next stage).
template <int kT0, bool kHalveAfter>
inline void PairStages(float* x, int64_t n) {
  constexpr int kGroup = 4 << kT0;
  GQSGD_IVDEP
  for (int64_t g = 0; g < n; g += kGroup) {
    float v[kGroup];
    GQSGD_UNROLL
    for (int j = 0; j < kGroup; ++j) v[j] = x[g + j];
    GQSGD_UNROLL
    for (int t = kT0; t < kT0 + 2; ++t) {
      const int half = 1 << t;
      GQSGD_UNROLL
      for (int j = 0; j < kGroup; ++j) {
        if (j & half) continue;
        const float a = v[j], b = v[j + half];
        v[j] = a + b;
        v[j + half] = a - b;
      }
    }
    GQSGD_UNROLL
    for (int j = 0; j < kGroup; ++j)
      x[g + j] = kHalveAfter ? v[j] * 0.5f : v[j];
  }
}

// Stages 0 .. 3 of n floats (a multiple of 16), src to dst (either may be
// the other). Stage 0's halving is a loop of its own, and stage 2's is
// applied to stage 1's results before they are stored: the vectorizer
// turns a product feeding the alternating sums and differences within a
// vector into fmaddsub instructions even with -ffp-contract=off (GCC 12),
// which round once where the radix-2 loop rounds twice (seen on subnormal
// products). A product after them, or in another loop, stays as written.
inline void LanePass(const float* src, float* dst, int64_t n) {
  Halve(src, dst, n);
  PairStages<0, true>(dst, n);
  PairStages<2, false>(dst, n);
}

// Where a pass reads and writes its rows: row r from src + r src_pitch to
// dst + r dst_pitch (in place where they are the same).
struct Rows {
  const float* src;
  int64_t src_pitch;
  float* dst;
  int64_t dst_pitch;
};

// kR stages s .. s + kR - 1 over `rows` rows of `width` floats, stage
// s + t pairing rows r and r + 2^(t0 + t).
template <int kR, int kMask>
inline void RowPass(const Rows& io, int64_t width, int64_t rows, int t0, int s,
                    int k) {
  float m[kR];
  for (int t = 0; t < kR; ++t) m[t] = StageScale(s + t, k);
  const int64_t span = int64_t{1} << t0;
  // Floats between partner rows.
  const int64_t src_apart = span * io.src_pitch;
  const int64_t dst_apart = span * io.dst_pitch;
  for (int64_t base = 0; base < rows; base += span << kR) {
    for (int64_t r = base; r < base + span; ++r) {
      const float* p = io.src + r * io.src_pitch;
      float* q = io.dst + r * io.dst_pitch;
      // Partners are at least a row apart and a row holds `width` floats,
      // so the iterations over columns are independent.
      GQSGD_IVDEP
      for (int64_t c = 0; c < width; ++c) {
        float v[1 << kR];
        GQSGD_UNROLL
        for (int j = 0; j < (1 << kR); ++j) v[j] = p[j * src_apart + c];
        Butterflies<kR, kMask>(v, m);
        GQSGD_UNROLL
        for (int j = 0; j < (1 << kR); ++j) q[j * dst_apart + c] = v[j];
      }
    }
  }
}

template <int kR>
inline void RowPassAt(const Rows& io, int64_t width, int64_t rows, int t0,
                      int s, int k) {
  if (s & 1) {
    RowPass<kR, kOddMask<kR>>(io, width, rows, t0, s, k);
  } else {
    RowPass<kR, kEvenMask<kR>>(io, width, rows, t0, s, k);
  }
}

// Stages s0 .. s0 + rows_log2 - 1 over 2^rows_log2 rows (see RowPass), in
// passes of three: the first reads `from`, the last writes `to` and the
// others work in place in `via` (all three in place where they are the
// same).
inline void RowStages(const Rows& from, float* via, int64_t via_pitch,
                      const Rows& to, int64_t width, int rows_log2, int s0,
                      int k) {
  const int64_t rows = int64_t{1} << rows_log2;
  for (int t = 0; t < rows_log2;) {
    const int r = std::min(3, rows_log2 - t);
    const bool first = t == 0, last = t + r == rows_log2;
    const Rows io{first ? from.src : via, first ? from.src_pitch : via_pitch,
                  last ? to.dst : via, last ? to.dst_pitch : via_pitch};
    if (r == 3) {
      RowPassAt<3>(io, width, rows, t, s0 + t, k);
    } else if (r == 2) {
      RowPassAt<2>(io, width, rows, t, s0 + t, k);
    } else {
      RowPassAt<1>(io, width, rows, t, s0 + t, k);
    }
    t += r;
  }
}

// Stages 0 .. b-1 of a 2^k transform on one block of 2^b floats, src to
// dst.
inline void BlockStages(const float* src, float* dst, int b, int k) {
  if (b < kLaneLog2) {  // rows of 1 .. 8 floats
    const int64_t n = int64_t{1} << b;
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    for (int s = 0; s < b; ++s) {
      const int64_t half = int64_t{1} << s;
      const bool scaled = (s & 1) == 0;
      const float m = StageScale(s, k);
      for (int64_t i = 0; i < n; ++i) {
        if (i & half) continue;
        float a = dst[i], c = dst[i + half];
        if (scaled) {
          a *= m;
          c *= m;
        }
        dst[i] = a + c;
        dst[i + half] = a - c;
      }
    }
    return;
  }
  LanePass(src, dst, int64_t{1} << b);
  const Rows in_place{dst, 16, dst, 16};
  RowStages(in_place, dst, 16, in_place, 16, b - kLaneLog2, kLaneLog2, k);
}

// Round to nearest with IEEE subnormals for the scope of one chunk, the
// caller's mode restored after (XLA's threads run with FTZ/DAZ).
class IeeeArithmetic {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  IeeeArithmetic() : saved_(_mm_getcsr()) {
    // Clear FTZ (bit 15), the rounding mode (bits 13-14) and DAZ (bit 6).
    _mm_setcsr(saved_ & ~0xE040u);
  }
  ~IeeeArithmetic() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// Phase 1 on the blocks [first, end) of 2^b floats, b = min(k, kBlockLog2),
// numbered across rows: in -> out.
struct BlockKernel {
  const float* in;
  float* out;
  int k;

  int BlockLog2() const { return std::min(k, kBlockLog2); }

  void operator()(int64_t first, int64_t stride, int64_t end) const {
    const IeeeArithmetic ieee;
    const int b = BlockLog2();
    for (int64_t i = first; i < end; i += stride) {
      BlockStages(in + (i << b), out + (i << b), b, k);
    }
  }
};

// Columns per strip of phase 2: 512 bytes of each row while the buffer
// stays at most 512 KiB (within L2), at least a vector. At 2^23, 512 bytes
// a row took 3.2 ms, 256 bytes 4.3 ms and 128 bytes 6.5 ms (one Zen 5
// core): the rows are 32 KiB apart, so each is a separate trip to memory.
inline int64_t StripWidth(int k) {
  const int h = k - kBlockLog2;
  return int64_t{1} << std::clamp(17 - h, 4, 7);
}

// Phase 2 on the strips [first, end), numbered across rows (2^kBlockLog2 /
// StripWidth per row), in place in `out`.
struct StripKernel {
  float* out;
  int k;

  void operator()(int64_t first, int64_t stride, int64_t end) const {
    const IeeeArithmetic ieee;
    const int h = k - kBlockLog2;
    const int64_t cols = int64_t{1} << kBlockLog2;
    const int64_t width = StripWidth(k);
    const int64_t per_row = cols / width;
    const int64_t rows = int64_t{1} << h;
    // Up to three stages: one pass straight over the rows, each cache line
    // read and written once, so their cache sets do not matter. More: the
    // first pass gathers the strip into the buffer, the last scatters it
    // back.
    float* buf = h <= 3 ? nullptr
                        : static_cast<float*>(::operator new(
                              static_cast<size_t>(rows * width) * sizeof(float),
                              std::align_val_t{64}));
    for (int64_t i = first; i < end; i += stride) {
      float* x = out + (i / per_row) * (rows * cols) + (i % per_row) * width;
      const Rows strip{x, cols, x, cols};
      RowStages(strip, buf, width, strip, width, h, kBlockLog2, k);
    }
    if (buf == nullptr) return;
    ::operator delete(buf, std::align_val_t{64});
  }
};

}  // namespace hadamard
}  // namespace gqsgd

#endif  // GQSGD_JAX_HADAMARD_KERNELS_H_
