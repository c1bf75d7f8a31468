"""Tests of qsgd: statistics, replicas, reference parity, wire bytes, input."""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import gqsgd_jax
from gqsgd_jax._src import ops
from gqsgd_jax._src import prng
from gqsgd_jax._src import reference
from gqsgd_jax._src.baselines import qsgd as qsgd_lib

from _utils import assert_replicas_equal
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh
from _utils import sharded_update

qsgd = qsgd_lib.qsgd
F32 = np.float32


def _grads(num_workers, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
    "dense": jax.random.normal(k1, (num_workers, 37, 5)),
    "bias": jax.random.normal(k2, (num_workers, 11)).astype(jnp.bfloat16),
    "scale": jax.random.normal(k3, (num_workers,)).astype(jnp.float16),
    "empty": jnp.zeros((num_workers, 0, 3)),
  }


def _monte_carlo(tx, stacked, keys):
  """tx.update for every key in one compiled program: (K, d) estimates."""

  @jax.jit
  @jax.shard_map(
    mesh=data_mesh(stacked.shape[0]), in_specs=(P("data"), P()), out_specs=P()
  )
  def run(g, keys):
    return jax.vmap(lambda k: tx.update(g[0], qsgd_lib.QsgdState(k))[0])(keys)

  return np.asarray(run(stacked, keys), np.float64)


@pytest.mark.parametrize(
  "num_workers,norm,ref",
  [
    (1, "linf", False),
    (2, "linf", False),
    (3, "l2", False),
    (8, "linf", False),
    (16, "l2", False),
    (4, "linf", True),
  ],
  ids=["W1", "W2", "W3-l2", "W8", "W16-l2", "W4-ref"],
)
def test_unbiased_with_exact_variance_within_bound(num_workers, norm, ref):
  # Worker i rounds y_i = g_i s_i / n_i (s_i = s, or 127 / W for the
  # reference): per coordinate var = sum_i (n_i / (s_i W))^2 f_i (1 - f_i).
  # Spec §5.3 bounds the whole vector by (1/W^2) sum_i min(d n_i^2 / (4
  # s^2), n_i ||g_i||_1 / s) for max-abs norms.
  d, count = 48, 2000
  g = jax.random.normal(jax.random.PRNGKey(num_workers), (num_workers, d))
  g = g.at[:, 3].set(0.0).at[0, 4].set(-6.0)
  tx = qsgd(norm=norm, reference_compatible=ref, levels=127)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(count) + 7)
  est = _monte_carlo(tx, g, keys)
  g32 = np.asarray(g, F32)
  if norm == "linf":
    norms = np.abs(g32).max(1)
  else:
    norms = np.linalg.norm(g32.astype(np.float64), axis=1).astype(F32)
  s = 127 / num_workers if ref else 127
  y = (g32 * (F32(s) / norms)[:, None]).astype(np.float64)
  frac = y - np.floor(y)
  n64 = norms.astype(np.float64)
  var = ((n64 / (s * num_workers))[:, None] ** 2 * frac * (1 - frac)).sum(0)
  g64 = g32.astype(np.float64)
  se = np.sqrt(var / count) + 1e-12
  bias = est.mean(0) - g64.mean(0)
  assert np.all(np.abs(bias) <= 5 * se + 1e-6), np.max(np.abs(bias) / se)
  measured = est.var(0, ddof=1)
  assert (
    abs(measured.mean() - var.mean())
    <= 6 * np.sqrt(2 / (count * d)) * var.mean() + 1e-12
  )
  if norm == "linf":
    bound = (
      sum(
        min(d * n**2 / (4 * s**2), n * np.abs(gi).sum() / s)
        for n, gi in zip(n64, g64)
      )
      / num_workers**2
    )
    assert measured.sum() <= bound * (1 + 6 * np.sqrt(2 / (count * d)))
    print(
      f"W={num_workers} ref={ref}: var {measured.sum():.4g} exact "
      f"{var.sum():.4g} bound {bound:.4g}"
    )


@pytest.mark.parametrize(
  "num_workers,kwargs",
  [
    (2, dict()),
    (5, dict(norm="l2", granularity="leaf")),
    (8, dict(reference_compatible=True, granularity="global")),
  ],
  ids=["W2", "W5-l2-leaf", "W8-ref-global"],
)
def test_replicas_identical_across_modes_and_impls(num_workers, kwargs):
  grads = _grads(num_workers)
  impls = ["xla"] + (["ffi"] if gqsgd_jax.HAS_CPU or gqsgd_jax.HAS_CUDA else [])
  results = {}
  for impl in impls:
    tx = qsgd(**kwargs, impl=impl)
    for mode in ("shard_map", "pmap"):
      per_worker, state = sharded_update(tx, grads, tx.init(None), mode=mode)
      assert_replicas_equal(per_worker)
      results[impl, mode] = (per_worker, state)
  first = results["xla", "shard_map"]
  for other in results.values():
    assert_trees_bitwise_equal(first, other)
  out = jax.tree.map(lambda x: x[0], first[0])
  for name, leaf in out.items():
    assert leaf.dtype == grads[name].dtype
    assert leaf.shape == grads[name].shape[1:]
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  assert isinstance(first[1], qsgd_lib.QsgdState)


@pytest.mark.parametrize("num_workers", [2, 4])
def test_reference_compatible_matches_the_torch_model(num_workers):
  # REF's qsgd_hook step 3 is sd8_encode with the worker's own max-abs:
  # y = g 127 / (W m_i), then g^ = sum_i q_i m_i / 127. We feed the torch
  # model the uniforms our kernel drew for each worker (see
  # torch_parity_test._sr_uniforms) and compare the decoded means; one code
  # apart would differ by m_i / 127, far above the f32 round-off allowed.
  torch = pytest.importorskip("torch")
  import torch_reference as ref  # pylint: disable=g-import-not-at-top

  n = 301
  rng = np.random.default_rng(num_workers)
  norms = [2.0**-3, 2.0**1, 1.0, 2.0**-5][:num_workers]
  g = []
  for m in norms:  # grid values: g * 127 / (W m) is exact in float32
    j = rng.integers(-(2**16), 2**16 + 1, n)
    j[0] = 2**16
    g.append((j * (m / 2**16)).astype(F32))
  g = np.stack(g)
  tx = qsgd(reference_compatible=True, granularity="leaf")
  state = tx.init(None)
  per_worker, _ = sharded_update(tx, jnp.asarray(g), state)
  _, step_key = jax.random.split(state.key)
  total = torch.zeros(n, dtype=torch.float64)
  for i, m in enumerate(norms):
    seed = ops.seed_from_key(prng.fold(step_key, 0, i))
    k = np.asarray(reference.random_bits(seed, n)) >> 8
    top = ((k.astype(np.float64) + 1) * 2.0**-24).astype(F32)
    u = torch.from_numpy(np.nextafter(top, F32(0)))
    codes = ref.sd8_encode(torch.from_numpy(g[i]), m, num_workers, u)
    assert codes.abs().max() <= math.ceil(127 / num_workers)
    total += ref.sd8_decode(codes, m).to(torch.float64)
  np.testing.assert_allclose(
    per_worker[0], total.numpy(), rtol=0, atol=1e-3 * min(norms) / 127
  )


def _compiled_step(tx, num_workers, params):
  @jax.jit
  @jax.shard_map(
    mesh=data_mesh(num_workers), in_specs=(P("data"), P()), out_specs=(P(), P())
  )
  def step(g, s):
    return tx.update(jax.tree.map(lambda x: x[0], g), s)

  grads = jax.tree.map(lambda p: jnp.zeros((num_workers,) + p.shape), params)
  return step.lower(grads, tx.init(None)).compile()


@pytest.mark.parametrize("granularity", ["bucket", "leaf"])
def test_hlo_wire_bytes_grow_with_workers_as_the_formula(granularity):
  params = {
    "w1": jnp.zeros((64, 256)),
    "b1": jnp.zeros(256),
    "w2": jnp.zeros((256, 10)),
    "b2": jnp.zeros(10),
  }
  sizes = [p.size for p in jax.tree.leaves(params)]
  n = sum(sizes)
  tx = qsgd(granularity=granularity)
  sent = {}
  for w in (2, 4, 8):
    report = gqsgd_jax.wire_report(_compiled_step(tx, w, params))
    expected = qsgd_lib.wire_bytes(sizes, w, granularity=granularity)
    assert set(report.by_op) == {"all-gather"}  # codes and norms only
    assert report.total_bytes == report.by_op["all-gather"] == expected.result
    assert np.isclose(report.sent_bytes, expected.sent)
    assert expected.received == expected.sent
    # The int8 codes: W n bytes gathered; floats only in the norms.
    assert report.float_payload_bytes <= 4 * w * len(sizes)
    sent[w] = report.sent_bytes
    print(
      f"{granularity} W={w}: result {report.total_bytes} B, sent "
      f"{report.sent_bytes:.0f} B for {n} elements"
    )
  # (W - 1) n: 1, 3, 7 times the int8 payload.
  assert np.isclose(sent[8] / sent[2], 7) and np.isclose(sent[4] / sent[2], 3)


def test_zeros_nonfinite_empty_and_scalar_leaves():
  w = 4
  grads = {
    "zeros": jnp.zeros((w, 9)),
    "nan": jnp.ones((w, 5)).at[2, 3].set(jnp.nan),
    "inf": jnp.ones((w, 6)).at[1, 0].set(-jnp.inf),
    "fine": jnp.full((w, 7), 0.5),
    "empty": jnp.zeros((w, 0)),
    "scalar": jnp.arange(w, dtype=jnp.float32),
  }
  for norm in ("linf", "l2"):
    tx = qsgd(norm=norm, granularity="leaf")
    for mode in ("shard_map", "pmap"):
      per_worker, _ = sharded_update(tx, grads, tx.init(0), mode=mode)
      out = jax.tree.map(lambda x: np.asarray(x[0]), per_worker)
      assert (
        np.array_equal(out["zeros"], np.zeros(9))
        and not np.signbit(out["zeros"]).any()
      )
      assert np.all(np.isnan(out["nan"]))  # never laundered into numbers
      assert np.all(np.isnan(out["inf"]))
      # 0.5 is exactly the top level of every worker with max-abs norms.
      if norm == "linf":
        np.testing.assert_array_equal(out["fine"], 0.5)
      assert out["empty"].shape == (0,)
      assert out["scalar"].shape == ()
      np.testing.assert_allclose(out["scalar"], 1.5)  # the max: exact


def test_bad_arguments_name_the_argument():
  for levels in (0, 128, -1):
    with pytest.raises(ValueError, match="levels"):
      qsgd(levels=levels)
  for levels in (127.0, "127", True):
    with pytest.raises(TypeError, match="levels"):
      qsgd(levels=levels)
  with pytest.raises(ValueError, match="levels"):
    qsgd(levels=63, reference_compatible=True)
  with pytest.raises(TypeError, match="reference_compatible"):
    qsgd(reference_compatible="yes")
  with pytest.raises(ValueError, match="norm"):
    qsgd(norm="l1")
  with pytest.raises(ValueError, match="granularity"):
    qsgd(granularity="layer")
  with pytest.raises(ValueError, match="bucket_bytes"):
    qsgd(bucket_bytes=0)
  with pytest.raises(ValueError, match="impl"):
    qsgd(impl="cuda")
  with pytest.raises(ValueError, match="key"):
    qsgd(key=jnp.zeros(3))


def test_unbound_axis_and_integer_leaves():
  tx = qsgd()
  grads = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    tx.update(grads, tx.init(grads))
  with pytest.raises(TypeError, match=r"\['count'\].*int32"):
    sharded_update(tx, {"count": jnp.ones((2, 3), jnp.int32)}, tx.init(0))
