"""Tests of jointsq: the MCKP greedy, the wire format, EF and the transform."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import gqsgd_jax
from gqsgd_jax._src import prng
from gqsgd_jax._src.baselines import jointsq as jsq

from _utils import assert_replicas_equal
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh
from _utils import mlp_step
from _utils import per_worker_step


def _stack(tree, num_workers):
  return jax.tree.map(
    lambda x: jnp.broadcast_to(x, (num_workers,) + jnp.shape(x)), tree
  )


def _run(tx, grads, state, *, mode="shard_map"):
  """tx.update on per-worker grads and state (leading axis = worker).

  Returns (per-worker updates, per-worker state); under shard_map the
  updates also leave through out_specs=P(), which type-checks that they are
  replicated.
  """
  num_workers = jax.tree.leaves(grads)[0].shape[0]
  step = per_worker_step(tx, num_workers, mode)
  # Host arrays in, so that every call hits the same compilation (a state
  # returned by the previous step would arrive with another sharding).
  host = lambda t: jax.tree.map(np.asarray, t)
  return jax.block_until_ready(step(host(grads), host(state)))


def _oracle_classes(profits, n, budget):
  """LP-greedy on sorted profits in NumPy: items by profit (ties: item
  index), the longest prefix of positive-profit items within the budget."""
  profits = np.asarray(profits)
  order = np.lexsort((np.arange(3 * n), -profits))
  weights = np.asarray(jsq.ITEM_WEIGHT)[order // n]
  take = (profits[order] > 0) & (np.cumsum(weights) <= budget)
  cls = np.zeros(n, np.int64)
  np.add.at(cls, order[take] % n, 1)
  return cls, order, int(take.sum())


def _values(n, seed, kind="normal"):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n,)))
  if kind == "ties":  # many equal magnitudes and zeros
    x = np.round(x * 2) / 2
  return jnp.asarray(x, jnp.float32)


# Encode/decode compiled once per static layout, shared by the tests.
_encode = jax.jit(
  jsq.encode, static_argnums=1, static_argnames=("selection", "sample_ratio")
)
_decode = jax.jit(jsq.decode, static_argnums=1)
_select = jax.jit(
  jsq.select, static_argnums=1, static_argnames=("selection", "sample_ratio")
)
_KEY = jax.random.PRNGKey(5)

_GREEDY = [
  (1, 0.5, "normal"),
  (7, 0.3, "ties"),
  (100, 0.032, "normal"),
  (1000, 0.01, "ties"),
  (50, 1.0, "ties"),
  (4096, 0.032, "normal"),
]


def test_greedy_equals_lp_greedy_on_sorted_profits():
  for n, ratio, kind in _GREEDY:
    v = _values(n, n, kind)
    layout = jsq.make_layout(n, ratio)
    profits = np.asarray(jax.jit(jsq.item_profits)(v))
    m = np.abs(np.asarray(v)).max()
    want = np.asarray(jsq.PROFIT_DENSITY)[:, None] * (np.asarray(v) / m) ** 2
    np.testing.assert_allclose(profits, want.reshape(-1), rtol=1e-6)
    cls = np.asarray(_select(v, layout, _KEY))
    oracle, _, _ = _oracle_classes(profits, n, layout.budget_bits)
    np.testing.assert_array_equal(cls, oracle, err_msg=f"n={n} ρ={ratio}")
    bits = np.asarray(jsq.CLASS_BITS)[cls]
    assert bits.sum() <= layout.budget_bits
    # A larger magnitude never gets fewer bits (no positional bias).
    order = np.argsort(-np.abs(np.asarray(v)), kind="stable")
    assert np.all(np.diff(bits[order]) <= 0)


@pytest.mark.parametrize("kind", ["normal", "ties", "heavy", "sparse"])
def test_bracketed_cut_equals_the_oracle_on_large_tensors(kind, monkeypatch):
  # From _SAMPLE_MIN elements the cut is bracketed on a sample and bisected
  # on the candidates near it; the classes must be the exact greedy's, also
  # when the bracket fails (a zero margin) or the candidates overflow.
  n = 3 * 2**14 + 5
  assert n >= jsq._SAMPLE_MIN
  x = np.asarray(_values(n, 11, "ties" if kind == "ties" else "normal"))
  if kind == "heavy":
    x = x**5
  if kind == "sparse":
    x = x * (np.arange(n) % 37 == 0)
  v = jnp.asarray(x, jnp.float32)
  profits = np.asarray(jax.jit(jsq.item_profits)(v))
  for ratio in (0.001, 0.032, 0.3):
    layout = jsq.make_layout(n, ratio)
    oracle, _, _ = _oracle_classes(profits, n, layout.budget_bits)
    for margin, divisor in ((0.04, 16), (0.0, 16), (0.04, n)):
      monkeypatch.setattr(jsq, "_SAMPLE_MARGIN", margin)
      monkeypatch.setattr(jsq, "_CANDIDATE_DIVISOR", divisor)
      # A fresh function: traced again with the patched constants.
      cls = np.asarray(jax.jit(lambda v, lay=layout: jsq.select(v, lay))(v))
      np.testing.assert_array_equal(
        cls, oracle, err_msg=f"{kind} ρ={ratio} margin={margin} /{divisor}"
      )


def test_cut_is_by_profit_not_by_position():
  # Magnitudes grow with the index: the reference's index-order cut would
  # spend the budget on the small, low-index elements (B-JSQ-3).
  n = 512
  v = jnp.linspace(0.01, 1.0, n)
  layout = jsq.make_layout(n, 0.01)
  cls = np.asarray(_select(v, layout, _KEY))
  chosen = np.flatnonzero(cls)
  assert chosen.size > 0 and chosen.min() > n - 2 * chosen.size
  assert (np.asarray(jsq.CLASS_BITS)[cls]).sum() <= layout.budget_bits


def test_sampled_selection_is_a_prefix_of_the_exact_order():
  n = 20000
  v = _values(n, 3)
  profits = jsq.item_profits(v)
  for ratio in (0.001, 0.032, 0.2):
    layout = jsq.make_layout(n, ratio)
    _, order, exact_items = _oracle_classes(profits, n, layout.budget_bits)
    for seed in range(3):
      cls = np.asarray(
        _select(
          v,
          layout,
          jax.random.PRNGKey(seed),
          selection="sampled",
          sample_ratio=0.01,
        )
      )
      taken = int(cls.sum())
      items = {
        int(t) * n + j for j in np.flatnonzero(cls) for t in range(cls[j])
      }
      assert items == set(order[:taken].tolist())
      bits = np.asarray(jsq.CLASS_BITS)[cls].sum()
      assert bits <= layout.budget_bits
      # The threshold adapts until >= 0.8 of the item capacity passes.
      assert taken >= 0.6 * exact_items, (ratio, seed, taken, exact_items)


_FORMATS = [
  ("positions", 37, 0.2, jnp.float32),
  ("bitmap", 1001, 0.01, jnp.float32),
  ("classmap", 333, 0.05, jnp.bfloat16),
  ("positions", 70001, 0.001, jnp.float32),
  ("bitmap", 9, 1.0, jnp.float16),
  ("classmap", 4099, 0.032, jnp.float32),
]


@pytest.mark.parametrize(
  "fmt,n,ratio,dtype",
  _FORMATS,
  ids=[f"{f}-n{n}-r{r}-{np.dtype(d).name}" for f, n, r, d in _FORMATS],
)
def test_decode_reproduces_the_dequantized_selection(fmt, n, ratio, dtype):
  layout = jsq.make_layout(n, ratio, fmt)
  v = (_values(n, 11) * 3).astype(dtype)
  payload, x_hat, counts = _encode(v, layout, _KEY)
  assert payload.dtype == jnp.uint8
  assert payload.shape == (layout.payload_bytes,)
  assert_trees_bitwise_equal(_decode(payload, layout), x_hat)
  k8, k4, k2 = np.asarray(counts)
  bits = layout.bits(counts)
  assert bits["code_bits"] == 8 * k8 + 4 * k4 + 2 * k2 <= layout.budget_bits
  assert bits["code_bits"] < bits["with_index_bits"] <= bits["payload_bits"]
  # Each class sits on its signed grid of its own norm, one step from v.
  cls, _, _ = _oracle_classes(
    jax.jit(jsq.item_profits)(v), n, layout.budget_bits
  )
  np.testing.assert_array_equal([np.sum(cls == c) for c in (3, 2, 1)], counts)
  x, x_hat = np.asarray(v, np.float32), np.asarray(x_hat)
  assert np.all(x_hat[cls == 0] == 0)
  for c in (1, 2, 3):
    sel = cls == c
    if not sel.any():
      continue
    norm = np.abs(x[sel]).max()
    step = norm / jsq.levels(jsq.CLASS_BITS[c])
    assert np.all(np.abs(x_hat[sel] - x[sel]) <= step * (1 + 1e-6))
    np.testing.assert_allclose(
      x_hat[sel] / step, np.round(x_hat[sel] / step), atol=1e-4
    )


def test_layout_accounting_and_auto_index_format():
  for n, ratio, want in [
    (100000, 0.001, "positions"),
    (100000, 0.01, "bitmap"),
    (100000, 0.032, "classmap"),
    (100000, 0.0045, "bitmap"),
  ]:
    layout = jsq.make_layout(n, ratio)
    assert layout.index_format == want
    cost = {
      f: jsq.make_layout(n, ratio, f).payload_bytes
      for f in ("positions", "bitmap", "classmap")
    }
    assert layout.payload_bytes == min(cost.values())
  assert jsq.budget_bits(1000, 0.032) == 1024  # decimal ρ, no float ceil
  # The code stream's capacity holds every (k8, k4, k2) the budget allows,
  # alignment padding included.
  for n in (1, 2, 3, 5, 8, 13):
    for budget in range(1, 8 * n + 12):
      layout = jsq.JointSQLayout(n, budget, "classmap")
      for k8 in range(n + 1):
        for k4 in range(n + 1 - k8):
          for k2 in range(n + 1 - k8 - k4):
            if 8 * k8 + 4 * k4 + 2 * k2 <= budget:
              used = k8 + -(-k4 // 2) + -(-k2 // 4)
              assert used <= layout.stream_bytes, (n, budget, k8, k4, k2)


def test_empty_zero_and_single_class_payloads():
  layout = jsq.make_layout(64, 0.25, "positions")
  # All zero: nothing selected, norms 0, no 0/0.
  payload, x_hat, counts = _encode(jnp.zeros(64), layout, _KEY)
  assert np.all(np.asarray(counts) == 0)
  assert np.all(np.asarray(_decode(payload, layout)) == 0)
  assert np.all(np.asarray(x_hat) == 0)
  # One nonzero element: only the 8-bit class is used, its value exact.
  one = jnp.zeros(64).at[17].set(-2.5)
  payload, x_hat, counts = _encode(one, layout, _KEY)
  np.testing.assert_array_equal(counts, [1, 0, 0])
  np.testing.assert_array_equal(_decode(payload, layout), one)
  # Budget 32n: every element is 8-bit, the 4- and 2-bit classes empty.
  full = jsq.make_layout(50, 1.0)
  v = _values(50, 2)
  payload, x_hat, counts = _encode(v, full, _KEY)
  np.testing.assert_array_equal(counts, [50, 0, 0])
  assert_trees_bitwise_equal(_decode(payload, full), x_hat)
  assert np.abs(np.asarray(x_hat - v)).max() <= np.abs(v).max() / 127
  # A budget below one item (B = 1): nothing can be sent.
  tiny = jsq.make_layout(1, 0.01)
  payload, x_hat, counts = _encode(jnp.ones(1), tiny, _KEY)
  assert tiny.budget_bits == 1 and np.all(np.asarray(x_hat) == 0)
  assert_trees_bitwise_equal(_decode(payload, tiny), x_hat)


def _grads(num_workers, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  return {
    "conv": jax.random.normal(ks[0], (num_workers, 3, 3, 8, 16)),
    # Same layout as conv: the two are encoded together (vmap).
    "conv2": jax.random.normal(ks[5], (num_workers, 3, 3, 8, 16)) * 0.1,
    "dense": jax.random.normal(ks[1], (num_workers, 20, 21)),  # < min_size
    "half": jax.random.normal(ks[2], (num_workers, 64, 32)).astype(jnp.float16),
    "bias": jax.random.normal(ks[3], (num_workers, 33)).astype(jnp.bfloat16),
    "scalar": jax.random.normal(ks[4], (num_workers,)),
    "empty": jnp.zeros((num_workers, 0, 4)),
  }


def _init(tx, grads):
  return _stack(
    tx.init(jax.tree.map(lambda x: x[0], grads)),
    jax.tree.leaves(grads)[0].shape[0],
  )


# One transform for the W = 4 transform tests, so they share compilations.
_W = 4
_TX = jsq.jointsq(compression_ratio=0.05, min_size=512, key=9)
# Compressed leaves -> index in the flattened dict (bias, conv, conv2,
# dense, empty, half, scalar), i.e. in the state's per-leaf tuples.
_LEAF = {"conv": 1, "conv2": 2, "half": 5}


def test_replicas_identical_under_shard_map_and_pmap_and_state_stable():
  grads = _grads(_W)
  state = _init(_TX, grads)
  results = {}
  for mode in ("shard_map", "pmap"):
    out, state1 = _run(_TX, grads, state, mode=mode)
    assert_replicas_equal(out)
    out2, state2 = _run(_TX, grads, state1, mode=mode)  # with EF memory
    assert_replicas_equal(out2)
    results[mode] = (out, state1, out2, state2)
  assert_trees_bitwise_equal(results["shard_map"], results["pmap"])
  out, state1, out2, _ = results["pmap"]
  out = jax.tree.map(lambda x: x[0], out)
  for name, leaf in out.items():
    assert leaf.dtype == grads[name].dtype
    assert leaf.shape == grads[name].shape[1:]
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  # Uncompressed leaves are the exact mean.
  np.testing.assert_allclose(out["scalar"], grads["scalar"].mean(), rtol=1e-6)
  np.testing.assert_allclose(
    out["dense"], grads["dense"].mean(0), rtol=1e-5, atol=1e-6
  )
  # State: same tree and dtypes, fresh key, counts per compressed leaf.
  assert isinstance(state1, jsq.JointSQState)
  assert jax.tree.structure(state1) == jax.tree.structure(state)
  assert state1.counts.shape == (_W, 9)  # 3 compressed leaves
  assert state1.counts.dtype == jnp.int32
  assert not np.array_equal(state1.key, state.key)
  # Uncompressed leaves: an unused f32[1] (orbax saves no zero-size array).
  assert [e.shape[1] for e in state1.error] == [1, 1152, 1152, 1, 1, 2048, 1]
  assert not np.array_equal(out2["conv"], results["pmap"][0]["conv"])
  # Bits of each worker's step, with and without the index.
  params = jax.tree.map(lambda x: x[0], grads)
  for i in range(_W):
    bits = jsq.jointsq_bits(
      params, state1.counts[i], compression_ratio=0.05, min_size=512
    )
    assert 0 < bits["code_bits"] <= bits["budget_bits"]
    assert bits["code_bits"] < bits["with_index_bits"]
    assert bits["with_index_bits"] <= bits["payload_bits"]
    if i == 0:
      n = sum(
        lay.numel
        for lay in jax.tree.leaves(
          jsq.jointsq_layouts(params, compression_ratio=0.05, min_size=512),
          is_leaf=lambda x: isinstance(x, jsq.JointSQLayout),
        )
      )
      print({k: round(v / n, 3) for k, v in bits.items()}, "bits/element")


def test_error_feedback_identity_and_mean_of_decoded_payloads():
  grads = _grads(_W, seed=1)
  state = _init(_TX, grads)
  ks = jax.random.split(jax.random.PRNGKey(2), 3)
  error = list(state.error)
  for k, i in zip(ks, _LEAF.values()):
    error[i] = jax.random.normal(k, error[i].shape) * 0.1
  state = state._replace(error=tuple(error))
  out, new_state = _run(_TX, grads, state)
  layouts = jsq.jointsq_layouts(
    jax.tree.map(lambda x: x[0], grads), compression_ratio=0.05, min_size=512
  )
  step_key = jax.random.split(prng.canonical_key(9))[1]
  for layer, (name, leaf) in enumerate(_LEAF.items()):
    layout = layouts[name]
    total = np.zeros(layout.numel, np.float32)
    for i in range(_W):
      v = state.error[leaf][i] + grads[name][i].reshape(-1).astype(jnp.float32)
      payload, x_hat, counts = _encode(v, layout, prng.fold(step_key, layer, i))
      # EF identity: the memory is exactly what was not sent.
      np.testing.assert_array_equal(new_state.error[leaf][i], v - x_hat)
      np.testing.assert_array_equal(
        new_state.counts[i, 3 * layer : 3 * layer + 3], counts
      )
      total = total + np.asarray(_decode(payload, layout))
    want = (total / np.float32(_W)).astype(grads[name].dtype)
    for i in range(_W):
      np.testing.assert_array_equal(out[name][i].reshape(-1), want)


def test_nonfinite_zeros_and_dtypes():
  grads = _grads(_W)
  zeros = jax.tree.map(jnp.zeros_like, grads)
  out, state = _run(_TX, zeros, _init(_TX, zeros))
  for name, leaf in out.items():
    assert leaf.dtype == grads[name].dtype
    assert np.all(np.asarray(leaf, np.float32) == 0)
  assert np.all(np.asarray(state.counts) == 0)
  bad = {
    **grads,
    "conv": grads["conv"].at[2, 0, 0, 0, 0].set(jnp.nan),
    "half": grads["half"].at[1, 5, 5].set(jnp.inf),
  }
  out, state = _run(_TX, bad, _init(_TX, bad))
  assert np.all(np.isnan(np.asarray(out["conv"])))
  assert np.all(np.isnan(np.asarray(out["half"], np.float32)))
  assert np.all(np.isfinite(np.asarray(out["dense"])))
  # The memory drops the non-finite entries and keeps the finite values.
  for leaf in jax.tree.leaves(state.error):
    assert np.all(np.isfinite(np.asarray(leaf)))
  np.testing.assert_array_equal(
    state.error[_LEAF["conv"]][2][1:], grads["conv"][2].reshape(-1)[1:]
  )


_WIRE = [(0.032, "classmap"), (0.001, "positions")]


@pytest.mark.parametrize("ratio,fmt", _WIRE, ids=[f for _, f in _WIRE])
def test_hlo_wire_bytes_equal_the_format_accounting(ratio, fmt):
  w = 8
  compiled, params = mlp_step(jsq.jointsq(compression_ratio=ratio), w)
  layouts = jax.tree.leaves(
    jsq.jointsq_layouts(params, compression_ratio=ratio),
    is_leaf=lambda x: isinstance(x, jsq.JointSQLayout),
  )
  # The two kernels, in the cheapest format; the biases go dense.
  assert [lay.index_format for lay in layouts] == [fmt, fmt]
  payload = sum(lay.payload_bytes for lay in layouts)
  report = gqsgd_jax.wire_report(compiled)
  # all_gather result: W payloads; all-reduce: the f32 biases (256 + 10).
  assert report.by_op == {
    "all-gather": w * payload,
    "all-reduce": 4 * (256 + 10),
  }
  assert report.float_payload_bytes == 4 * (256 + 10)  # every bias
  dense_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
  print(
    f"ratio={ratio} {fmt}: payload {payload} B/worker vs {dense_bytes} B f32"
  )


def test_least_squares_converges_close_to_uncompressed():
  # W = 4 workers, each with its own rows of A X = B (X: 32 x 32, one
  # compressed tensor of 1024 elements); full-batch gradients, SGD 0.1.
  # JointSQ at ρ = 0.032 (~1 bit per element + 2-bit class map) with EF
  # must reach the loss of the uncompressed run within 5 % (measured 1.4 %).
  num_workers, rows, d, steps = 4, 64, 32, 400
  ka, kx, kn = jax.random.split(jax.random.PRNGKey(7), 3)
  a = jax.random.normal(ka, (num_workers, rows, d))
  x_true = jax.random.normal(kx, (d, d))
  b = a @ x_true + 0.1 * jax.random.normal(kn, (num_workers, rows, d))
  mesh = data_mesh(num_workers)

  def loss(x, a, b):
    return 0.5 * jnp.mean(jnp.sum((a @ x - b) ** 2, axis=-1))

  def train(compressor):
    tx = optax.chain(compressor, optax.sgd(0.1))

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

      # The error memory is per worker: type the fresh state as varying.
      state = gqsgd_jax.varying(tx.init(x), "data")
      (x, _), _ = jax.lax.scan(body, (x, state), None, length=steps)
      return x

    x = run(a, b)
    return float(jnp.mean(jax.vmap(loss, (None, 0, 0))(x, a, b)))

  initial = float(
    jnp.mean(jax.vmap(loss, (None, 0, 0))(jnp.zeros((d, d)), a, b))
  )
  reference = train(gqsgd_jax.psum_mean())
  compressed = train(jsq.jointsq(compression_ratio=0.032))
  print(
    f"loss: initial {initial:.4f} uncompressed {reference:.4f} "
    f"jointsq {compressed:.4f}"
  )
  assert compressed <= reference * 1.05


def test_bad_arguments_name_the_argument():
  for ratio in (0, -0.1, 1.5, "0.1", True):
    with pytest.raises(ValueError, match="compression_ratio"):
      jsq.jointsq(compression_ratio=ratio)
  with pytest.raises(ValueError, match="selection"):
    jsq.jointsq(selection="topk")
  with pytest.raises(ValueError, match="sample_ratio"):
    jsq.jointsq(sample_ratio=0)
  with pytest.raises(ValueError, match="index_format"):
    jsq.jointsq(index_format="delta")
  with pytest.raises(ValueError, match="min_size"):
    jsq.jointsq(min_size=0)
  with pytest.raises(ValueError, match="predicate"):
    jsq.jointsq(predicate="conv")
  with pytest.raises(TypeError, match="predicate"):
    jsq.jointsq(predicate=4)
  with pytest.raises(ValueError, match="key"):
    jsq.jointsq(key=jnp.zeros(3, jnp.uint32))
  with pytest.raises(ValueError, match="impl"):
    jsq.jointsq(impl="cuda")
  tx = jsq.jointsq()
  grads = {"w": jnp.ones((64, 32))}
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    jax.jit(tx.update)(grads, tx.init(grads))
  # Memory from another model; integer leaves.
  with pytest.raises(ValueError, match=r"JointSQState does not match"):
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


def test_reference_predicate_compresses_conv_kernels_only():
  params = {
    "conv": jnp.zeros((3, 3, 4, 8)),
    "fc": jnp.zeros((300, 10)),
    "b": jnp.zeros(10),
  }
  ref = jsq.jointsq_layouts(params, predicate="reference")
  assert ref["conv"] is not None and ref["fc"] is None and ref["b"] is None
  default = jsq.jointsq_layouts(params, min_size=100)
  assert default["conv"] is not None and default["fc"] is not None
  assert default["b"] is None
