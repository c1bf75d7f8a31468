"""Tests of powersgd: recovery, EF, zeros, replicas, warm-up, wire, input."""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import gqsgd_jax
from gqsgd_jax._src import bucketing
from gqsgd_jax._src import hlo
from gqsgd_jax._src.baselines import orthogonalize as orth
from gqsgd_jax._src.baselines import powersgd as psgd
from gqsgd_jax._src.worker_state import worker_state_specs

from _lowrank_utils import compiled_flax_step
from _lowrank_utils import low_rank_steps
from _lowrank_utils import np_orthogonalize
from _lowrank_utils import np_power_round
from _lowrank_utils import Runner
from _lowrank_utils import stacked
from _lowrank_utils import zeros_like_params
from _utils import assert_replicas_equal
from _utils import data_mesh

# A conv kernel, two same-shaped matrices (batched), a vector, a scalar and
# a matrix too small to compress.
SHAPES = {
  "conv": (8, 4, 3, 3),
  "w1": (24, 16),
  "w2": (24, 16),
  "b": (16,),
  "s": (),
  "small": (2, 2),
}
COMPRESSED = ("conv", "w1", "w2")


def _mean(g):
  return {k: v.astype(np.float64).mean(axis=0) for k, v in g.items()}


def _assert_close_to(out, target, rtol=2e-5):
  for k, v in target.items():
    scale = max(np.abs(v).max(), 1e-30)
    np.testing.assert_allclose(
      out[k][0], v, rtol=0, atol=rtol * scale, err_msg=k
    )


@pytest.mark.parametrize(
  "rank,warm_start",
  [(1, True), (4, True), (2, False)],
  ids=["r1-gs", "r4-qr", "r2-cold"],
)
def test_exact_recovery_when_the_mean_has_rank_at_most_r(rank, warm_start):
  tx = psgd.powersgd(
    rank=rank, start_iter=0, warm_start=warm_start, min_compression_rate=1
  )
  runner = Runner(tx, zeros_like_params(SHAPES), 4)
  steps = low_rank_steps(SHAPES, COMPRESSED, rank, 4, rank)
  for _ in range(3):
    g = next(steps)
    out, _ = runner.step(g)
    # P = sum_i X_i Q spans the mean's column space and P P^T X = X; with
    # EF the residuals x_i - mean are zero-mean, so every step is exact.
    _assert_close_to(out, _mean(g))


def test_error_feedback_identity_and_warm_up():
  rng = np.random.default_rng(0)
  tx = psgd.powersgd(rank=1, start_iter=2)
  runner = Runner(tx, zeros_like_params(SHAPES), 4)
  names = sorted(SHAPES)
  error = np.zeros((4, sum(max(math.prod(SHAPES[n]), 1) for n in names)))
  for step in range(5):
    g = stacked(rng, SHAPES, 4)
    out, state = runner.step(g)
    new_error = np.concatenate(state.error, axis=1)
    if step < 2:  # warm-up: the plain mean, no residual
      _assert_close_to(out, _mean(g), rtol=1e-6)
      assert not new_error.any()
    else:
      full = {k: v for k, v in g.items() if k in COMPRESSED}
      assert max(np.abs(out[k][0] - _mean(g)[k]).max() for k in full) > 0.1
      # input + old residual = output + new residual, on every worker.
      x = np.concatenate([g[n].reshape(4, -1) for n in names], 1) + error
      o = np.concatenate([out[n].reshape(4, -1) for n in names], 1)
      np.testing.assert_allclose(x, o + new_error, atol=1e-5)
    error = new_error
    assert_replicas_equal(out)
    assert_replicas_equal(state.q)
  assert runner.traces == 1  # warm-up and compression: one program


@pytest.mark.parametrize(
  "rank,epsilon", [(2, 0.0), (4, 1e-8)], ids=["r2-eps0", "r4-qr"]
)
def test_zero_layers_give_no_nan_and_recover(rank, epsilon):
  tx = psgd.powersgd(
    rank=rank,
    start_iter=0,
    min_compression_rate=1,
    orthogonalization_epsilon=epsilon,
  )
  runner = Runner(tx, zeros_like_params(SHAPES), 2)
  steps = low_rank_steps(SHAPES, COMPRESSED, 1, 2, rank)
  for step in range(6):
    g = next(steps)
    if step < 3:  # w1 frozen, then live again
      g["w1"] = np.zeros_like(g["w1"])
    out, state = runner.step(g)
    for leaf in jax.tree.leaves((out, state)):
      assert np.isfinite(leaf).all()
    if step < 3:
      assert not out["w1"].any()
    else:
      # The dead Q columns were re-drawn, so w1 is recovered exactly again
      # (a zero Q would have stayed zero forever).
      _assert_close_to(out, _mean(g))


def test_reference_epsilon_zero_nans_on_a_zero_column():
  # B-PS-1 in isolation: 0 / (0 + 0). Our default epsilon keeps it at 0.
  zero = jnp.zeros((1, 5, 2)).at[0, :, 1].set(1.0)
  assert np.isnan(orth.orthogonalize(zero, 0.0)).any()
  np.testing.assert_array_equal(orth.orthogonalize(zero)[0, :, 0], 0.0)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_replicas_are_bitwise_identical(mode):
  rng = np.random.default_rng(2)
  tx = psgd.powersgd(rank=2, start_iter=1)
  runner = Runner(tx, zeros_like_params(SHAPES), 4, mode)
  for _ in range(3):
    out, state = runner.step(stacked(rng, SHAPES, 4))
    assert_replicas_equal(out)
    assert_replicas_equal((state.q, state.count, state.key))
  # The residuals are per worker.
  assert not np.array_equal(state.error[0][0], state.error[0][1])


@pytest.mark.parametrize("dims", [(2, 10), (3, 17)], ids=["1-rank", "3-rank"])
def test_orthogonalize_batches_and_matches_numpy(dims):
  k, n = 3, 9
  r = dims[0]
  a = np.random.default_rng(3).standard_normal((k, n, r)).astype(np.float32)
  got = np.asarray(jax.jit(orth.orthogonalize)(a))
  for i in range(k):
    want = np_orthogonalize(a[i], orth.DEFAULT_EPSILON)
    # Same projection (QR column signs may differ from NumPy's).
    np.testing.assert_allclose(got[i] @ got[i].T, want @ want.T, atol=1e-5)
    np.testing.assert_allclose(got[i].T @ got[i], np.eye(r), atol=1e-5)


def _bucket_matrices(leaves, bucket_bytes):
  buckets = bucketing.plan_buckets(leaves, bucket_bytes=bucket_bytes)
  return buckets, [math.isqrt(b.size - 1) + 1 for b in buckets]


def test_batched_variant_matches_the_spec_model():
  """Each bucket as one zero-padded ceil(sqrt N)^2 square, EF on the square."""
  rng = np.random.default_rng(4)
  params = zeros_like_params(SHAPES)
  bucket_bytes = 1200  # a few buckets
  tx = psgd.powersgd(
    rank=2, start_iter=1, batched=True, bucket_bytes=bucket_bytes
  )
  leaves = jax.tree.leaves(params)
  buckets, sides = _bucket_matrices(leaves, bucket_bytes)
  assert len(buckets) > 2
  q = [np.asarray(x, np.float64) for x in jax.jit(tx.init)(params).q]
  runner = Runner(tx, params, 2)
  error = [np.zeros((2, s * s)) for s in sides]
  names = sorted(SHAPES)
  for step in range(4):
    g = stacked(rng, SHAPES, 2)
    out, state = runner.step(g)
    if step == 0:
      continue
    flat_out = [None] * len(names)
    for b, (bucket, side) in enumerate(zip(buckets, sides)):
      x = np.concatenate(
        [g[names[i]].reshape(2, -1) for i in bucket.leaf_ids], axis=1
      ).astype(np.float64)
      x = np.pad(x, ((0, 0), (0, side * side - x.shape[1]))) + error[b]
      approx, q[b] = np_power_round(
        x.reshape(2, side, side), q[b], orth.DEFAULT_EPSILON
      )
      approx = approx.reshape(-1)
      error[b] = x - approx
      np.testing.assert_allclose(state.error[b], error[b], atol=2e-5)
      offset = 0
      for i, size in zip(bucket.leaf_ids, bucket.sizes):
        flat_out[i] = approx[offset : offset + size]
        offset += size
    for i, n in enumerate(names):
      np.testing.assert_allclose(
        out[n][0].reshape(-1), flat_out[i], atol=2e-5, err_msg=n
      )


def test_dtypes_and_state_structure_are_stable():
  params = {
    "w": jnp.zeros((32, 16), jnp.bfloat16),
    "v": jnp.zeros((16,), jnp.float32),
  }
  tx = psgd.powersgd(rank=2, start_iter=0)
  runner = Runner(tx, params, 2)
  rng = np.random.default_rng(5)
  g = {
    "w": jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.bfloat16),
    "v": jnp.asarray(rng.standard_normal((2, 16)), jnp.float32),
  }
  out, state = runner.step(g)
  assert out["w"].dtype == jnp.bfloat16 and out["v"].dtype == np.float32
  init = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(init) == jax.tree.structure(
    jax.tree.map(lambda x: x[0], state)
  )
  assert state.error[1].dtype == jnp.bfloat16  # residual in the leaf dtype


def test_converges_on_a_quadratic_with_error_feedback():
  # f_i(W) = |W - T_i|^2 / 2: the workers' mean gradient W - mean(T) is
  # full rank, PowerSGD sends rank 1 per step, EF delivers the rest later.
  rng = np.random.default_rng(6)
  targets = jnp.asarray(rng.standard_normal((4, 16, 12)), jnp.float32)
  params = {"w": jnp.zeros((16, 12), jnp.float32)}
  tx = optax.chain(psgd.powersgd(rank=1, start_iter=0), optax.sgd(0.1))
  mesh = data_mesh(4)
  specs = worker_state_specs(jax.eval_shape(tx.init, params))
  state = jax.jit(
    jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs)
  )(params)

  @jax.jit
  @jax.shard_map(
    mesh=mesh, in_specs=(P(), specs, P("data")), out_specs=(P(), specs)
  )
  def train(params, state, target):
    def body(carry, _):
      params, state = carry
      grads = {"w": gqsgd_jax.varying(params, "data")["w"] - target[0]}
      updates, state = tx.update(grads, state)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(body, (params, state), None, length=150)[0]

  params, _ = train(params, state, targets)
  np.testing.assert_allclose(params["w"], targets.mean(0), atol=1e-4)


def _all_reduce_sizes(compiled):
  return sorted(
    c.elements
    for c in hlo.collectives(compiled.as_text())
    if c.op == "all-reduce"
  )


@pytest.mark.parametrize("rank", [1, 4])
def test_wire_bytes_match_the_formula(rank):
  compiled = compiled_flax_step(psgd.powersgd(rank=rank, start_iter=0))
  # Kernels 64x256 and 256x10 are compressed, biases (256, 10) are not.
  mats = [(64, 256), (256, 10)]
  p = sum(n * rank for n, _ in mats)
  q = sum(m * rank for _, m in mats)
  unc = 256 + 10
  report = gqsgd_jax.wire_report(compiled)
  # §12: 4 r (n + m) bytes per compressed matrix + 4 bytes per uncompressed
  # element, as three all-reduces (all Ps, all Qs, the rest), f32.
  assert report.total_bytes == 4 * (p + q + unc)
  assert _all_reduce_sizes(compiled) == sorted([p, q, unc])


def test_wire_bytes_with_warm_up_and_batched():
  n = 64 * 256 + 256 + 256 * 10 + 10
  # Both branches of the warm-up cond are in the program: the plain f32
  # mean (4 N bytes) and the compressed step.
  compiled = compiled_flax_step(psgd.powersgd(rank=1, start_iter=5))
  assert gqsgd_jax.wire_report(compiled).total_bytes == 4 * (
    n + 64 + 256 + 256 + 10 + 266
  )
  # Batched: one bucket, a side x side square, P and Q of side x r.
  side = math.isqrt(n - 1) + 1
  compiled = compiled_flax_step(
    psgd.powersgd(rank=2, start_iter=0, batched=True)
  )
  assert _all_reduce_sizes(compiled) == [2 * side, 2 * side]
  assert gqsgd_jax.wire_report(compiled).total_bytes == 4 * 2 * side * 2


@pytest.mark.parametrize(
  "kwargs,name",
  [
    (dict(rank=0), "rank"),
    (dict(rank=1.5), "rank"),
    (dict(start_iter=-1), "start_iter"),
    (dict(start_iter=True), "start_iter"),
    (dict(min_compression_rate=0), "min_compression_rate"),
    (dict(orthogonalization_epsilon=-1e-8), "orthogonalization_epsilon"),
    (dict(orthogonalization_epsilon=float("nan")), "orthogonalization_epsilon"),
    (dict(bucket_bytes=0), "bucket_bytes"),
    (dict(error_feedback="yes"), "error_feedback"),
    (dict(warm_start=None), "warm_start"),
    (dict(batched=1), "batched"),
    (dict(key=jnp.zeros(3)), "key"),
  ],
)
def test_bad_arguments_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name):
    psgd.powersgd(**kwargs)


def test_bad_updates_and_state_are_reported():
  tx = psgd.powersgd(rank=1, start_iter=0)
  params = {"w": jnp.zeros((16, 8))}
  state = tx.init(params)
  with pytest.raises(ValueError, match="axis_name"):
    tx.update(params, state)  # not inside shard_map / pmap
  mesh = data_mesh(2)

  def run(updates, state):
    f = jax.shard_map(
      tx.update, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False
    )
    return jax.eval_shape(f, updates, state)

  with pytest.raises(ValueError, match="PowerSGDState does not match"):
    run({"w": jnp.zeros((16, 9))}, state)
  with pytest.raises(TypeError, match="'w'"):
    run({"w": jnp.zeros((16, 8), jnp.int32)}, state)


@pytest.mark.parametrize("rank", [1, 4], ids=["gram-schmidt", "qr"])
def test_a_nonfinite_step_gives_nan_and_keeps_the_memory(rank):
  tx = psgd.powersgd(rank=rank, start_iter=0)
  runner = Runner(tx, zeros_like_params(SHAPES), 4)
  rng = np.random.default_rng(6)
  w1, b = sorted(SHAPES).index("w1"), sorted(SHAPES).index("b")
  mats, _ = psgd.plan_matrices(
    jax.tree.leaves(zeros_like_params(SHAPES)),
    rank=rank,
    min_compression_rate=2,
  )
  j = [m.index for m in mats].index(w1)
  _, before = runner.step(stacked(rng, SHAPES, 4))
  for bad in (np.inf, -np.inf, np.nan):
    g = stacked(rng, SHAPES, 4)
    g["w1"][2, -1, -1] = bad
    g["b"][1, -1] = bad
    out, after = runner.step(g)
    assert np.isnan(out["w1"]).all()  # every worker, every coordinate
    assert np.isnan(out["b"][:, -1]).all()
    assert np.isfinite(out["b"][:, 0]).all()
    assert np.isfinite(out["w2"]).all()
    # The bad matrix's Q and residual, and the bad coordinate's, stay.
    np.testing.assert_array_equal(after.q[j], before.q[j])
    np.testing.assert_array_equal(after.error[w1], before.error[w1])
    np.testing.assert_array_equal(after.error[b][:, -1], before.error[b][:, -1])
    before = after
  out, state = runner.step(stacked(rng, SHAPES, 4))
  for leaf in jax.tree.leaves((out, state)):
    assert np.isfinite(leaf).all()
