"""Tests of the Hadamard transforms and of thc: statistics, EF, wire, input."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest
import scipy.linalg

import gqsgd_jax
from gqsgd_jax._src.baselines import hadamard
from gqsgd_jax._src.baselines import thc as thc_lib
from gqsgd_jax._src.worker_state import worker_state_specs

from _utils import assert_replicas_equal
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh


def _local(tree):
  return jax.tree.map(lambda x: x[0], tree)


def _init(tx, params, num_workers, mode="shard_map"):
  """Per-worker states: (W * size) memories under shard_map, (W, ...) pmap."""
  if mode == "pmap":
    return jax.pmap(
      lambda _: tx.init(params),
      axis_name="data",
      devices=jax.devices()[:num_workers],
    )(jnp.arange(num_workers))
  specs = worker_state_specs(tx.init(params))
  init = jax.shard_map(
    lambda: tx.init(params),
    mesh=data_mesh(num_workers),
    in_specs=(),
    out_specs=specs,
  )
  return jax.jit(init)()


@functools.cache
def _stepper(tx, num_workers, mode, specs):
  """A compiled per-worker tx.update, cached so repeated steps reuse it."""
  if mode == "pmap":
    return jax.pmap(
      tx.update,
      axis_name="data",
      in_axes=(0, 0),
      out_axes=(0, 0),
      devices=jax.devices()[:num_workers],
    )

  @jax.jit
  @jax.shard_map(
    mesh=data_mesh(num_workers),
    in_specs=(P("data"), specs),
    out_specs=(P(), P("data"), specs),
  )
  def step(g, s):
    u, s = tx.update(_local(g), s)
    # out_specs P() checks the updates are typed replicated.
    return u, jax.tree.map(lambda x: x[None], u), s

  return lambda g, s: step(g, s)[1:]


def _update(tx, stacked, state, mode="shard_map"):
  """tx.update per worker: (per-worker updates, new per-worker state)."""
  num_workers = jax.tree.leaves(stacked)[0].shape[0]
  step = _stepper(tx, num_workers, mode, worker_state_specs(state))
  return jax.block_until_ready(step(stacked, state))


def _errors(state, num_workers):
  """The memories as (W, padded size) arrays per buffer (its chunks' side
  by side), whichever mode made the state."""
  return [
    np.concatenate([np.asarray(c).reshape(num_workers, -1) for c in e], axis=1)
    for e in state.error
  ]


# -----------------------------------------------------------------------------
# Hadamard transforms.


_fwht = jax.jit(hadamard.hadamard_transform)


@pytest.mark.parametrize("d", [1, 2, 8, 512], ids=lambda d: f"d{d}")
def test_hadamard_matches_matrix_orthonormal_and_self_inverse(d):
  x = jax.random.normal(jax.random.PRNGKey(d), (3, d))
  h = scipy.linalg.hadamard(d) / np.sqrt(d)
  y = _fwht(x)
  assert y.dtype == x.dtype and y.shape == x.shape
  np.testing.assert_allclose(
    y, np.asarray(x, np.float64) @ h, rtol=0, atol=1e-5
  )
  np.testing.assert_allclose(_fwht(y), x, atol=1e-5)
  np.testing.assert_allclose(
    np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
  )
  # The rows of the transform are orthonormal: H H^T = I.
  hh = np.asarray(_fwht(jnp.eye(d)), np.float64)
  np.testing.assert_allclose(hh @ hh.T, np.eye(d), atol=1e-5)
  # bf16 keeps its dtype (the transform runs in the input's dtype).
  assert _fwht(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("block_log2", [None, 0, 2, 6])
def test_randomized_hadamard_inverse_and_blocks(block_log2):
  d = 64
  x = jax.random.normal(jax.random.PRNGKey(0), (d,))
  signs = hadamard.random_signs(jax.random.PRNGKey(1), d)
  assert set(np.unique(signs).tolist()) == {-1.0, 1.0}
  fwd = jax.jit(hadamard.randomized_hadamard, static_argnames="block_log2")
  inv = jax.jit(
    hadamard.inverse_randomized_hadamard, static_argnames="block_log2"
  )
  y = fwd(x, signs, block_log2=block_log2)
  back = inv(y, signs, block_log2=block_log2)
  np.testing.assert_allclose(back, x, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-5)
  block = d if block_log2 is None else 2**block_log2
  h = scipy.linalg.block_diag(
    *[scipy.linalg.hadamard(block) / np.sqrt(block)] * (d // block)
  )
  np.testing.assert_allclose(
    y, h @ (np.asarray(signs) * np.asarray(x)), atol=1e-5
  )


def test_hadamard_rejects_bad_lengths():
  with pytest.raises(ValueError, match="power of two"):
    hadamard.hadamard_transform(jnp.ones(6))
  signs = jnp.ones(12)
  with pytest.raises(ValueError, match="multiple of 2"):
    hadamard.randomized_hadamard(jnp.ones(12), signs, block_log2=3)
  with pytest.raises(ValueError, match="signs"):
    hadamard.randomized_hadamard(jnp.ones(8), jnp.ones(4))


def test_shared_signs_are_the_same_on_every_worker():
  mesh = data_mesh(4)
  key = jax.random.PRNGKey(5)

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P(), out_specs=P("data"))
  def per_worker(key):
    return hadamard.random_signs(key, 32)[None]

  signs = np.asarray(per_worker(key))
  assert np.all(signs == signs[0]) and not np.all(signs[0] == signs[0, 0])


# -----------------------------------------------------------------------------
# Static layout.


@pytest.mark.parametrize("n", [1, 3, 1000, 1024, 1025, 5000, 70001, 2**15])
def test_chunk_plan_is_powers_of_two_with_little_padding(n):
  for chunk_size in (2**11, 2**23):
    chunks = thc_lib.plan_chunks(n, chunk_size)
    total = sum(chunks)
    assert all(c & (c - 1) == 0 and c <= max(chunk_size, 1) for c in chunks)
    assert total >= n
    if n <= thc_lib.MIN_CHUNK:
      assert chunks == (1 << (n - 1).bit_length(),)
    else:
      assert total - n < thc_lib.MIN_CHUNK and total % thc_lib.MIN_CHUNK == 0
      assert list(chunks) == sorted(chunks, reverse=True)


def test_wire_dtype_is_the_smallest_that_cannot_overflow():
  assert thc_lib.wire_dtype(17, 16) == np.uint8  # 17 * 15 = 255
  assert thc_lib.wire_dtype(18, 16) == np.float16  # 270
  assert thc_lib.wire_dtype(136, 16) == np.float16  # 2040
  assert thc_lib.wire_dtype(137, 16) == np.int32  # 2055 > 2048
  assert thc_lib.wire_dtype(16, 129) == np.float16  # 2048
  assert thc_lib.wire_dtype(1, 2**16) == np.int32
  with pytest.raises(ValueError, match="levels"):
    thc_lib.wire_dtype(2**16, 2**16)
  # float16 holds every integer up to 2048, not 2049.
  assert float(np.float16(2048)) == 2048 and float(np.float16(2049)) != 2049


# -----------------------------------------------------------------------------
# Statistics.


def _rotated(x, signs, block):
  """Numpy RHT of the rows of x (float64)."""
  d = x.shape[-1]
  h = scipy.linalg.block_diag(
    *[scipy.linalg.hadamard(block) / np.sqrt(block)] * (d // block)
  )
  return (x * signs) @ h.T, h


@pytest.mark.parametrize(
  "num_workers,block_log2",
  [(1, None), (2, None), (3, None), (5, 3), (8, None), (16, None)],
)
def test_unbiased_without_clipping_with_exact_variance(num_workers, block_log2):
  # overflow_prob=0: t = N >= |x~_j|, nothing clips. In the rotated domain
  # each worker's coordinate j has variance delta^2 f_ij (1 - f_ij) (SR of
  # the fractional part f_ij); the inverse rotation mixes them with weights
  # H_kj^2 = 1 / block, so var(out_k) = (delta / W)^2 / block *
  # sum_i sum_{j in block(k)} f_ij (1 - f_ij) <= delta^2 / (4 W).
  d, count, levels = 64, 2000, 16
  g = jax.random.normal(jax.random.PRNGKey(num_workers), (num_workers, d))
  g = g.at[:, 5].set(0.0).at[0, 7].set(4.0)
  tx = thc_lib.thc(
    levels=levels,
    overflow_prob=0.0,
    error_feedback=False,
    block_log2=block_log2,
  )
  state = tx.init(None)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(count) + 1000)

  @jax.jit
  @jax.shard_map(
    mesh=data_mesh(num_workers), in_specs=(P("data"), P()), out_specs=P()
  )
  def run(g, keys):
    return jax.vmap(lambda k: tx.update(g[0], state._replace(key=k))[0])(keys)

  est = np.asarray(run(g, keys), np.float64)
  g64 = np.asarray(g, np.float64)
  signs = np.asarray(
    thc_lib.chunk_signs(state.rotation_key, 0, 0, d), np.float64
  )
  block = d if block_log2 is None else 2**block_log2
  rot, _ = _rotated(g64, signs, block)
  t = np.linalg.norm(g64, axis=1).max()
  delta = 2 * t / (levels - 1)
  y = (rot + t) / delta
  frac = y - np.floor(y)
  per_rot = (delta / num_workers) ** 2 * (frac * (1 - frac)).sum(0)
  var = per_rot.reshape(-1, block).mean(1).repeat(block)
  bound = delta**2 / (4 * num_workers)
  assert np.all(var <= bound * (1 + 1e-9))
  se = np.sqrt(var / count)
  bias = est.mean(0) - g64.mean(0)
  assert np.all(np.abs(bias) <= 5 * se + 1e-5), np.max(np.abs(bias) / se)
  measured = est.var(0, ddof=1).mean()
  exact = var.mean()
  assert abs(measured - exact) <= 6 * np.sqrt(2 / (count * d)) * exact
  print(
    f"W={num_workers}: var {measured:.4g} exact {exact:.4g} bound {bound:.4g}"
  )


def _unrotated(errors, state):
  """Per-worker memories of one single-chunk buffer, back in the gradient's
  domain (the state keeps them rotated)."""
  d = errors.shape[1]
  key = jnp.asarray(state.rotation_key).reshape(-1, 2)[0]  # any mode
  signs = thc_lib.chunk_signs(key, 0, 0, d)
  inv = jax.vmap(lambda e: hadamard.inverse_randomized_hadamard(e, signs))
  return np.asarray(inv(jnp.asarray(errors)), np.float64)


def test_error_feedback_identity_with_clipping():
  # Per worker: g + e_old = contribution + e_new with contribution =
  # RHT^-1(dequant(codes)); summed over workers the contributions are W
  # times the decoded mean. Clipping is on (p = 0.2) and the second step
  # starts from non-zero memories.
  w, n = 4, 300
  g = jax.random.normal(jax.random.PRNGKey(1), (3, w, n))
  g = g.at[:, :, 0].mul(40.0)  # a spike: its rotated energy gets clipped
  tx = thc_lib.thc(overflow_prob=0.2)
  params = jnp.zeros(n)
  state = _init(tx, params, w)
  clipped = False
  for step in range(3):
    old = _unrotated(_errors(state, w)[0], state)
    out, state = _update(tx, g[step], state)
    assert_replicas_equal(out)
    new = _unrotated(_errors(state, w)[0], state)
    lhs = np.asarray(g[step], np.float64).sum(0) + old[:, :n].sum(0)
    rhs = w * np.asarray(out[0], np.float64) + new[:, :n].sum(0)
    np.testing.assert_allclose(rhs, lhs, rtol=0, atol=2e-5 * np.abs(lhs).max())
    clipped |= np.abs(new).max() > 1.0  # more than rounding error
    assert np.any(new[:, n:] != 0)  # the padding carries memory too
  assert clipped
  # Without error feedback the state has no memories.
  tx = thc_lib.thc(error_feedback=False)
  assert tx.init(params).error == ()


@pytest.mark.parametrize("levels", [16, 1024])
def test_error_feedback_identity_across_leaves_and_chunks(levels):
  # One fused buffer of 700 + 1500 + 33 elements, padded to 3072 and cut
  # into chunks of 2048 and 1024: leaf "b" straddles the chunks, the chunks
  # are assembled from the leaves' pieces and the leaves from the chunks'.
  # Per step, summed over workers: g + e_old = W * out + e_new (memories
  # unrotated chunk by chunk); 1024 levels round with the counter hash and
  # sum in int32.
  w = 3
  shapes = {"a": (700,), "b": (30, 50), "c": (33,)}
  params = {k: jnp.zeros(v) for k, v in shapes.items()}
  tx = thc_lib.thc(levels=levels, overflow_prob=0.2)
  state = _init(tx, params, w)
  key = jnp.asarray(state.rotation_key).reshape(-1, 2)[0]
  assert thc_lib.plan_chunks(2233) == (2048, 1024)

  def unrotated(errors):
    parts, off = [], 0
    for c, d in enumerate((2048, 1024)):
      signs = thc_lib.chunk_signs(key, 0, c, d)
      inv = jax.vmap(
        functools.partial(hadamard.inverse_randomized_hadamard, signs=signs)
      )
      parts.append(np.asarray(inv(jnp.asarray(errors[:, off : off + d]))))
      off += d
    return np.concatenate(parts, axis=1).astype(np.float64)

  for step in range(3):
    keys = jax.random.split(jax.random.PRNGKey(step), 3)
    g = {
      k: jax.random.normal(kk, (w,) + v) * (1 + 10 * i)
      for i, ((k, v), kk) in enumerate(zip(sorted(shapes.items()), keys))
    }
    old = unrotated(_errors(state, w)[0])
    out, state = _update(tx, g, state)
    assert_replicas_equal(out)
    new = unrotated(_errors(state, w)[0])
    flat_g = np.concatenate(
      [np.asarray(g[k], np.float64).reshape(w, -1) for k in sorted(shapes)],
      axis=1,
    )
    flat_out = np.concatenate(
      [np.asarray(out[k][0], np.float64).reshape(-1) for k in sorted(shapes)]
    )
    lhs = flat_g.sum(0) + old[:, :2233].sum(0)
    rhs = w * flat_out + new[:, :2233].sum(0)
    np.testing.assert_allclose(rhs, lhs, rtol=0, atol=2e-5 * np.abs(lhs).max())
    assert np.any(new[:, 2233:] != 0)  # the padding carries memory too


def test_error_feedback_converges_on_least_squares():
  # Heavy clipping (p = 0.3) is biased; error feedback still reaches the
  # uncompressed loss within 5 %.
  num_workers, n, d, steps = 4, 64, 16, 300
  ka, kx = jax.random.split(jax.random.PRNGKey(7))
  a = jax.random.normal(ka, (num_workers, n, d))
  b = a @ jax.random.normal(kx, (d,))
  b = b + 0.1 * jax.random.normal(jax.random.PRNGKey(8), b.shape)
  mesh = data_mesh(num_workers)

  def loss(x, a, b):
    return 0.5 * jnp.mean((a @ x - b) ** 2)

  def train(compressor):
    tx = optax.chain(compressor, optax.sgd(0.05))
    x0 = jnp.zeros(d)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
    def run(a, b):
      a, b = a[0], b[0]

      def body(carry, _):
        x, state = carry
        grad = jax.grad(loss)(gqsgd_jax.varying(x, "data"), a, b)
        updates, state = tx.update(grad, state, x)
        return (optax.apply_updates(x, updates), state), None

      (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)
      return x

    x = run(a, b)
    return float(jnp.mean(jax.vmap(loss, (None, 0, 0))(x, a, b)))

  reference = train(gqsgd_jax.psum_mean())
  assert train(thc_lib.thc(overflow_prob=0.3)) <= reference * 1.05
  assert train(thc_lib.thc()) <= reference * 1.05


# -----------------------------------------------------------------------------
# Replica consistency, modes, the integer sum.


def _grads(num_workers, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
    "dense": jax.random.normal(k1, (num_workers, 37, 41)),
    "bias": jax.random.normal(k2, (num_workers, 11)).astype(jnp.bfloat16),
    "scale": jax.random.normal(k3, (num_workers,)).astype(jnp.float16),
    "empty": jnp.zeros((num_workers, 0, 3)),
  }


@pytest.mark.parametrize(
  "num_workers,kwargs",
  [
    (3, dict(granularity="leaf", block_log2=4)),
    (8, dict(levels=4, chunk_size=1024)),
  ],
  ids=["W3-leaf-partial", "W8-q4-chunks"],
)
def test_replicas_identical_under_shard_map_and_pmap(num_workers, kwargs):
  grads = _grads(num_workers)
  tx = thc_lib.thc(**kwargs)
  params = _local(grads)
  results = {}
  for mode in ("shard_map", "pmap"):
    state = _init(tx, params, num_workers, mode)
    out, state = _update(tx, grads, state, mode)
    out2, state = _update(tx, grads, state, mode)  # with memories
    assert_replicas_equal((out, out2))
    results[mode] = (
      out,
      out2,
      _errors(state, num_workers),
      state.key.reshape(-1, 2)[0],
    )
  assert_trees_bitwise_equal(results["shard_map"], results["pmap"])
  out = _local(results["pmap"][0])
  for name, leaf in out.items():
    assert leaf.dtype == grads[name].dtype
    assert leaf.shape == grads[name].shape[1:]
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  # Workers' memories differ (independent dither), keys stay shared.
  errors = results["pmap"][2][0]
  assert not np.array_equal(errors[0], errors[1])


@pytest.mark.parametrize(
  "num_workers,levels,dtype",
  [
    (17, 16, np.uint8),  # W (q - 1) = 255
    (16, 129, np.float16),  # 2048
    (4, 1000, np.int32),  # 3996
  ],
  ids=["u8-255", "f16-2048", "i32"],
)
def test_integer_sum_at_the_wire_dtype_limit(num_workers, levels, dtype):
  # Every worker sends the top code q - 1 on every coordinate: its rotated
  # vector is the constant c and z = 0.25 < 1 clips it to t. The sum is
  # exactly W (q - 1), the dtype's limit, and decodes to t on every
  # coordinate; a wrap-around would decode to about -t.
  assert thc_lib.wire_dtype(num_workers, levels) == dtype
  d = 64
  tx = thc_lib.thc(levels=levels, overflow_prob=0.4, error_feedback=False)
  state = tx.init(None)
  signs = thc_lib.chunk_signs(state.rotation_key, 0, 0, d)
  x = hadamard.inverse_randomized_hadamard(jnp.full(d, 0.5), signs)
  stacked = jnp.broadcast_to(x, (num_workers, d))
  per_worker, _ = _update(
    tx,
    stacked,
    jax.tree.map(
      lambda s: jnp.broadcast_to(s, (num_workers,) + s.shape), state
    ),
    "pmap",
  )
  assert_replicas_equal(per_worker)
  t = 0.5 * np.sqrt(d) * thc_lib.clip_quantile(0.4) / np.sqrt(d)
  expected = np.asarray(
    hadamard.inverse_randomized_hadamard(jnp.full(d, t, jnp.float32), signs)
  )
  np.testing.assert_allclose(per_worker[0], expected, rtol=1e-5, atol=1e-6)
  # The signs agree wherever x is not (up to the rounding of the transform's
  # sums) zero.
  x = np.asarray(x)
  big = np.abs(x) > 1e-6 * np.abs(x).max()
  assert np.all(np.sign(per_worker[0][big]) == np.sign(x[big]))


# -----------------------------------------------------------------------------
# Wire bytes.


def _compiled_thc_step(tx, num_workers, params):
  mesh = data_mesh(num_workers)
  specs = worker_state_specs(tx.init(params))
  state = jax.jit(
    jax.shard_map(
      lambda: tx.init(params), mesh=mesh, in_specs=(), out_specs=specs
    )
  )()

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P("data"), specs), out_specs=(P(), specs))
  def step(g, s):
    return tx.update(_local(g), s)

  grads = jax.tree.map(lambda p: jnp.zeros((num_workers,) + p.shape), params)
  return step.lower(grads, state).compile()


@pytest.mark.parametrize(
  "num_workers,levels,granularity",
  [
    (8, 16, "fused"),
    (4, 16, "leaf"),
    (8, 256, "fused"),
  ],
  ids=["u8", "u8-leaf", "f16"],
)
def test_hlo_wire_bytes_match_the_formula(num_workers, levels, granularity):
  params = {
    "w1": jnp.zeros((64, 256)),
    "b1": jnp.zeros(256),
    "w2": jnp.zeros((256, 10)),
    "b2": jnp.zeros(10),
  }
  tx = thc_lib.thc(levels=levels, granularity=granularity)
  report = gqsgd_jax.wire_report(_compiled_thc_step(tx, num_workers, params))
  sizes = [p.size for p in jax.tree.leaves(params)]
  expected = thc_lib.wire_bytes(
    sizes, num_workers, levels=levels, granularity=granularity
  )
  assert set(report.by_op) == {"all-reduce"}  # the psum and the norm pmax
  assert report.total_bytes == expected.result
  assert np.isclose(report.sent_bytes, expected.sent)
  assert expected.received == expected.sent
  itemsize = thc_lib.wire_dtype(num_workers, levels).itemsize
  n = sum(sizes)
  # Padding stays below MIN_CHUNK elements per buffer.
  assert (
    n * itemsize
    <= report.payload_bytes
    < (n + thc_lib.MIN_CHUNK * (1 if granularity == "fused" else 4)) * itemsize
  )
  if itemsize == 1:
    assert report.float_payload_bytes == 0
  print(
    f"W={num_workers} q={levels} {granularity}: {report.total_bytes} B "
    f"for {n} elements"
  )


# -----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_zeros_nonfinite_empty_scalar_and_dtypes(mode):
  w = 4
  grads = {
    "zeros": jnp.zeros((w, 9)),
    "nan": jnp.ones((w, 5)).at[2, 3].set(jnp.nan),
    "inf": jnp.ones((w, 6)).at[1, 0].set(-jnp.inf),
    "fine": jnp.full((w, 8), 0.5),
    "empty": jnp.zeros((w, 0)),
    "scalar": jnp.arange(w, dtype=jnp.float32),
    "bf16": jnp.full((w, 4), 0.25, jnp.bfloat16),
    "f16": jnp.full((w, 2, 2), -1.5, jnp.float16),
  }
  # One buffer per leaf, so a non-finite leaf only poisons its own buffer.
  tx = thc_lib.thc(granularity="leaf")
  state = _init(tx, _local(grads), w, mode)
  out, new_state = _update(tx, grads, state, mode)
  assert_replicas_equal(out)
  out = jax.tree.map(lambda x: np.asarray(x[0]), out)
  assert (
    np.array_equal(out["zeros"], np.zeros(9))
    and not np.signbit(out["zeros"]).any()
  )
  assert np.all(np.isnan(out["nan"]))  # never laundered into numbers
  assert np.all(np.isnan(out["inf"]))
  assert out["empty"].shape == (0,)
  assert out["scalar"].shape == ()
  for name in ("bf16", "f16"):
    assert out[name].dtype == grads[name].dtype
    assert out[name].shape == grads[name].shape[1:]
  errors = dict(
    zip(sorted(k for k in grads if k != "empty"), _errors(new_state, w))
  )
  # Values of the finite leaves, constant and one-element ones included
  # (sizes 1, 4, 8: no padding, so each leaf is exactly one chunk).
  # (1) Error feedback is exact: each worker's decoded x^ = x - e_new with
  # x = g (zero memories before), so mean(g) - (the returned mean) =
  # mean(e_new), and the rotation (orthonormal, in whichever domain the
  # memory is kept) preserves its norm, up to the rounding of the dtype.
  # (2) Below d' = z^2 nothing is clipped (t = N) and each rotated
  # coordinate moves by < delta = 2N / (q - 1), so ||mean - x^||_2 <=
  # sqrt(d') delta with N the largest worker norm, d' the padded size.
  z = thc_lib.clip_quantile(1e-4)
  for name in ("zeros", "fine", "scalar", "bf16", "f16"):
    g = np.asarray(grads[name], np.float32).reshape(w, -1)
    got = np.asarray(out[name], np.float32).reshape(-1)
    e = errors[name]
    d_pad = e.shape[1]
    assert d_pad == g.shape[1] or name == "zeros", name
    eps = float(jnp.finfo(grads[name].dtype).eps)
    lost = np.linalg.norm(g.mean(0) - got)
    kept = np.linalg.norm(e.mean(0))
    assert abs(lost - kept) <= np.sqrt(d_pad) * (
      max(eps, 1e-5) * np.abs(got).max() + 1e-6
    ), (name, lost, kept)
    if d_pad <= z**2:
      big_n = np.linalg.norm(g, axis=1).max()
      delta = 2 * big_n / (16 - 1)
      assert np.linalg.norm(got - g.mean(0)) <= (
        np.sqrt(d_pad) * delta * (1 + eps)
      ), name
  # A non-finite step leaves those memories untouched (zeros here), so the
  # next finite step is not poisoned; zeros keep zero memories.
  for name in ("nan", "inf", "zeros"):
    assert np.array_equal(errors[name], np.zeros_like(errors[name])), name
  grads["nan"] = jnp.ones((w, 5))
  again, _ = _update(tx, grads, new_state, mode)
  assert np.all(np.isfinite(np.asarray(again["nan"])))


def test_bad_arguments_name_the_argument():
  for levels in (1, 0, 2**16 + 1):
    with pytest.raises(ValueError, match="levels"):
      thc_lib.thc(levels=levels)
  for levels in (16.0, "16", True):
    with pytest.raises(TypeError, match="levels"):
      thc_lib.thc(levels=levels)
  for p in (-0.1, 0.5, 1.0, "1e-4", None):
    with pytest.raises(ValueError, match="overflow_prob"):
      thc_lib.thc(overflow_prob=p)
  for block in (0, 31, 2.0, True):
    with pytest.raises(ValueError, match="block_log2"):
      thc_lib.thc(block_log2=block)
  for size in (1000, 512, 2**20 + 1):
    with pytest.raises(ValueError, match="chunk_size"):
      thc_lib.thc(chunk_size=size)
  with pytest.raises(ValueError, match="granularity"):
    thc_lib.thc(granularity="bucket")
  with pytest.raises(ValueError, match="key"):
    thc_lib.thc(key=jnp.zeros(3))
  with pytest.raises(ValueError, match="needs params"):
    thc_lib.thc().init(None)


def test_error_memory_is_one_array_per_chunk():
  # The memories follow plan_chunks: per buffer, one f32[d] per chunk (a
  # fused buffer of 2233 elements: chunks of 2048 and 1024); per leaf with
  # granularity="leaf"; a state with one flat memory per buffer is refused.
  params = {"a": jnp.zeros(700), "b": jnp.zeros((30, 50)), "c": jnp.zeros(33)}
  state = thc_lib.thc().init(params)
  assert [[c.shape for c in e] for e in state.error] == [[(2048,), (1024,)]]
  assert all(c.dtype == jnp.float32 for c in state.error[0])
  leaf = thc_lib.thc(granularity="leaf").init(params)
  assert [[c.shape for c in e] for e in leaf.error] == [
    [(1024,)],
    [(2048,)],
    [(64,)],
  ]
  tx = thc_lib.thc()
  flat = state._replace(error=(jnp.zeros(3072),))
  step = jax.shard_map(
    lambda g: tx.update(g, flat)[0],
    mesh=data_mesh(2),
    in_specs=P(),
    out_specs=P(),
  )
  with pytest.raises(ValueError, match="state.error"):
    step(params)


def test_unbound_axis_state_mismatch_and_integer_leaves():
  tx = thc_lib.thc()
  grads = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    tx.update(grads, tx.init(grads))
  mesh = data_mesh(2)
  other = tx.init({"w": jnp.ones(5000)})
  step = jax.shard_map(
    lambda g: tx.update(g, other)[0], mesh=mesh, in_specs=P(), out_specs=P()
  )
  with pytest.raises(ValueError, match="state.error"):
    step(grads)
  ints = thc_lib.thc(error_feedback=False)
  step = jax.shard_map(
    lambda g: ints.update(g, ints.init(None))[0],
    mesh=mesh,
    in_specs=P(),
    out_specs=P(),
  )
  with pytest.raises(TypeError, match=r"\['count'\].*int32"):
    step({"count": jnp.ones(3, jnp.int32)})
