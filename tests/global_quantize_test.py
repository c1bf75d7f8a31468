"""Tests of global_quantize: semantics, statistics, overflow, bad input."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import gqsgd_jax
from gqsgd_jax._src import bucketing
from gqsgd_jax._src import global_quantize as gq
from gqsgd_jax._src import wire
from _utils import assert_replicas_equal
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh
from _utils import sharded_update


def _grads(num_workers, seed=0):
  """Per-worker gradients of mixed shapes and dtypes (leading axis = W)."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
      "dense": jax.random.normal(k1, (num_workers, 37, 5)),
      "bias": jax.random.normal(k2, (num_workers, 11)).astype(jnp.bfloat16),
      "scale": jax.random.normal(k3, (num_workers,)).astype(jnp.float16),
      "empty": jnp.zeros((num_workers, 0, 3)),
  }


# (W, kwargs): every strategy, powers of two and not, psum and packed lanes.
_CONFIGS = [
    (2, dict(bits=8, reduction="psum")),
    (3, dict(bits=4, reduction="butterfly")),
    (5, dict(bits=3, reduction="butterfly")),
    (6, dict(bits=8, dithering="exponential")),
    (8, dict(bits=2, reduction="auto")),
    (7, dict(bits=6, reduction="psum", granularity="leaf")),
]


@pytest.mark.parametrize("num_workers,kwargs", _CONFIGS,
                         ids=[f"W{w}-{'-'.join(map(str, k.values()))}"
                              for w, k in _CONFIGS])
def test_replicas_identical_across_modes_and_impls(num_workers, kwargs):
  grads = _grads(num_workers)
  results = {}
  impls = ["xla"] + (["ffi"] if gqsgd_jax.HAS_CPU or gqsgd_jax.HAS_CUDA
                     else [])
  for impl in impls:
    tx = gqsgd_jax.global_quantize(**kwargs, impl=impl)
    for mode in ("shard_map", "pmap"):
      per_worker, state = sharded_update(tx, grads, tx.init(None), mode=mode)
      assert_replicas_equal(per_worker)
      results[impl, mode] = (per_worker, state)
  first = results["xla", "shard_map"]
  for other in results.values():
    assert_trees_bitwise_equal(first, other)
  out = jax.tree.map(lambda x: x[0], first[0])
  for name, leaf in out.items():
    assert leaf.dtype == grads[name].dtype and leaf.shape == grads[name].shape[1:]
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def _keys(count):
  return jax.vmap(jax.random.PRNGKey)(jnp.arange(count))


def _monte_carlo(tx, stacked, keys):
  """tx.update for every key in one compiled program: (K, d) estimates."""
  num_workers = stacked.shape[0]
  mesh = data_mesh(num_workers)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P("data"), P()), out_specs=P())
  def run(g, keys):
    return jax.vmap(
        lambda k: tx.update(g[0], gqsgd_jax.GlobalQuantizeState(k))[0])(keys)

  return np.asarray(run(stacked, keys), np.float64)


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4, 8, 16, 64])
def test_psum_unbiased_with_exact_variance(num_workers):
  # Per coordinate, var = (M / (s W))^2 * sum_i f_i (1 - f_i) with f_i the
  # fractional part of worker i's scaled value: independent dither per worker.
  d, count = 48, 2000
  g = jax.random.normal(jax.random.PRNGKey(num_workers), (num_workers, d))
  tx = gqsgd_jax.global_quantize(bits=8, reduction="psum")
  est = _monte_carlo(tx, g, _keys(count))
  g64 = np.asarray(g, np.float64)
  big_m = np.abs(g64).max()
  s = wire.psum_levels(8, num_workers, signed_codes=True)
  y = np.asarray(g * np.float32(s / np.float32(big_m)), np.float64)
  frac = y - np.floor(y)
  var = (big_m / (s * num_workers))**2 * (frac * (1 - frac)).sum(0)
  # Unbiased: each coordinate's MC mean within 5 standard errors.
  se = np.sqrt(var / count) + 1e-12
  bias = est.mean(0) - g64.mean(0)
  assert np.all(np.abs(bias) <= 5 * se + 1e-6), np.max(np.abs(bias) / se)
  # Variance: the average over coordinates matches the exact value (the
  # sample variance of K draws has relative s.e. ~ sqrt(2 / K) per coordinate;
  # averaged over d coordinates, 6 of those is a safe band).
  measured = est.var(0, ddof=1).mean()
  exact = var.mean()
  assert abs(measured - exact) <= 6 * np.sqrt(2 / (count * d)) * exact + 1e-12
  # ... and within the spec's bound d M^2 / (4 s^2 W) per vector (§1.5).
  assert measured <= big_m**2 / (4 * s**2 * num_workers) * 1.05


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4, 8, 16, 64])
def test_butterfly_unbiased_and_within_bound(num_workers):
  # Spec §2.3: per coordinate, leaves contribute <= step^2 / (4W) and the
  # re-rounding along the tree < step^2 / 2 in total, step = M / s.
  d, count = 48, 2000
  g = jax.random.normal(jax.random.PRNGKey(100 + num_workers),
                        (num_workers, d))
  bits = 4
  tx = gqsgd_jax.global_quantize(bits=bits, reduction="butterfly")
  est = _monte_carlo(tx, g, _keys(count))
  g64 = np.asarray(g, np.float64)
  step = np.abs(g64).max() / wire.max_levels(bits)
  bound = step**2 * (1 / (4 * num_workers) + 0.5)
  bias = est.mean(0) - g64.mean(0)
  assert np.all(np.abs(bias) <= 5 * np.sqrt(bound / count))
  measured = est.var(0, ddof=1)
  assert measured.mean() <= bound * (1 + 6 * np.sqrt(2 / (count * d)))
  assert measured.mean() > 0


def test_psum_levels_never_overflow_the_wire():
  # spec §1.3/B-GQ-1: with s = ceil(127/W) a sum of W codes reaches 128.
  for w in range(1, 130):
    assert w * wire.psum_levels(8, w, signed_codes=True) <= 127
    for bits in range(2, 9):
      assert w * 2 * wire.psum_levels(bits, w) <= 2**bits - 1


_ADVERSARIAL = [
    (2, dict(bits=8, reduction="psum")),
    (4, dict(bits=8, reduction="psum")),
    (8, dict(bits=8, reduction="psum")),
    (2, dict(bits=4, reduction="psum")),
    (3, dict(bits=5, reduction="psum")),
    (8, dict(bits=4, reduction="butterfly")),
    (3, dict(bits=2, reduction="butterfly")),
]


@pytest.mark.parametrize("num_workers,kwargs", _ADVERSARIAL,
                         ids=[f"W{w}-{k['bits']}-{k['reduction']}"
                              for w, k in _ADVERSARIAL])
def test_adversarial_inputs_never_overflow(num_workers, kwargs):
  # Every worker holds +M or -M on the same coordinates (the largest codes,
  # summed W times), and values a hair below M that round up almost surely.
  big_m = np.float32(3.0)
  row = np.array([big_m, -big_m, big_m * (1 - 2**-20), -big_m * (1 - 2**-20)],
                 np.float32)
  g = jnp.asarray(np.tile(row, (num_workers, 8)))
  tx = gqsgd_jax.global_quantize(**kwargs)
  for seed in range(3):
    per_worker, _ = sharded_update(tx, g, tx.init(seed))
    out = np.asarray(per_worker[0])
    # No wrap-around: signs are kept and magnitudes stay at M (± one level).
    assert np.all(np.sign(out) == np.sign(np.asarray(g[0])))
    np.testing.assert_allclose(np.abs(out[::4]), big_m, rtol=1e-6)
    np.testing.assert_allclose(np.abs(out[1::4]), big_m, rtol=1e-6)


def test_least_squares_converges_like_uncompressed():
  # W = 4 workers with their own data; full-batch gradient steps. The
  # compressed run must reach the uncompressed loss within 2 % (quantization
  # noise floor at this learning rate, measured ~0.3 %).
  num_workers, n, d, steps = 4, 64, 16, 300
  ka, kx, kn = jax.random.split(jax.random.PRNGKey(7), 3)
  a = jax.random.normal(ka, (num_workers, n, d))
  x_true = jax.random.normal(kx, (d,))
  b = a @ x_true + 0.1 * jax.random.normal(kn, (num_workers, n))
  mesh = data_mesh(num_workers)

  def loss(x, a, b):
    return 0.5 * jnp.mean((a @ x - b)**2)

  def train(compressor):
    tx = optax.chain(compressor, optax.sgd(0.05))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("data"), P("data")),
                   out_specs=P())
    def run(a, b):
      a, b = a[0], b[0]
      x = jnp.zeros(d)

      def body(carry, _):
        x, state = carry
        grad = jax.grad(loss)(gqsgd_jax.varying(x, "data"), a, b)
        updates, state = tx.update(grad, state, x)
        return (optax.apply_updates(x, updates), state), None

      (x, _), _ = jax.lax.scan(body, (x, tx.init(x)), None, length=steps)
      return x
    x = run(a, b)
    return float(jnp.mean(jax.vmap(loss, (None, 0, 0))(x, a, b)))

  reference = train(gqsgd_jax.psum_mean())
  for compressor in (gqsgd_jax.global_quantize(bits=4),
                     gqsgd_jax.global_quantize(bits=8),
                     gqsgd_jax.global_quantize(bits=8,
                                               dithering="exponential")):
    assert train(compressor) <= reference * 1.02


def test_state_and_dtypes_are_stable():
  grads = _grads(4)
  tx = gqsgd_jax.global_quantize(bits=4)
  state = tx.init(jax.tree.map(lambda x: x[0], grads))
  per_worker, new_state = sharded_update(tx, grads, state)
  assert isinstance(new_state, gqsgd_jax.GlobalQuantizeState)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert new_state.key.dtype == state.key.dtype == jnp.uint32
  assert not np.array_equal(new_state.key, state.key)
  for name, leaf in per_worker.items():
    assert leaf.dtype == grads[name].dtype
    assert leaf.shape == grads[name].shape
  # A second step from the new state draws fresh dither.
  again, _ = sharded_update(tx, grads, new_state)
  assert not np.array_equal(again["dense"], per_worker["dense"])


@pytest.mark.parametrize("kwargs", [dict(bits=8), dict(bits=4),
                                    dict(bits=8, dithering="exponential")],
                         ids=["psum8", "butterfly4", "exponential"])
def test_zeros_nonfinite_empty_and_scalar_leaves(kwargs):
  w = 4
  grads = {
      "zeros": jnp.zeros((w, 9)),
      "nan": jnp.ones((w, 5)).at[2, 3].set(jnp.nan),
      "inf": jnp.ones((w, 6)).at[1, 0].set(-jnp.inf),
      "fine": jnp.full((w, 7), 0.5),
      "empty": jnp.zeros((w, 0)),
      "scalar": jnp.arange(w, dtype=jnp.float32),
  }
  # One bucket per leaf, so a non-finite leaf only poisons its own bucket.
  tx = gqsgd_jax.global_quantize(**kwargs, granularity="leaf")
  per_worker, _ = sharded_update(tx, grads, tx.init(0))
  out = jax.tree.map(lambda x: np.asarray(x[0]), per_worker)
  assert np.array_equal(out["zeros"], np.zeros(9)) and not np.signbit(
      out["zeros"]).any()
  assert np.all(np.isnan(out["nan"]))  # never laundered into numbers
  assert not np.any(np.isfinite(out["inf"]))
  np.testing.assert_allclose(out["fine"], 0.5, rtol=0, atol=0.5)
  assert out["empty"].shape == (0,)
  assert out["scalar"].shape == () and np.isfinite(out["scalar"])


def test_bad_arguments_name_the_argument():
  for bits in (1, 9, 0):
    with pytest.raises(ValueError, match="bits"):
      gqsgd_jax.global_quantize(bits=bits)
  for bits in ("4", 4.0, True):
    with pytest.raises(TypeError, match="bits"):
      gqsgd_jax.global_quantize(bits=bits)
  with pytest.raises(ValueError, match="reduction"):
    gqsgd_jax.global_quantize(reduction="ring")
  with pytest.raises(ValueError, match="dithering"):
    gqsgd_jax.global_quantize(dithering="linear")
  with pytest.raises(ValueError, match="bits"):
    gqsgd_jax.global_quantize(bits=4, dithering="exponential")
  with pytest.raises(ValueError, match="reduction"):
    gqsgd_jax.global_quantize(bits=8, dithering="exponential",
                              reduction="psum")
  with pytest.raises(ValueError, match="granularity"):
    gqsgd_jax.global_quantize(granularity="layer")
  with pytest.raises(ValueError, match="bucket_bytes"):
    gqsgd_jax.global_quantize(bucket_bytes=0)
  with pytest.raises(ValueError, match="impl"):
    gqsgd_jax.global_quantize(impl="cuda")
  with pytest.raises(ValueError, match="floor_code"):
    gqsgd_jax.global_quantize(bits=8, dithering="exponential", floor_code=0)
  with pytest.raises(ValueError, match="key"):
    gqsgd_jax.global_quantize(key=jnp.zeros(3))


def test_unbound_or_wrong_axis_name_is_a_clear_error():
  tx = gqsgd_jax.global_quantize(bits=4)
  grads = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    tx.update(grads, tx.init(grads))
  wrong = gqsgd_jax.global_quantize(bits=4, axis_name="batch")
  mesh = data_mesh(2)
  step = jax.shard_map(lambda g: wrong.update(g, wrong.init(g))[0], mesh=mesh,
                       in_specs=P(), out_specs=P())
  with pytest.raises(ValueError, match="axis_name='batch'"):
    step(grads)


def test_worker_count_the_wire_cannot_serve():
  tx = gqsgd_jax.global_quantize(bits=4, reduction="psum")
  with pytest.raises(ValueError, match=r"reduction='psum' with bits=4"):
    sharded_update(tx, jnp.ones((8, 3)), tx.init(0))
  with pytest.raises(ValueError, match="at most 65536 workers"):
    gq.choose_reduction("butterfly", 4, 2**16 + 1)


def test_integer_leaves_are_rejected_by_path():
  tx = gqsgd_jax.global_quantize(bits=8)
  with pytest.raises(TypeError, match=r"\['count'\].*int32"):
    sharded_update(tx, {"count": jnp.ones((2, 3), jnp.int32)}, tx.init(0))


def test_auto_rule():
  # psum while each worker keeps >= 7 levels, the butterfly beyond.
  assert gq.choose_reduction("auto", 8, 16) == "psum"  # s = 7
  assert gq.choose_reduction("auto", 8, 19) == "butterfly"  # s = 6
  assert gq.choose_reduction("auto", 4, 1) == "psum"
  assert gq.choose_reduction("auto", 4, 2) == "butterfly"
  assert gq.choose_reduction("auto", 7, 9) == "psum"
  assert gq.choose_reduction("auto", 2, 64) == "butterfly"


def test_bucket_plan_is_reverse_order_capped_and_single_dtype():
  leaves = [jnp.zeros(10), jnp.zeros(20), jnp.zeros(5, jnp.bfloat16),
            jnp.zeros(0), jnp.zeros(30), jnp.zeros(1000)]
  plan = bucketing.plan_buckets(leaves, bucket_bytes=200)
  assert [b.leaf_ids for b in plan] == [(5,), (4,), (2,), (1, 0)]
  assert [b.dtype for b in plan] == [np.float32, np.float32, jnp.bfloat16,
                                     np.float32]
  per_leaf = bucketing.plan_buckets(leaves, bucket_bytes=10**9, per_leaf=True)
  assert [b.leaf_ids for b in per_leaf] == [(5,), (4,), (2,), (1,), (0,)]


def test_granularity_changes_the_scale_not_the_mean():
  # One outlier leaf: per-leaf scales keep the small leaf fine-grained.
  w = 4
  grads = {"small": jnp.full((w, 64), 0.01), "outlier": jnp.full((w, 4), 50.0)}
  errors = {}
  for granularity in ("bucket", "leaf", "global"):
    tx = gqsgd_jax.global_quantize(bits=4, granularity=granularity)
    per_worker, _ = sharded_update(tx, grads, tx.init(3))
    errors[granularity] = float(np.abs(per_worker["small"][0] - 0.01).max())
  assert errors["leaf"] < 1e-6  # 0.01 is exactly the leaf's top level
  # One bucket (or model) scale of 50: step 7.1, so 0.01 rounds to 0 almost
  # surely and the error is the whole value.
  assert errors["global"] > 0.009 and errors["bucket"] > 0.009
