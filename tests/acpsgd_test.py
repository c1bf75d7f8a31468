"""Tests of acpsgd: the spec model, alternation, EF, zeros, replicas, wire."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqsgd_jax
from gqsgd_jax._src import hlo
from gqsgd_jax._src.baselines import acpsgd as acp
from gqsgd_jax._src.baselines import orthogonalize as orth

from _lowrank_utils import compiled_flax_step
from _lowrank_utils import low_rank_steps
from _lowrank_utils import np_orthogonalize
from _lowrank_utils import Runner
from _lowrank_utils import stacked
from _lowrank_utils import zeros_like_params
from _utils import assert_replicas_equal

# Matrices (a conv kernel, two same-shaped ones, a rank-limited 3 x 40) and
# leaves that are not: a bias and a scalar.
SHAPES = {
  "conv": (8, 4, 3, 3),
  "w1": (24, 16),
  "w2": (24, 16),
  "thin": (3, 40),
  "b": (16,),
  "s": (),
}
MATRICES = ("conv", "thin", "w1", "w2")  # leaf order


class _AcpModel:
  """Float64 model of ACP-SGD on {name: [W, *shape]} gradients."""

  def __init__(self, q0: dict, epsilon=orth.DEFAULT_EPSILON, ef=True):
    self.q = {n: np.asarray(q, np.float64) for n, q in q0.items()}
    self.p = {}
    self.e = {}
    self.ef = ef
    self.epsilon = epsilon
    self.count = 0

  def step(self, g):
    out = {}
    for n, x in g.items():
      x = x.astype(np.float64)
      if n not in self.q:
        out[n] = x.mean(0)
        continue
      w, shape = len(x), x.shape[1:]
      x = x.reshape(w, shape[0], -1) + (self.e.get(n, 0) if self.ef else 0)
      if self.count % 2 == 0:  # P-step
        q = np_orthogonalize(self.q[n], self.epsilon)
        ps = [xi @ q for xi in x]
        self.e[n] = np.stack([xi - pi @ q.T for xi, pi in zip(x, ps)])
        self.p[n], self.q[n] = sum(ps), q
      else:  # Q-step
        p = np_orthogonalize(self.p[n], self.epsilon)
        qs = [xi.T @ p for xi in x]
        self.e[n] = np.stack([xi - p @ qi.T for xi, qi in zip(x, qs)])
        self.p[n], self.q[n] = p, sum(qs)
      out[n] = (self.p[n] @ self.q[n].T / w).reshape(shape)
    self.count += 1
    return out


def _runner(tx, num_workers=4, mode="shard_map", shapes=None):
  return Runner(tx, zeros_like_params(shapes or SHAPES), num_workers, mode)


@pytest.mark.parametrize("rank", [2, 4], ids=["gram-schmidt", "qr"])
def test_alternates_p_and_q_steps_as_the_spec_model(rank):
  tx = acp.acpsgd(rank=rank)
  params = zeros_like_params(SHAPES)
  q0 = dict(zip(MATRICES, jax.jit(tx.init)(params).q))
  model = _AcpModel(q0)
  runner = _runner(tx)
  rng = np.random.default_rng(rank)
  for step in range(5):
    g = stacked(rng, SHAPES, 4)
    out, state = runner.step(g)
    want = model.step(g)
    for n in SHAPES:
      np.testing.assert_allclose(
        out[n][0], want[n], atol=3e-5, err_msg=f"{n} step {step}"
      )
    for j, n in enumerate(MATRICES):
      # The all-reduced factor of this step and the orthonormal other one.
      np.testing.assert_allclose(state.p[j][0], model.p[n], atol=3e-5)
      np.testing.assert_allclose(state.q[j][0], model.q[n], atol=3e-5)
      np.testing.assert_allclose(
        state.error[j].reshape(4, -1), model.e[n].reshape(4, -1), atol=3e-5
      )
    assert state.count[0] == step + 1
  assert runner.traces == 1  # both parities in one compiled function


@pytest.mark.parametrize("ef", [False, True], ids=["no-ef", "ef"])
def test_exact_recovery_when_the_mean_has_rank_at_most_r(ef):
  # The mean stays in fixed rank-r column/row spaces U, V. The first P-step
  # finds U; then without EF every step is exact (P spans U, Q spans V).
  # With EF the P-step residual X (I - Q Q^T) has rows outside V, so only
  # the Q-steps (P spans U) are exact: each delivers the mean plus the last
  # residual, so the running sum of outputs is exact after every Q-step.
  rank = 2
  shapes = {k: v for k, v in SHAPES.items() if k != "thin"}
  runner = _runner(acp.acpsgd(rank=rank, error_feedback=ef), shapes=shapes)
  steps = low_rank_steps(shapes, ("conv", "w1", "w2"), 7, 4, rank)
  sent = dict.fromkeys(shapes, 0.0)
  total = dict.fromkeys(shapes, 0.0)
  for step in range(5):
    g = next(steps)
    out, _ = runner.step(g)
    for k in shapes:
      mean = g[k].astype(np.float64).mean(0)
      sent[k] = sent[k] + out[k][0]
      total[k] = total[k] + mean
      if step == 0:
        continue
      if not ef:
        np.testing.assert_allclose(
          out[k][0], mean, atol=2e-5 * np.abs(mean).max(), err_msg=k
        )
      elif step % 2 == 1:
        np.testing.assert_allclose(
          sent[k], total[k], atol=2e-5 * np.abs(total[k]).max(), err_msg=k
        )


def test_error_feedback_identity_on_average():
  # Per worker x_i = local approximation + e_i; averaged over workers the
  # local approximations are the output: mean(g + e_old) = out + mean(e).
  runner = _runner(acp.acpsgd(rank=1))
  rng = np.random.default_rng(3)
  error = dict.fromkeys(MATRICES, 0.0)
  for _ in range(4):
    g = stacked(rng, SHAPES, 4)
    out, state = runner.step(g)
    for j, n in enumerate(MATRICES):
      new = state.error[j].reshape((4,) + SHAPES[n])
      np.testing.assert_allclose(
        (g[n] + error[n]).mean(0), out[n][0] + new.mean(0), atol=2e-5
      )
      error[n] = new
    np.testing.assert_allclose(out["b"][0], g["b"].mean(0), atol=1e-6)


def test_zero_layers_give_no_nan_and_recover():
  runner = _runner(acp.acpsgd(rank=2, orthogonalization_epsilon=0.0), 2)
  rng = np.random.default_rng(4)
  for step in range(7):
    g = stacked(rng, SHAPES, 2)
    if step < 3:  # w1 frozen for a P-, a Q- and a P-step
      g["w1"] = np.zeros_like(g["w1"])
    out, state = runner.step(g)
    for leaf in jax.tree.leaves((out, state)):
      assert np.isfinite(leaf).all()
    if step < 3:
      assert not out["w1"].any()
  assert np.abs(out["w1"][0]).max() > 0.1  # the subspace came back


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_replicas_are_bitwise_identical_from_a_shared_key(mode):
  runner = _runner(acp.acpsgd(rank=2, key=5), 4, mode)
  rng = np.random.default_rng(5)
  init = runner.state
  if mode == "pmap":  # every device drew the same initial Q
    assert_replicas_equal(init.q)
  for _ in range(3):
    out, state = runner.step(stacked(rng, SHAPES, 4))
    assert_replicas_equal(out)
    assert_replicas_equal((state.p, state.q, state.count))
  params = zeros_like_params(SHAPES)
  q5 = acp.acpsgd(rank=2, key=5).init(params).q
  q6 = acp.acpsgd(rank=2, key=6).init(params).q
  assert not np.array_equal(q5[0], q6[0])


def test_wire_bytes_are_one_factor_per_step():
  compiled = compiled_flax_step(acp.acpsgd(rank=4))
  mats = [(64, 256), (256, 10)]
  vectors = 256 + 10
  p_step = sum(n * 4 for n, _ in mats) + vectors
  q_step = sum(m * 4 for _, m in mats) + vectors
  # §8.4: 4 sum(n r) (P-step) or 4 sum(m r) (Q-step) + 4 x the vectors, in
  # one all-reduce each; both branches of the parity cond are compiled in.
  sizes = sorted(
    c.elements
    for c in hlo.collectives(compiled.as_text())
    if c.op == "all-reduce"
  )
  assert sizes == sorted([p_step, q_step])
  report = gqsgd_jax.wire_report(compiled)
  assert report.total_bytes == 4 * (p_step + q_step)


def test_dtypes_and_empty_leaves():
  params = {
    "w": jnp.zeros((16, 8), jnp.bfloat16),
    "e": jnp.zeros((0, 4)),
    "v": jnp.zeros((5,), jnp.float16),
  }
  runner = Runner(acp.acpsgd(rank=2), params, 2)
  rng = np.random.default_rng(6)
  g = {
    "w": jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.bfloat16),
    "e": jnp.zeros((2, 0, 4)),
    "v": jnp.asarray(rng.standard_normal((2, 5)), jnp.float16),
  }
  out, _ = runner.step(g)
  assert out["w"].dtype == jnp.bfloat16 and out["v"].dtype == np.float16
  assert out["e"].shape == (2, 0, 4)
  want = np.asarray(g["v"], np.float32).mean(0)
  np.testing.assert_allclose(out["v"][0], want, rtol=1e-3)


@pytest.mark.parametrize(
  "kwargs,name",
  [
    (dict(rank=0), "rank"),
    (dict(rank=2.0), "rank"),
    (dict(orthogonalization_epsilon=-1.0), "orthogonalization_epsilon"),
    (dict(key=jnp.zeros(3)), "key"),
    (dict(error_feedback=0), "error_feedback"),
  ],
)
def test_bad_arguments_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name):
    acp.acpsgd(**kwargs)


def test_unbound_axis_is_reported():
  tx = acp.acpsgd()
  params = {"w": jnp.zeros((8, 8))}
  with pytest.raises(ValueError, match="axis_name"):
    tx.update(params, tx.init(params))


def test_matrix_count():
  # Every matrix is compressed, at r = min(rank, n, m).
  tx = acp.acpsgd(rank=4)
  state = tx.init(zeros_like_params(SHAPES))
  assert [q.shape for q in state.q] == [(36, 4), (40, 3), (16, 4), (16, 4)]
  assert [p.shape for p in state.p] == [(8, 4), (3, 3), (24, 4), (24, 4)]
  assert [e.shape for e in state.error] == [
    (math.prod(SHAPES[n]),) for n in MATRICES
  ]


def test_a_nonfinite_step_gives_nan_and_keeps_the_memory():
  runner = _runner(acp.acpsgd(rank=2), 4)
  rng = np.random.default_rng(6)
  j = [k for k in sorted(SHAPES) if len(SHAPES[k]) >= 2].index("w1")
  _, before = runner.step(stacked(rng, SHAPES, 4))
  for bad in (np.inf, np.nan):  # a Q-step, then a P-step
    g = stacked(rng, SHAPES, 4)
    g["w1"][2, -1, -1] = bad
    out, after = runner.step(g)
    assert np.isnan(out["w1"]).all()  # every worker, every coordinate
    assert np.isfinite(out["w2"]).all()
    for field in ("error", "p", "q"):
      np.testing.assert_array_equal(
        getattr(after, field)[j], getattr(before, field)[j]
      )
    before = after
  out, state = runner.step(stacked(rng, SHAPES, 4))
  for leaf in jax.tree.leaves((out, state)):
    assert np.isfinite(leaf).all()
