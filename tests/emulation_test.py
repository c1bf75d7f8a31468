"""CUDA kernel bodies run on the CPU by the host emulation of the grid."""

import functools
import itertools

import jax
import numpy as np
import pytest

from gqsgd_jax._src import ffi as ffi_lib
from gqsgd_jax._src import ops
from gqsgd_jax._src import reference
from gqsgd_jax._src import wire

from _utils import assert_trees_bitwise_equal

emulation = ffi_lib.host_emulation

pytestmark = pytest.mark.skipif(
  emulation is None, reason="the _gqsgd_cpu module is not built"
)

# (blocks, threads). A single thread; a warp-sized grid; an odd grid whose
# stride divides nothing; and one with more threads than any work below but
# the largest size, so most threads get no item at all.
GRIDS = [(1, 1), (3, 32), (7, 5), (40, 256)]
# Tails that are not a multiple of the lanes per word (4, 10, 2, 6, 5, 4, 1
# for bits 2..8) nor of the grid strides (1, 96, 35, 10240); 0 launches no
# work.
SIZES = (0, 1, 7, 97, 2**16 + 3)
CODES = [(bits, False) for bits in range(2, 9)] + [(8, True)]
SEED = np.array([0xDEADBEEF, 0x01234567], np.uint32)


def _grid_params():
  return [pytest.param(g, id=f"grid{g[0]}x{g[1]}") for g in GRIDS]


def _size_params():
  return [pytest.param(n, id=f"n{n}") for n in SIZES]


def _code_id(code) -> str:
  return "int8" if code[1] else f"bits{code[0]}"


def _ffi_and_twin(fn, *args):
  """[ffi, xla] outputs of fn(*args, impl=...) as NumPy arrays.

  The FFI side only with the CPU handlers on the default backend (the CUDA
  grid against the emulation is in cuda_test.py); the twin always.
  """
  on_cpu = ffi_lib.HAS_CPU and jax.default_backend() == "cpu"
  impls = ("ffi", "xla") if on_cpu else ("xla",)
  outs = jax.jit(lambda *a: tuple(fn(*a, impl=i) for i in impls))(*args)
  return [np.asarray(o) for o in outs]


def _assert_all_equal(emulated, expected):
  for out in expected:
    assert_trees_bitwise_equal(emulated, out)


# ---------------------------------------------------------------------------
# Quantize.


def _quantize_inputs(n: int, levels: int):
  rng = np.random.default_rng(n)
  m = np.float32(1.75)
  x = (rng.uniform(-1.0, 1.0, n) * m).astype(np.float32)
  # Subnormals quantize to 0 with or without flush-to-zero, so they stay.
  specials = np.array(
    [m, -m, np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 3e38], np.float32
  )
  k = min(n, specials.size)
  x[:k] = specials[:k]
  x[n - k :] = specials[:k][::-1]
  # One ulp up: |x| == M lands above the top level and must clamp.
  scale = np.nextafter(np.float32(levels) / m, np.float32(np.inf))
  return x, np.float32(scale)


@functools.cache
def _quantize_expected(code, n):
  bits, signed = code
  levels = wire.max_levels(bits, signed)
  x, scale = _quantize_inputs(n, levels)
  fn = functools.partial(
    ops.quantize, levels=levels, bits=bits, signed_codes=signed
  )
  return x, scale, levels, _ffi_and_twin(fn, x, scale, SEED)


@pytest.mark.parametrize("grid", _grid_params())
@pytest.mark.parametrize("n", _size_params())
@pytest.mark.parametrize("code", CODES, ids=_code_id)
def test_emulated_quantize(code, n, grid):
  bits, signed = code
  x, scale, levels, expected = _quantize_expected(code, n)
  # Poisoned output: every word must be written, padding lanes zeroed.
  codes = np.full(wire.num_words(n, bits, signed), 0xA5, np.uint8).astype(
    wire.word_dtype(bits, signed)
  )
  emulation.emulate_quantize(
    x, float(scale), SEED, codes, levels, bits, signed, *grid
  )
  _assert_all_equal(codes, expected)


# ---------------------------------------------------------------------------
# Dequantize and average (the butterfly's combine) on packed words.


def _random_words(words: int, bits: int, rng) -> np.ndarray:
  """Packed words whose lanes hold uniform codes (every value occurs)."""
  lanes = wire.lanes_per_word(bits)
  codes = rng.integers(0, 1 << bits, (words, lanes)).astype(np.uint64)
  shifts = np.uint64(bits) * np.arange(lanes - 1, -1, -1, dtype=np.uint64)
  return (codes << shifts).sum(1).astype(wire.word_dtype(bits))


# Sizes in words: 0 launches no work; the rest are not multiples of the grid
# strides (so threads get different item counts) and the largest spans
# several host blocks of the contiguous path.
WORD_SIZES = (0, 1, 97, 2**12 + 5)


@functools.cache
def _dequantize_expected(code, words):
  bits, signed = code
  rng = np.random.default_rng(words + 3)
  if signed:
    codes = rng.integers(-127, 128, words).astype(np.int8)
    n, offset = words, 0
  else:
    codes = _random_words(words, bits, rng)
    # A partial last word (bits < 8): its padding lanes are not written.
    lanes = wire.lanes_per_word(bits)
    n = max(0, words * lanes - (lanes > 1))
    offset = wire.max_levels(bits)
  scale = np.float32(0.37)
  fn = functools.partial(
    ops.dequantize, n=n, bits=bits, offset=offset, signed_codes=signed
  )
  return codes, scale, n, offset, _ffi_and_twin(fn, codes, scale)


@pytest.mark.parametrize("grid", _grid_params())
@pytest.mark.parametrize("code", CODES, ids=_code_id)
def test_emulated_dequantize(code, grid):
  bits, signed = code
  for words in WORD_SIZES:
    codes, scale, n, offset, expected = _dequantize_expected(code, words)
    out = np.full(n, np.nan, np.float32)
    emulation.emulate_dequantize(
      codes, float(scale), out, bits, signed, offset, *grid
    )
    _assert_all_equal(out, expected)


# (n_a, n_b): a plain pair, the fold of an extra worker into a pair, unequal
# halves, and large counts up to the limit n_a + n_b = 2^16.
COUNTS = [
  (1, 1),
  (2, 1),
  (3, 5),
  (64, 64),
  (150, 150),
  (1, 2**16 - 1),
  (2**15, 2**15),
]


@functools.cache
def _average_expected(bits, words, counts):
  rng = np.random.default_rng(words + bits)
  a = _random_words(words, bits, rng)
  b = _random_words(words, bits, rng)
  fn = functools.partial(ops.average, bits=bits)
  return a, b, _ffi_and_twin(fn, a, b, *np.int32(counts), SEED)


@pytest.mark.parametrize("grid", _grid_params())
@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"bits{b}")
def test_emulated_average(bits, grid):
  # Any grid but (1, 1) runs AverageKernel::Strided, the CUDA kernel's body;
  # (1, 1) runs the host's contiguous path.
  for words in WORD_SIZES:
    for counts in COUNTS:
      a, b, expected = _average_expected(bits, words, counts)
      out = np.full_like(a, 0xA5)
      emulation.emulate_average(a, b, *counts, SEED, out, bits, *grid)
      _assert_all_equal(out, expected)


def test_emulated_average_rejects_bad_arguments():
  a = np.zeros(4, np.uint8)
  with pytest.raises(ValueError, match="n_a and n_b"):
    emulation.emulate_average(a, a, 2**15, 2**15 + 1, SEED, a.copy(), 4, 1, 1)
  with pytest.raises(ValueError, match="n_a and n_b"):
    emulation.emulate_average(a, a, 0, 1, SEED, a.copy(), 4, 1, 1)
  with pytest.raises(ValueError, match="same length"):
    emulation.emulate_average(a, a, 1, 1, SEED, np.zeros(3, np.uint8), 4, 1, 1)
  with pytest.raises(ValueError, match="same length"):
    emulation.emulate_average(a, a, 1, 1, SEED, a.copy(), 3, 1, 1)
  with pytest.raises(ValueError, match="bits"):
    emulation.emulate_average(a, a, 1, 1, SEED, a.copy(), 9, 1, 1)


# ---------------------------------------------------------------------------
# Exponential dithering.


def _exp_inputs(n: int):
  """Normal |x| from 2^-126 up to 4, and specials.

  Subnormal x are left out: XLA:CPU reads them as zero (denormals-are-zero)
  while the emulation does not; see test_emulated_exp_encode_subnormal_x.
  """
  rng = np.random.default_rng(n + 1)
  mag = np.exp2(rng.uniform(-126.0, 2.0, n)).astype(np.float32)
  x = np.where(rng.random(n) < 0.5, -mag, mag).astype(np.float32)
  specials = np.array(
    [
      0.5,
      -0.5,
      4.0,
      np.nan,
      -np.inf,
      0.0,
      -0.0,
      2.0**-100,
      -(2.0**-126),
      1.5 * 2.0**-126,
    ],
    np.float32,
  )
  k = min(n, specials.size)
  x[:k] = specials[:k]
  x[n - k :] = specials[:k][::-1]
  return x


FLOOR_CODES = (127, 100, 1)
# 2^-40: about a third of the products x * scale fall below the f32 normal
# range, where XLA:CPU flushes and the emulation does not.
EXP_SCALES = (1.0, 2.0**-40)


@functools.cache
def _exp_encode_expected(floor_code, n, scale):
  x = _exp_inputs(n)
  fn = functools.partial(ops.exp_encode, floor_code=floor_code)
  return x, _ffi_and_twin(fn, x, np.float32(scale), SEED)


@pytest.mark.parametrize("grid", _grid_params())
@pytest.mark.parametrize("n", _size_params())
@pytest.mark.parametrize("scale", EXP_SCALES, ids=["scale1", "scale2^-40"])
@pytest.mark.parametrize("floor_code", FLOOR_CODES, ids=lambda c: f"floor{c}")
def test_emulated_exp_encode(floor_code, scale, n, grid):
  x, expected = _exp_encode_expected(floor_code, n, scale)
  codes = np.full(n, 0xA5, np.uint8)
  emulation.emulate_exp_encode(x, scale, SEED, codes, floor_code, *grid)
  _assert_all_equal(codes, expected)


def test_emulated_exp_encode_subnormal_x():
  # Subnormal inputs read as zero in every kernel (math.h FlushSubnormal), so
  # the GPU path (here: its host emulation) agrees with XLA:CPU's DAZ.
  x = np.full(4099, 2.0**-127, np.float32)
  x[1::2] = -(2.0**-140)
  codes = np.zeros(x.shape[0], np.uint8)
  emulation.emulate_exp_encode(x, 1.0, SEED, codes, 127, 7, 5)
  assert not codes.any()
  _assert_all_equal(
    codes, _ffi_and_twin(ops.exp_encode, x, np.float32(1.0), SEED)
  )


def _subnormal_product_inputs(n: int):
  """Normal x and scale whose product v = ±0.375 * 2^-126 is subnormal."""
  x = np.full(n, 1.5 * 2.0**-64, np.float32)
  x[1::2] *= -1
  return x, np.float32(2.0**-64), 0.375 * 2.0**-126


def test_emulated_exp_encode_subnormal_products_are_unbiased():
  n = 1 << 14
  x, scale, v = _subnormal_product_inputs(n)
  codes = np.zeros(n, np.uint8)
  emulation.emulate_exp_encode(x, float(scale), SEED, codes, 127, 3, 32)
  nonzero = codes != 0
  assert 0 < np.mean(nonzero) < 1, "v must round between 0 and a level"
  np.testing.assert_array_equal(codes[nonzero] >> 7, np.arange(n)[nonzero] % 2)
  # E|decoded| = |v|; the standard error of the mean is about 1% here.
  magnitude = np.where(
    nonzero, np.exp2(-(codes & 0x7F).astype(np.float64)), 0.0
  )
  assert abs(np.mean(magnitude) / v - 1) < 0.05


def test_emulated_exp_encode_subnormal_products_match_ffi():
  # XLA:CPU runs the handler and the twin with subnormals flushed to zero,
  # the emulation (like a GPU) without: math.h must not depend on it.
  x, scale, _ = _subnormal_product_inputs(4099)
  codes = np.zeros(x.shape[0], np.uint8)
  emulation.emulate_exp_encode(x, float(scale), SEED, codes, 127, 7, 5)
  _assert_all_equal(codes, _ffi_and_twin(ops.exp_encode, x, scale, SEED))


@functools.cache
def _exp_reduce_expected(n):
  rng = np.random.default_rng(n + 2)
  a, b = rng.integers(0, 256, (2, n)).astype(np.uint8)
  return a, b, _ffi_and_twin(ops.exp_reduce, a, b, SEED)


@pytest.mark.parametrize("grid", _grid_params())
@pytest.mark.parametrize("n", _size_params())
def test_emulated_exp_reduce(n, grid):
  a, b, expected = _exp_reduce_expected(n)
  out = np.full(n, 0xA5, np.uint8)
  emulation.emulate_exp_reduce(a, b, SEED, out, *grid)
  _assert_all_equal(out, expected)


# ---------------------------------------------------------------------------
# Block scales: element i uses scale[i >> shift] (kernels.h scale_shift).

# (n, block size): blocks that split words (16 is not a multiple of the 10
# lanes of 3-bit words, nor 256 of 6 or 5), several host blocks, a tail.
BLOCK_CASES = [(97, 16), (4101, 16), (4101, 256)]


def _block_scales(n: int, block: int, rng, base: float) -> np.ndarray:
  """One scale per block around ``base``; one block's scale is 0 (a block
  below the tiny threshold encodes and decodes as zeros)."""
  blocks = -(-n // block)
  scales = (base * rng.uniform(0.5, 1.0, blocks)).astype(np.float32)
  scales[blocks // 2] = 0.0
  return scales


@functools.cache
def _block_quantize_expected(code, n, block):
  bits, signed = code
  levels = wire.max_levels(bits, signed)
  rng = np.random.default_rng(n + block)
  x = rng.uniform(-1.0, 1.0, n).astype(np.float32)
  scales = _block_scales(n, block, rng, levels)
  fn = functools.partial(
    ops.quantize,
    levels=levels,
    bits=bits,
    signed_codes=signed,
    block_size=block,
  )
  return x, scales, levels, _ffi_and_twin(fn, x, scales, SEED)


@pytest.mark.parametrize("grid", _grid_params())
@pytest.mark.parametrize("code", CODES, ids=_code_id)
def test_emulated_quantize_block_scales(code, grid):
  bits, signed = code
  for n, block in BLOCK_CASES:
    x, scales, levels, expected = _block_quantize_expected(code, n, block)
    codes = np.full(wire.num_words(n, bits, signed), 0xA5, np.uint8).astype(
      wire.word_dtype(bits, signed)
    )
    emulation.emulate_quantize(
      x,
      scales,
      SEED,
      codes,
      levels,
      bits,
      signed,
      *grid,
      scale_shift=block.bit_length() - 1,
    )
    _assert_all_equal(codes, expected)


@functools.cache
def _block_dequantize_expected(code, n, block):
  bits, signed = code
  rng = np.random.default_rng(n + block + 1)
  words = wire.num_words(n, bits, signed)
  if signed:
    codes, offset = rng.integers(-127, 128, words).astype(np.int8), 0
  else:
    codes, offset = _random_words(words, bits, rng), wire.max_levels(bits)
  scales = _block_scales(n, block, rng, 0.37)
  fn = functools.partial(
    ops.dequantize,
    n=n,
    bits=bits,
    offset=offset,
    signed_codes=signed,
    block_size=block,
  )
  return codes, scales, offset, _ffi_and_twin(fn, codes, scales)


@pytest.mark.parametrize("grid", _grid_params())
@pytest.mark.parametrize("code", CODES, ids=_code_id)
def test_emulated_dequantize_block_scales(code, grid):
  bits, signed = code
  for n, block in BLOCK_CASES:
    codes, scales, offset, expected = _block_dequantize_expected(code, n, block)
    out = np.full(n, np.nan, np.float32)
    emulation.emulate_dequantize(
      codes,
      scales,
      out,
      bits,
      signed,
      offset,
      *grid,
      scale_shift=block.bit_length() - 1,
    )
    _assert_all_equal(out, expected)


@functools.cache
def _block_exp_encode_expected(n, block):
  rng = np.random.default_rng(n + block + 2)
  x = _exp_inputs(n)
  # |x| <= 4: scales up to 1/8 keep |x * scale| <= 1/2.
  scales = _block_scales(n, block, rng, 0.125)
  fn = functools.partial(ops.exp_encode, block_size=block)
  return x, scales, _ffi_and_twin(fn, x, scales, SEED)


@pytest.mark.parametrize("grid", _grid_params())
def test_emulated_exp_encode_block_scales(grid):
  for n, block in BLOCK_CASES:
    x, scales, expected = _block_exp_encode_expected(n, block)
    codes = np.full(n, 0xA5, np.uint8)
    emulation.emulate_exp_encode(
      x, scales, SEED, codes, 127, *grid, scale_shift=block.bit_length() - 1
    )
    _assert_all_equal(codes, expected)


@functools.cache
def _exp_decode_expected(n, block):
  rng = np.random.default_rng(n + 3)
  codes = rng.integers(0, 256, n).astype(np.uint8)
  if block is None:
    scales = np.float32(2.5)
    fn = ops.exp_decode
  else:
    scales = _block_scales(n, block, rng, 2.5)
    fn = functools.partial(ops.exp_decode, block_size=block)
  return codes, scales, _ffi_and_twin(fn, codes, scales)


@pytest.mark.parametrize("grid", _grid_params())
def test_emulated_exp_decode(grid):
  cases = [(n, None) for n in SIZES] + BLOCK_CASES
  for n, block in cases:
    codes, scales, expected = _exp_decode_expected(n, block)
    out = np.full(n, np.nan, np.float32)
    if block is None:
      emulation.emulate_exp_decode(codes, float(scales), out, *grid)
    else:
      emulation.emulate_exp_decode(
        codes, scales, out, *grid, scale_shift=block.bit_length() - 1
      )
    _assert_all_equal(out, expected)


def test_emulation_rejects_short_block_scales():
  x = np.ones(33, np.float32)
  codes = np.zeros(33, np.uint8)
  with pytest.raises(ValueError, match="fewer elements than blocks"):
    emulation.emulate_exp_encode(
      x, np.ones(2, np.float32), SEED, codes, 127, 1, 1, scale_shift=4
    )
  with pytest.raises(ValueError, match="scale_shift"):
    emulation.emulate_exp_encode(
      x, np.ones(3, np.float32), SEED, codes, 127, 1, 1, scale_shift=63
    )


def test_emulated_exp_reduce_all_pairs():
  # Every (a, b) byte pair once, against the handler and the twin.
  a, b = (
    v.reshape(-1)
    for v in np.meshgrid(
      np.arange(256, dtype=np.uint8),
      np.arange(256, dtype=np.uint8),
      indexing="ij",
    )
  )
  out = np.zeros_like(a)
  emulation.emulate_exp_reduce(a, b, SEED, out, 7, 5)
  _assert_all_equal(out, _ffi_and_twin(ops.exp_reduce, a, b, SEED))


# ---------------------------------------------------------------------------
# Random bits at 64-bit element indices.

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _np_mix32(x: np.ndarray) -> np.ndarray:
  """math.h Mix32 on uint64 arrays of 32-bit values (products fit 64 bits)."""
  x = x ^ (x >> np.uint64(16))
  x = (x * np.uint64(0x21F0AAAD)) & np.uint64(_M32)
  x = x ^ (x >> np.uint64(15))
  x = (x * np.uint64(0x735A2D97)) & np.uint64(_M32)
  return x ^ (x >> np.uint64(15))


def _np_stream_key(seed, stream: int) -> tuple[np.uint64, np.uint64]:
  """math.h MakeStreamKey, uint32 wrap-around made explicit."""
  s0, s1 = np.uint64(seed[0]), np.uint64(seed[1])
  mult = np.uint64((_GOLDEN * (stream + 1)) & _M32)
  a = _np_mix32(np.array([(s0 + mult) & np.uint64(_M32)], np.uint64))
  a = _np_mix32(a ^ s1)
  mult_b = np.uint64((0x7FEB352D * (stream + 1)) & _M32)
  b = _np_mix32(np.array([(s1 + mult_b) & np.uint64(_M32)], np.uint64))
  b = _np_mix32((b + a) & np.uint64(_M32))
  return a[0], b[0]


def _np_random_bits(seed, start: int, n: int, stream: int) -> np.ndarray:
  """math.h RandomBits at indices start..start+n-1, hi word included."""
  a, b = _np_stream_key(seed, stream)
  i = np.uint64(start) + np.arange(n, dtype=np.uint64)
  lo = i & np.uint64(_M32)
  hi = i >> np.uint64(32)
  hi_term = (hi * np.uint64(_GOLDEN)) & np.uint64(_M32)
  inner = ((lo ^ a) + (b ^ hi_term)) & np.uint64(_M32)
  return _np_mix32(inner).astype(np.uint32)


STARTS = [0, 5, 2**31 - 3, 2**32 - 5, 2**32 + 7, 5 * 2**32 + 11]
STREAMS = (0, 1, 5)
RUN = 37  # crosses 2^31 and 2^32 from the starts just below them


@pytest.mark.parametrize("grid", [(1, 1), (3, 5)], ids=["grid1x1", "grid3x5"])
@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: f"stream{s}")
@pytest.mark.parametrize("start", STARTS, ids=lambda s: f"start{s}")
def test_random_bits_at_matches_numpy_model(start, stream, grid):
  out = np.zeros(RUN, np.uint32)
  emulation.random_bits_at(SEED, start, stream, out, *grid)
  np.testing.assert_array_equal(out, _np_random_bits(SEED, start, RUN, stream))


@pytest.mark.parametrize("stream", STREAMS, ids=lambda s: f"stream{s}")
@pytest.mark.parametrize(
  "start", [s for s in STARTS if s < 2**32], ids=lambda s: f"start{s}"
)
def test_random_bits_at_matches_twin_below_2_32(start, stream):
  # The twin has no hi word: it covers indices < 2^32 only.
  run = min(RUN, 2**32 - start)
  out = np.zeros(run, np.uint32)
  emulation.random_bits_at(SEED, start, stream, out)
  # XLA fuses the slice into the iota, so only `run` elements are computed.
  twin = jax.jit(
    lambda s: reference.random_bits(s, start + run, stream=stream)[start:]
  )
  np.testing.assert_array_equal(out, np.asarray(twin(SEED)))


def test_random_bits_hi_word_changes_the_draw():
  # Element 2^32 + k must not repeat element k (a 32-bit index would).
  lo, hi = np.zeros(64, np.uint32), np.zeros(64, np.uint32)
  emulation.random_bits_at(SEED, 0, 0, lo)
  emulation.random_bits_at(SEED, 2**32, 0, hi)
  assert np.mean(lo == hi) < 0.1


def test_random_bits_streams_differ():
  draws = []
  for stream in STREAMS:
    out = np.zeros(256, np.uint32)
    emulation.random_bits_at(SEED, 0, stream, out)
    draws.append(out)
  for x, y in itertools.combinations(draws, 2):
    assert np.mean(x == y) < 0.1


# ---------------------------------------------------------------------------
# Argument checking of the emulation entry points.


@pytest.mark.parametrize(
  "grid", [(0, 1), (1, 0), (-1, 32)], ids=["blocks0", "threads0", "blocks-1"]
)
def test_emulation_rejects_empty_grid(grid):
  out = np.zeros(4, np.uint8)
  with pytest.raises(ValueError, match="blocks and threads must be >= 1"):
    emulation.emulate_exp_reduce(out, out, SEED, out.copy(), *grid)


def test_emulation_rejects_wrong_output():
  x = np.ones(7, np.float32)
  with pytest.raises(ValueError, match="codes has the wrong size or dtype"):
    emulation.emulate_quantize(
      x, 1.0, SEED, np.zeros(3, np.uint8), 7, 4, False, 1, 1
    )
  with pytest.raises(ValueError, match="codes has the wrong size or dtype"):
    emulation.emulate_quantize(
      x, 1.0, SEED, np.zeros(4, np.uint32), 7, 4, False, 1, 1
    )
  with pytest.raises(ValueError, match="codes must match x"):
    emulation.emulate_exp_encode(x, 1.0, SEED, np.zeros(6, np.uint8), 127, 1, 1)
  with pytest.raises(ValueError, match="start must be >= 0"):
    emulation.random_bits_at(SEED, -1, 0, np.zeros(4, np.uint32))
