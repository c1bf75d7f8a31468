"""hierarchical: full precision inside hosts, compressed across hosts."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import gqsgd_jax
from gqsgd_jax._src import hlo
from gqsgd_jax._src import wire

from _utils import assert_trees_bitwise_equal
from _utils import data_mesh
from conftest import require_devices

AXES = ("host", "local")


def _mesh(hosts, local):
  devices = require_devices(hosts * local)
  return jax.sharding.Mesh(
    np.array(devices).reshape(hosts, local),
    AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )


def _step(tx, mesh):
  """jit(shard_map(update)): (replicated updates, every device's copy,
  state) from per-device gradients with a leading device axis."""

  @jax.jit
  @jax.shard_map(
    mesh=mesh, in_specs=(P(AXES), P()), out_specs=(P(), P(AXES), P())
  )
  def step(g, s):
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s)
    return u, jax.tree.map(lambda x: x[None], u), s

  return step


def _run(tx, grads, mesh, steps=1):
  """Updates of each step; checks every device computed the same bits."""
  step = _step(tx, mesh)
  state = tx.init(jax.tree.map(lambda x: x[0], grads))
  outs = []
  for _ in range(steps):
    u, copies, state = step(grads, state)
    for leaf, copy in zip(jax.tree.leaves(u), jax.tree.leaves(copies)):
      for c in np.asarray(copy):
        assert_trees_bitwise_equal(c, np.asarray(leaf))
    outs.append(u)
  return outs, state


def _grads(devices, seed=0, dtypes=(jnp.float32,) * 3):
  rng = np.random.default_rng(seed)
  shapes = {"w": (37,), "b": (3, 5), "s": ()}  # 53 elements: uneven
  return {
    k: jnp.asarray(rng.standard_normal((devices,) + shape), dtype)
    for (k, shape), dtype in zip(shapes.items(), dtypes)
  }


def _tx(inner, **kwargs):
  return gqsgd_jax.hierarchical(inner, local_axis="local", **kwargs)


# ---------------------------------------------------------------------------
# The compiled step: floats only inside a host, integers only across hosts.

_PAIRS = re.compile(r"source_target_pairs=\{([\d,{}]*)\}")


@pytest.mark.parametrize("reduction", ["psum", "butterfly"])
@pytest.mark.parametrize("wire_dtype", [None, jnp.bfloat16])
def test_floats_cross_only_local_links_integers_only_host_links(
  reduction, wire_dtype
):
  hosts, local = 4, 2  # distinct group sizes: 4 = host axis, 2 = local axis
  mesh = _mesh(hosts, local)
  tx = optax.chain(
    _tx(
      gqsgd_jax.global_quantize(
        bits=8 if reduction == "psum" else 4,
        axis_name="host",
        reduction=reduction,
      ),
      wire_dtype=wire_dtype,
    ),
    optax.sgd(0.1),
  )
  grads = {"w": jnp.ones((8, 1000, 3)), "b": jnp.ones((8, 3))}
  params = jax.tree.map(lambda x: x[0], grads)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(), P(), P(AXES)), out_specs=(P(), P()))
  def step(p, s, g):
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, u), s

  text = step.lower(params, tx.init(params), grads).compile().as_text()
  found = hlo.collectives(text)
  payload = [c for c in found if c.elements > 64]
  floats = [c for c in payload if c.dtype.startswith(("f", "bf"))]
  ints = [c for c in payload if not c.dtype.startswith(("f", "bf"))]
  assert {c.op for c in floats} == {"all-to-all", "all-gather"}, found
  assert all(c.group_size == local for c in floats), floats
  assert ints, found
  assert all(
    c.group_size == hosts for c in ints if c.op != "collective-permute"
  ), ints
  # Float collectives across hosts: only the max-abs scales (one per
  # bucket or block of >= 256 elements), never gradient values.
  block = 3003 // local
  assert all(
    c.op == "all-reduce" and c.elements <= block // 128
    for c in found
    if c.dtype.startswith(("f", "bf")) and c.group_size != local
  ), found
  # The butterfly's permutes pair devices of the same local index (device
  # h * local + l), i.e. they run over host links only.
  for line in text.splitlines():
    if " collective-permute" in line and "source_target_pairs" in line:
      pairs = re.findall(r"\{(\d+),(\d+)\}", _PAIRS.search(line).group(1))
      assert pairs and all(
        int(a) % local == int(b) % local for a, b in pairs
      ), line
  report = gqsgd_jax.wire_report(text)
  assert report.sent_bytes > 0


# ---------------------------------------------------------------------------
# Exact reference: global_quantize over "host" applied to the local means.


def _reference(grads, hosts, local, bits, reduction, steps):
  """Per step, each local block of the hosts' mean gradients reduced by
  global_quantize(axis_name="host") on a 1-D mesh of ``hosts`` devices."""
  names = list(grads)  # jax flattens dict keys sorted
  names.sort()
  x = {k: np.asarray(grads[k]) for k in names}
  dtype = x[names[0]].dtype
  flat = np.concatenate([x[k].reshape(hosts, local, -1) for k in names], axis=2)
  # The local mean: g / L in the leaf dtype, summed in f32 in local-index
  # order, cast back (what the all-to-all exchange computes).
  means = (flat.astype(np.float32) / np.float32(local)).astype(dtype)
  total = means[:, 0].astype(np.float32)
  for j in range(1, local):
    total = total + means[:, j].astype(np.float32)
  mean = total.astype(dtype)
  n = mean.shape[1]
  mean = np.pad(mean, ((0, 0), (0, (-n) % local)))
  blocks = np.split(mean, local, axis=1)  # [local] x (hosts, n / L)
  inner = gqsgd_jax.global_quantize(
    bits=bits, axis_name="data", reduction=reduction
  )
  mesh = data_mesh(hosts)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P("data"), P()), out_specs=(P(), P()))
  def run(b, s):
    out, s = inner.update((b[0],), s)
    return out[0], s

  state = inner.init(None)
  results = []
  for _ in range(steps):
    outs = []
    for block in blocks:  # every block sees the same state (see docstring)
      out, new_state = run(jnp.asarray(block), state)
      outs.append(np.asarray(out))
    state = new_state
    full = np.concatenate(outs)[:n]
    sizes = np.cumsum([0] + [x[k][0].size for k in names])
    results.append(
      {
        k: full[sizes[i] : sizes[i + 1]].reshape(x[k].shape[1:])
        for i, k in enumerate(names)
      }
    )
  return results


@pytest.mark.parametrize(
  "reduction,bits,dtype,local",
  [
    ("psum", 4, jnp.float32, 2),
    ("butterfly", 4, jnp.bfloat16, 2),
    ("psum", 8, jnp.bfloat16, 4),
  ],
)
def test_equals_global_quantize_of_the_local_means(
  reduction, bits, dtype, local
):
  hosts = 2
  grads = _grads(hosts * local, seed=1, dtypes=(dtype,) * 3)
  tx = _tx(
    gqsgd_jax.global_quantize(bits=bits, axis_name="host", reduction=reduction)
  )
  outs, _ = _run(tx, grads, _mesh(hosts, local), steps=2)
  expected = _reference(grads, hosts, local, bits, reduction, steps=2)
  for out, ref in zip(outs, expected):
    assert_trees_bitwise_equal(out, ref)


@pytest.mark.parametrize("hosts,local", [(2, 4), (3, 3)])
def test_psum_mean_inner_is_the_flat_mean(hosts, local):
  grads = _grads(hosts * local, seed=2)
  (out,), _ = _run(
    _tx(gqsgd_jax.psum_mean(axis_name="host")), grads, _mesh(hosts, local)
  )
  for k, g in grads.items():
    np.testing.assert_allclose(
      out[k], np.mean(np.asarray(g), 0), rtol=1e-6, atol=1e-7
    )
  (out16,), _ = _run(
    _tx(gqsgd_jax.psum_mean(axis_name="host"), wire_dtype=jnp.bfloat16),
    grads,
    _mesh(hosts, local),
  )
  for k, g in grads.items():
    assert out16[k].dtype == g.dtype
    np.testing.assert_allclose(
      out16[k], np.mean(np.asarray(g), 0), rtol=2e-2, atol=2e-2
    )


# ---------------------------------------------------------------------------
# Statistics: unbiased, and the variance of a W = hosts psum.


def test_unbiased_with_the_variance_of_a_psum_over_hosts():
  # 8 devices as 2 hosts x 4: a flat 4-bit psum cannot serve W = 8
  # (floor(15 / 16) = 0 levels); across 2 hosts it has 3 levels, and the
  # estimate's variance is within the bound of a psum over the 2 hosts.
  hosts, local, d, count = 2, 4, 24, 2000
  g = jax.random.normal(jax.random.PRNGKey(7), (hosts * local, d))
  tx = _tx(
    gqsgd_jax.global_quantize(bits=4, axis_name="host", reduction="psum")
  )
  mesh = _mesh(hosts, local)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(count))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(AXES), P()), out_specs=P())
  def run(g, keys):
    def one(k):
      state = gqsgd_jax.HierarchicalState(gqsgd_jax.GlobalQuantizeState(k))
      return tx.update(g[0], state)[0]

    return jax.vmap(one)(keys)

  est = np.asarray(run(g, keys), np.float64)
  g64 = np.asarray(g, np.float64)
  means = g64.reshape(hosts, local, d).mean(1)
  big_m = np.abs(means).max()
  s = wire.psum_levels(4, hosts, signed_codes=False)
  assert s == 3
  # Spec §1.5 with W = hosts: var <= (M / (s W))^2 * W / 4 per coordinate.
  bound = (big_m / (s * hosts)) ** 2 * hosts / 4
  measured = est.var(0, ddof=1)
  se = np.sqrt(measured / count) + 1e-9
  bias = est.mean(0) - g64.mean(0)
  assert np.all(np.abs(bias) <= 5 * se + 1e-6), np.max(np.abs(bias) / se)
  assert 0 < measured.mean() <= bound * (1 + 6 * np.sqrt(2 / (count * d)))


# ---------------------------------------------------------------------------
# Edge cases and errors.


def test_mixed_dtypes_keep_each_leaf_dtype_and_shape():
  grads = _grads(4, seed=3, dtypes=(jnp.float32, jnp.bfloat16, jnp.float16))
  for wire_dtype in (None, jnp.bfloat16):
    tx = _tx(
      gqsgd_jax.global_quantize(bits=4, axis_name="host"), wire_dtype=wire_dtype
    )
    (out,), _ = _run(tx, grads, _mesh(2, 2))
    for k, g in grads.items():
      assert out[k].dtype == g.dtype and out[k].shape == g.shape[1:]
      assert np.all(np.isfinite(np.asarray(out[k], np.float32)))


def test_nonfinite_anywhere_makes_every_update_nan_everywhere():
  grads = _grads(4, seed=4)
  grads["w"] = grads["w"].at[3, 5].set(jnp.nan)  # one device, one element
  tx = _tx(gqsgd_jax.global_quantize(bits=4, axis_name="host"))
  (out,), state = _run(tx, grads, _mesh(2, 2))
  for leaf in jax.tree.leaves(out):
    assert np.all(np.isnan(np.asarray(leaf)))
  # The inner state still advanced (as global_quantize's does).
  assert not np.array_equal(
    state.inner_state.key, tx.init(None).inner_state.key
  )


def test_apply_if_finite_over_both_axes_skips_on_every_device():
  tx = gqsgd_jax.apply_if_finite(
    optax.chain(
      _tx(gqsgd_jax.global_quantize(bits=4, axis_name="host")), optax.sgd(0.1)
    ),
    2,
    axis_name=AXES,
  )
  grads = {"w": jnp.ones((4, 10)).at[1, 3].set(jnp.inf)}
  (out,), state = _run(tx, grads, _mesh(2, 2))
  np.testing.assert_array_equal(out["w"], np.zeros(10))
  assert int(state.total_notfinite) == 1


def test_empty_scalar_and_no_leaves():
  tx = _tx(gqsgd_jax.global_quantize(bits=4, axis_name="host"))
  mesh = _mesh(2, 2)
  grads = {"e": jnp.zeros((4, 0, 3)), "s": jnp.arange(4.0)}
  (out,), _ = _run(tx, grads, mesh)
  assert out["e"].shape == (0, 3)
  assert out["s"].shape == ()
  np.testing.assert_allclose(out["s"], 1.5, atol=0.5)
  (out,), _ = _run(tx, {"e": jnp.zeros((4, 0))}, mesh)
  assert out["e"].shape == (0,)
  (out,), _ = _run(tx, {}, mesh)
  assert out == {}


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match="inner"):
    gqsgd_jax.hierarchical(lambda g: g)
  with pytest.raises(ValueError, match="wire_dtype"):
    _tx(gqsgd_jax.psum_mean(axis_name="host"), wire_dtype=jnp.int8)
  stateful = _tx(gqsgd_jax.powersgd(rank=1, axis_name="host"))
  with pytest.raises(ValueError, match="inner keeps per-worker state"):
    stateful.init({"w": jnp.zeros((4, 4))})
  tx = _tx(gqsgd_jax.psum_mean(axis_name="host"))
  with pytest.raises(ValueError, match="local"):
    jax.shard_map(
      lambda g: tx.update(g, tx.init(g))[0],
      mesh=data_mesh(2),
      in_specs=P("data"),
      out_specs=P("data"),
    )(jnp.zeros(4))
  mesh = _mesh(2, 2)
  with pytest.raises(TypeError, match=r"\['i'\]"):
    _run(tx, {"i": jnp.zeros((4, 3), jnp.int32)}, mesh)


def test_trains_with_optax_chain():
  # Least squares on 2 x 2 devices converges like the uncompressed mean.
  hosts, local, d = 2, 2, 16
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((hosts * local, 32, d)), jnp.float32)
  b = a @ jnp.ones(d)
  mesh = _mesh(hosts, local)

  def train(inner):
    tx = optax.chain(_tx(inner), optax.sgd(0.1))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P(AXES), P(AXES)), out_specs=P())
    def run(a, b):
      def body(carry, _):
        x, s = carry
        grad = jax.grad(lambda x: 0.5 * jnp.mean((a[0] @ x - b[0]) ** 2))(
          gqsgd_jax.varying(x, AXES)
        )
        u, s = tx.update(grad, s, x)
        return (optax.apply_updates(x, u), s), None

      x = jnp.zeros(d)
      (x, _), _ = jax.lax.scan(body, (x, tx.init(x)), None, length=100)
      return x

    return np.asarray(run(a, b))

  x = train(gqsgd_jax.global_quantize(bits=4, axis_name="host"))
  np.testing.assert_allclose(x, np.ones(d), atol=0.05)


# ---------------------------------------------------------------------------
# The emulated-cluster benchmark's link classification (no root needed).


def test_benchmark_classifies_collectives_by_link():
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  sys.path.insert(
    0, os.path.join(os.path.dirname(__file__), "..", "benchmarks")
  )
  import cluster_hierarchical as ch  # pylint: disable=g-import-not-at-top

  groups = ch.replica_groups("x replica_groups={{0,1},{2,3}}, y", 4)
  assert groups == [[0, 1], [2, 3]]
  assert ch.link_class(groups, 2) == "intra"
  assert ch.replica_groups("replica_groups=[2,2]<=[4], z", 4) == [
    [0, 1],
    [2, 3],
  ]
  assert ch.replica_groups("replica_groups=[2,2]<=[2,2]T(1,0), z", 4) == [
    [0, 2],
    [1, 3],
  ]
  assert ch.link_class([[0, 2], [1, 3]], 2) == "inter"
  assert ch.replica_groups("source_target_pairs={{0,2},{2,0}}", 4) == [
    [0, 2],
    [2, 0],
  ]
  assert ch.replica_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
  # A compiled hierarchical step on 2 x 2 devices: floats intra-host only.
  mesh = _mesh(2, 2)
  tx = _tx(
    gqsgd_jax.global_quantize(bits=8, axis_name="host", reduction="psum")
  )
  grads = {"w": jnp.ones((4, 1000))}
  text = (
    jax.jit(
      jax.shard_map(
        lambda g, s: tx.update(jax.tree.map(lambda x: x[0], g), s)[0],
        mesh=mesh,
        in_specs=(P(AXES), P()),
        out_specs=P(),
      )
    )
    .lower(grads, tx.init(None))
    .compile()
    .as_text()
  )
  by_link = ch.hlo_bytes_by_link(text, 4, 2)
  # Sends: all-to-all of 4000 B and all-gather of 4000 B over groups of
  # 2, (1/2) x 4000 each; the int8 psum of 500 codes over 2
  # hosts, 2 x (1/2) x 500, plus the max-abs scales.
  assert by_link["intra"] == 4000.0
  assert 500.0 <= by_link["inter"] <= 540.0
  assert by_link["unknown"] == 0.0
