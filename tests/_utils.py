"""Tree comparison helpers (optax's test_utils style, without chex)."""

import jax
import numpy as np


def assert_trees_bitwise_equal(a, b) -> None:
  """Same structure, dtypes, shapes and bits (NaN == NaN)."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f"tree structures differ: {ta} vs {tb}"
  for i, (x, y) in enumerate(zip(la, lb)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, f"leaf {i}: dtype {x.dtype} vs {y.dtype}"
    assert x.shape == y.shape, f"leaf {i}: shape {x.shape} vs {y.shape}"
    xb = x.reshape(-1).view(np.uint8)
    yb = y.reshape(-1).view(np.uint8)
    if not np.array_equal(xb, yb):
      bad = np.flatnonzero(x.reshape(-1) != y.reshape(-1))[:5]
      raise AssertionError(f"leaf {i}: bits differ at {bad.tolist()}")


def assert_trees_all_close(a, b, rtol=1e-6, atol=0.0) -> None:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, f"tree structures differ: {ta} vs {tb}"
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol,
                               atol=atol)


def data_mesh(num_workers: int):
  """A 1-D mesh named "data" (Auto axes) over the first num_workers devices."""
  from conftest import require_devices  # pylint: disable=g-import-not-at-top
  devices = require_devices(num_workers)
  return jax.sharding.Mesh(np.array(devices), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def sharded_update(tx, stacked_grads, state, *, mode: str = "shard_map"):
  """Runs ``tx.update`` on per-worker gradients (leading axis = worker).

  Returns (per_worker_updates, new_state): per_worker_updates has a leading
  worker axis with what every device computed, so tests can check replica
  consistency bit for bit. Blocks on the result (collectives on simulated
  CPU devices must not pile up un-awaited).
  """
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  num_workers = jax.tree.leaves(stacked_grads)[0].shape[0]
  mesh = data_mesh(num_workers)
  if mode == "shard_map":
    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("data"), P()),
                   out_specs=(P(), P("data"), P()))
    def step(g, s):
      u, s = tx.update(jax.tree.map(lambda x: x[0], g), s)
      # out_specs P() type-checks that updates are replicated; the P("data")
      # copy exposes every device's bits.
      return u, jax.tree.map(lambda x: x[None], u), s
    _, per_worker, new_state = step(stacked_grads, state)
  elif mode == "pmap":
    step = jax.pmap(tx.update, axis_name="data", in_axes=(0, None),
                    out_axes=(0, None), devices=list(mesh.devices.flat))
    per_worker, new_state = step(stacked_grads, state)
  else:
    raise ValueError(mode)
  return jax.block_until_ready((per_worker, new_state))


def assert_replicas_equal(per_worker) -> None:
  """Every worker's copy (leading axis) is bitwise equal to worker 0's."""
  for leaf in jax.tree.leaves(per_worker):
    leaf = np.asarray(leaf)
    for w in range(1, leaf.shape[0]):
      assert_trees_bitwise_equal(leaf[0], leaf[w])
