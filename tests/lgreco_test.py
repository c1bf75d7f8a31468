"""Tests of lgreco: the DP (brute force, infeasible), rank choice, transform."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqsgd_jax
from gqsgd_jax._src import hlo
from gqsgd_jax._src.baselines import lgreco as lg
from gqsgd_jax._src.baselines import powersgd as psgd

from _lowrank_utils import compiled_flax_step
from _lowrank_utils import np_power_round
from _lowrank_utils import Runner
from _lowrank_utils import stacked
from _lowrank_utils import zeros_like_params
from _utils import assert_replicas_equal


def _brute_force(errors, sizes, budget, k):
  """(least size, least total cost among those) over all configurations."""
  errors, sizes = np.asarray(errors), np.asarray(sizes)
  width = budget / k
  best = (np.inf, np.inf)
  for combo in itertools.product(*[range(errors.shape[1])] * len(errors)):
    rows = np.arange(len(errors))
    e, s = errors[rows, combo], sizes[rows, combo]
    if not (np.isfinite(e).all() and np.isfinite(s).all()):
      continue
    cost = (
      np.ceil(e / width).sum()
      if width > 0
      else (0 if (e == 0).all() else np.inf)
    )
    if cost <= k:
      best = min(best, (s.sum(), cost))
  return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  layers, cands, k = rng.integers(1, 5), rng.integers(2, 5), 40
  # Errors fall and sizes grow with the rank, as for real candidates.
  errors = np.sort(rng.random((layers, cands)), axis=1)[:, ::-1]
  sizes = np.sort(rng.integers(1, 30, (layers, cands)), axis=1).astype(float)
  if seed % 3 == 0:  # some candidates not allowed
    errors[0, -1] = np.inf
    sizes[-1, 0] = np.inf
  budget = rng.uniform(0.3, 1.0) * errors[np.isfinite(errors)].sum() / 2
  choice, feasible = lg.lgreco_dp(errors, sizes, budget, k)
  want_size, want_cost = _brute_force(errors, sizes, budget, k)
  assert feasible == np.isfinite(want_size)
  if feasible:
    rows = np.arange(layers)
    got_cost = np.ceil(errors[rows, choice] / (budget / k)).sum()
    assert sizes[rows, choice].sum() == want_size
    assert got_cost == want_cost <= k
    assert errors[rows, choice].sum() <= budget * (1 + 1e-12)


def test_dp_infeasible_and_degenerate_budgets():
  errors = np.array([[1.0, 0.5], [2.0, 1.0]])
  sizes = np.array([[1.0, 2.0], [1.0, 2.0]])
  assert not lg.lgreco_dp(errors, sizes, 0.1, 100)[1]  # below every error
  assert not lg.lgreco_dp(errors, sizes, float("nan"), 100)[1]
  assert not lg.lgreco_dp(np.full((2, 2), np.inf), sizes, 1.0, 100)[1]
  # Zero budget: only zero-error candidates, the smallest of them.
  zero = np.array([[0.0, 0.0], [1.0, 0.0]])
  choice, feasible = lg.lgreco_dp(zero, sizes, 0.0, 100)
  assert feasible and choice.tolist() == [0, 1]


DIMS = [(64, 48), (32, 32), (3, 40)]  # the last caps ranks at 3
CANDS = (2, 3, 4, 5, 6, 7, 8)


def test_choose_ranks_falls_back_to_uniform_ranks():
  errors = np.tile(np.linspace(1.0, 0.1, len(CANDS)), (3, 1))
  # Infeasible (alpha tiny): uniform.
  ranks = lg.choose_ranks(errors, DIMS, CANDS, 4, alpha=1e-6)
  assert ranks.tolist() == [4, 4, 3]
  # Uniform infeasible after ceil discretisation (REF issue: each base
  # error is 1/3 of the budget, 3 x ceil(10/3) = 12 > K = 10) and every
  # other feasible choice is larger: still the uniform ranks.
  errors = np.tile([[9.0, 9.0, 1.0, 0.0, 0.0, 0.0, 0.0]], (3, 1))
  dims = [(64, 48), (32, 32), (40, 40)]
  assert lg.choose_ranks(errors, dims, CANDS, 4, num_buckets=10).tolist() == [
    4,
    4,
    4,
  ]
  # NaN errors are not allowed candidates (the reference discarded its
  # nan_to_num); ranks stay candidates in [1, min(n, m)].
  errors = np.tile(np.linspace(1.0, 0.1, len(CANDS)), (3, 1))
  errors[1, :2] = np.nan
  ranks = lg.choose_ranks(errors, DIMS, CANDS, 4, aggregation="fro2")
  assert ranks[1] >= 4 and ranks[2] <= 3 and set(ranks) <= set(CANDS)
  # A NaN at the uniform rank leaves the budget undefined: uniform ranks.
  errors[0, 2] = np.nan
  assert lg.choose_ranks(errors, DIMS, CANDS, 4).tolist() == [4, 4, 3]


def test_choose_ranks_trades_rank_between_layers():
  # Layer 0 is exactly rank 2, layer 1 has a flat spectrum: the budget of
  # uniform rank 4 is met by giving layer 0 rank 2 and layer 1 more.
  cands = np.arange(1, 9)
  flat = np.sqrt(np.maximum(32 - cands, 0.0))
  low = np.where(cands >= 2, 0.0, 1.0)
  ranks = lg.choose_ranks(np.stack([low, flat]), [(64, 64), (32, 32)], cands, 4)
  assert ranks.tolist()[0] == 2 and ranks[1] >= 4
  sizes = ranks * np.array([128, 64])
  assert sizes.sum() < 4 * (128 + 64)


SHAPES = {"low": (24, 20), "full": (24, 20), "zero": (16, 12), "b": (20,)}


def _grads(rng, step, num_workers):
  """'low' is the same rank-1 matrix on every worker, 'full' full rank."""
  u = np.linspace(1, 2, 24)[:, None]
  v = np.cos(np.arange(20))[None, :]
  low = np.broadcast_to((1 + step % 3) * u * v, (num_workers, 24, 20))
  return {
    "low": low.astype(np.float32),
    "full": rng.standard_normal((num_workers, 24, 20)).astype(np.float32),
    "zero": np.zeros((num_workers, 16, 12), np.float32),
    "b": rng.standard_normal((num_workers, 20)).astype(np.float32),
  }


@pytest.mark.parametrize(
  "mode,method,inputs",
  [("shard_map", "power", "worker0"), ("pmap", "svd", "mean")],
)
def test_ranks_adapt_without_recompiling(mode, method, inputs):
  tx = lg.lgreco(
    rank=2,
    start_iter=1,
    adjust_every=3,
    acc_iters=2,
    error_method=method,
    inputs=inputs,
    key=3,
  )
  runner = Runner(tx, zeros_like_params(SHAPES), 4, mode)
  rng = np.random.default_rng(0)
  error = 0.0
  for step in range(8):
    g = _grads(rng, step, 4)
    out, state = runner.step(g)
    assert_replicas_equal(out)
    assert_replicas_equal((state.q, state.ranks, state.count))
    for leaf in jax.tree.leaves((out, state)):
      assert np.isfinite(leaf).all()
    ranks = state.ranks[0].tolist()  # [full, low, zero] (leaf order)
    if step < 3:  # warm-up step + the first period: base rank
      assert ranks == [2, 2, 2]
    else:
      # Rank 1 is exact for 'low' and the zero layer: both drop to it.
      # 'full' keeps its rank (or one more: the conservative ceil can rule
      # out exactly meeting the budget when the others are ~exact).
      assert ranks[1] == 1 and ranks[2] == 1 and ranks[0] in (2, 3), ranks
    if step >= 1:
      # EF identity on every worker: x_i = output + new residual.
      new = np.concatenate(state.error, axis=1)
      x = np.concatenate([g[n].reshape(4, -1) for n in sorted(SHAPES)], 1)
      o = np.concatenate([out[n].reshape(4, -1) for n in sorted(SHAPES)], 1)
      np.testing.assert_allclose(x + error, o + new, atol=2e-5)
      error = new
    if step >= 4:
      mean = g["low"].astype(np.float64).mean(0)
      np.testing.assert_allclose(out["low"][0], mean, atol=1e-4)
      # Masked columns stay zero in the warm-start Q.
      assert not state.q[1][0][:, 1:].any()
  assert runner.traces == 1  # rank changes did not recompile


def test_each_matrix_travels_with_its_own_rank():
  # Ranks 1 and 3 (width 4) fit the uniform rank-2 buffers: Ps 24 + 3 * 16
  # <= 2 * (24 + 16), Qs 20 + 3 * 12 <= 2 * (20 + 12). Each matrix's live
  # columns must be packed and unpacked with its own rank (not another
  # matrix's), so the step is rank-r PowerSGD on each.
  shapes = {"a": (24, 20), "b": (16, 12)}
  tx = lg.lgreco(rank=2, start_iter=0, error_feedback=False, key=5)
  runner = Runner(tx, zeros_like_params(shapes), 4)
  rng = np.random.default_rng(7)
  qs = tuple(rng.standard_normal((m, 4)).astype(np.float32) for m in (20, 12))
  ranks = np.array([1, 3], np.int32)
  mats = [
    psgd.Matrix(i, n, m, 4, np.dtype(np.float32))
    for i, (n, m) in enumerate(shapes.values())
  ]
  assert lg.fits_wire(ranks, mats, 2)
  runner.state = runner.state._replace(q=qs, ranks=ranks)
  grads = stacked(rng, shapes, 4)
  out, state = runner.step(grads)
  assert_replicas_equal(out)
  for name, q, r in zip(shapes, qs, ranks):
    want, _ = np_power_round(grads[name], q[:, :r], 1e-8)
    np.testing.assert_allclose(out[name][0], want, rtol=1e-4, atol=1e-5)
  assert state.ranks[0].tolist() == [1, 3]


@pytest.mark.parametrize("start_iter", [0, 5])
def test_wire_never_exceeds_uniform_rank_powersgd(start_iter):
  # The compiled program holds every step: warm-up (start_iter > 0), the
  # compressed steps and the rank decision.
  compiled = compiled_flax_step(lg.lgreco(rank=2, start_iter=start_iter))
  uniform = compiled_flax_step(
    gqsgd_jax.powersgd(rank=2, start_iter=start_iter)
  )
  p = (64 + 256) * 2  # the live columns, packed to the uniform ranks' size
  q = (256 + 10) * 2
  vectors = 256 + 10
  sums = sorted(
    c.elements
    for c in hlo.collectives(compiled.as_text())
    if c.op == "all-reduce" and c.reducer == "sum"
  )
  warmup = [64 * 256 + 256 * 10 + vectors] if start_iter else []
  assert sums == sorted([p, q, vectors] + warmup)
  report = gqsgd_jax.wire_report(compiled)
  assert report.payload_bytes <= gqsgd_jax.wire_report(uniform).payload_bytes
  # The only other collective: worker 0's L x C error table, by a max.
  assert report.scale_bytes == 2 * 4 * 4


def test_rank_choices_that_overflow_a_side_fall_back_to_uniform():
  mats = [
    psgd.Matrix(0, 100, 10, 4, np.dtype(np.float32)),
    psgd.Matrix(1, 10, 100, 4, np.dtype(np.float32)),
  ]
  # Same total size as the uniform ranks (2, 2), but the Ps need 310 > 220.
  assert not lg.fits_wire(np.array([3, 1]), mats, 2)
  assert lg.fits_wire(np.array([2, 2]), mats, 2)
  assert lg.fits_wire(np.array([1, 3]), mats[:1] + [mats[0]], 2)
  # Ranks beyond the static width count at the width.
  assert lg.fits_wire(
    np.array([2, 9]),
    mats[:1] + [psgd.Matrix(1, 10, 100, 2, np.dtype(np.float32))],
    2,
  )


@pytest.mark.parametrize(
  "kwargs,name",
  [
    (dict(rank=0), "rank"),
    (dict(adjust_every=0), "adjust_every"),
    (dict(gamma=0.0 - 1), "gamma"),
    (dict(gamma=1.5), "gamma"),
    (dict(beta=0.5), "beta"),
    (dict(alpha=0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(error_method="qr"), "error_method"),
    (dict(aggregation="l1"), "aggregation"),
    (dict(inputs="all"), "inputs"),
    (dict(acc_iters=200), "acc_iters"),
    (dict(power_iters=0), "power_iters"),
    (dict(num_buckets=0), "num_buckets"),
    (dict(start_iter=-2), "start_iter"),
    (dict(min_compression_rate=-1), "min_compression_rate"),
    (dict(orthogonalization_epsilon=-1), "orthogonalization_epsilon"),
    (dict(warm_start="no"), "warm_start"),
  ],
)
def test_bad_arguments_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name):
    lg.lgreco(**kwargs)


def test_state_layout():
  tx = lg.lgreco(rank=4, gamma=0.25, beta=4)  # candidates 1..16
  params = {
    "a": jnp.zeros((64, 48)),
    "b": jnp.zeros((12, 200)),
    "c": jnp.zeros((8,)),
  }
  state = tx.init(params)
  assert [q.shape for q in state.q] == [(48, 16), (200, 12)]
  assert state.ranks.tolist() == [4, 4]
  assert not np.asarray(state.q[0])[:, 4:].any()  # only r0 columns live
  assert [a.shape for a in state.acc] == [(64 * 48,), (12 * 200,)]
