"""Tests of the examples' shared step builder on a small regression."""

import io

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from examples import common
from examples.vision.train_test import _require_devices

W = 4
# Methods with per-worker state of each kind, if present: fields declared
# by the state (THC; PowerSGD, whose lax.cond needs them varying to trace)
# or found by tracing alone (DGC). The examples' tests cover Global-QSGD and
# the convergence script every method.
METHODS = [
  (c, 4) for c in ("thc", "powersgd", "dgc") if c in common.COMPRESSORS
]


def _problem(seed=0):
  """Linear regression: params {w [64, 32], b [32]}, targets from a true w."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(W * 16, 64)).astype(np.float32)
  y = (x @ rng.normal(size=(64, 32)) / 8).astype(np.float32)
  params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
  return params, (x, y)


def _loss(params, batch):
  x, y = batch
  err = x @ params["w"] + params["b"] - y
  return jnp.mean(err**2), {"max_err": jnp.max(jnp.abs(err))}


@pytest.mark.parametrize(
  "compressor,bits", METHODS, ids=[common.method_name(c, b) for c, b in METHODS]
)
def test_every_method_trains_with_replicated_params(compressor, bits):
  _require_devices(W)
  mesh = common.make_mesh(W)
  params, batch = _problem()
  tx = common.make_optimizer(
    compressor, bits, "sgd", optax.constant_schedule(0.5), momentum=0.5
  )
  params = common.replicate(params, mesh)
  opt_state, mask = common.init_opt_state(tx, params, mesh)
  step = common.make_train_step(_loss, tx, mesh, mask)
  batch = common.shard(batch, mesh)
  losses = []
  for _ in range(20):
    params, opt_state, metrics = step(params, opt_state, batch)
    losses.append(float(np.mean(common.to_host(metrics)["loss"])))
  # Low-rank and sparse methods are slow on this full-rank target: only
  # ask for progress.
  assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
  # Raises if the devices' copies differ.
  assert len(common.params_digest(params)) == 64
  # Per-worker leaves are [W, ...] blocks sharded over the mesh axis.
  for leaf, per_worker in zip(
    jax.tree.leaves(opt_state), jax.tree.leaves(mask)
  ):
    want = NamedSharding(mesh, P(common.AXIS) if per_worker else P())
    assert leaf.size == 0 or leaf.sharding.is_equivalent_to(want, leaf.ndim), (
      compressor,
      leaf.shape,
    )


def test_per_worker_mask_finds_error_memories():
  _require_devices(W)
  mesh = common.make_mesh(W)
  params, _ = _problem()
  plain = common.per_worker_mask(
    common.make_optimizer("gqsgd", 4, "adam", optax.constant_schedule(0.1)),
    params,
    mesh,
  )
  assert not any(jax.tree.leaves(plain))
  if "dgc" in common.COMPRESSORS:
    mask = common.per_worker_mask(common.make_compressor("dgc"), params, mesh)
    assert all(jax.tree.leaves(mask.momentum))
    assert not any(jax.tree.leaves(mask.key))


def test_a_local_optimizer_is_rejected():
  _require_devices(W)
  mesh = common.make_mesh(W)
  params, _ = _problem()
  with pytest.raises(ValueError, match="differ per worker"):
    common.per_worker_mask(optax.sgd(0.1), params, mesh)


def test_shard_feeds_this_process_rows():
  _require_devices(W)
  mesh = common.make_mesh(W)
  sharding = NamedSharding(mesh, P(common.AXIS))
  assert common.process_rows(sharding, 8) == slice(0, 8)
  x = np.arange(8 * 3).reshape(8, 3)
  np.testing.assert_array_equal(common.to_host(common.shard(x, mesh)), x)


def test_make_optimizer_moves_momentum_into_dgc():
  if "dgc" not in common.COMPRESSORS:
    pytest.skip("no DGC in this build")
  tx = common.make_optimizer(
    "dgc", 0, "sgd", optax.constant_schedule(0.1), momentum=0.9
  )
  state = jax.eval_shape(tx.init, {"w": jnp.zeros((64, 32))})
  # DGC's velocity, and no momentum trace in the outer SGD.
  assert "TraceState" not in repr(state)


def test_progress_prints_lines_when_output_is_not_a_terminal():
  out = io.StringIO()  # not a TTY, like a log file or the launcher's pipe
  bar = common.progress(range(20), total=20, desc="run", stream=out)
  for step in bar:
    bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
  lines = out.getvalue().splitlines()
  assert len(lines) == 10  # every total // 10 steps, the last one included
  assert lines[0].startswith("run: step 2/20 loss 0.500 (")
  assert lines[-1].startswith("run: step 20/20 loss 0.050 (")
  out = io.StringIO()
  list(
    common.progress(range(20), total=20, desc="run", stream=out, enabled=False)
  )
  assert not out.getvalue()
