"""Pure-jnp twins of the FFI kernels: the fallback path and the test oracle.

Each function mirrors one function of ``xla_ffi/include/gqsgd/math.h`` and
``kernels.h`` operation by operation (uint32 arithmetic wraps as in C++), so
for the same seed the two paths return the same bits. Keep them in lockstep:
``tests/ops_test.py`` asserts bit equality over dtypes and sizes.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gqsgd_jax._src import nonfinite
from gqsgd_jax._src import wire

_U32 = jnp.uint32


def _u32(v: int | np.integer) -> jax.Array:
  return jnp.asarray(np.uint32(v), _U32)


# --------------------------------------------------------------------------
# Counter-based random bits (math.h: Mix32, MakeStreamKey, RandomBits).


def mix32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * _u32(0x21F0AAAD)
  x = x ^ (x >> 15)
  x = x * _u32(0x735A2D97)
  return x ^ (x >> 15)


_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def stream_key(seed: jax.Array, stream: int) -> tuple[jax.Array, jax.Array]:
  """math.h MakeStreamKey: (a, b), a bijection of the seed per stream."""
  seed = jnp.asarray(seed, _U32)
  mult_a = np.uint32((_GOLDEN * (stream + 1)) & _M32)
  mult_b = np.uint32((0x7FEB352D * (stream + 1)) & _M32)
  a = mix32(mix32(seed[0] + _u32(mult_a)) ^ seed[1])
  b = mix32(mix32(seed[1] + _u32(mult_b)) + a)
  return a, b


def random_bits(
  seed: jax.Array, n: int, stream: int = 0, start: int = 0
) -> jax.Array:
  """math.h RandomBits of the 64-bit element indices start .. start + n - 1.

  jnp has no 64-bit integers (without x64), so the indices are cut at the
  multiples of 2^32: within a piece the high word hi is a constant that,
  as in C++, is folded into the key (b ^ hi * golden), and the low word is
  a uint32 iota. Any n and start with start + n <= 2^64 agree with C++.
  """
  if n < 0 or start < 0 or start + n > 2**64:
    raise ValueError(
      f"need n >= 0, start >= 0 and start + n <= 2^64, got n={n}, start={start}"
    )
  a, b = stream_key(seed, stream)
  pieces = []
  first, end = start, start + n
  while first < end:
    hi = first >> 32
    stop = min(end, (hi + 1) << 32)
    lo = jax.lax.iota(_U32, stop - first) + _u32(first & _M32)  # no wrap
    key_b = b ^ _u32((hi * _GOLDEN) & _M32)
    pieces.append(mix32((lo ^ a) + key_b))
    first = stop
  if not pieces:
    return jnp.zeros((0,), _U32)
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def flush_subnormal(x: jax.typing.ArrayLike) -> jax.Array:
  """math.h FlushSubnormal: subnormal f32 (after widening) reads as ±0."""
  u = jax.lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.float32), _U32)
  u = jnp.where((u & _u32(0x7F800000)) == 0, u & _u32(0x80000000), u)
  return jax.lax.bitcast_convert_type(u, jnp.float32)


def block_max_abs(x: jax.Array, block_shift: int) -> jax.Array:
  """kernels.h BlockMaxAbsKernel: float32[ceil(n / 2^shift)] block max-abs.

  +inf for a block with a NaN or Inf, subnormals flushed; the max-abs is
  ``nonfinite.max_abs``, which never lets XLA:CPU's max see a NaN.
  """
  x = flush_subnormal(x.reshape(-1))
  size = 1 << block_shift
  blocks = -(-x.shape[0] // size)
  x = jnp.pad(x, (0, blocks * size - x.shape[0])).reshape(blocks, size)
  return nonfinite.max_abs(x, axis=1)


# --------------------------------------------------------------------------
# Block scales (kernels.h scale_shift): element i uses scale[i >> shift].


def _blocked(
  block_shift: int | None, scale: jax.Array, *arrays: jax.Array
) -> tuple[jax.Array, Sequence[jax.Array]]:
  """Views 1-D arrays as [blocks, 2^block_shift] rows beside scale[:, None].

  With ``block_shift=None`` (one scalar scale) nothing changes. The tail
  block is padded with zeros, which the caller slices off again; the
  per-row scale is broadcast inside the fused elementwise computation, never
  materialized per element.
  """
  if block_shift is None:
    return scale, arrays
  size = 1 << block_shift
  blocks = scale.shape[0]
  rows = []
  for a in arrays:
    a = jnp.pad(a, (0, blocks * size - a.shape[0]))
    rows.append(a.reshape(blocks, size))
  return scale[:, None], tuple(rows)


# --------------------------------------------------------------------------
# Standard dithering.


def stochastic_round(
  x: jax.Array, scale: jax.Array, levels: int, random: jax.Array
) -> jax.Array:
  """math.h StochasticRound: SR(clamp(x * scale)) as int32."""
  lim = jnp.float32(levels)
  y = flush_subnormal(x) * flush_subnormal(scale)
  y = jnp.where(y > lim, lim, y)
  y = jnp.where(y < -lim, -lim, y)
  y = jnp.where(y == y, y, jnp.float32(0))
  trunc = y.astype(jnp.int32)
  fl = trunc - (y < trunc.astype(jnp.float32)).astype(jnp.int32)
  frac = y - fl.astype(jnp.float32)
  threshold = (frac * jnp.float32(16777216.0)).astype(jnp.int32).astype(_U32)
  return fl + ((random >> 8) < threshold).astype(jnp.int32)


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs uint32 codes (< 2^bits) into words, element 0 in the high lane."""
  lanes = wire.lanes_per_word(bits)
  n = codes.shape[0]
  words = wire.num_words(n, bits)
  codes = jnp.pad(codes, (0, words * lanes - n)).reshape(words, lanes)
  shifts = _u32(bits) * jnp.arange(lanes - 1, -1, -1, dtype=_U32)
  packed = (
    jnp.bitwise_or.reduce(codes << shifts, axis=1)
    if lanes > 1
    else (codes[:, 0])
  )
  return packed.astype(wire.word_dtype(bits))


def unpack(words: jax.Array, bits: int) -> jax.Array:
  """All lanes of packed words as uint32 codes (length words * lanes)."""
  lanes = wire.lanes_per_word(bits)
  shifts = _u32(bits) * jnp.arange(lanes - 1, -1, -1, dtype=_U32)
  mask = _u32((1 << bits) - 1)
  return ((words.astype(_U32)[:, None] >> shifts) & mask).reshape(-1)


def quantize(
  x: jax.Array,
  scale: jax.Array,
  seed: jax.Array,
  *,
  levels: int,
  bits: int,
  signed_codes: bool = False,
  block_shift: int | None = None,
) -> jax.Array:
  """kernels.h QuantizeKernel: int8 codes or packed offset-binary lanes.

  ``scale`` is a scalar, or with ``block_shift`` one scale per block of
  2^block_shift elements.
  """
  x = x.reshape(-1)
  n = x.shape[0]
  s, (xb, rb) = _blocked(block_shift, scale, x, random_bits(seed, n))
  q = stochastic_round(xb, s, levels, rb).reshape(-1)[:n]
  if signed_codes:
    return q.astype(jnp.int8)
  mask = _u32((1 << bits) - 1)
  return pack((q + levels).astype(_U32) & mask, bits)


def dequantize(
  codes: jax.Array,
  scale: jax.Array,
  *,
  n: int,
  bits: int,
  offset: int,
  signed_codes: bool = False,
  block_shift: int | None = None,
) -> jax.Array:
  """kernels.h DequantizeKernel: (code - offset) * scale as float32[n]."""
  if signed_codes:
    c = codes.astype(jnp.int32)
  else:
    c = unpack(codes, bits)[:n].astype(jnp.int32)
  s, (cb,) = _blocked(block_shift, scale, c - offset)
  return (cb.astype(jnp.float32) * flush_subnormal(s)).reshape(-1)[:n]


def rounded_average(
  a: jax.Array,
  b: jax.Array,
  n_a: jax.typing.ArrayLike,
  n_b: jax.typing.ArrayLike,
  random: jax.Array,
) -> jax.Array:
  """math.h RoundedAverage on uint32 arrays (n_a + n_b <= 2^16).

  Rounds up iff floor((random >> 8) * den / 2^24) < rem, the 40-bit product
  floored in two exact 32-bit steps as in C++. The floor of num / den is an
  integer division here and a float one in C++: both are exact (math.h).
  """
  n_a = jnp.asarray(n_a).astype(_U32)
  n_b = jnp.asarray(n_b).astype(_U32)
  num = n_a * a + n_b * b
  den = n_a + n_b
  fl = num // den
  rem = num - fl * den
  r_hi = random >> 24
  r_lo = (random >> 8) & _u32(0xFFFF)
  scaled = (r_hi * den + ((r_lo * den) >> 16)) >> 8
  return fl + (scaled < rem).astype(_U32)


def average(
  a: jax.Array,
  b: jax.Array,
  n_a: jax.typing.ArrayLike,
  n_b: jax.typing.ArrayLike,
  seed: jax.Array,
  *,
  bits: int,
) -> jax.Array:
  """kernels.h AverageKernel: lane-wise SR((n_a a + n_b b) / (n_a + n_b))."""
  ca, cb = unpack(a, bits), unpack(b, bits)
  avg = rounded_average(ca, cb, n_a, n_b, random_bits(seed, ca.shape[0]))
  return pack(avg & _u32((1 << bits) - 1), bits)


# --------------------------------------------------------------------------
# Exponential dithering.


def exp_encode(
  x: jax.Array,
  scale: jax.Array,
  seed: jax.Array,
  *,
  floor_code: int = 127,
  block_shift: int | None = None,
) -> jax.Array:
  """math.h ExpEncode: sign + exponent bytes of x * scale."""
  x = x.reshape(-1)
  n = x.shape[0]
  scale, (x, random) = _blocked(block_shift, scale, x, random_bits(seed, n))
  x = flush_subnormal(x)
  scale = flush_subnormal(scale)
  v = x * scale
  u = jax.lax.bitcast_convert_type(v, _U32)
  sign = (u >> 24) & _u32(0x80)
  mag = u & _u32(0x7FFFFFFF)
  is_nan = mag > _u32(0x7F800000)
  mag = jnp.where(mag > _u32(0x3F000000), _u32(0x3F000000), mag)
  ef_v = (mag >> 23).astype(jnp.int32)
  v64 = (x * jnp.float32(2.0**64)) * scale
  u64 = jax.lax.bitcast_convert_type(v64, _U32) & _u32(0x7FFFFFFF)
  ef64 = (u64 >> 23).astype(jnp.int32)
  use64 = ef_v == 0
  lost = use64 & ((ef64 == 0) | (ef64 == 0xFF))
  ef = jnp.where(use64, ef64 - 64, ef_v)
  m = jnp.where(use64, u64, mag) & _u32(0x7FFFFF)
  code_normal = 127 - ef - ((random >> 9) < m).astype(jnp.int32)
  small = (126 - ef) >= floor_code
  mant = m | _u32(0x800000)
  sh = 150 - floor_code - ef
  sh_right = sh - 32
  left = mant << jnp.clip(32 - sh, 0, 31).astype(_U32)
  right = mant >> jnp.clip(sh_right, 0, 31).astype(_U32)
  p32 = jnp.where(sh <= 32, left, jnp.where(sh_right < 32, right, _u32(0)))
  code_small = jnp.where(random < p32, floor_code, 0)
  code = jnp.where(is_nan | lost, 0, jnp.where(small, code_small, code_normal))
  byte = jnp.where(code == 0, _u32(0), code.astype(_U32) | sign)
  return byte.astype(jnp.uint8).reshape(-1)[:n]


def exp_decode(
  codes: jax.Array, scale: jax.Array, block_shift: int | None = None
) -> jax.Array:
  """math.h ExpDecode: ±2^-e * scale by exponent arithmetic, f32."""
  n = codes.shape[0]
  scale, (codes,) = _blocked(block_shift, scale, codes)
  us = jax.lax.bitcast_convert_type(flush_subnormal(scale), _U32)
  ef_s = ((us >> 23) & _u32(0xFF)).astype(jnp.int32)
  c = codes.astype(_U32)
  e = (c & _u32(0x7F)).astype(jnp.int32)
  ef = ef_s - e
  sign = ((c & _u32(0x80)) << 24) ^ (us & _u32(0x80000000))
  value = sign | (jnp.maximum(ef, 0).astype(_U32) << 23) | (us & _u32(0x7FFFFF))
  value = jnp.where((e == 0) | (ef < 1), _u32(0), value)
  value = jnp.where(ef_s == 0xFF, _u32(0x7FC00000), value)
  return jax.lax.bitcast_convert_type(value, jnp.float32).reshape(-1)[:n]


def geometric_tail(t: jax.Array, r0: jax.Array, r1: jax.Array) -> jax.Array:
  """math.h GeometricTail: True with probability 2^-t (t: uint32)."""
  ones = _u32(0xFFFFFFFF)
  mask0 = jnp.where(t >= 32, ones, (_u32(1) << jnp.minimum(t, 31)) - 1)
  t1 = jnp.where(t > 32, t - 32, _u32(0))
  mask1 = jnp.where(t1 >= 32, ones, (_u32(1) << jnp.minimum(t1, 31)) - 1)
  return (t <= 64) & ((r0 & mask0) == 0) & ((r1 & mask1) == 0)


def exp_reduce_codes(
  a: jax.Array, b: jax.Array, r0: jax.Array, r1: jax.Array
) -> jax.Array:
  """math.h ExpReduce on uint32 arrays of bytes."""
  ea, eb = a & _u32(0x7F), b & _u32(0x7F)
  sa, sb = a & _u32(0x80), b & _u32(0x80)
  a_dom = ea <= eb
  e_big = jnp.where(a_dom, ea, eb)
  e_small = jnp.where(a_dom, eb, ea)
  s_big = jnp.where(a_dom, sa, sb)
  same = sa == sb
  t = e_small - e_big
  tt = jnp.where(same, t, t - 1)
  event = geometric_tail(tt, r0, r1)
  doubled = jnp.where(e_big > 1, e_big - 1, _u32(1))
  e_res = jnp.where(
    same, jnp.where(event, doubled, e_big), jnp.where(event, e_big + 1, e_big)
  )
  cancel = (~same) & (t == 0)
  general = jnp.where(cancel, _u32(0), s_big | e_res)
  return jnp.where(
    ea == 0, jnp.where(eb == 0, _u32(0), b), jnp.where(eb == 0, a, general)
  )


def exp_reduce(a: jax.Array, b: jax.Array, seed: jax.Array) -> jax.Array:
  """kernels.h ExpReduceKernel: pairwise stochastic reduce of byte codes."""
  n = a.shape[0]
  r0 = random_bits(seed, n, stream=0)
  r1 = random_bits(seed, n, stream=1)
  out = exp_reduce_codes(a.astype(_U32), b.astype(_U32), r0, r1)
  return out.astype(jnp.uint8)
