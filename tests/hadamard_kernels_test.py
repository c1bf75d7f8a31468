"""The CPU Walsh-Hadamard kernel (xla_ffi/include/gqsgd/hadamard_kernels.h):
bit for bit a plain radix-2 loop, on every ISA copy and thread count, and
what THC's transforms run on CPU."""

import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from gqsgd_jax._src import ffi as ffi_lib
from gqsgd_jax._src.baselines import hadamard
from gqsgd_jax._src.baselines import thc as thc_lib
from gqsgd_jax._src.worker_state import worker_state_specs

from _utils import assert_child_pytest_passes
from _utils import data_mesh

pytestmark = pytest.mark.skipif(
  not ffi_lib.HAS_CPU, reason="needs the _gqsgd_cpu module"
)

_F32_MAX = np.finfo(np.float32).max


def _radix2(x: np.ndarray) -> np.ndarray:
  """The kernel's arithmetic, stage by stage: stage s takes (a, b) =
  (x[i], x[i + 2^s]) to (a m + b m, a m - b m), m = 1/2 on even stages
  (f32(2^-1/2) on the last one of an odd k), no product on odd stages."""
  y = np.array(x, np.float32)
  rows, d = y.reshape(-1, y.shape[-1]).shape
  k = d.bit_length() - 1
  with np.errstate(all="ignore"):
    for s in range(k):
      v = y.reshape(rows, d >> (s + 1), 2, 1 << s)
      a, b = v[:, :, 0], v[:, :, 1]
      if s % 2 == 0:
        m = np.float32(np.sqrt(0.5)) if s == k - 1 else np.float32(0.5)
        a, b = a * m, b * m
      y = np.stack([a + b, a - b], axis=2)
  return y.reshape(x.shape)


def _assert_bits_equal(actual, expected):
  """Equal bits, NaN payloads aside (only NaN-ness is specified)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape and actual.dtype == expected.dtype
  nan = np.isnan(expected)
  np.testing.assert_array_equal(np.isnan(actual), nan)
  np.testing.assert_array_equal(
    actual[~nan].view(np.uint32), expected[~nan].view(np.uint32)
  )


_kernel = jax.jit(functools.partial(hadamard.hadamard_transform, impl="ffi"))
_products = jax.jit(functools.partial(hadamard.hadamard_transform, impl="xla"))


def _normal(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


@pytest.mark.parametrize("k", range(17), ids=lambda k: f"k{k}")
def test_matches_radix2_bit_for_bit(k):
  x = _normal((3, 1 << k), k)
  _assert_bits_equal(_kernel(x), _radix2(x))


def test_largest_chunk_matches_radix2_bit_for_bit():
  x = _normal((1 << 23,), 23)
  _assert_bits_equal(_kernel(x), _radix2(x))


@pytest.mark.parametrize("k", [14, 17, 20, 24], ids=lambda k: f"k{k}")
def test_rows_past_the_block_match_radix2(k):
  """Both phases on several rows, each strip width of phase 2."""
  x = _normal((max(1, 2**20 >> k) * 2, 1 << k), k)
  _assert_bits_equal(_kernel(x), _radix2(x))


@pytest.mark.parametrize("block_log2", [1, 4, 9, 13, 15])
def test_partial_blocks_match_radix2(block_log2):
  x = _normal((1 << 18,), block_log2)
  y = jax.jit(
    functools.partial(hadamard.transform_blocks, impl="ffi"),
    static_argnums=1,
  )(x, block_log2)
  _assert_bits_equal(y, _radix2(x.reshape(-1, 1 << block_log2)).reshape(-1))


def _special_inputs(k):
  d = 1 << k
  rng = np.random.default_rng(k)
  zeros = np.zeros(d, np.float32)
  signed_zeros = np.where(rng.random(d) < 0.5, -0.0, 0.0).astype(np.float32)
  # The largest finite input: one element at f32 max, and a vector of norm
  # just below it (H x = (||x||, 0, ...): finite only if nothing overflows
  # on the way).
  delta = zeros.copy()
  delta[d // 3] = -_F32_MAX
  flat = np.full(d, _F32_MAX / np.sqrt(d) * 0.99, np.float32)
  huge = (rng.standard_normal(d) * 1e37).astype(np.float32)
  # IEEE subnormals (no FTZ/DAZ), as numpy computes them.
  tiny = (rng.standard_normal(d) * 1e-39).astype(np.float32)
  inf = _normal(d, k)
  inf[d // 2] = np.inf
  nan = _normal(d, k)
  nan[-1] = np.nan
  both = _normal(d, k)
  both[0], both[d - 1] = -np.inf, np.nan
  return dict(
    zeros=zeros,
    signed_zeros=signed_zeros,
    delta=delta,
    flat=flat,
    huge=huge,
    tiny=tiny,
    inf=inf,
    nan=nan,
    both=both,
  )


@pytest.mark.parametrize("k", [1, 5, 13, 16, 21])
def test_special_inputs_match_radix2(k):
  for name, x in _special_inputs(k).items():
    y = np.asarray(_kernel(x))
    _assert_bits_equal(y, _radix2(x))
    if name in ("delta", "flat", "huge"):
      assert np.all(np.isfinite(y)), name
  # The flat vector of norm ~0.99 f32 max goes to (||x||, 0, ...).
  y = np.asarray(_kernel(_special_inputs(k)["flat"]))
  assert y[0] > 0.98 * _F32_MAX and not np.any(y[1:])


def test_independent_of_threads_and_batching():
  """Each block and strip is computed alone: the bits do not depend on how
  the pool shares them out, on the rows around a row, or on vmap."""
  x = _normal((8, 1 << 17), 1)
  whole = np.asarray(_kernel(x))
  np.testing.assert_array_equal(np.asarray(_kernel(x)), whole)
  for r in range(8):
    np.testing.assert_array_equal(np.asarray(_kernel(x[r])), whole[r])
  np.testing.assert_array_equal(np.asarray(jax.vmap(_kernel)(x)), whole)
  # One row per device: 8 programs sharing the 2-core pool.
  per_device = jax.pmap(_kernel, devices=jax.devices()[:8])(x)
  np.testing.assert_array_equal(np.asarray(per_device), whole)


# Set in the child processes of test_every_isa_copy_matches_radix2.
_ISA_CHILD = "GQSGD_HADAMARD_TEST_ISA_CHILD"


@pytest.mark.parametrize("isa", ["baseline", "x86-64-v3"])
def test_every_isa_copy_matches_radix2(isa):
  """The AVX2 and portable copies (never taken on an AVX-512 host): the
  bit-identity tests again in a child process with GQSGD_JAX_CPU_ISA (read
  once per process)."""
  if os.environ.get(_ISA_CHILD):
    pytest.skip("already in a child process")
  assert_child_pytest_passes(
    __file__, "radix2", {"GQSGD_JAX_CPU_ISA": isa, _ISA_CHILD: "1"}
  )


@pytest.mark.parametrize("k", [1, 6, 7, 12, 13, 18, 23])
def test_agrees_with_the_products(k):
  x = _normal((1 << k,), k)
  y = np.asarray(_kernel(x), np.float64)
  z = np.asarray(_products(x), np.float64)
  scale = np.linalg.norm(x.astype(np.float64))
  np.testing.assert_allclose(y, z, rtol=0, atol=2e-6 * scale)
  np.testing.assert_allclose(np.linalg.norm(y), scale, rtol=1e-5)


def test_impl_choice():
  x = _normal((4, 64))
  assert (
    "gqsgd_hadamard" in jax.jit(hadamard.hadamard_transform).lower(x).as_text()
  )
  assert "gqsgd_hadamard" not in _products.lower(x).as_text()
  # Other dtypes keep the products (and their dtype); "ffi" refuses them.
  xb = x.astype(jnp.bfloat16)
  hlo = jax.jit(hadamard.hadamard_transform).lower(xb).as_text()
  assert "gqsgd_hadamard" not in hlo
  assert hadamard.hadamard_transform(xb).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="float32"):
    hadamard.hadamard_transform(xb, impl="ffi")
  with pytest.raises(ValueError, match="impl"):
    hadamard.hadamard_transform(x, impl="cuda")


def _thc_step_hlo(mode, num_workers=8):
  """The lowered text of one THC step on 8 simulated CPU devices."""
  tx = thc_lib.thc(axis_name="data", levels=16)
  # One fused buffer of 4096 elements: one chunk.
  params = {
    "w": jnp.zeros((4000,), jnp.float32),
    "b": jnp.zeros((12, 8), jnp.bfloat16),
  }
  grads = jax.tree.map(
    lambda p: jnp.ones((num_workers,) + p.shape, p.dtype), params
  )
  if mode == "pmap":
    state = jax.pmap(
      lambda _: tx.init(params),
      axis_name="data",
      devices=jax.devices()[:num_workers],
    )(jnp.arange(num_workers))
    step = jax.pmap(
      tx.update, axis_name="data", devices=jax.devices()[:num_workers]
    )
    return step.lower(grads, state).as_text()
  specs = worker_state_specs(tx.init(params))
  state = jax.jit(
    jax.shard_map(
      lambda: tx.init(params),
      mesh=data_mesh(num_workers),
      in_specs=(),
      out_specs=specs,
    )
  )()

  @jax.jit
  @jax.shard_map(
    mesh=data_mesh(num_workers),
    in_specs=(P("data"), specs),
    out_specs=(P("data"), specs),
  )
  def step(g, s):
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s)
    return jax.tree.map(lambda x: x[None], u), s

  return step.lower(grads, state).as_text()


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_thc_runs_the_kernel_on_cpu(mode):
  """Both of THC's transforms (of the gradient, of the summed codes) are
  the custom call, and no matrix product is left."""
  hlo = _thc_step_hlo(mode)
  assert hlo.count("@gqsgd_hadamard") == 2, hlo.count("@gqsgd_hadamard")
  assert "dot_general" not in hlo
