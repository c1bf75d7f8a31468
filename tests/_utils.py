"""Shared test helpers: tree comparisons (optax's test_utils style, without
chex), the data mesh, a sharded update with replica checks, a compiled
Flax MLP step for HLO wire tests, and pytest in a child process."""

import functools
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import gqsgd_jax
from gqsgd_jax._src.worker_state import worker_state_specs


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
    np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
    )


def data_mesh(num_workers: int):
  """A 1-D mesh named "data" (Auto axes) over the first num_workers devices."""
  from conftest import require_devices  # pylint: disable=g-import-not-at-top

  devices = require_devices(num_workers)
  return jax.sharding.Mesh(
    np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )


def sharded_update(tx, stacked_grads, state, *, mode: str = "shard_map"):
  """Runs ``tx.update`` on per-worker gradients (leading axis = worker).

  Returns (per_worker_updates, new_state): per_worker_updates has a leading
  worker axis with what every device computed, so tests can check replica
  consistency bit for bit. Blocks on the result (collectives on simulated
  CPU devices must not pile up un-awaited).
  """
  num_workers = jax.tree.leaves(stacked_grads)[0].shape[0]
  mesh = data_mesh(num_workers)
  if mode == "shard_map":

    @jax.jit
    @jax.shard_map(
      mesh=mesh, in_specs=(P("data"), P()), out_specs=(P(), P("data"), P())
    )
    def step(g, s):
      u, s = tx.update(jax.tree.map(lambda x: x[0], g), s)
      # out_specs P() type-checks that updates are replicated; the P("data")
      # copy exposes every device's bits.
      return u, jax.tree.map(lambda x: x[None], u), s

    _, per_worker, new_state = step(stacked_grads, state)
  elif mode == "pmap":
    step = jax.pmap(
      tx.update,
      axis_name="data",
      in_axes=(0, None),
      out_axes=(0, None),
      devices=list(mesh.devices.flat),
    )
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


class Mlp(nnx.Module):
  """64 -> 256 -> 10 with a ReLU: kernels 64 x 256 and 256 x 10, biases of
  256 and 10 (two large and two small leaves)."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 256, rngs=rngs)
    self.out = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def mlp_step(compressor, num_workers: int, *, abstract: bool = False):
  """A compiled Flax/optax data-parallel step of ``Mlp`` under shard_map.

  The step is ``optax.chain(compressor, optax.sgd(0.1))`` on local gradients
  (``gqsgd_jax.varying``), with the optimizer state laid out as a user would:
  per-worker memories sharded (``worker_state_specs``), the rest replicated.
  ``abstract`` lowers on shapes only (no state is initialised), enough to
  read the HLO.

  Returns:
    (compiled, params): the compiled step and the MLP's params.
  """
  graphdef, params = nnx.split(Mlp(nnx.Rngs(0)), nnx.Param)
  tx = optax.chain(compressor, optax.sgd(0.1))
  mesh = data_mesh(num_workers)
  specs = worker_state_specs(jax.eval_shape(tx.init, params))
  init = jax.jit(
    jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs)
  )
  opt_state = jax.eval_shape(init, params) if abstract else init(params)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  @jax.shard_map(
    mesh=mesh,
    in_specs=(P(), specs, P("data"), P("data")),
    out_specs=(P(), specs),
  )
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(gqsgd_jax.varying(params, "data"), x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  x = jax.ShapeDtypeStruct((num_workers * 4, 64), jnp.float32)
  y = jax.ShapeDtypeStruct((num_workers * 4,), jnp.int32)
  return step.lower(params, opt_state, x, y).compile(), params


@functools.cache
def per_worker_step(tx, num_workers: int, mode: str):
  """``tx.update`` with per-worker state (leading axis = worker), compiled once.

  Returns ``f(grads, state) -> (per_worker_updates, per_worker_state)``,
  under ``jax.pmap`` or ``jax.shard_map`` (``mode``). The shard_map version
  also returns the updates with ``out_specs=P()``, which type-checks that
  they are replicated.
  """
  mesh = data_mesh(num_workers)
  if mode == "pmap":
    return jax.pmap(
      tx.update,
      axis_name="data",
      in_axes=(0, 0),
      out_axes=(0, 0),
      devices=list(mesh.devices.flat),
    )
  first = lambda t: jax.tree.map(lambda x: x[0], t)
  lead = lambda t: jax.tree.map(lambda x: x[None], t)

  @jax.jit
  @jax.shard_map(
    mesh=mesh,
    in_specs=(P("data"), P("data")),
    out_specs=(P(), P("data"), P("data")),
  )
  def step(g, s):
    u, s = tx.update(first(g), first(s))
    return u, lead(u), lead(s)

  return lambda g, s: step(g, s)[1:]


def monte_carlo_estimates(tx, stacked, count: int) -> np.ndarray:
  """Global-QSGD's mean for ``count`` step keys, in one compiled program.

  ``stacked`` holds one gradient row per worker; the result is the
  replicated output of ``tx.update`` for the keys PRNGKey(0 .. count - 1),
  as float64 (count, d): the samples of the statistical tests.
  """
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(count))

  @jax.jit
  @jax.shard_map(
    mesh=data_mesh(stacked.shape[0]), in_specs=(P("data"), P()), out_specs=P()
  )
  def run(g, keys):
    return jax.vmap(
      lambda k: tx.update(g[0], gqsgd_jax.GlobalQuantizeState(k))[0]
    )(keys)

  return np.asarray(run(stacked, keys), np.float64)


def assert_child_pytest_passes(
  test_file: str, selection: str, env: dict
) -> None:
  """Runs ``pytest -k selection`` on test_file in a child process with the
  extra environment ``env`` (e.g. GQSGD_JAX_CPU_ISA, which the kernels read
  once per process) and asserts that it passed."""
  child = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    + [test_file, "-k", selection],
    env=dict(os.environ, **env),
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
  assert " passed" in child.stdout
