"""GPU only: the CUDA handlers against the pure-XLA twins and the emulation."""

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

# Skipped unless a CUDA GPU and the _gqsgd_cuda module are present.
pytestmark = pytest.mark.requires_cuda

DTYPES = [
  pytest.param(np.dtype(np.float32), id="float32"),
  pytest.param(np.dtype(jnp.bfloat16), id="bfloat16"),
  pytest.param(np.dtype(np.float16), id="float16"),
]
# Tails not a multiple of the lanes, nor of any launch grid; 2**20 + 1 needs
# more than one grid-stride iteration for a clamped grid.
SIZES = [pytest.param(n, id=f"n{n}") for n in (0, 1, 7, 2**16 + 3, 2**20 + 1)]
CODES = [pytest.param((b, False), id=f"bits{b}") for b in range(2, 9)] + [
  pytest.param((8, True), id="int8")
]
SEED = np.array([0x0BADF00D, 0x5EED5EED], np.uint32)


def _run_cuda_and_twin(fn, *args):
  """(CUDA, twin) outputs; asserts the compiled program holds the handler.

  impl="auto" (not "ffi", see test_ffi_impl_runs_on_gpu) so that the kernel
  comparisons do not depend on the backend-name check in ops._select.
  """
  cuda = jax.jit(functools.partial(fn, impl="auto"))
  hlo = cuda.trace(*args).lower().as_text()
  assert "gqsgd_" in hlo, "impl='auto' did not lower to the CUDA handler"
  twin = jax.jit(functools.partial(fn, impl="xla"))
  return np.asarray(cuda(*args)), np.asarray(twin(*args))


def _float_inputs(n: int, dtype, m: float = 1.75) -> np.ndarray:
  rng = np.random.default_rng(n)
  x = (rng.uniform(-1.0, 1.0, n) * m).astype(np.float32)
  fi = jnp.finfo(dtype)
  # Subnormals too: a flush-to-zero CUDA build would differ from the twin.
  specials = np.array(
    [
      m,
      -m,
      np.nan,
      np.inf,
      -np.inf,
      0.0,
      -0.0,
      float(fi.smallest_subnormal),
      float(fi.max),
      -float(fi.smallest_normal),
    ],
    np.float32,
  )
  k = min(n, specials.size)
  x[:k] = specials[:k]
  x[n - k :] = specials[:k][::-1]
  return x.astype(dtype)


def _random_words(rng, n: int, bits: int, signed: bool = False):
  raw = rng.integers(0, 2**32, wire.num_words(n, bits, signed), dtype=np.uint64)
  return raw.astype(np.uint32).astype(wire.word_dtype(bits, signed))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("code", CODES)
def test_quantize(code, dtype, n):
  bits, signed = code
  levels = wire.max_levels(bits, signed)
  x = _float_inputs(n, dtype)
  # One ulp above levels / M: the clamp must catch |x| == M.
  scale = np.nextafter(np.float32(levels / 1.75), np.float32(np.inf))
  fn = functools.partial(
    ops.quantize, levels=levels, bits=bits, signed_codes=signed
  )
  cuda, twin = _run_cuda_and_twin(fn, x, scale, SEED)
  assert_trees_bitwise_equal(cuda, twin)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("code", CODES)
def test_dequantize(code, n):
  bits, signed = code
  codes = _random_words(np.random.default_rng(n), n, bits, signed)
  fn = functools.partial(
    ops.dequantize,
    n=n,
    bits=bits,
    offset=4 * wire.max_levels(bits, signed),
    signed_codes=signed,
  )
  for scale in (0.3712, 1e-40, np.inf, np.nan):
    cuda, twin = _run_cuda_and_twin(fn, codes, np.float32(scale))
    assert_trees_bitwise_equal(cuda, twin)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"bits{b}")
def test_average(bits, n):
  rng = np.random.default_rng(n + bits)
  a, b = _random_words(rng, n, bits), _random_words(rng, n, bits)
  fn = functools.partial(ops.average, bits=bits)
  for n_a, n_b in [(1, 1), (5, 2), (1, 127)]:
    cuda, twin = _run_cuda_and_twin(
      fn, a, b, np.int32(n_a), np.int32(n_b), SEED
    )
    assert_trees_bitwise_equal(cuda, twin)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
  "floor_code", [127, 126, 20, 1], ids=lambda c: f"floor{c}"
)
def test_exp_encode(floor_code, dtype, n):
  x = _float_inputs(n, dtype)
  fn = functools.partial(ops.exp_encode, floor_code=floor_code)
  # Realistic, tiny (f32 subnormal products) and clamping scales.
  for scale in (1.0 / (16 * 1.75), 2.0**-120, 2.0**100):
    cuda, twin = _run_cuda_and_twin(fn, x, np.float32(scale), SEED)
    assert_trees_bitwise_equal(cuda, twin)


@pytest.mark.parametrize("n", SIZES)
def test_exp_decode(n):
  codes = (np.arange(n) % 256).astype(np.uint8)
  for scale in (0.37, 2.0**-100, 1e-40, 0.0, np.inf, np.nan):
    cuda, twin = _run_cuda_and_twin(ops.exp_decode, codes, np.float32(scale))
    assert_trees_bitwise_equal(cuda, twin)


@pytest.mark.parametrize("n", SIZES)
def test_exp_reduce(n):
  rng = np.random.default_rng(n)
  a, b = rng.integers(0, 256, (2, n)).astype(np.uint8)
  cuda, twin = _run_cuda_and_twin(ops.exp_reduce, a, b, SEED)
  assert_trees_bitwise_equal(cuda, twin)


def test_exp_reduce_all_pairs():
  a, b = (
    v.reshape(-1)
    for v in np.meshgrid(
      np.arange(256, dtype=np.uint8),
      np.arange(256, dtype=np.uint8),
      indexing="ij",
    )
  )
  cuda, twin = _run_cuda_and_twin(ops.exp_reduce, a, b, SEED)
  assert_trees_bitwise_equal(cuda, twin)


def test_vmap_row_scale_on_gpu():
  """Sequential vmap: each row keeps its own max-abs scale on the GPU too."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 1001)) * 10.0 ** np.arange(4)[:, None]).astype(
    np.float32
  )

  def row(x, impl):
    return ops.quantize(
      x, 7.0 / jnp.max(jnp.abs(x)), SEED, levels=7, bits=4, impl=impl
    )

  out = jax.jit(jax.vmap(functools.partial(row, impl="auto")))(x)
  twin = jax.jit(functools.partial(row, impl="xla"))
  assert_trees_bitwise_equal(out, np.stack([twin(r) for r in x]))


# ---------------------------------------------------------------------------
# The real launch grid against the host emulation of one.

EMULATION_GRIDS = [(1, 1), (7, 5), (40, 256)]


@pytest.mark.skipif(
  ffi_lib.host_emulation is None,
  reason="the _gqsgd_cpu module (host emulation) is absent",
)
@pytest.mark.parametrize(
  "n", [1, 7, 97, 2**16 + 3, 2**20 + 1], ids=lambda n: f"n{n}"
)
def test_cuda_matches_host_emulation(n):
  emulation = ffi_lib.host_emulation
  x = _float_inputs(n, np.float32)
  for (bits, signed), grid in itertools.product(
    [(3, False), (4, False), (8, True)], EMULATION_GRIDS
  ):
    levels = wire.max_levels(bits, signed)
    scale = np.float32(levels / 1.75)
    fn = functools.partial(
      ops.quantize, levels=levels, bits=bits, signed_codes=signed
    )
    cuda, _ = _run_cuda_and_twin(fn, x, scale, SEED)
    emulated = np.zeros_like(cuda)
    emulation.emulate_quantize(
      x, float(scale), SEED, emulated, levels, bits, signed, *grid
    )
    assert_trees_bitwise_equal(cuda, emulated)
  for grid in EMULATION_GRIDS:
    # Mostly f32 subnormal products: the floor path's hardest inputs, and
    # no flush-to-zero on either side here (unlike XLA:CPU).
    scale = np.float32(2.0**-126)
    cuda, _ = _run_cuda_and_twin(ops.exp_encode, x, scale, SEED)
    emulated = np.zeros_like(cuda)
    emulation.emulate_exp_encode(x, float(scale), SEED, emulated, 127, *grid)
    assert_trees_bitwise_equal(cuda, emulated)
    a = np.asarray(cuda)
    b = a[::-1].copy()
    cuda, _ = _run_cuda_and_twin(ops.exp_reduce, a, b, SEED)
    emulated = np.zeros_like(cuda)
    emulation.emulate_exp_reduce(a, b, SEED, emulated, *grid)
    assert_trees_bitwise_equal(cuda, emulated)


def test_ffi_impl_runs_on_gpu():
  # impl="ffi" must be accepted on a GPU host (jax names the backend "gpu",
  # the registration "cuda") and give the twin's bits.
  x = _float_inputs(1001, np.float32)
  out = jax.jit(
    lambda x: ops.quantize(x, 7.0 / 1.75, SEED, levels=7, bits=4, impl="ffi")
  )(x)
  twin = jax.jit(
    lambda x: ops.quantize(x, 7.0 / 1.75, SEED, levels=7, bits=4, impl="xla")
  )(x)
  assert_trees_bitwise_equal(out, twin)
