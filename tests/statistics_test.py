"""Monte-Carlo statistics of the stochastic kernels: bias, variance, algebra."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqsgd_jax._src import ops

# 2^14 >= 10^4 seeds per experiment. Seeds are independent draws of
# jax.random; each kernel hashes its seed into a stream key (MakeStreamKey),
# so distinct seeds give unrelated streams, which is all the estimators
# below assume. The last test checks this directly.
N_SEEDS = 1 << 14
# Tolerances are Z standard errors of the exact (Bernoulli) variance of each
# estimator: P(|N(0,1)| > 5) = 5.7e-7 per checked value. Deterministic seeds
# make every run identical, so a pass is not a matter of luck per run.
Z = 5.0


def _seeds(n: int, salt: int) -> jax.Array:
  return jax.random.bits(jax.random.key(salt), (n, 2), jnp.uint32)


def _two_point(x, lo, hi, p, target, bias):
  """Checks samples x[seed, value] of a two-point rounding; returns Var.

  Each column must take only the values lo (probability 1 - p) and hi
  (probability p, the kernel's exact rule). Its mean must be within Z
  standard errors plus the documented granularity `bias` of `target` (the
  unrounded value), and its variance about the exact mean lo + p (hi - lo)
  must match (hi - lo)^2 p (1 - p): that estimator has standard error
  (hi - lo)^2 sqrt(p (1 - p) (1 - 2p)^2 / N), the 4th central moment of a
  Bernoulli minus its squared variance.
  """
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  lo, hi, p, target = (
    np.broadcast_to(np.asarray(v, np.float64), x.shape[1:])
    for v in (lo, hi, p, target)
  )
  on_support = (x == lo) | ((x == hi) & (p > 0))
  bad = np.flatnonzero(~on_support.all(0))
  assert bad.size == 0, f"values off the two-point support at {bad[:5]}"
  width = np.abs(hi - lo)
  bern = p * (1 - p)
  mean_err = np.abs(x.mean(0) - target)
  mean_tol = Z * width * np.sqrt(bern / n) + bias + 1e-12 * np.abs(target)
  bad = np.flatnonzero(mean_err > mean_tol)
  assert bad.size == 0, (
    f"biased at {bad[:5]}: err {mean_err[bad[:5]]}, tol {mean_tol[bad[:5]]}"
  )
  var = ((x - (lo + p * (hi - lo))) ** 2).mean(0)
  exact = width**2 * bern
  var_tol = Z * width**2 * np.sqrt(bern * (1 - 2 * p) ** 2 / n) + 1e-12
  bad = np.flatnonzero(np.abs(var - exact) > var_tol)
  assert bad.size == 0, (
    f"variance off at {bad[:5]}: {var[bad[:5]]} vs exact {exact[bad[:5]]}"
  )
  return var


# -----------------------------------------------------------------------------
# Standard dithering: quantize (SR).


@functools.partial(jax.jit, static_argnames=("levels", "bits", "signed"))
def _sr_codes(x, scale, seeds, *, levels, bits, signed):
  def one(seed):
    words = ops.quantize(
      x, scale, seed, levels=levels, bits=bits, signed_codes=signed, impl="xla"
    )
    return ops.dequantize(
      words,
      1.0,
      n=x.shape[0],
      bits=bits,
      offset=0 if signed else levels,
      signed_codes=signed,
      impl="xla",
    )

  return jax.vmap(one)(seeds)


def _sr_inputs(levels: int, norm: float, rng) -> tuple[np.ndarray, float]:
  """x in [-M, M]: +-M, 0, exact levels, half-steps, tiny and random values."""
  scale = np.float32(levels / norm)
  step = norm / levels
  y = np.concatenate(
    [
      [
        levels,
        -levels,
        0,
        1,
        -1,
        0.5,
        -0.5,
        levels - 0.5,
        1e-3,
        -1e-3,
        1 / 3,
        -1 / 3,
      ],
      rng.uniform(-levels, levels, 52),
    ]
  )
  x = (y * step).astype(np.float32)
  x[:2] = [norm, -norm]  # x * fl(s / M) may overshoot s by an ulp: clamped
  return x, scale


def _sr_exact(x: np.ndarray, scale, levels: int):
  """The kernel's y (float32 product, clamped), floor, exact P(up)."""
  y = np.clip(x * scale, -levels, levels).astype(np.float32)
  fl = np.floor(y)
  frac = (y - fl).astype(np.float32)  # the float32 frac the kernel computes
  p = np.floor(frac.astype(np.float64) * 2**24) / 2**24
  return y.astype(np.float64), fl.astype(np.float64), p


@pytest.mark.parametrize(
  "bits,levels,signed",
  [
    (8, 127, True),
    (8, 31, True),
    (8, 1, True),
    (8, 127, False),
    (5, 15, False),
    (4, 7, False),
    (4, 3, False),
    (3, 3, False),
    (2, 1, False),
  ],
  ids=lambda v: str(v),
)
def test_quantize_unbiased_variance_within_bound(bits, levels, signed):
  rng = np.random.default_rng(bits * 1000 + levels)
  norm = 1.7
  x, scale = _sr_inputs(levels, norm, rng)
  q = np.asarray(
    _sr_codes(
      x,
      scale,
      _seeds(N_SEEDS, bits + levels),
      levels=levels,
      bits=bits,
      signed=signed,
    )
  )
  y, fl, p = _sr_exact(x, scale, levels)
  # The kernel's P(up) is frac rounded to a multiple of 2^-24: bias < 2^-24.
  var = _two_point(q, fl, fl + 1, p, y, bias=2.0**-24)
  assert np.abs(q).max() <= levels
  # Spec §0.1: Var = f (1 - f) <= min(1/4, |y|) step^2 (in code units).
  assert np.all(var <= 0.25 + Z * 0.25 / np.sqrt(N_SEEDS))
  assert np.all(p * (1 - p) <= np.minimum(0.25, np.abs(y)) + 2.0**-24)
  # +-M (clamped where x * fl(s / M) overshoots s by an ulp) and 0 are
  # exact levels: deterministic codes.
  assert np.all(p[:3] == 0)
  np.testing.assert_array_equal(
    q[:, :3], np.broadcast_to([levels, -levels, 0], (N_SEEDS, 3))
  )


# -----------------------------------------------------------------------------
# 4-bit averaging tree: average.


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Offset codes into uint8 words, element 0 in the high lane (wire.py)."""
  lanes = 8 // bits
  c = codes.reshape(-1, lanes).astype(np.uint32)
  shifts = bits * np.arange(lanes - 1, -1, -1, dtype=np.uint32)
  return np.bitwise_or.reduce(c << shifts, axis=1).astype(np.uint8)


@functools.partial(jax.jit, static_argnames=("bits",))
def _average_codes(a, b, n_a, n_b, seeds, *, bits):
  n = a.shape[0] * (8 // bits)

  def one(seed):
    words = ops.average(a, b, n_a, n_b, seed, bits=bits, impl="xla")
    return ops.dequantize(words, 1.0, n=n, bits=bits, offset=0, impl="xla")

  return jax.vmap(one)(seeds)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n_a,n_b", [(1, 1), (2, 1), (3, 5), (64, 64)])
def test_average_unbiased_variance_within_bound(n_a, n_b, bits):
  top = 2**bits - 1
  if bits < 8:  # every code pair
    a, b = np.meshgrid(np.arange(top + 1), np.arange(top + 1), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
  else:  # a sample of pairs, with the extremes
    rng = np.random.default_rng(n_a * 100 + n_b)
    a, b = rng.integers(0, top + 1, (2, 256))
    a[:4], b[:4] = [0, top, 0, top], [0, top, top, 0]
  q = np.asarray(
    _average_codes(
      _pack(a, bits),
      _pack(b, bits),
      n_a,
      n_b,
      _seeds(N_SEEDS, n_a * 7 + n_b + bits),
      bits=bits,
    )
  )
  num = n_a * a + n_b * b
  den = n_a + n_b
  fl, rem = num // den, num % den
  # math.h RoundedAverage: P(up) = ceil(rem 2^24 / den) / 2^24 (bias < 2^-24).
  p = np.ceil(rem * 2.0**24 / den) / 2**24
  var = _two_point(q, fl, fl + 1, p, num / den, bias=2.0**-24)
  assert q.min() >= 0 and q.max() <= top
  assert np.all(var <= 0.25 + Z * 0.25 / np.sqrt(N_SEEDS))


# -----------------------------------------------------------------------------
# Exponential dithering: exp_encode.


def _decode(codes) -> np.ndarray:
  """±2^-e in float64 (exact, no flush), 0 for e = 0."""
  c = np.asarray(codes).astype(np.int64)
  e = c & 0x7F
  val = np.where(e > 0, np.ldexp(1.0, -e), 0.0)
  return np.where(c & 0x80, -val, val)


@functools.partial(jax.jit, static_argnames=("floor_code",))
def _exp_codes(x, scale, seeds, *, floor_code):
  return jax.vmap(
    lambda s: ops.exp_encode(x, scale, s, floor_code=floor_code, impl="xla")
  )(seeds)


def _exp_exact(v: np.ndarray, floor_code: int):
  """Two-point support (lo, hi) of |v| and the kernel's exact P(hi)."""
  a = np.abs(v.astype(np.float64))
  mu, big_e = np.frexp(a)  # a = mu 2^E, mu in [1/2, 1)
  lo, hi, p = np.ldexp(1.0, big_e - 1), np.ldexp(1.0, big_e), 2 * mu - 1
  floor = np.ldexp(1.0, -floor_code)
  small = a < floor  # SR between 0 and the floor level, 32-bit threshold
  p = np.where(small, np.floor(a / floor * 2.0**32) / 2**32, p)
  lo = np.where(small, 0.0, lo)
  hi = np.where(small, floor, hi)
  zero = a == 0
  return np.where(zero, 0, lo), np.where(zero, 0, hi), np.where(zero, 0, p)


@pytest.mark.parametrize("floor_code", [127, 20])
def test_exp_encode_unbiased_relative_variance_within_bound(floor_code):
  rng = np.random.default_rng(floor_code)
  # |v| = 2^-k (1 + j/16) over the octaves, mu near 2/3 (p = 1/3, where
  # p(1-p)/(1+p)^2 peaks at 1/8), exact powers, 1/2, and for floor_code = 20
  # values below the floor (normal floats: the floor path is reachable).
  k = np.repeat(np.arange(1, 40, 3), 16)
  j = np.tile(np.arange(16), k.size // 16)
  mags = [
    np.ldexp(1 + j / 16, -k),
    np.ldexp(4 / 3, -np.arange(2, 30, 4)),
    [0.5, 0.25, 2.0**-60],
  ]
  if floor_code < 127:
    mags.append(np.exp2(rng.uniform(-26, -floor_code, 32)))
  mag = np.concatenate(mags)
  v = (mag * rng.choice([-1, 1], mag.size)).astype(np.float32)
  v = v[np.abs(v) <= 0.5]
  scale = 2.0**-3  # x = 8 v: the product x * scale is exact
  codes = _exp_codes(
    v * 8, scale, _seeds(N_SEEDS, floor_code), floor_code=floor_code
  )
  lo, hi, p = _exp_exact(v, floor_code)
  a = np.abs(v.astype(np.float64))
  sign = np.sign(v.astype(np.float64))
  # Relative units (x / |v|) keep every column O(1). The floor path's 32-bit
  # threshold truncates P(hi) by < 2^-32, i.e. hi * 2^-32 / |v| relative.
  rel = _decode(codes) * sign / a
  bias = np.where(a < 2.0**-floor_code, hi / a * 2.0**-32, 0.0)
  var = _two_point(rel, lo / a, hi / a, p, 1.0, bias=bias)
  normal = a >= 2.0**-floor_code
  # Natural compression bound: Var <= |v|^2 / 8, peaking at p = 1/3.
  exact = p * (1 - p) * ((hi - lo) / a) ** 2
  assert np.all(exact[normal] <= 1 / 8 + 1e-12)
  assert np.all(var[normal] <= 1 / 8 + Z * np.sqrt(1 / 8 / N_SEEDS))
  assert exact[normal].max() > 0.124  # the 1/8 peak is exercised
  # Floor path: the floor term |v| (2^-c - |v|) instead of |v|^2 / 8 (up to
  # the 2^-32 truncation of P(hi); below 2^-32 of the floor it is 0).
  floor_term = hi / a - 1 + (hi / a) ** 2 * 2.0**-32
  assert np.all(exact[~normal] <= floor_term[~normal])
  assert (~normal).any() == (floor_code < 127)


# -----------------------------------------------------------------------------
# Exponential pairwise reduce.

E_RANGE = np.arange(1, 13)
CODES = np.concatenate([E_RANGE, 0x80 | E_RANGE]).astype(np.uint8)


@jax.jit
def _reduce_codes(a, b, seeds):
  return jax.vmap(lambda s: ops.exp_reduce(a, b, s, impl="xla"))(seeds)


def _natural_rounding(z: np.ndarray):
  """lo, hi bracketing |z| by powers of two and P(hi) = (|z| - lo) / lo."""
  a = np.abs(z)
  mu, big_e = np.frexp(np.where(a > 0, a, 1.0))
  lo = np.ldexp(1.0, big_e - 1)
  return lo, 2 * lo, 2 * mu - 1


def test_exp_reduce_equals_exact_add_then_natural_rounding():
  a, b = (x.reshape(-1) for x in np.meshgrid(CODES, CODES, indexing="ij"))
  out = _decode(_reduce_codes(a, b, _seeds(N_SEEDS, 1)))
  z = _decode(a) + _decode(b)  # the exact sum (float64, exact here)
  zero = z == 0
  # B-GQ-3: |z| > 1/2 needs exponent 0, which our reduce saturates at code 1
  # (REF wraps to zero); the transforms' headroom never reaches it. Those
  # pairs (both signs equal, one operand 1/2) are deterministic 1/2.
  over = np.abs(z) > 0.5
  np.testing.assert_array_equal(out[:, zero], 0.0)
  np.testing.assert_array_equal(
    out[:, over], np.broadcast_to(np.sign(z[over]) * 0.5, out[:, over].shape)
  )
  ok = ~zero & ~over
  lo, hi, p = _natural_rounding(z[ok])
  zs = np.abs(z[ok])
  sign = np.sign(z[ok])
  # Exact probabilities (our geometric tail is exact for t <= 64): the
  # empirical law of every pair is the two-point law of natural rounding.
  var = _two_point(out[:, ok] * sign / zs, lo / zs, hi / zs, p, 1.0, bias=0)
  # Per-outcome binomial check of the count of `hi` (same as the mean, but
  # stated as counts: N p within Z sqrt(N p (1 - p))).
  count = (np.abs(out[:, ok]) == hi).sum(0)
  assert np.all(
    np.abs(count - N_SEEDS * p) <= Z * np.sqrt(N_SEEDS * p * (1 - p)) + 1e-9
  )
  # Variance of one reduce relative to z^2, r = 2^-t.
  ea, eb = a[ok] & 0x7F, b[ok] & 0x7F
  same = (a[ok] & 0x80) == (b[ok] & 0x80)
  r = np.ldexp(1.0, -np.abs(ea.astype(np.int64) - eb))
  # np.where evaluates both branches: the opposite-sign one divides by zero
  # on the equal same-sign pairs, whose value it then discards.
  with np.errstate(divide="ignore", invalid="ignore"):
    formula = np.where(
      same, r * (1 - r) / (1 + r) ** 2, r * (1 - 2 * r) / (2 * (1 - r) ** 2)
    )
  np.testing.assert_allclose(
    p * (1 - p) * ((hi - lo) / zs) ** 2, formula, rtol=1e-12, atol=1e-15
  )
  tol = (
    Z
    * ((hi - lo) / zs) ** 2
    * np.sqrt(p * (1 - p) * (1 - 2 * p) ** 2 / N_SEEDS)
    + 1e-12
  )
  assert np.all(np.abs(var - formula) <= tol)
  assert np.all(formula <= 1 / 8)
  np.testing.assert_allclose(formula[same].max(), 3 / 25)  # t = 2
  np.testing.assert_allclose(formula[~same].max(), 1 / 9)  # t = 2


@pytest.mark.parametrize("impl", ["xla", "ffi"])
def test_exp_reduce_symmetric_bitwise(impl):
  # Redundant butterfly nodes compute reduce(a, b) and reduce(b, a) with the
  # same key: they must agree bit for bit, for every byte pair.
  c = np.arange(256, dtype=np.uint8)
  a, b = (x.reshape(-1) for x in np.meshgrid(c, c, indexing="ij"))
  f = jax.jit(functools.partial(ops.exp_reduce, impl=impl))
  for seed in _seeds(8, 2):
    np.testing.assert_array_equal(
      np.asarray(f(a, b, seed)), np.asarray(f(b, a, seed))
    )


@pytest.mark.parametrize("impl", ["xla", "ffi"])
def test_exp_reduce_exact_cases(impl):
  c = np.arange(256, dtype=np.uint8)
  e = np.arange(1, 128, dtype=np.uint8)
  zero = np.zeros(256, np.uint8)
  neg_zero = np.full(256, 0x80, np.uint8)  # e = 0 with the sign bit: zero
  f = jax.jit(functools.partial(ops.exp_reduce, impl=impl))
  for seed in _seeds(16, 3):
    # A zero operand returns the other operand unchanged.
    for z in (zero, neg_zero):
      np.testing.assert_array_equal(
        np.asarray(f(c, z, seed)), np.where(c & 0x7F, c, 0)
      )
    # Equal codes, same sign: exact doubling (code 1 saturates, B-GQ-3).
    for s in (0, 0x80):
      np.testing.assert_array_equal(
        np.asarray(f(e | s, e | s, seed)), np.maximum(e - 1, 1) | s
      )
    # Equal exponents, opposite signs: exact cancellation to zero.
    np.testing.assert_array_equal(np.asarray(f(e, e | 0x80, seed)), 0)
    # Opposite signs one apart: a - a/2 = a/2 exactly, the smaller operand.
    np.testing.assert_array_equal(
      np.asarray(f(e[:-1], e[1:] | 0x80, seed)), e[1:]
    )


# -----------------------------------------------------------------------------
# Seeds: determinism and independence.


def _half_chance_inputs():
  """Per kernel, inputs where every element rounds up with probability 1/2."""
  n = 1 << 12
  half = np.full(n, 0.5, np.float32)  # y = 1/2: P(up) = 2^23 / 2^24
  three_quarters = np.full(n, 0.375, np.float32)  # 3/4 * 2^-1: p = 1/2
  same_t1_a = np.full(n, 3, np.uint8)  # 2^-3 + 2^-4: doubling w.p. 1/2
  same_t1_b = np.full(n, 4, np.uint8)
  avg_a = _pack(np.zeros(n, np.int64), 4)  # (0 + 1) / 2 per lane
  avg_b = _pack(np.ones(n, np.int64), 4)
  return {
    "quantize": lambda s, impl: ops.quantize(
      half, 1.0, s, levels=7, bits=4, impl=impl
    ),
    "average": lambda s, impl: ops.average(
      avg_a, avg_b, 1, 1, s, bits=4, impl=impl
    ),
    "exp_encode": lambda s, impl: ops.exp_encode(
      three_quarters, 1.0, s, impl=impl
    ),
    "exp_reduce": lambda s, impl: ops.exp_reduce(
      same_t1_a, same_t1_b, s, impl=impl
    ),
  }


def _lagged_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """corr(x[i + k], y[i]) for every lag |k| < n / 2 (one FFT, any n).

  For independent streams each value has standard error about
  1 / sqrt(n - |k|) <= sqrt(2 / n): for n = 4096 the largest of the n lags
  is about 4 of those, 0.07-0.08 (measured); a shifted copy gives 1.
  """
  x = x.astype(np.float64) - x.mean()
  y = y.astype(np.float64) - y.mean()
  n = x.size
  size = 2 * n  # zero padding: a linear, not circular, correlation
  full = np.fft.irfft(
    np.fft.rfft(x, size) * np.conj(np.fft.rfft(y, size)), size
  )
  lags = np.arange(-(n // 2) + 1, n // 2)
  overlap = n - np.abs(lags)
  return full[lags] / (overlap * x.std() * y.std())


@pytest.mark.parametrize("impl", ["xla", "ffi"])
@pytest.mark.parametrize(
  "kernel", ["quantize", "average", "exp_encode", "exp_reduce"]
)
def test_same_seed_same_output_other_seed_independent(kernel, impl):
  fn = jax.jit(functools.partial(_half_chance_inputs()[kernel], impl=impl))
  s1, s2 = _seeds(2, 4)
  out1 = np.asarray(fn(s1))
  np.testing.assert_array_equal(out1, np.asarray(fn(s1)))
  out2 = np.asarray(fn(s2))
  # Independent streams: each lane (4-bit words hold two) differs with
  # probability 2 * 1/2 * 1/2 = 1/2; a shared stream would not.
  if kernel in ("quantize", "average"):
    out1 = np.stack([out1 >> 4, out1 & 0xF], 1).reshape(-1)
    out2 = np.stack([out2 >> 4, out2 & 0xF], 1).reshape(-1)
  differ = np.mean(out1 != out2)
  assert abs(differ - 0.5) <= Z * np.sqrt(0.25 / out1.size)
  # Nor is the second stream the first one shifted: a stream offset by k
  # elements correlates perfectly with the first at lag k, which the test
  # above cannot see (out1[i] and out1[i + k] differ with probability 1/2).
  corr = _lagged_correlations(out1 == out1.max(), out2 == out2.max())
  assert np.max(np.abs(corr)) < 0.25, np.argmax(np.abs(corr))
  # Within one seed, the elements are independent draws too: the rounding
  # indicators of neighbours are uncorrelated (lag-1 correlation within Z
  # standard errors of zero).
  up = (out1 == out1.max()).astype(np.float64)
  corr = np.corrcoef(up[:-1], up[1:])[0, 1]
  assert abs(corr) <= Z / np.sqrt(up.size)


@pytest.mark.parametrize("kernel", ["quantize", "exp_encode", "exp_reduce"])
def test_ffi_path_unbiased_over_elements(kernel):
  # The production (FFI) kernel, one seed, many copies of one input: the
  # element index selects the draw. For a fixed key the map index -> bits is
  # a bijection followed by a strong integer hash (math.h RandomBits), so
  # copies get distinct, well-mixed words, i.e. independent samples under
  # the same assumption as across seeds.
  n = 1 << 20
  seed = _seeds(1, 5)[0]
  if kernel == "quantize":
    y = 0.3  # codes 0 / 1, P(1) = floor(0.3f * 2^24) / 2^24
    out = ops.quantize(
      np.full(n, y, np.float32),
      1.0,
      seed,
      levels=1,
      bits=8,
      signed_codes=True,
      impl="ffi",
    )
    x, target, p = np.asarray(out, np.float64), np.float32(y), 0.3
  elif kernel == "exp_encode":
    v = 0.3  # in [1/4, 1/2): 1/4 or 1/2, p = 0.2
    out = ops.exp_encode(np.full(n, v, np.float32), 1.0, seed, impl="ffi")
    x, target, p = _decode(out), np.float32(v), 0.2
  else:
    a = np.full(n, 2, np.uint8)  # 2^-2 + 2^-4 = 5/16: 1/4 or 1/2, p = 1/4
    out = ops.exp_reduce(a, a + 2, seed, impl="ffi")
    x, target, p = _decode(out), 5 / 16, 0.25
  width = np.ptp(x)
  assert width > 0
  assert abs(x.mean() - target) <= Z * width * np.sqrt(p * (1 - p) / n)
