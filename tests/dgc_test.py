"""Tests of dgc: momentum correction, masking, the (index, value) wire."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import gqsgd_jax
from gqsgd_jax._src import hlo
from gqsgd_jax._src.baselines import dgc as dgc_lib

from _utils import assert_replicas_equal
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh
from _utils import mlp_step
from _utils import per_worker_step

_W = 4


def _stack(tree, num_workers):
  return jax.tree.map(
    lambda x: jnp.broadcast_to(x, (num_workers,) + jnp.shape(x)), tree
  )


def _run(tx, grads, state, *, mode="shard_map"):
  """(per-worker updates, per-worker state), as numpy trees."""
  num_workers = jax.tree.leaves(grads)[0].shape[0]
  host = lambda t: jax.tree.map(np.asarray, t)
  out = per_worker_step(tx, num_workers, mode)(host(grads), host(state))
  return host(jax.block_until_ready(out))


def _init(tx, grads):
  return _stack(
    tx.init(jax.tree.map(lambda x: x[0], grads)),
    jax.tree.leaves(grads)[0].shape[0],
  )


def _grads(num_workers, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {
    "conv": jax.random.normal(ks[0], (num_workers, 3, 3, 8, 16)),
    "half": jax.random.normal(ks[1], (num_workers, 40, 30)).astype(jnp.float16),
    "bias": jax.random.normal(ks[2], (num_workers, 33)).astype(jnp.bfloat16),
    "scalar": jax.random.normal(ks[3], (num_workers,)),
    "empty": jnp.zeros((num_workers, 0, 4)),
  }


# Leaf order of the dict (bias, conv, empty, half, scalar) in the state.
_CONV, _HALF = 1, 3


def _oracle(grads_seq, *, density, momentum):
  """DGC in NumPy (float32 values): returns the outputs and final u, v."""
  names = sorted(grads_seq[0])
  w = grads_seq[0][names[0]].shape[0]
  comp = {"conv", "half", "w"} & set(names)
  u = {k: np.zeros((w, grads_seq[0][k][0].size), np.float32) for k in names}
  v = {k: np.zeros_like(u[k]) for k in comp}
  outs = []
  for grads in grads_seq:
    out = {}
    for k in names:
      g = np.asarray(grads[k], np.float32).reshape(w, -1)
      u[k] = np.float32(momentum) * u[k] + g
      if k not in comp:
        out[k] = u[k].mean(0)
        continue
      n = g.shape[1]
      kk = dgc_lib.num_selected(n, density)
      v[k] = v[k] + u[k]
      total = np.zeros(n, np.float32)
      for i in range(w):
        idx = np.argsort(-np.abs(v[k][i]), kind="stable")[:kk]
        total[idx] += v[k][i][idx]
        v[k][i][idx] = 0
        u[k][i][idx] = 0
      out[k] = total / np.float32(w)
    outs.append(out)
  return outs, u, v


def test_matches_numpy_dgc_over_three_steps():
  density, momentum = 0.02, 0.9
  tx = dgc_lib.dgc(
    density=density, momentum=momentum, min_size=512, value_dtype=jnp.float32
  )
  seq = [_grads(_W, seed) for seed in range(3)]
  state = _init(tx, seq[0])
  want, u, v = _oracle(seq, density=density, momentum=momentum)
  for grads, expect in zip(seq, want):
    out, state = _run(tx, grads, state)
    for k, leaf in out.items():
      assert leaf.dtype == grads[k].dtype
      tol = 1e-5 if leaf.dtype == np.float32 else 1e-2  # f16/bf16 output
      np.testing.assert_allclose(
        leaf[0].reshape(-1).astype(np.float32),
        expect[k],
        rtol=tol,
        atol=tol,
        err_msg=k,
      )
  # Momentum-factor masking: u and v are zero exactly where values left.
  for k, i in (("conv", _CONV), ("half", _HALF)):
    np.testing.assert_allclose(state.momentum[i], u[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.velocity[i], v[k], rtol=1e-5, atol=1e-6)
    assert np.all((state.velocity[i] == 0) == (state.momentum[i] == 0))
    k_sel = dgc_lib.num_selected(state.velocity[i].shape[1], density)
    assert np.all(np.sum(state.velocity[i] == 0, axis=1) >= k_sel)


_TX = dgc_lib.dgc(density=0.02, min_size=512)  # bfloat16 values


def test_replicas_identical_and_bf16_rounding_stays_in_velocity():
  grads = _grads(_W)
  state = _init(_TX, grads)
  results = {}
  for mode in ("shard_map", "pmap"):
    out, state1 = _run(_TX, grads, state, mode=mode)
    assert_replicas_equal(out)
    out2, state2 = _run(_TX, grads, state1, mode=mode)
    assert_replicas_equal(out2)
    results[mode] = (out, state1, out2, state2)
  assert_trees_bitwise_equal(results["shard_map"], results["pmap"])
  out, state1, _, _ = results["shard_map"]
  assert isinstance(state1, dgc_lib.DGCState)
  # Unused f32[1] placeholders where there is nothing to remember (orbax
  # saves no zero-size array).
  assert [m.shape[1] for m in state1.momentum] == [33, 1152, 1, 1200, 1]
  assert [v.shape[1] for v in state1.velocity] == [1, 1152, 1, 1200, 1]
  # First step from zero state: u = v = g. Each worker sent bf16(g) at its
  # k largest |g|, kept g - bf16(g) in v and cleared u there.
  g = np.asarray(grads["conv"]).reshape(_W, -1)
  k = dgc_lib.num_selected(g.shape[1], 0.02)
  total = np.zeros(g.shape[1], np.float32)
  for i in range(_W):
    idx = np.argsort(-np.abs(g[i]), kind="stable")[:k]
    sent = g[i][idx].astype(jnp.bfloat16).astype(np.float32)
    total[idx] += sent
    np.testing.assert_array_equal(
      state1.velocity[_CONV][i][idx], g[i][idx] - sent
    )
    assert np.all(state1.momentum[_CONV][i][idx] == 0)
    rest = np.setdiff1d(np.arange(g.shape[1]), idx)
    np.testing.assert_array_equal(state1.momentum[_CONV][i][rest], g[i][rest])
  np.testing.assert_allclose(out["conv"][0].reshape(-1), total / _W, rtol=1e-6)


def test_nonfinite_zeros_and_dtypes():
  grads = _grads(_W)
  zeros = jax.tree.map(jnp.zeros_like, grads)
  out, state = _run(_TX, zeros, _init(_TX, zeros))
  for k, leaf in out.items():
    assert leaf.dtype == grads[k].dtype and np.all(leaf == 0)
  bad = {
    **grads,
    "conv": grads["conv"].at[1, 0, 0, 0, 3].set(jnp.nan),
    "half": grads["half"].at[2, 7, 7].set(jnp.inf),
  }
  out, state = _run(_TX, bad, _init(_TX, bad))
  # Non-finite values rank first, so they reach the output ...
  assert np.isnan(out["conv"][0, 0, 0, 0, 3])
  assert not np.isfinite(out["half"][0, 7, 7])
  assert np.sum(~np.isfinite(out["conv"])) == _W  # that coordinate only
  # ... and leave no trace in the state.
  for leaf in jax.tree.leaves((state.momentum, state.velocity)):
    assert np.all(np.isfinite(leaf))


def test_sampled_threshold_sends_a_prefix_of_the_top_k():
  v = jax.random.normal(jax.random.PRNGKey(1), (30000,))
  k = 300
  select = jax.jit(lambda v, key: dgc_lib.select(v, k, key, "sampled", 0.01))
  order = np.argsort(-np.abs(np.asarray(v)), kind="stable")
  for seed in range(3):
    idx, valid = select(v, jax.random.PRNGKey(seed))
    chosen = np.asarray(idx)[np.asarray(valid)]
    assert 0.5 * k <= chosen.size <= k
    assert set(chosen.tolist()) == set(order[: chosen.size].tolist())


def test_hlo_wire_bytes_are_k_index_value_pairs():
  w, density = 8, 0.01
  compiled, params = mlp_step(dgc_lib.dgc(density=density), w)
  k = dgc_lib.num_selected(64 * 256, density) + dgc_lib.num_selected(
    256 * 10, density
  )
  assert k == 164 + 26
  report = gqsgd_jax.wire_report(compiled)
  coll = {(c.op, c.dtype): c.bytes for c in hlo.collectives(compiled.as_text())}
  # all_gather results: W × k int32 indices and W × k bf16 values (as
  # uint16 bits); the biases' f32 momentum goes through one all-reduce.
  assert coll[("all-gather", "s32")] == w * k * 4
  assert coll[("all-gather", "u16")] == w * k * 2
  assert report.by_op == {"all-gather": w * k * 6, "all-reduce": 4 * (256 + 10)}
  assert dgc_lib.dgc_wire_bytes(params, density=density) == dict(
    sparse_bytes=k * 6, dense_bytes=4 * (256 + 10)
  )


def test_least_squares_converges_close_to_momentum_sgd():
  # W = 4 workers with their own rows of A X = B (X: 32 x 32, 1024
  # elements, compressed); full-batch gradients. DGC at density 5 % with
  # momentum 0.9 inside, then plain SGD, must come within 5 % of the loss
  # of uncompressed momentum SGD (same learning rate and momentum;
  # measured: 2 % above).
  num_workers, rows, d, steps, lr = 4, 64, 32, 300, 0.02
  ka, kx, kn = jax.random.split(jax.random.PRNGKey(7), 3)
  a = jax.random.normal(ka, (num_workers, rows, d))
  x_true = jax.random.normal(kx, (d, d))
  b = a @ x_true + 0.1 * jax.random.normal(kn, (num_workers, rows, d))
  mesh = data_mesh(num_workers)

  def loss(x, a, b):
    return 0.5 * jnp.mean(jnp.sum((a @ x - b) ** 2, axis=-1))

  def train(tx, per_worker_state):
    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
    def run(a, b):
      a, b = a[0], b[0]
      x = jnp.zeros((d, d))

      def body(carry, _):
        x, state = carry
        grad = jax.grad(loss)(gqsgd_jax.varying(x, "data"), a, b)
        updates, state = tx.update(grad, state, x)
        return (optax.apply_updates(x, updates), state), None

      state = tx.init(x)
      if per_worker_state:  # DGC's u and v differ per worker
        state = gqsgd_jax.varying(state, "data")
      (x, _), _ = jax.lax.scan(body, (x, state), None, length=steps)
      return x

    x = run(a, b)
    return float(jnp.mean(jax.vmap(loss, (None, 0, 0))(x, a, b)))

  reference = train(
    optax.chain(gqsgd_jax.psum_mean(), optax.sgd(lr, momentum=0.9)), False
  )
  compressed = train(
    optax.chain(dgc_lib.dgc(density=0.05, momentum=0.9), optax.sgd(lr)), True
  )
  print(f"loss: momentum SGD {reference:.4f} DGC {compressed:.4f}")
  assert compressed <= reference * 1.05


def test_bad_arguments_name_the_argument():
  for density in (0, 1.5, -1, "x", True):
    with pytest.raises(ValueError, match="density"):
      dgc_lib.dgc(density=density)
  for momentum in (1.0, -0.1, "0.9"):
    with pytest.raises(ValueError, match="momentum"):
      dgc_lib.dgc(momentum=momentum)
  with pytest.raises(ValueError, match="value_dtype"):
    dgc_lib.dgc(value_dtype=jnp.int8)
  with pytest.raises(ValueError, match="value_dtype"):
    dgc_lib.dgc(value_dtype="nonsense")
  with pytest.raises(ValueError, match="selection"):
    dgc_lib.dgc(selection="random")
  with pytest.raises(ValueError, match="sample_ratio"):
    dgc_lib.dgc(sample_ratio=2)
  with pytest.raises(ValueError, match="min_size"):
    dgc_lib.dgc(min_size=-3)
  with pytest.raises(ValueError, match="predicate"):
    dgc_lib.dgc(predicate="conv")
  with pytest.raises(ValueError, match="key"):
    dgc_lib.dgc(key=jnp.zeros(5, jnp.uint32))
  tx = dgc_lib.dgc()
  grads = {"w": jnp.ones((64, 32))}
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    jax.jit(tx.update)(grads, tx.init(grads))
  with pytest.raises(ValueError, match="DGCState does not match"):
    _run(
      tx,
      {"w": jnp.ones((2, 64, 32))},
      _stack(tx.init({"w": jnp.ones((32, 60))}), 2),
    )
  with pytest.raises(TypeError, match=r"\['n'\].*int32"):
    _run(
      tx,
      {"n": jnp.ones((2, 3), jnp.int32)},
      _stack(tx.init({"n": jnp.ones(3, jnp.int32)}), 2),
    )


def _selection_data(kind, n, rng):
  x = rng.standard_normal(n)
  if kind == "ties":
    x = np.round(x)
  if kind == "nonfinite":
    x[rng.integers(0, n, 20)] = np.inf
    x[rng.integers(0, n, 20)] = -np.inf
    x[rng.integers(0, n, 20)] = np.nan
  if kind == "sparse":
    x = x * (rng.random(n) < 0.003)
  if kind == "zeros":
    x = 0 * x
  return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("sigmas", [5.0, 0.0])
def test_candidate_selection_is_the_top_k_set(sigmas, monkeypatch):
  # From _SAMPLE_MIN elements the exact selection searches candidates
  # above a sample's bound: the same set as lax.top_k (ties by index), also
  # when the bound misses (no sigmas) or the candidates overflow their
  # slots (ties, fewer non-zeros than k) and the search runs on all.
  monkeypatch.setattr(dgc_lib, "_SAMPLE_SIGMAS", sigmas)
  rng = np.random.default_rng(3)
  kinds = ("normal", "ties", "nonfinite", "sparse", "zeros")
  for n in (dgc_lib._SAMPLE_MIN, 3 * 2**14 + 5):
    data = {kind: _selection_data(kind, n, rng) for kind in kinds}
    for density in (1e-5, 0.001, 0.01, 0.3, 1.0):
      k = dgc_lib.num_selected(n, density)
      # A fresh function: traced again with the patched constant.
      select = jax.jit(lambda v, k=k: dgc_lib.select(v, k, None, "exact", 0))
      for kind, v in data.items():
        scores = jnp.where(jnp.isfinite(v), jnp.abs(v), jnp.inf)
        want = np.sort(np.asarray(jax.lax.top_k(scores, k)[1]))
        idx, valid = select(v)
        assert np.asarray(valid).all()
        np.testing.assert_array_equal(
          np.asarray(idx), want, err_msg=f"{kind} n={n} k={k}"
        )


def test_large_leaf_matches_numpy_dgc_on_every_replica():
  # A leaf of at least _SAMPLE_MIN elements takes the candidate selection
  # inside the update (a lax.cond on each worker's own data).
  grads = {
    "w": jax.random.normal(
      jax.random.PRNGKey(5), (_W, 40, dgc_lib._SAMPLE_MIN // 32)
    )
  }
  tx = dgc_lib.dgc(density=0.01, momentum=0.9, value_dtype=jnp.float32)
  want, u, v = _oracle([grads, grads], density=0.01, momentum=0.9)
  for mode in ("shard_map", "pmap"):
    state = _init(tx, grads)
    for expect in want:
      out, state = _run(tx, grads, state, mode=mode)
      assert_replicas_equal(out)
      np.testing.assert_allclose(
        out["w"][0].reshape(-1), expect["w"], rtol=1e-5, atol=1e-6
      )
    np.testing.assert_allclose(state.momentum[0], u["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.velocity[0], v["w"], rtol=1e-5, atol=1e-6)


def test_sampled_selection_drops_unused_slots():
  # The sampled threshold sends at most k pairs (unused slots: index n,
  # value 0); the receivers' one accumulator for all leaves puts each
  # leaf's pairs at its own offset. Momentum 0 from zero state: each worker
  # sends g exactly where its u was cleared.
  grads = _grads(_W, seed=4)
  tx = dgc_lib.dgc(
    density=0.05,
    momentum=0.0,
    min_size=512,
    value_dtype=jnp.float32,
    selection="sampled",
    sample_ratio=0.2,
  )
  out, state = _run(tx, grads, _init(tx, grads))
  assert_replicas_equal(out)
  for k, i in (("conv", _CONV), ("half", _HALF)):
    g = np.asarray(grads[k], np.float32).reshape(_W, -1)
    sent = (state.momentum[i] == 0) & (g != 0)
    assert sent.sum() < _W * dgc_lib.num_selected(g.shape[1], 0.05)
    np.testing.assert_allclose(
      out[k][0].reshape(-1).astype(np.float32),
      np.sum(np.where(sent, g, 0), axis=0) / _W,
      rtol=1e-2,
      atol=1e-3,
      err_msg=k,
    )
