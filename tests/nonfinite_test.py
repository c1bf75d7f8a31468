"""Non-finite gradients give non-finite means on every worker, every method.

A NaN or Inf on one worker must never be laundered into finite numbers:
``optax.apply_if_finite`` (or ``gqsgd_jax.apply_if_finite``) then skips the
step. XLA:CPU's max/min reductions drop NaN from 4096 elements on (the max
of 4095 ones and a trailing NaN is -inf), so sizes straddle that threshold,
go up to 2^20 + 1, and the bad value sits first, in the middle and last.

One compiled step per (method, size, mode); the bad value and its position
are data, so the nine cases of a size reuse it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import gqsgd_jax

from _methods import METHODS
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh

NUM_WORKERS = 4
BAD_WORKER = 1
# Matrix leaves, so the low-rank methods compress them: 1, at and above
# XLA:CPU's 4096-element threshold, and 2^20 + 1 = 17 * 61681.
SHAPES = {1: (1, 1), 4096: (64, 64), 4097: (17, 241), 2**20 + 1: (17, 61681)}
# pmap runs the same kernels as shard_map; one size above the threshold
# checks its own path (per-device state, no varying types).
PMAP_SIZES = {4096}
BAD_VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
# Methods whose scale, norm or rotation covers the whole leaf: one bad value
# makes every coordinate of its leaf's mean NaN. The others (plain psums,
# sparsifiers, low-rank factors) must give at least one non-finite
# coordinate (a psum's mean of +inf and numbers is +inf, as it should be).
WHOLE_LEAF_NAN = {
  "gq8_psum",
  "gq4_butterfly",
  "gq3_butterfly_leaf",
  "gq_exponential",
  "thc",
  "qsgd",
}


def _grads(shape, bad=None, position=0):
  """Per-worker gradients (leading axis = worker), a bad value on one."""
  n = int(np.prod(shape))
  rng = np.random.default_rng(n)
  m = rng.normal(size=(NUM_WORKERS, n)).astype(np.float32)
  if bad is not None:
    m[BAD_WORKER, position] = bad
  # A second, clean leaf: a finite leaf next to a bad one (other buckets or
  # leaves may stay finite, and must stay replica-identical).
  v = rng.normal(size=(NUM_WORKERS, 8)).astype(np.float32)
  return {"m": m.reshape((NUM_WORKERS,) + shape), "v": v}


def _params(shape):
  return {"m": jnp.zeros(shape), "v": jnp.zeros((8,))}


@functools.cache
def _step(method, shape, mode):
  """update(grads) per worker: returns a worker-stacked copy of the mean."""
  tx = METHODS[method]()
  params = _params(shape)
  if mode == "pmap":
    stacked = jax.tree.map(lambda x: jnp.stack([x] * NUM_WORKERS), params)
    devices = jax.devices()[:NUM_WORKERS]
    state = jax.pmap(tx.init, axis_name="data", devices=devices)(stacked)
    update = jax.pmap(
      lambda g, s: tx.update(g, s)[0], axis_name="data", devices=devices
    )
    return lambda g: update(g, state)
  mesh = data_mesh(NUM_WORKERS)
  specs = gqsgd_jax.worker_state_specs(jax.eval_shape(tx.init, params))
  state = jax.jit(
    jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs)
  )(params)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P("data"), specs), out_specs=P("data"))
  def update(g, s):
    u, _ = tx.update(jax.tree.map(lambda x: x[0], g), s)
    return jax.tree.map(lambda x: x[None], u)

  return lambda g: update(g, state)


def _check(method, out, label):
  out = jax.tree.map(np.asarray, out)
  for w in range(1, NUM_WORKERS):
    assert_trees_bitwise_equal(
      jax.tree.map(lambda x: x[0], out), jax.tree.map(lambda x, w=w: x[w], out)
    )
  m = out["m"].astype(np.float32)
  for w in range(NUM_WORKERS):
    if method in WHOLE_LEAF_NAN:
      assert np.isnan(m[w]).all(), (
        f"{method} {label}: worker {w} has {np.isfinite(m[w]).sum()} "
        "finite values in the mean of a leaf holding a non-finite value"
      )
    else:
      assert not np.isfinite(m[w]).all(), (
        f"{method} {label}: worker {w}'s mean is finite although one "
        "worker's gradient holds a non-finite value"
      )


CASES = [(size, "shard_map") for size in sorted(SHAPES)] + [
  (size, "pmap") for size in sorted(PMAP_SIZES)
]


@pytest.mark.parametrize(("size", "mode"), CASES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_non_finite_gradient_gives_non_finite_mean(method, size, mode):
  shape = SHAPES[size]
  step = _step(method, shape, mode)
  clean = step(_grads(shape))
  # The control: finite input gives a finite mean (so the test can fail).
  assert all(
    np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(clean)
  ), f"{method}: clean input"
  positions = sorted({0, size // 2, size - 1})
  for name, bad in BAD_VALUES.items():
    for pos in positions:
      _check(method, step(_grads(shape, bad, pos)), f"{name} at {pos}")
