"""Reliability across every transform: checkpoint/restore, determinism,
apply_if_finite, and property-based bad input (hypothesis)."""

import functools

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import gqsgd_jax

from _methods import METHODS
from _methods import STOCHASTIC
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh


def _problem(num_workers):
  """Per-worker least-squares data and initial params (mixed dtypes)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(42))
  a = jax.random.normal(k1, (num_workers, 16, 12))
  b = jax.random.normal(k2, (num_workers, 16))
  params = {
    "w": jnp.zeros((12,)),
    "scale": jnp.ones((), jnp.bfloat16),
    "m": jnp.zeros((12, 3), jnp.float16),
  }
  return params, a, b


def _loss(params, a, b):
  w = params["w"] + params["m"].astype(jnp.float32).sum(1)
  return 0.5 * jnp.mean((a @ w * params["scale"].astype(jnp.float32) - b) ** 2)


def _state_specs(tx, params):
  """Specs of tx's state: per-worker memories (EF) on "data", rest P()."""
  return gqsgd_jax.worker_state_specs(jax.eval_shape(tx.init, params))


def _init_fn(tx, params, mesh):
  """tx.init inside the map, so per-worker memories get one copy each."""
  return jax.jit(
    jax.shard_map(
      tx.init, mesh=mesh, in_specs=P(), out_specs=_state_specs(tx, params)
    )
  )


class _Tx:
  """A transform with its state specs and a sharded init."""

  def __init__(self, tx, params, mesh):
    self.tx = tx
    self.specs = _state_specs(tx, params)
    self._init = _init_fn(tx, params, mesh)

  def init(self, params):
    return self._init(params)


@functools.cache
def _train_fn(method, num_workers, steps, key=None):
  """A jitted shard_map that runs ``steps`` SGD steps with the method."""
  kwargs = {} if key is None else {"key": key}
  tx = optax.chain(METHODS[method](**kwargs), optax.sgd(0.05))
  mesh = data_mesh(num_workers)
  wrapped = _Tx(tx, _problem(num_workers)[0], mesh)

  @jax.jit
  @jax.shard_map(
    mesh=mesh,
    in_specs=(P(), wrapped.specs, P("data"), P("data")),
    out_specs=(P(), wrapped.specs),
  )
  def run(params, state, a, b):
    def body(carry, _):
      params, state = carry
      grads = jax.grad(_loss)(gqsgd_jax.varying(params, "data"), a[0], b[0])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(body, (params, state), None, length=steps)
    return params, state

  return wrapped, run


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_from_checkpoint_is_bit_identical(tmp_path, method):
  # Four workers: per-worker memories differ, so a restore that mixed them
  # up would show (one worker could not tell).
  num_workers = 4
  params, a, b = _problem(num_workers)
  tx, run3 = _train_fn(method, num_workers, 3)
  state = tx.init(params)
  # Uninterrupted: 3 + 3 steps.
  p1, s1 = run3(params, state, a, b)
  p_ref, s_ref = run3(p1, s1, a, b)
  # Interrupted: save after 3 steps, restore into a fresh process state.
  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  ckpt.save(path, {"params": p1, "state": s1})
  ckpt.wait_until_finished()
  target = jax.tree.map(
    ocp.utils.to_shape_dtype_struct, {"params": p1, "state": s1}
  )
  restored = ckpt.restore(path, target)
  assert jax.tree.structure(restored["state"]) == jax.tree.structure(s1)
  p2, s2 = run3(restored["params"], restored["state"], a, b)
  jax.block_until_ready((p2, s2))
  assert_trees_bitwise_equal((p2, s2), (p_ref, s_ref))


@pytest.mark.parametrize("method", sorted(STOCHASTIC))
def test_same_key_same_run_different_key_different_run(method):
  params, a, b = _problem(4)
  tx, run = _train_fn(method, 4, 2, key=0)
  first = run(params, tx.init(params), a, b)
  again = run(params, tx.init(params), a, b)
  assert_trees_bitwise_equal(first, again)
  tx1, run1 = _train_fn(method, 4, 2, key=1)
  other = run1(params, tx1.init(params), a, b)
  assert not np.array_equal(
    np.asarray(other[0]["w"]), np.asarray(first[0]["w"])
  )


def _guarded_step(tx, num_workers, params):
  mesh = data_mesh(num_workers)
  wrapped = _Tx(tx, params, mesh)

  @jax.jit
  @jax.shard_map(
    mesh=mesh,
    in_specs=(P(), wrapped.specs, P("data")),
    out_specs=(P(), wrapped.specs),
  )
  def step(params, state, g):
    updates, state = tx.update(jax.tree.map(lambda x: x[0], g), state, params)
    return optax.apply_updates(params, updates), state

  return wrapped, step


_GOOD = {"w": jnp.tile(jnp.linspace(-1, 1, 10), (4, 1))}
_BAD = {"w": _GOOD["w"].at[1, 3].set(jnp.nan)}  # one worker, one value


@pytest.mark.parametrize("method", sorted(METHODS))
def test_apply_if_finite_skips_bad_steps_without_corrupting_state(method):
  tx = gqsgd_jax.apply_if_finite(
    optax.chain(METHODS[method](), optax.sgd(0.1)), max_consecutive_errors=3
  )
  params = {"w": jnp.ones(10)}
  wrapped, step = _guarded_step(tx, 4, params)
  state = wrapped.init(params)
  p_good, s_good = step(params, state, _GOOD)
  p_bad, s_bad = step(params, state, _BAD)
  # All workers skip the bad step: nothing changes but the counters...
  assert_trees_bitwise_equal(p_bad, params)
  assert_trees_bitwise_equal(s_bad.inner_state, state.inner_state)
  assert int(s_bad.notfinite_count) == 1 and not bool(s_bad.last_finite)
  # ... so a good step after it is exactly the good step from the start.
  p_after, s_after = step(p_bad, s_bad, _GOOD)
  assert_trees_bitwise_equal(p_after, p_good)
  assert_trees_bitwise_equal(s_after.inner_state, s_good.inner_state)
  assert int(s_after.notfinite_count) == 0
  assert int(s_after.total_notfinite) == 1


def test_optax_apply_if_finite_after_the_compressor_is_safe():
  # On the mean gradient (identical everywhere) optax's own wrapper works:
  # the compressor turns one worker's NaN into NaN on every worker.
  tx = optax.chain(
    gqsgd_jax.global_quantize(bits=4), optax.apply_if_finite(optax.sgd(0.1), 3)
  )
  params = {"w": jnp.ones(10)}
  wrapped, step = _guarded_step(tx, 4, params)
  p_bad, s_bad = step(params, wrapped.init(params), _BAD)
  assert_trees_bitwise_equal(p_bad, params)
  assert int(s_bad[1].notfinite_count) == 1


def test_apply_if_finite_gives_up_after_max_consecutive_errors():
  tx = optax.chain(
    gqsgd_jax.psum_mean(),
    gqsgd_jax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=1),
  )
  params = {"w": jnp.ones(10)}
  wrapped, step = _guarded_step(tx, 4, params)
  state = wrapped.init(params)
  p1, state = step(params, state, _BAD)
  assert_trees_bitwise_equal(p1, params)
  p2, state = step(p1, state, _BAD)  # second in a row: applied anyway
  assert np.isnan(np.asarray(p2["w"])).any()
  with pytest.raises(ValueError, match="max_consecutive_errors"):
    gqsgd_jax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=-1)


# ---------------------------------------------------------------------------
# Property-based bad input: fixed shapes (one compile per method and dtype),
# values drawn from NaN, ±Inf, subnormals, huge, zeros and mixtures.

_FUZZ_WORKERS = 2
_MAY_EXCEED_INPUT = {"powersgd", "acpsgd", "lgreco", "jointsq", "dgc"}
_SHAPES = {"a": (9,), "b": (2, 3), "c": ()}
_SPECIAL = [
  0.0,
  -0.0,
  np.nan,
  np.inf,
  -np.inf,
  1e-40,
  -1e-45,
  3e38,
  -3e38,
  1e-30,
  65504.0,
  1.0,
  -2.5,
]


@functools.cache
def _fuzz_step(method, dtype):
  tx = METHODS[method]()
  mesh = data_mesh(_FUZZ_WORKERS)
  params = {k: jnp.zeros(s, dtype) for k, s in _SHAPES.items()}
  wrapped = _Tx(tx, params, mesh)

  @jax.jit
  @jax.shard_map(
    mesh=mesh, in_specs=(P("data"), wrapped.specs, P()), out_specs=P("data")
  )
  def step(g, state, params):
    updates, _ = tx.update(jax.tree.map(lambda x: x[0], g), state, params)
    return jax.tree.map(lambda x: x[None], updates)

  return (lambda g, state: step(g, state, params)), wrapped.init(params)


def _values(dtype):
  finfo = np.finfo(dtype)
  with np.errstate(over="ignore"):
    special = [v for v in _SPECIAL if not np.isfinite(v) or abs(v) <= finfo.max]
  special = [
    v
    for v in special
    if v == 0 or not np.isfinite(v) or abs(v) >= finfo.smallest_subnormal
  ]
  return st.one_of(
    st.sampled_from(special),
    st.floats(
      -float(finfo.max),
      float(finfo.max),
      width=32 if dtype == np.float32 else 16,
      allow_subnormal=True,
    ),
  )


@st.composite
def _gradients(draw, dtype):
  out = {}
  for name, shape in _SHAPES.items():
    full = (_FUZZ_WORKERS,) + shape
    kind = draw(st.sampled_from(["any", "zeros", "finite"]))
    if kind == "zeros":
      out[name] = np.zeros(full, dtype)
    elif kind == "finite":
      out[name] = draw(
        hnp.arrays(
          dtype,
          full,
          elements=st.floats(
            -1e4, 1e4, width=16 if dtype == np.float16 else 32
          ),
        )
      )
    else:
      out[name] = draw(hnp.arrays(dtype, full, elements=_values(dtype)))
  return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("method", sorted(METHODS))
@hypothesis.settings(
  max_examples=12,
  deadline=None,
  derandomize=True,
  suppress_health_check=[
    hypothesis.HealthCheck.too_slow,
    hypothesis.HealthCheck.data_too_large,
  ],
)
@hypothesis.given(data=st.data())
def test_fuzzed_gradients(method, dtype, data):
  step, state = _fuzz_step(method, dtype)
  grads = data.draw(_gradients(dtype))
  out = jax.tree.map(np.asarray, step(grads, state))
  flat = np.concatenate(
    [np.ravel(x).astype(np.float64) for x in grads.values()]
  )
  all_finite = np.all(np.isfinite(flat))
  # All leaves share one bucket (one dtype, far below bucket_bytes).
  overflow = (
    method == "gq_exponential" and all_finite and np.abs(flat).max() > 2.0**100
  )
  for name, g in grads.items():
    o = out[name]
    assert o.dtype == g.dtype and o.shape == g.shape
    # Every worker holds the same bits.
    assert np.array_equal(
      o[0].reshape(-1).view(np.uint8), o[-1].reshape(-1).view(np.uint8)
    )
    if not np.all(np.isfinite(g)):
      # Non-finite in -> non-finite out, never laundered into numbers.
      assert not np.all(np.isfinite(o[0])), (name, g, o)
    elif overflow:
      assert np.all(np.isnan(o[0]))  # documented overflow signal
    elif all_finite and (
      method not in _MAY_EXCEED_INPUT
      or np.abs(flat).max() < np.finfo(dtype).max / 4
    ):
      # Finite in -> finite out. Low-rank projections and re-quantized
      # sparse selections can legitimately exceed the inputs' magnitude, so
      # for them inputs within 4x of the dtype's max may round to inf.
      assert np.all(np.isfinite(o[0])), (name, g, o)
      if not np.any(g) and not np.any(flat):
        assert not np.any(o[0]), (name, o)  # zeros in -> exact zeros out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_init_under_pmap_without_axis_name(method):
  # init needs no collective: a pmap that binds no axis (or another one)
  # must work, not fail on the unbound data axis.
  params = jax.tree.map(lambda x: jnp.stack([x, x]), _problem(2)[0])
  devices = jax.devices()[:2]
  tx = METHODS[method]()
  state = jax.pmap(tx.init, devices=devices)(params)
  expected = jax.pmap(tx.init, axis_name="data", devices=devices)(params)
  if method == "gq4_owner_feedback":
    # Its memories hold 1/W of each bucket: without the axis W is unknown
    # and they come out empty (the structure only), as documented.
    assert [r.shape[1] for r in state.residual] == [0] * len(state.residual)
    assert [r.shape[1] > 0 for r in expected.residual] == [True] * len(
      state.residual
    )
    return
  assert_trees_bitwise_equal(state, expected)
