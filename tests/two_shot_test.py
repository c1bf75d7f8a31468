"""Tests of global_quantize(reduction="two_shot"): exact owner sums, one
re-quantization, the owners' error feedback, wire bytes."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import gqsgd_jax
from gqsgd_jax._src import global_quantize as gq
from gqsgd_jax._src import two_shot
from gqsgd_jax._src import wire
from gqsgd_jax._src import worker_state

from _utils import assert_replicas_equal
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh
from _utils import mlp_step
from _utils import monte_carlo_estimates
from _utils import per_worker_step
from _utils import sharded_update

_IMPLS = ["xla"] + (["ffi"] if gqsgd_jax.HAS_CPU or gqsgd_jax.HAS_CUDA else [])


def _init_per_worker(tx, params, num_workers):
  """tx.init inside the map: per-worker state stacked on a leading axis."""
  mesh = data_mesh(num_workers)
  return jax.jit(
    jax.shard_map(
      lambda p: jax.tree.map(lambda x: x[None], tx.init(p)),
      mesh=mesh,
      in_specs=P(),
      out_specs=P("data"),
      check_vma=False,
    )
  )(params)


_CONFIGS = [
  (3, dict(bits=4)),
  (5, dict(bits=3, gather_bits=5, granularity="bucket")),
  (8, dict(bits=4, gather_bits=8)),
  (6, dict(bits=8, granularity="leaf")),
  (1, dict(bits=4)),
]


@pytest.mark.parametrize(
  "num_workers,kwargs",
  _CONFIGS,
  ids=[f"W{w}-{'-'.join(map(str, k.values()))}" for w, k in _CONFIGS],
)
def test_replicas_identical_across_modes_and_impls(num_workers, kwargs):
  key = jax.random.PRNGKey(num_workers)
  grads = {
    "dense": jax.random.normal(key, (num_workers, 37, 29)),
    "bias": jax.random.normal(key, (num_workers, 11)).astype(jnp.bfloat16),
    "scalar": jax.random.normal(key, (num_workers,)).astype(jnp.float16),
  }
  results = {}
  for impl in _IMPLS:
    tx = gqsgd_jax.global_quantize(reduction="two_shot", impl=impl, **kwargs)
    for mode in ("shard_map", "pmap"):
      per_worker, _ = sharded_update(tx, grads, tx.init(None), mode=mode)
      assert_replicas_equal(per_worker)
      results[impl, mode] = per_worker
  first = results["xla", "shard_map"]
  for other in results.values():
    assert_trees_bitwise_equal(first, other)
  for name, leaf in first.items():
    assert leaf.dtype == grads[name].dtype
    assert leaf.shape == grads[name].shape


@pytest.mark.parametrize(
  "num_workers,gather_bits", [(4, 8), (8, 8), (3, 4), (8, 4)]
)
def test_unbiased_with_exact_variance(num_workers, gather_bits):
  # Workers' dither: var_w = step^2 / W^2 * sum_i f_i (1 - f_i), step = M/s.
  # When W s fits the gather width, the owners' sum travels exactly and
  # that is all. Otherwise the owner re-rounds t = S L / (W s) on L levels,
  # adding E[frac(t)(1 - frac(t))] * (M / L)^2, between 0 and (M / L)^2 / 4.
  d, count, bits = 48, 3000, 4
  g = jax.random.normal(jax.random.PRNGKey(num_workers), (num_workers, d))
  tx = gqsgd_jax.global_quantize(
    bits=bits,
    reduction="two_shot",
    gather_bits=gather_bits,
    granularity="bucket",
  )
  est = monte_carlo_estimates(tx, g, count)
  g64 = np.asarray(g, np.float64)
  big_m = np.abs(g64).max()
  s = wire.max_levels(bits)
  top = two_shot.gather_levels(bits, gather_bits, num_workers)
  y = np.asarray(g * np.float32(s / np.float32(big_m)), np.float64)
  frac = y - np.floor(y)
  var_w = (big_m / s) ** 2 / num_workers**2 * (frac * (1 - frac)).sum(0)
  extra = 0.0 if top == num_workers * s else (big_m / top) ** 2 / 4
  bias = est.mean(0) - g64.mean(0)
  assert np.all(np.abs(bias) <= 5 * np.sqrt((var_w + extra) / count) + 1e-6)
  measured = est.var(0, ddof=1).mean()
  rel = 6 * np.sqrt(2 / (count * d))
  if extra == 0.0:  # exact sums: the workers' dither only
    assert abs(measured - var_w.mean()) <= rel * var_w.mean()
  else:
    assert var_w.mean() * (1 - rel) <= measured
    assert measured <= (var_w.mean() + extra) * (1 + rel)
    # The re-rounding is really there (a gather that skipped it would sit
    # at the workers' share).
    assert measured >= var_w.mean() + 0.2 * extra


def _on_grid(num_workers, d, big_m, levels, seed):
  """Gradients on every worker's grid (k * M / s): worker dither is exact,
  so the mean of the codes is the mean of the gradients."""
  rng = np.random.default_rng(seed)
  k = rng.integers(-levels, levels + 1, size=(num_workers, d))
  k[:, 0] = levels  # every worker holds M itself
  return jnp.asarray(k * np.float32(big_m / levels), jnp.float32)


@pytest.mark.parametrize("num_workers", [3, 8])
def test_owner_feedback_telescopes(num_workers):
  # With on-grid gradients the owners' exact mean m is the true mean, and
  # with feedback the sum of T outputs is T m - e_T, |e_T| <= half a gather
  # step: the running average converges like 1 / T. Without feedback (the
  # stochastic re-rounding) it converges like 1 / sqrt(T).
  d, steps, bits, big_m = 600, 24, 4, 3.0
  levels = wire.max_levels(bits)
  g = _on_grid(num_workers, d, big_m, levels, num_workers)
  exact = np.asarray(g, np.float64).mean(0)
  half_step = big_m / wire.max_levels(bits) / 2  # gather width = bits
  errors = {}
  for feedback in (False, True):
    tx = gqsgd_jax.global_quantize(
      bits=bits,
      reduction="two_shot",
      owner_feedback=feedback,
      granularity="bucket",
      scale_format="f32",
    )
    state = _init_per_worker(tx, g[0], num_workers)
    step = per_worker_step(tx, num_workers, "shard_map")
    total = np.zeros(d)
    for _ in range(steps):
      out, state = step(g, state)
      assert_replicas_equal(out)
      total += np.asarray(out[0], np.float64)
    errors[feedback] = np.abs(total / steps - exact)
  assert errors[True].max() <= half_step / steps * (1 + 1e-5)
  # Without feedback most coordinates are further off than that.
  assert np.mean(errors[False] > half_step / steps) > 0.5


def test_owner_feedback_memory_is_per_worker_and_skips_nonfinite_steps():
  w, d = 4, 1000
  tx = gqsgd_jax.global_quantize(
    bits=4, reduction="two_shot", owner_feedback=True
  )
  g = jax.random.normal(jax.random.PRNGKey(0), (w, d))
  state = _init_per_worker(tx, g[0], w)
  assert worker_state.per_worker_fields(state) == ("residual",)
  shard = two_shot.shard_size(d, w, 4, 4)
  assert [r.shape for r in state.residual] == [(w, shard)]
  step = per_worker_step(tx, w, "shard_map")
  _, state = step(g, state)
  memory = np.asarray(state.residual[0])
  assert np.any(memory != 0)  # each owner holds its own rounding error
  assert not np.array_equal(memory[0], memory[1])
  bad = g.at[2, 777].set(jnp.nan)
  out, after = step(bad, state)
  assert np.all(np.isnan(np.asarray(out)))  # on every worker, every element
  np.testing.assert_array_equal(np.asarray(after.residual[0]), memory)
  # Zero gradients with a zero memory decode to exact zeros.
  fresh = _init_per_worker(tx, g[0], w)
  zeros, _ = step(jnp.zeros_like(g), fresh)
  zeros = np.asarray(zeros)
  assert np.array_equal(zeros, np.zeros_like(zeros))
  assert not np.signbit(zeros).any()


def test_owner_feedback_state_made_outside_the_map_is_rejected():
  tx = gqsgd_jax.global_quantize(
    bits=4, reduction="two_shot", owner_feedback=True
  )
  g = jnp.ones((4, 300))
  outside = tx.init(g[0])  # structure only: empty memories
  assert [r.shape for r in outside.residual] == [(0,)]
  with pytest.raises(ValueError, match="inside jax.shard_map"):
    sharded_update(tx, g, outside)


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match="gather_bits"):
    gqsgd_jax.global_quantize(bits=4, reduction="psum", gather_bits=8)
  with pytest.raises(ValueError, match="owner_feedback"):
    gqsgd_jax.global_quantize(
      bits=4, reduction="butterfly", owner_feedback=True
    )
  with pytest.raises(ValueError, match="gather_bits"):
    gqsgd_jax.global_quantize(bits=6, reduction="two_shot", gather_bits=4)
  with pytest.raises(ValueError, match="bits"):
    gqsgd_jax.global_quantize(bits=4, reduction="two_shot", gather_bits=9)
  with pytest.raises(ValueError, match="reduction"):
    gqsgd_jax.global_quantize(
      bits=8, dithering="exponential", reduction="two_shot"
    )
  with pytest.raises(ValueError, match="two_shot"):
    gq.choose_reduction("two_shot", 4, two_shot.MAX_WORKERS + 1)


@pytest.mark.parametrize("bits,gather_bits", [(4, 4), (4, 8), (8, 8)])
def test_wire_bytes_of_a_training_step(bits, gather_bits):
  # Up: (W-1)/W of the codes in one all-to-all; down: the all-gather of the
  # owners' codes. The only float collective is the scales' pmax.
  workers = 8
  f32, n = mlp_step(gqsgd_jax.psum_mean(), workers)
  compiled, _ = mlp_step(
    gqsgd_jax.global_quantize(
      bits=bits, reduction="two_shot", gather_bits=gather_bits
    ),
    workers,
  )
  n = sum(x.size for x in jax.tree.leaves(n))
  report = gqsgd_jax.wire_report(compiled)
  assert report.float_payload_bytes == 0
  assert set(report.by_op) == {"all-reduce", "all-to-all", "all-gather"}
  up = report.by_op["all-to-all"]
  down = report.by_op["all-gather"]
  assert n * bits / 8 <= up <= n * bits / 8 * 1.02 + 1024
  assert n * gather_bits / 8 <= down <= n * gather_bits / 8 * 1.02 + 1024
  scales = sum(c.sent_bytes() for c in report.collectives if c.kind == "scale")
  codes = report.sent_bytes - scales
  share = (workers - 1) / workers
  assert codes <= share * n * (bits + gather_bits) / 8 * 1.02 + 1024
  ratio = gqsgd_jax.wire_report(f32).sent_bytes / report.sent_bytes
  assert ratio >= 0.97 * 64 / (bits + gather_bits)


def test_owner_feedback_trains_in_a_flax_step():
  # The optimizer state laid out as a user would (worker_state_specs): the
  # memories sharded, the key replicated; two steps run.
  tx = gqsgd_jax.global_quantize(
    bits=4, reduction="two_shot", owner_feedback=True
  )
  compiled, params = mlp_step(tx, 4)
  specs = worker_state_specs_of(tx, params)
  assert specs[0].residual == tuple(P("data") for _ in specs[0].residual)
  assert specs[0].key == P()
  del compiled


def worker_state_specs_of(tx, params):
  chained = optax.chain(tx, optax.sgd(0.1))
  return worker_state.worker_state_specs(jax.eval_shape(chained.init, params))
