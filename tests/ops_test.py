"""FFI ops vs their pure-XLA twins: bit identity under jit, vmap and SPMD."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqsgd_jax._src import ffi as ffi_lib
from gqsgd_jax._src import ops
from gqsgd_jax._src import wire

from _utils import assert_trees_bitwise_equal
from conftest import require_devices

P = jax.sharding.PartitionSpec


def _ffi_platform() -> str:
  # jax calls CUDA backends "gpu"; registration and lowering say "cuda".
  backend = jax.default_backend()
  return "cuda" if backend == "gpu" else backend


requires_ffi = pytest.mark.skipif(
  _ffi_platform() not in ffi_lib.REGISTERED_PLATFORMS,
  reason="no gqsgd_jax FFI module is registered for the default backend",
)

DTYPES = [
  pytest.param(np.dtype(np.float32), id="float32"),
  pytest.param(np.dtype(jnp.bfloat16), id="bfloat16"),
  pytest.param(np.dtype(np.float16), id="float16"),
]
LARGE = 2**20 + 1
# 2**16 + 3: several CPU chunks (2**15 words each) and a ragged tail.
SMALL_SIZES = (0, 1, 7, 2**16 + 3)
# Tail handling does not depend on the input dtype: the degenerate sizes run
# for float32 only, which keeps the compile count (and runtime) down.
DTYPE_SIZES = [
  (d, n) for d in DTYPES for n in SMALL_SIZES if d.id == "float32" or n > 1
]
# (bits, signed_codes): every packed width plus the int8 wire.
CODES = [(bits, False) for bits in range(2, 9)] + [(8, True)]
SEED = np.array([0x12345678, 0x9ABCDEF0], np.uint32)


def _code_id(code) -> str:
  bits, signed = code
  return "int8" if signed else f"bits{bits}"


def _size_params(sizes):
  return [pytest.param(n, id=f"n{n}") for n in sizes]


def _run_impls(fn, *args):
  """(ffi, auto, xla) outputs of fn(*args, impl=...), compiled in one jit."""
  return jax.jit(lambda *a: tuple(fn(*a, impl=i) for i in ops.IMPLS))(*args)


def _assert_impls_agree(fn, *args):
  """Asserts all three paths give the same bits; returns the FFI output."""
  ffi_out, auto_out, xla_out = _run_impls(fn, *args)
  assert_trees_bitwise_equal(ffi_out, xla_out)
  assert_trees_bitwise_equal(auto_out, xla_out)
  return np.asarray(ffi_out)


def _np_unpack(words, bits: int, n: int) -> np.ndarray:
  """All lanes as int64, element 0 of a word in its highest lane."""
  lanes = wire.lanes_per_word(bits)
  w = np.asarray(words).astype(np.uint64)
  shifts = np.uint64(bits) * np.arange(lanes - 1, -1, -1, dtype=np.uint64)
  codes = (w[:, None] >> shifts) & np.uint64((1 << bits) - 1)
  return codes.reshape(-1).astype(np.int64)


def _signed_levels(
  codes, n: int, *, bits: int, signed: bool, levels: int
) -> np.ndarray:
  """The quantized integers q in [-levels, levels] of a code buffer."""
  if signed:
    return np.asarray(codes).astype(np.int64)
  return _np_unpack(codes, bits, n)[:n] - levels


# ---------------------------------------------------------------------------
# Inputs.


def _max_abs_and_scale(dtype, levels: int) -> tuple[np.float32, np.float32]:
  """M exact in dtype and scale = levels / M with M * scale > levels in f32.

  That is the case the clamp exists for: |x| == M rounds one ulp above the
  top level, and one more stochastic round-up would carry into the
  neighbouring lane. For some levels (powers of two) no M overshoots; the
  scale is then nudged one ulp up, as a differently rounded formula would.
  """
  lim = np.float32(levels)
  for v in np.unique(np.arange(1.0, 4.0, 2**-10).astype(dtype)):
    m = np.float32(v)
    scale = lim / m
    if m * scale > lim:
      return m, scale
  m = np.float32(np.asarray(1.5, dtype))
  return m, np.nextafter(lim / m, np.float32(np.inf))


def _specials(dtype, m) -> np.ndarray:
  fi = jnp.finfo(dtype)
  return np.array(
    [
      m,
      -m,
      np.nan,
      np.inf,
      -np.inf,
      0.0,
      float(fi.smallest_subnormal),
      -float(fi.smallest_subnormal),
      float(fi.max),
      -float(fi.max),
      -0.0,
      0.5 * m,
      -0.5 * m,
      4 * float(fi.smallest_subnormal),
      float(fi.smallest_normal),
    ],
    np.float32,
  )


def _with_specials(x: np.ndarray, specials: np.ndarray) -> np.ndarray:
  """Specials at the head and, reversed, at the tail (the ragged last word)."""
  n = x.shape[0]
  k = min(n, specials.shape[0])
  x = x.copy()
  x[:k] = specials[:k].astype(x.dtype)
  x[n - k :] = specials[:k][::-1].astype(x.dtype)
  return x


def _quantize_inputs(n: int, dtype, levels: int):
  m, scale = _max_abs_and_scale(dtype, levels)
  rng = np.random.default_rng(n + levels)
  # Uniform in [-M, M]: rounding to dtype never leaves it since M is exact.
  x = (rng.uniform(-1.0, 1.0, n) * m).astype(dtype)
  return _with_specials(x, _specials(dtype, m)), scale


def _expected_deterministic(x, scale, levels):
  """(mask, q) of the elements whose code does not depend on the draw."""
  with np.errstate(all="ignore"):
    y = np.asarray(x).astype(np.float32) * np.float32(scale)
  lim = np.float32(levels)
  want = np.where(y >= lim, levels, np.where(y <= -lim, -levels, 0))
  # NaN -> 0; beyond the levels -> ±levels (the clamp); |y| < 2^-25 -> 0
  # (zeros, subnormals: 1 - |y| rounds to 1, so negatives round up to 0).
  fixed = np.isnan(y) | (np.abs(y) >= lim) | (np.abs(y) < 2**-25)
  return fixed, want


def _random_words(rng, n: int, bits: int, signed: bool) -> np.ndarray:
  words = wire.num_words(n, bits, signed)
  raw = rng.integers(0, 2**32, words, dtype=np.uint64)
  return raw.astype(np.uint32).astype(wire.word_dtype(bits, signed))


def _log_uniform(rng, n: int, dtype) -> np.ndarray:
  """Signed magnitudes from the dtype's subnormals up to 2^20."""
  fi = jnp.finfo(dtype)
  lo = np.log2(float(fi.smallest_subnormal))
  hi = min(np.log2(float(fi.max)), 20.0)
  mag = np.exp2(rng.uniform(lo, hi, n))
  x = np.where(rng.random(n) < 0.5, -mag, mag)
  return x.astype(np.float32).astype(dtype)


# ---------------------------------------------------------------------------
# Quantize.


def _quantize_case_params():
  params = []
  for (dtype, n), code in itertools.product(DTYPE_SIZES, CODES):
    params.append(
      pytest.param(
        dtype.values[0], code, n, id=f"{dtype.id}-{_code_id(code)}-n{n}"
      )
    )
  # The largest size for a subset only: uint8 and uint32 words, int8 codes.
  for code in [(3, False), (4, False), (8, True)]:
    params.append(
      pytest.param(
        np.dtype(np.float32),
        code,
        LARGE,
        id=f"float32-{_code_id(code)}-n{LARGE}",
      )
    )
  params.append(
    pytest.param(
      np.dtype(jnp.bfloat16), (4, False), LARGE, id=f"bfloat16-bits4-n{LARGE}"
    )
  )
  return params


def _check_quantize(x, scale, *, levels, bits, signed, seed=SEED):
  n = x.shape[0]
  fn = functools.partial(
    ops.quantize, levels=levels, bits=bits, signed_codes=signed
  )
  codes = _assert_impls_agree(fn, x, scale, seed)
  assert codes.dtype == wire.word_dtype(bits, signed)
  assert codes.shape == (wire.num_words(n, bits, signed),)
  q = _signed_levels(codes, n, bits=bits, signed=signed, levels=levels)
  assert np.all(np.abs(q) <= levels), f"codes beyond {levels} levels"
  fixed, want = _expected_deterministic(x, scale, levels)
  np.testing.assert_array_equal(q[fixed], want[fixed])
  if not signed:
    # Padding lanes of the last word and unused high bits are zero.
    assert not np.any(_np_unpack(codes, bits, n)[n:])
    used = wire.lanes_per_word(bits) * bits
    assert not np.any(codes.astype(np.uint64) >> np.uint64(used))
  return codes


@requires_ffi
@pytest.mark.parametrize(("dtype", "code", "n"), _quantize_case_params())
def test_quantize_matches_twin(dtype, code, n):
  bits, signed = code
  levels = wire.max_levels(bits, signed)
  x, scale = _quantize_inputs(n, dtype, levels)
  _check_quantize(x, scale, levels=levels, bits=bits, signed=signed)


@requires_ffi
@pytest.mark.parametrize("code", CODES, ids=_code_id)
def test_quantize_clamps_to_levels(code):
  """A scale 2^-6 too large: unclamped, ~levels/64 of these would overflow."""
  bits, signed = code
  levels = wire.max_levels(bits, signed)
  m = np.float32(1.5)
  x = np.tile(np.float32([m, -m, 2 * m, -np.inf]), 1024)
  scale = np.float32(levels / m * (1 + 2**-6))
  codes = _check_quantize(x, scale, levels=levels, bits=bits, signed=signed)
  q = _signed_levels(codes, x.shape[0], bits=bits, signed=signed, levels=levels)
  np.testing.assert_array_equal(q, np.sign(x) * levels)


def _psum_params():
  params = []
  for code, workers in itertools.product(CODES, (2, 8)):
    bits, signed = code
    if wire.psum_levels(bits, workers, signed) >= 1:
      params.append(
        pytest.param(code, workers, id=f"{_code_id(code)}-W{workers}")
      )
  return params


@requires_ffi
@pytest.mark.parametrize(("code", "workers"), _psum_params())
def test_quantize_psum_levels_sum_without_carry(code, workers):
  """W workers' codes at psum levels add word-wise without lane overflow."""
  bits, signed = code
  levels = wire.psum_levels(bits, workers, signed)
  x, scale = _quantize_inputs(2**16 + 3, np.float32, levels)
  n = x.shape[0]
  seeds = [SEED + np.uint32(7 * w) for w in range(workers)]
  # Worker 0 through all paths; the others reuse the compiled FFI call.
  codes = [_check_quantize(x, scale, levels=levels, bits=bits, signed=signed)]
  quantize = jax.jit(
    functools.partial(
      ops.quantize, levels=levels, bits=bits, signed_codes=signed, impl="ffi"
    )
  )
  codes += [np.asarray(quantize(x, scale, s)) for s in seeds[1:]]
  if signed:
    total = np.sum([c.astype(np.int64) for c in codes], axis=0)
    assert np.all(np.abs(total) <= 127)
    return
  # The word sum a psum computes (no wrap: it must fit the word) ...
  total = np.sum([c.astype(np.uint64) for c in codes], axis=0)
  assert np.all(total < 2 ** (8 * codes[0].itemsize))
  # ... unpacks to the lane-wise sum of the codes: no carry between lanes.
  lane_sum = np.sum([_np_unpack(c, bits, n) for c in codes], axis=0)
  np.testing.assert_array_equal(_np_unpack(total, bits, n), lane_sum)


@requires_ffi
@pytest.mark.parametrize("bits", range(2, 9))
def test_packed_layout_element_zero_in_high_lane(bits):
  """Exact integers quantize deterministically; unpack them with NumPy."""
  levels = wire.max_levels(bits)
  n = 2 * wire.lanes_per_word(bits) + 1  # odd, and a partial last word
  q = (np.arange(n) % (2 * levels + 1)) - levels
  x = q.astype(np.float32)
  codes = _check_quantize(
    x, np.float32(1.0), levels=levels, bits=bits, signed=False
  )
  np.testing.assert_array_equal(_np_unpack(codes, bits, n)[:n], q + levels)
  if bits == 4:
    # The reference's nibble order: byte k = c[2k] << 4 | c[2k + 1].
    c = q + levels
    np.testing.assert_array_equal(codes[0], (c[0] << 4) | c[1])
    np.testing.assert_array_equal(codes[-1], c[-1] << 4)
  # Dequantize trims the padding lanes and inverts exactly.
  dequantize = functools.partial(ops.dequantize, n=n, bits=bits, offset=levels)
  for out in _run_impls(dequantize, codes, np.float32(1.0)):
    np.testing.assert_array_equal(np.asarray(out), x)


@requires_ffi
def test_signed_codes_are_q():
  x = np.arange(-127, 128, dtype=np.float32)
  codes = _check_quantize(x, np.float32(1.0), levels=127, bits=8, signed=True)
  np.testing.assert_array_equal(codes, x.astype(np.int8))


# ---------------------------------------------------------------------------
# Dequantize and average.


def _dequantize_params():
  params = []
  for code, n in itertools.product(CODES, SMALL_SIZES):
    if n > 0 or code in [(3, False), (4, False), (8, True)]:
      params.append(pytest.param(code, n, id=f"{_code_id(code)}-n{n}"))
  for code in [(4, False), (7, False), (8, True)]:
    params.append(pytest.param(code, LARGE, id=f"{_code_id(code)}-n{LARGE}"))
  return params


# Operands, so one compilation covers them all. Includes a subnormal, an
# overflowing and non-finite scales.
DEQUANTIZE_SCALES = [
  0.3712,
  1.0,
  3.0e-3 / 7,
  1e-40,
  3e38,
  0.0,
  np.inf,
  np.nan,
  -2.5,
]


@requires_ffi
@pytest.mark.parametrize(("code", "n"), _dequantize_params())
def test_dequantize_matches_twin(code, n):
  bits, signed = code
  levels = wire.max_levels(bits, signed)
  # A psum offset (W = 4 workers' offsets) on all lane values, padding too.
  offset = 4 * levels
  codes = _random_words(np.random.default_rng(n), n, bits, signed)
  fn = jax.jit(
    lambda c, s: tuple(
      ops.dequantize(
        c, s, n=n, bits=bits, offset=offset, signed_codes=signed, impl=i
      )
      for i in ops.IMPLS
    )
  )
  for scale in DEQUANTIZE_SCALES:
    ffi_out, auto_out, xla_out = fn(codes, np.float32(scale))
    assert_trees_bitwise_equal(ffi_out, xla_out)
    assert_trees_bitwise_equal(auto_out, xla_out)
    assert ffi_out.shape == (n,) and ffi_out.dtype == np.float32
  raw = codes.astype(np.int64) if signed else _np_unpack(codes, bits, n)[:n]
  np.testing.assert_array_equal(
    np.asarray(fn(codes, np.float32(1.0))[0]), raw - offset
  )


# (n_a, n_b) operand pairs up to the n_a + n_b <= 2^16 limit.
COUNTS = [
  (1, 1),
  (1, 3),
  (5, 2),
  (64, 64),
  (1, 127),
  (127, 1),
  (150, 150),
  (2**15, 2**15),
  (1, 2**16 - 1),
  (40503, 25033),
]


def _average_params():
  params = [
    pytest.param(bits, n, id=f"bits{bits}-n{n}")
    for bits, n in itertools.product(range(2, 9), SMALL_SIZES)
    if n > 1 or bits in (3, 4)
  ]
  params.append(pytest.param(4, LARGE, id=f"bits4-n{LARGE}"))
  return params


@requires_ffi
@pytest.mark.parametrize(("bits", "n"), _average_params())
def test_average_matches_twin(bits, n):
  rng = np.random.default_rng(n + bits)
  a = _random_words(rng, n, bits, False)
  b = _random_words(rng, n, bits, False)
  fn = jax.jit(
    lambda *args: tuple(
      ops.average(*args, bits=bits, impl=i) for i in ops.IMPLS
    )
  )
  ca, cb = _np_unpack(a, bits, 0), _np_unpack(b, bits, 0)
  for n_a, n_b in COUNTS:
    ffi_out, auto_out, xla_out = fn(a, b, n_a, n_b, SEED)
    assert_trees_bitwise_equal(ffi_out, xla_out)
    assert_trees_bitwise_equal(auto_out, xla_out)
    # A rounded weighted average stays between its operands, lane by lane.
    c = _np_unpack(ffi_out, bits, 0)
    assert np.all((c >= np.minimum(ca, cb)) & (c <= np.maximum(ca, cb)))


@requires_ffi
def test_average_of_equal_codes_is_exact():
  x, scale = _quantize_inputs(1001, np.float32, 7)
  a = jax.jit(functools.partial(ops.quantize, levels=7, bits=4))(x, scale, SEED)
  average = functools.partial(ops.average, bits=4)
  for out in _run_impls(average, a, a, 3, 5, SEED + 1):
    np.testing.assert_array_equal(np.asarray(out), np.asarray(a))


@requires_ffi
@pytest.mark.parametrize(
  ("n_a", "n_b"),
  [(2**15, 2**15 + 1), (0, 1), (1, 0)],
  ids=["sum65537", "n_a0", "n_b0"],
)
def test_average_ffi_rejects_bad_counts(n_a, n_b):
  # Traced counts reach the handler, which checks them at run time.
  a = np.zeros(4, np.uint8)
  run = jax.jit(functools.partial(ops.average, bits=4, impl="ffi"))
  with pytest.raises(Exception, match="n_a and n_b must be >= 1"):
    jax.block_until_ready(run(a, a, n_a, n_b, SEED))


# ---------------------------------------------------------------------------
# Exponential dithering.


def _exp_inputs(n: int, dtype):
  rng = np.random.default_rng(n + 1)
  x = _log_uniform(rng, n, dtype)
  fi = jnp.finfo(dtype)
  specials = np.array(
    [
      np.nan,
      -np.inf,
      np.inf,
      0.0,
      -0.0,
      1.0,
      -1.0,
      0.5,
      2.0**-10,
      3.0,
      float(fi.smallest_subnormal),
      -float(fi.smallest_normal),
      1000.0,
    ],
    np.float32,
  )
  return _with_specials(x, specials)


def _exp_scale(kind: str, x) -> np.float32:
  xf = np.asarray(x).astype(np.float32)
  finite = np.abs(xf[np.isfinite(xf)])
  m = np.float32(finite.max()) if finite.size else np.float32(1.0)
  m = m if m > 0 else np.float32(1.0)
  if kind == "global":  # S = 2^(D+1) M for a depth-3 tree (§3.5)
    return np.float32(1.0 / (16.0 * float(m)))
  # tiny: products down in the floor range and below the normal range;
  # huge: clamped to 1/2, and overflowing to Inf above 2^8.
  return np.float32({"tiny": 2.0**-100, "huge": 2.0**120}[kind])


# floor_code is an attribute (one compilation each); the scale kinds are
# operands and run through one compiled function.
FLOOR_CODES = (127, 20, 1)
EXP_SCALE_KINDS = ("global", "tiny", "huge")


def _exp_encode_params():
  params = []
  for (dtype, n), floor in itertools.product(DTYPE_SIZES, FLOOR_CODES):
    params.append(
      pytest.param(
        dtype.values[0], floor, n, id=f"{dtype.id}-floor{floor}-n{n}"
      )
    )
  # 126: where the f32 subnormal floor min(c, 126) stops differing from c.
  params.append(
    pytest.param(
      np.dtype(np.float32), 126, 2**16 + 3, id="float32-floor126-n65539"
    )
  )
  params.append(
    pytest.param(
      np.dtype(np.float32), 127, LARGE, id=f"float32-floor127-n{LARGE}"
    )
  )
  return params


@requires_ffi
@pytest.mark.parametrize(("dtype", "floor_code", "n"), _exp_encode_params())
def test_exp_encode_matches_twin(dtype, floor_code, n):
  x = _exp_inputs(n, dtype)
  xf = np.asarray(x).astype(np.float32)
  fn = jax.jit(
    lambda x, s, seed: tuple(
      ops.exp_encode(x, s, seed, floor_code=floor_code, impl=i)
      for i in ops.IMPLS
    )
  )
  for kind in EXP_SCALE_KINDS:
    scale = _exp_scale(kind, x)
    ffi_out, auto_out, xla_out = fn(x, scale, SEED)
    assert_trees_bitwise_equal(ffi_out, xla_out)
    assert_trees_bitwise_equal(auto_out, xla_out)
    codes = np.asarray(ffi_out)
    assert codes.dtype == np.uint8 and codes.shape == (n,)
    e = codes & 0x7F
    assert np.all(e <= floor_code)
    assert not np.any(codes == 0x80), "a zero code carries a sign"
    with np.errstate(all="ignore"):
      v = xf * scale
    assert not np.any(codes[np.isnan(xf)])
    # |v| >= 1/2 clamps to 1/2 = code 1 (never wraps to zero).
    np.testing.assert_array_equal(e[np.abs(v) >= 0.5], 1)
    nonzero = e > 0
    np.testing.assert_array_equal(
      codes[nonzero] >> 7, np.signbit(v[nonzero]).astype(np.uint8)
    )


def _byte_codes(n: int) -> np.ndarray:
  return (np.arange(n) % 256).astype(np.uint8)


# Scales as operands: realistic, one whose low codes leave the normal range,
# subnormal, zero, non-finite, negative (the sign of a scale is ignored).
EXP_DECODE_SCALES = [
  2.0 * 0.731 / 8,
  1.0,
  2.0**-100,
  1e-40,
  0.0,
  3e38,
  np.inf,
  np.nan,
  -0.25,
]


@requires_ffi
@pytest.mark.parametrize("n", _size_params((0, 1, 7, 256, 2**16 + 3, LARGE)))
def test_exp_decode_matches_twin(n):
  codes = _byte_codes(n)
  fn = jax.jit(
    lambda c, s: tuple(ops.exp_decode(c, s, impl=i) for i in ops.IMPLS)
  )
  for scale in EXP_DECODE_SCALES:
    ffi_out, auto_out, xla_out = fn(codes, np.float32(scale))
    assert_trees_bitwise_equal(ffi_out, xla_out)
    assert_trees_bitwise_equal(auto_out, xla_out)
  if n >= 256:
    # Exact powers of two: ±2^-e for the unit scale, 0 for e == 0.
    out = np.asarray(fn(codes, np.float32(1.0))[0])[:256]
    e = np.arange(256) & 0x7F
    want = np.where(e == 0, 0.0, np.exp2(-e.astype(np.float64)))
    want = np.where(np.arange(256) >= 128, -want, want).astype(np.float32)
    want[e > 126] = 0.0  # below the normal range: flushed (documented)
    np.testing.assert_array_equal(np.abs(out), np.abs(want))


def _all_pairs():
  a, b = np.meshgrid(
    np.arange(256, dtype=np.uint8),
    np.arange(256, dtype=np.uint8),
    indexing="ij",
  )
  return a.reshape(-1), b.reshape(-1)


@requires_ffi
@pytest.mark.parametrize("n", _size_params((0, 1, 7, 2**16, 2**16 + 3, LARGE)))
def test_exp_reduce_matches_twin_and_is_symmetric(n):
  if n == 2**16:
    a, b = _all_pairs()  # every pair of bytes once
  else:
    rng = np.random.default_rng(n)
    a, b = rng.integers(0, 256, (2, n)).astype(np.uint8)
  out = _assert_impls_agree(ops.exp_reduce, a, b, SEED)
  # Symmetric in (a, b): two devices computing one node agree (§0.3).
  swapped = jax.jit(functools.partial(ops.exp_reduce, impl="ffi"))(b, a, SEED)
  np.testing.assert_array_equal(np.asarray(swapped), out)
  # A zero operand returns the other one exactly.
  zero_a = (a & 0x7F) == 0
  np.testing.assert_array_equal(
    out[zero_a & ((b & 0x7F) != 0)], b[zero_a & ((b & 0x7F) != 0)]
  )


# ---------------------------------------------------------------------------
# Block max-abs: the scale statistic (a CPU handler; XLA's reduction on GPUs).

requires_cpu_ffi = pytest.mark.skipif(
  jax.default_backend() != "cpu" or "cpu" not in ffi_lib.REGISTERED_PLATFORMS,
  reason="block_max_abs has a CPU FFI handler only",
)


def _np_block_max_abs(x: np.ndarray, block: int) -> np.ndarray:
  """numpy oracle: float64 max |x| per block, inf for a non-finite block,
  subnormal float32 magnitudes as zero."""
  a = np.abs(np.asarray(x, np.float64))
  a[a < np.finfo(np.float32).tiny] = 0.0
  out = []
  for lo in range(0, len(a), block):
    chunk = a[lo : lo + block]
    out.append(np.inf if not np.all(np.isfinite(chunk)) else chunk.max())
  return np.asarray(out, np.float32)


def _block_max_input(n: int, dtype, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)
  return x.astype(np.float32).astype(dtype)


@requires_cpu_ffi
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", _size_params((0, 1, 4095, 2**16 + 3, LARGE)))
@pytest.mark.parametrize("block", [1, 32, 4096, 2**16])
def test_block_max_abs_matches_twin_and_oracle(dtype, n, block):
  x = _block_max_input(n, dtype, n + block)
  if n > 8:  # subnormals (float32 only), exact zeros, a short last block
    x[n // 3] = np.asarray(1e-40, np.float32).astype(dtype)
    x[: min(n, 5)] = 0
  fn = functools.partial(ops.block_max_abs, block_size=block)
  out = _assert_impls_agree(fn, x)
  np.testing.assert_array_equal(out, _np_block_max_abs(x, block))


@requires_cpu_ffi
@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_block_max_abs_carries_non_finite(bad, where):
  """A NaN or Inf anywhere in a block gives +inf for that block only, also
  where XLA:CPU's float max drops NaN (a NaN after >= 4095 finite values)."""
  n, block = 3 * 8192 + 100, 8192
  x = np.ones(n, np.float32)
  pos = {"first": 0, "last": n - 1, "middle": 8192 + 8191}[where]
  x[pos] = bad
  for fn in (
    functools.partial(ops.block_max_abs, block_size=block),
    ops.max_abs,
  ):
    out = _assert_impls_agree(fn, x)
    want = _np_block_max_abs(x, block if fn is not ops.max_abs else n)
    np.testing.assert_array_equal(out.reshape(-1), want)
    assert np.isposinf(out).sum() == 1


@requires_cpu_ffi
@pytest.mark.parametrize("n", _size_params((0, 1, 2**16 + 3, LARGE)))
def test_max_abs_is_the_max_over_blocks(n):
  x = _block_max_input(n, np.float32, n)
  out = _assert_impls_agree(ops.max_abs, x)
  assert out.shape == ()
  assert out == (_np_block_max_abs(x, max(n, 1)).max(initial=0.0))


def test_block_max_abs_bad_block_size():
  with pytest.raises(ValueError, match="block_size must be a power of two"):
    ops.block_max_abs(np.ones(8, np.float32), 3)


# ---------------------------------------------------------------------------
# vmap: one call per row (vmap_method="sequential"), never a broadcast.

BATCH, ROW = 4, 37


def _row_quantize(x, seed, *, impl, bits=4, signed=False):
  # The scale comes from the row itself, as in the transforms.
  levels = wire.max_levels(bits, signed)
  scale = levels / jnp.max(jnp.abs(x))
  return ops.quantize(
    x, scale, seed, levels=levels, bits=bits, signed_codes=signed, impl=impl
  )


def _row_exp_encode(x, seed, *, impl):
  scale = 1.0 / (4.0 * jnp.max(jnp.abs(x)))
  return ops.exp_encode(x, scale, seed, impl=impl)


def _batched_seeds(batch=BATCH) -> np.ndarray:
  return SEED[None, :] + np.arange(batch, dtype=np.uint32)[:, None] * np.uint32(
    0x9E3779B9
  )


def _vmap_cases():
  """name -> (fn(*row_args, impl), batched args)."""
  rng = np.random.default_rng(0)
  # Rows on very different scales: a scale shared across rows would clamp.
  x = (
    rng.normal(size=(BATCH, ROW)) * 10.0 ** np.arange(BATCH)[:, None]
  ).astype(np.float32)
  seeds = _batched_seeds()
  words = np.stack([_random_words(rng, ROW, 4, False) for _ in range(BATCH)])
  other = np.stack([_random_words(rng, ROW, 4, False) for _ in range(BATCH)])
  bytes_a = rng.integers(0, 256, (BATCH, ROW)).astype(np.uint8)
  bytes_b = rng.integers(0, 256, (BATCH, ROW)).astype(np.uint8)
  scales = np.float32([0.5, 3.0, 1e-3, 7.0])
  return {
    "quantize": (_row_quantize, (x, seeds)),
    "quantize_int8": (
      functools.partial(_row_quantize, bits=8, signed=True),
      (x, seeds),
    ),
    "dequantize": (
      functools.partial(ops.dequantize, n=ROW, bits=4, offset=7),
      (words, scales),
    ),
    "average": (
      functools.partial(ops.average, bits=4),
      (words, other, np.int32([1, 2, 3, 64]), np.int32([1, 5, 1, 64]), seeds),
    ),
    "exp_encode": (_row_exp_encode, (x, seeds)),
    "exp_decode": (ops.exp_decode, (bytes_a, scales)),
    "exp_reduce": (ops.exp_reduce, (bytes_a, bytes_b, seeds)),
  }


VMAP_OPS = list(_vmap_cases())


def _row_loop(fn, args, in_axes=None):
  """The twin called row by row (jitted: one compilation for all rows)."""
  in_axes = in_axes or (0,) * len(args)
  twin = jax.jit(functools.partial(fn, impl="xla"))
  rows = []
  for i in range(BATCH):
    row = [a if ax is None else a[i] for a, ax in zip(args, in_axes)]
    rows.append(np.asarray(twin(*row)))
  return np.stack(rows)


@requires_ffi
@pytest.mark.parametrize("op", VMAP_OPS)
def test_vmap_matches_loop_over_rows(op):
  fn, args = _vmap_cases()[op]
  out = jax.jit(jax.vmap(functools.partial(fn, impl="ffi")))(*args)
  assert_trees_bitwise_equal(np.asarray(out), _row_loop(fn, args))


@requires_ffi
@pytest.mark.parametrize("impl", ops.IMPLS)
def test_vmap_row_scale_with_shared_seed(impl):
  """The per-row max-abs scale must not be broadcast across the batch."""
  fn, (x, _) = _vmap_cases()["quantize"]
  out = jax.jit(jax.vmap(functools.partial(fn, impl=impl), in_axes=(0, None)))(
    x, SEED
  )
  want = _row_loop(fn, (x, SEED), in_axes=(0, None))
  assert_trees_bitwise_equal(np.asarray(out), want)
  # Row 0's scale on the larger rows would saturate them; the loop does not.
  q = np.stack(
    [_signed_levels(r, ROW, bits=4, signed=False, levels=7) for r in want]
  )
  assert np.all(np.mean(np.abs(q) == 7, axis=1) < 0.5)


@requires_ffi
@pytest.mark.parametrize("impl", ops.IMPLS)
def test_vmap_batched_seed_gives_each_row_its_stream(impl):
  x = np.tile(np.linspace(-1, 1, 1001, dtype=np.float32), (BATCH, 1))
  out = jax.jit(jax.vmap(functools.partial(_row_quantize, impl=impl)))(
    x, _batched_seeds()
  )
  out = np.asarray(out)
  assert_trees_bitwise_equal(
    out, _row_loop(_row_quantize, (x, _batched_seeds()))
  )
  # Same data, different seeds: different draws in every row.
  for i in range(1, BATCH):
    assert not np.array_equal(out[i], out[0])


@requires_ffi
@pytest.mark.parametrize("op", VMAP_OPS)
def test_eager_ffi_matches_twin(op):
  # Outside jit every FFI call is dispatched on its own; each row (scales
  # from 1 to 1000, counts up to 64) must give the twin's bits. Eager
  # against jitted FFI alone would compare the kernel with itself.
  fn, args = _vmap_cases()[op]
  eager = np.stack(
    [np.asarray(fn(*[a[i] for a in args], impl="ffi")) for i in range(BATCH)]
  )
  assert_trees_bitwise_equal(eager, _row_loop(fn, args))


# ---------------------------------------------------------------------------
# SPMD: per-device FFI results equal per-device calls of the twin.

DEVICES = 8
LOCAL = 2**16 + 3  # several CPU chunks per device, all devices at once
PSUM_LEVELS = wire.psum_levels(8, DEVICES)


def _per_device(x, seed, *, axis, impl):
  """The Global-QSGD step on one device's shard; returns all intermediates."""
  seed = seed.reshape(2)
  m = jax.lax.pmax(jnp.max(jnp.abs(x)), axis)
  codes = ops.quantize(
    x, PSUM_LEVELS / m, seed, levels=PSUM_LEVELS, bits=8, impl=impl
  )
  total = jax.lax.psum(codes, axis)  # lanes never carry at psum levels
  mean = ops.dequantize(
    total,
    m / (PSUM_LEVELS * DEVICES),
    n=x.shape[0],
    bits=8,
    offset=PSUM_LEVELS * DEVICES,
    impl=impl,
  )
  exp = ops.exp_encode(x, 1.0 / (16.0 * m), seed, impl=impl)
  # Butterfly partner i ^ 1, reduced with the pair's shared seed.
  pairs = [(i, i ^ 1) for i in range(DEVICES)]
  partner = jax.lax.ppermute(exp, axis, pairs)
  pair_seed = jnp.asarray(SEED) + (jax.lax.axis_index(axis) // 2).astype(
    jnp.uint32
  )
  reduced = ops.exp_reduce(exp, partner, pair_seed, impl=impl)
  avg = ops.average(
    codes,
    jax.lax.ppermute(codes, axis, pairs),
    1,
    1,
    pair_seed,
    bits=8,
    impl=impl,
  )
  return codes, mean, exp, reduced, avg


def _spmd_inputs():
  rng = np.random.default_rng(8)
  x = (
    rng.normal(size=(DEVICES, LOCAL)) * np.linspace(0.1, 2.0, DEVICES)[:, None]
  ).astype(np.float32)
  return x, _batched_seeds(DEVICES)


def _twin_per_device(x, seeds):
  """The same step from per-device twin calls; returns [device][output]."""
  m = np.float32(np.max(np.abs(x)))
  xla = dict(impl="xla")
  quantize = jax.jit(
    functools.partial(ops.quantize, levels=PSUM_LEVELS, bits=8, **xla)
  )
  exp_encode = jax.jit(functools.partial(ops.exp_encode, **xla))
  exp_reduce = jax.jit(functools.partial(ops.exp_reduce, **xla))
  average = jax.jit(functools.partial(ops.average, bits=8, **xla))
  codes = [quantize(x[d], PSUM_LEVELS / m, seeds[d]) for d in range(DEVICES)]
  exp = [
    exp_encode(x[d], np.float32(1.0) / (np.float32(16.0) * m), seeds[d])
    for d in range(DEVICES)
  ]
  # The psum of the words, lane sums fit: plain integer addition.
  total = np.sum([np.asarray(c, np.uint64) for c in codes], axis=0)
  mean = ops.dequantize(
    total.astype(np.uint8),
    m / (PSUM_LEVELS * DEVICES),
    n=LOCAL,
    bits=8,
    offset=PSUM_LEVELS * DEVICES,
    **xla,
  )
  out = []
  for d in range(DEVICES):
    pair_seed = SEED + np.uint32(d // 2)
    reduced = exp_reduce(exp[d], exp[d ^ 1], pair_seed)
    avg = average(codes[d], codes[d ^ 1], 1, 1, pair_seed)
    out.append([codes[d], mean, exp[d], reduced, avg])
  return out


def _assert_per_device_equal(got, want):
  for d in range(DEVICES):
    for k, (g, w) in enumerate(zip(got[d], want[d])):
      try:
        assert_trees_bitwise_equal(np.asarray(g), np.asarray(w))
      except AssertionError as e:
        raise AssertionError(f"device {d}, output {k}: {e}") from None


@requires_ffi
@pytest.mark.parametrize("impl", ["ffi", "auto"])
def test_shard_map_matches_per_device_twin(impl):
  devices = require_devices(DEVICES)
  mesh = jax.make_mesh(
    (DEVICES,),
    ("data",),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices,
  )
  x, seeds = _spmd_inputs()
  step = jax.jit(
    jax.shard_map(
      functools.partial(_per_device, axis="data", impl=impl),
      mesh=mesh,
      in_specs=(P("data"), P("data")),
      out_specs=P("data"),
    )
  )
  outs = step(x.reshape(-1), seeds)
  got = [
    [np.split(np.asarray(o), DEVICES)[d] for o in outs] for d in range(DEVICES)
  ]
  _assert_per_device_equal(got, _twin_per_device(x, seeds))


@requires_ffi
def test_pmap_matches_per_device_twin():
  x, seeds = _spmd_inputs()
  step = jax.pmap(
    functools.partial(_per_device, axis="data", impl="ffi"),
    axis_name="data",
    devices=require_devices(DEVICES),
  )
  outs = step(x, seeds)
  got = [[np.asarray(o)[d] for o in outs] for d in range(DEVICES)]
  _assert_per_device_equal(got, _twin_per_device(x, seeds))


# ---------------------------------------------------------------------------
# Argument checking and the fallback.


@pytest.mark.parametrize("bits", [1, 9, 0, -4])
def test_bad_bits_value(bits):
  x = np.ones(8, np.float32)
  with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
    ops.quantize(x, 1.0, SEED, levels=1, bits=bits)
  with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
    ops.dequantize(np.zeros(8, np.uint8), 1.0, n=8, bits=bits, offset=0)
  with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
    ops.average(
      np.zeros(8, np.uint8), np.zeros(8, np.uint8), 1, 1, SEED, bits=bits
    )


@pytest.mark.parametrize("bits", [4.0, True, "4", None])
def test_bad_bits_type(bits):
  with pytest.raises(TypeError, match="bits must be an int"):
    ops.quantize(np.ones(8, np.float32), 1.0, SEED, levels=1, bits=bits)


@pytest.mark.parametrize(
  ("bits", "signed", "levels", "limit"),
  [
    (4, False, 0, 7),
    (4, False, 8, 7),
    (2, False, 2, 1),
    (3, False, 4, 3),
    (8, False, 128, 127),
    (8, True, 128, 127),
    (8, True, -1, 127),
  ],
)
def test_bad_levels(bits, signed, levels, limit):
  with pytest.raises(
    ValueError,
    match=(
      rf"levels must be in \[1, {limit}\] "
      rf"for bits={bits}, got {levels}"
    ),
  ):
    ops.quantize(
      np.ones(8, np.float32),
      1.0,
      SEED,
      levels=levels,
      bits=bits,
      signed_codes=signed,
    )


def test_signed_codes_need_bits_8():
  with pytest.raises(ValueError, match="signed_codes needs bits=8"):
    ops.quantize(
      np.ones(8, np.float32), 1.0, SEED, levels=1, bits=4, signed_codes=True
    )


SEEDED_OPS = {
  "quantize": lambda s: ops.quantize(
    np.ones(8, np.float32), 1.0, s, levels=7, bits=4
  ),
  "average": lambda s: ops.average(
    np.zeros(4, np.uint8), np.zeros(4, np.uint8), 1, 1, s, bits=4
  ),
  "exp_encode": lambda s: ops.exp_encode(np.ones(8, np.float32), 0.25, s),
  "exp_reduce": lambda s: ops.exp_reduce(
    np.zeros(8, np.uint8), np.zeros(8, np.uint8), s
  ),
}


@pytest.mark.parametrize("op", list(SEEDED_OPS))
@pytest.mark.parametrize(
  "seed",
  [
    pytest.param(np.array([1, 2], np.int32), id="int32"),
    pytest.param(np.array([1, 2], np.float32), id="float32"),
    pytest.param(np.array([1, 2, 3], np.uint32), id="len3"),
    pytest.param(np.array([[1, 2]], np.uint32), id="1x2"),
    pytest.param(np.uint32(1), id="scalar"),
    pytest.param(jax.random.key(0), id="prng_key"),
  ],
)
def test_bad_seed(op, seed):
  with pytest.raises(ValueError, match=r"seed must be uint32\[2\]"):
    SEEDED_OPS[op](seed)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_])
def test_non_float_input(dtype):
  x = np.ones(8, dtype)
  with pytest.raises(
    TypeError,
    match=(f"x must be float32, bfloat16 or float16, got {np.dtype(dtype)}"),
  ):
    ops.quantize(x, 1.0, SEED, levels=7, bits=4)
  with pytest.raises(TypeError, match="x must be float32, bfloat16"):
    ops.exp_encode(x, 1.0, SEED)


@pytest.mark.parametrize(
  ("codes", "kwargs", "match"),
  [
    (
      np.zeros(4, np.uint32),
      dict(n=7, bits=4),
      r"codes must be uint8\[4\] for n=7, bits=4, got uint32\[4\]",
    ),
    (
      np.zeros(5, np.uint8),
      dict(n=7, bits=4),
      r"codes must be uint8\[4\] for n=7, bits=4, got uint8\[5\]",
    ),
    (
      np.zeros(1, np.uint8),
      dict(n=7, bits=3),
      r"codes must be uint32\[1\] for n=7, bits=3, got uint8\[1\]",
    ),
    (
      np.zeros(7, np.uint8),
      dict(n=7, bits=8, signed_codes=True),
      r"codes must be int8\[7\]",
    ),
    (np.zeros(7, np.int8), dict(n=7, bits=8), r"codes must be uint8\[7\]"),
  ],
  ids=[
    "uint32_for_bits4",
    "too_long",
    "uint8_for_bits3",
    "uint8_for_int8",
    "int8_for_bits8",
  ],
)
def test_dequantize_code_dtype_mismatch(codes, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ops.dequantize(codes, 1.0, offset=0, **kwargs)


def test_average_code_dtype_mismatch():
  u8, u32 = np.zeros(4, np.uint8), np.zeros(4, np.uint32)
  with pytest.raises(
    ValueError, match="packed words for bits=4 are uint8, got uint32"
  ):
    ops.average(u32, u32, 1, 1, SEED, bits=4)
  with pytest.raises(ValueError, match="a and b must be 1-D packed buffers"):
    ops.average(u8, u32, 1, 1, SEED, bits=4)
  with pytest.raises(ValueError, match="a and b must be 1-D packed buffers"):
    ops.average(u8, np.zeros(5, np.uint8), 1, 1, SEED, bits=4)


def test_exp_code_dtype_mismatch():
  with pytest.raises(ValueError, match=r"codes must be uint8\[n\], got int8"):
    ops.exp_decode(np.zeros(4, np.int8), 1.0)
  with pytest.raises(ValueError, match=r"codes must be uint8\[n\]"):
    ops.exp_decode(np.zeros((2, 2), np.uint8), 1.0)
  with pytest.raises(ValueError, match="a and b must be uint8"):
    ops.exp_reduce(np.zeros(4, np.uint8), np.zeros(4, np.int8), SEED)
  with pytest.raises(ValueError, match="a and b must be uint8"):
    ops.exp_reduce(np.zeros(4, np.uint8), np.zeros(5, np.uint8), SEED)


@pytest.mark.parametrize("floor_code", [0, 128, -1])
def test_bad_floor_code(floor_code):
  with pytest.raises(ValueError, match=r"floor_code must be in \[1, 127\]"):
    ops.exp_encode(np.ones(4, np.float32), 0.25, SEED, floor_code=floor_code)


def test_bad_impl():
  with pytest.raises(ValueError, match="impl must be one of"):
    ops.exp_decode(np.zeros(4, np.uint8), 1.0, impl="cuda")


@pytest.mark.parametrize("op", VMAP_OPS)
def test_no_module_ffi_raises_and_auto_falls_back(op, monkeypatch):
  fn, args = _vmap_cases()[op]
  row = [a[0] for a in args]
  twin = np.asarray(jax.jit(functools.partial(fn, impl="xla"))(*row))
  monkeypatch.setattr(ffi_lib, "REGISTERED_PLATFORMS", set())
  with pytest.raises(
    RuntimeError,
    match=(
      "impl='ffi' was requested, but no gqsgd_jax FFI module is registered "
      r"for the '\w+' backend \(registered: none\)"
    ),
  ):
    fn(*row, impl="ffi")
  auto = functools.partial(fn, impl="auto")
  lowered = jax.jit(auto).trace(*row).lower()
  assert "gqsgd_" not in lowered.as_text(), "a custom call with no module"
  assert_trees_bitwise_equal(np.asarray(lowered.compile()(*row)), twin)
  if op == "quantize":  # eagerly too (op by op: slow, so for one op only)
    assert_trees_bitwise_equal(np.asarray(auto(*row)), twin)


def test_seed_from_key():
  seed = ops.seed_from_key(jax.random.key(3))
  assert seed.dtype == np.uint32 and seed.shape == (2,)
  assert_trees_bitwise_equal(seed, ops.seed_from_key(jax.random.key(3)))
  assert not np.array_equal(seed, ops.seed_from_key(jax.random.key(4)))
  # Usable directly as the seed operand, under jit too.
  x = np.linspace(-1, 1, 64, dtype=np.float32)
  q = jax.jit(
    lambda k: ops.quantize(x, 7.0, ops.seed_from_key(k), levels=7, bits=4)
  )(jax.random.key(3))
  twin = jax.jit(functools.partial(ops.quantize, levels=7, bits=4, impl="xla"))
  assert_trees_bitwise_equal(q, twin(x, 7.0, seed))
