"""Exponential dithering end to end: global_quantize(dithering="exponential").

Statistics of the whole transform (encode + butterfly of pairwise reduces +
decode) against the spec's variance bound, headroom under adversarial
inputs with the reference's overflow-to-zero semantics, replica consistency,
and code-for-code parity with the PyTorch model of the reference.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import gqsgd_jax
from gqsgd_jax._src import collectives
from gqsgd_jax._src import ops
from gqsgd_jax._src import prng
from gqsgd_jax._src import reference

from _utils import assert_replicas_equal
from _utils import assert_trees_bitwise_equal
from _utils import data_mesh
from _utils import monte_carlo_estimates
from _utils import sharded_update

F32 = np.float32


def _tx(**kwargs):
  return gqsgd_jax.global_quantize(bits=8, dithering="exponential", **kwargs)


def _tree(num_workers):
  """The butterfly's reduction tree (collectives.butterfly_allreduce).

  Returns (workers, height) per node, leaves included: the workers whose
  values the node sums, and the number of reduce nodes above it. The extra
  W - P workers (P = 2^floor(log2 W)) are folded into workers 0.. first;
  then level l sums aligned blocks of 2^(l+1) of the P positions. Every
  element sees the same tree.
  """
  p = 1 << (num_workers.bit_length() - 1)
  nodes = []  # (workers, parent index)
  current = []
  for j in range(p):
    if j < num_workers - p:
      a, b = len(nodes), len(nodes) + 1
      nodes += [[(j,), None], [(p + j,), None]]
      nodes.append([(j, p + j), None])
      nodes[a][1] = nodes[b][1] = len(nodes) - 1
    else:
      nodes.append([(j,), None])
    current.append(len(nodes) - 1)
  while len(current) > 1:
    merged = []
    for a, b in zip(current[::2], current[1::2]):
      nodes.append([nodes[a][0] + nodes[b][0], None])
      nodes[a][1] = nodes[b][1] = len(nodes) - 1
      merged.append(len(nodes) - 1)
    current = merged
  out = []
  for workers, parent in nodes:
    height = 0
    while parent is not None:
      height += 1
      parent = nodes[parent][1]
    out.append((workers, height))
  return out


def _variance_bound(g: np.ndarray) -> np.ndarray:
  """Per-coordinate bound on Var(g^) for W workers' rows g (float64).

  Every rounding event (each worker's encode, each tree node's reduce) is
  an unbiased rounding to a power of two: E[eps^2] <= z^2 / 8 for its
  input z. For a node of children a, b (independent),
  Var(node) <= 9/8 (Var a + Var b) + v^2 / 8 with v its exact sum, so
  Var(root) <= 1/8 sum_nodes (9/8)^height v_node^2. Decoding multiplies by
  S / W, i.e. the bound in gradient units is that sum over W^2.
  """
  num_workers = g.shape[0]
  total = np.zeros(g.shape[1])
  for workers, height in _tree(num_workers):
    v = g[list(workers)].sum(0)
    total += (9 / 8) ** height * v**2 / 8
  return total / num_workers**2


def _butterfly_root(stacked, combine):
  """butterfly_allreduce of the rows of ``stacked``, one row per worker."""
  num_workers = stacked.shape[0]

  @jax.jit
  @jax.shard_map(mesh=data_mesh(num_workers), in_specs=P("data"), out_specs=P())
  def run(x):
    return collectives.butterfly_allreduce(
      x[0], combine, axis_name="data", num_workers=num_workers
    )

  return np.asarray(run(stacked))


@pytest.mark.parametrize("num_workers", [1, 2, 3, 5, 6, 8, 11, 16])
def test_variance_bound_follows_the_library_butterfly(num_workers):
  # The bound's tree (_tree) must be the one collectives.butterfly_allreduce
  # reduces with. A deterministic combine on (v, b) pairs that evaluates the
  # bound's recursion, b = 9/8 (b_a + b_b) + v^2 / 8 with v = v_a + v_b
  # from leaves (g, g^2 / 8), returns W^2 * _variance_bound(g) at the root
  # only if every node sums the workers _tree says at the height it says.
  d = 13  # not a multiple of the blocks: the padding takes part too
  g = np.asarray(
    jax.random.normal(jax.random.PRNGKey(num_workers), (num_workers, d)),
    np.float64,
  )

  def bound_combine(a, b, n_a, n_b, stage):
    del n_a, n_b, stage
    v = a.real + b.real
    return jax.lax.complex(v, 9 / 8 * (a.imag + b.imag) + v * v / 8)

  root = _butterfly_root(
    (g + 1j * g**2 / 8).astype(np.complex64), bound_combine
  )
  np.testing.assert_allclose(root.real, g.sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    root.imag, _variance_bound(g) * num_workers**2, rtol=1e-5
  )

  # The counts handed to the combine are the workers behind each operand.
  def count_combine(a, b, n_a, n_b, stage):
    del stage
    return jnp.where((a == n_a) & (b == n_b), a + b, jnp.nan)

  counts = _butterfly_root(np.ones((num_workers, d), np.float32), count_combine)
  np.testing.assert_array_equal(counts, np.full(d, num_workers, np.float32))
  heights = [h for _, h in _tree(num_workers)]
  assert max(heights) == collectives.tree_depth(num_workers)


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4, 5, 8, 16])
def test_unbiased_and_within_the_variance_bound(num_workers):
  d, count = 32, 2000
  g = jax.random.normal(jax.random.PRNGKey(num_workers), (num_workers, d))
  g = g.at[:, 0].set(0.0)  # zeros everywhere: exact zero
  g = g.at[0, 1].set(8.0)  # an outlier sets M
  g = g.at[:, 2].mul(1e-6)  # tiny values: rounded, not flushed
  g = g.at[:, 3].set(jnp.where(jnp.arange(num_workers) % 2, -1.0, 1.0))
  est = monte_carlo_estimates(_tx(), g, count)
  g64 = np.asarray(g, np.float64)
  mean = g64.mean(0)
  bound = _variance_bound(g64)
  assert np.all(est[:, 0] == 0) and not np.signbit(est[:, 0]).any()
  bias = est.mean(0) - mean
  tol = 5 * np.sqrt(bound / count) + 1e-12
  assert np.all(np.abs(bias) <= tol), np.max(np.abs(bias) / tol)
  # The tiny column keeps its relative precision (exponential levels).
  assert np.abs(bias[2]) <= 5 * np.sqrt(bound[2] / count) + 1e-15
  var = est.var(0, ddof=1)
  # The bound takes the worst case 1/8 for every event, so the sample
  # variance must stay below it beyond sampling noise (~sqrt(2/K) = 3 %).
  assert np.all(var <= bound * 1.2 + 1e-15)
  assert var.sum() <= bound.sum() * 1.05
  if num_workers > 1:
    assert var.sum() > 0
  rel = var[1:].sum() / bound[1:].sum()
  print(
    f"W={num_workers}: var {var.sum():.4g} bound {bound.sum():.4g} "
    f"(ratio {rel:.2f})"
  )


# -----------------------------------------------------------------------------
# Headroom: no overflow for any W.


def _overflow_to_zero(original):
  """ops.exp_reduce with the reference's semantics at the top code.

  Our kernel saturates a doubling of code 1 at code 1; the reference stores
  the resulting exponent 0 as zero (B-GQ-3). The wrapper recomputes the
  kernel's random event and zeroes exactly those elements, so an overflow
  would show as a zero (or a lost sign) in the transform's output.
  """

  def exp_reduce(a, b, seed, *, impl="auto"):
    out = original(a, b, seed, impl=impl)
    n = a.shape[0]
    ua, ub = a.astype(jnp.uint32), b.astype(jnp.uint32)
    ea, eb = ua & 0x7F, ub & 0x7F
    same = (ua & 0x80) == (ub & 0x80)
    e_big, e_small = jnp.minimum(ea, eb), jnp.maximum(ea, eb)
    event = reference.geometric_tail(
      e_small - e_big,
      reference.random_bits(seed, n, 0),
      reference.random_bits(seed, n, 1),
    )
    overflow = (ea > 0) & (eb > 0) & same & (e_big == 1) & event
    return jnp.where(overflow, jnp.uint8(0), out)

  return exp_reduce


def _adversarial(num_workers, big_m=3.0):
  """Columns: all +M, all -M, all just below M, +M on one worker and tiny
  elsewhere, alternating +-M, all +M/2."""
  w = np.arange(num_workers)
  cols = [
    np.full(num_workers, big_m),
    np.full(num_workers, -big_m),
    np.full(num_workers, big_m * (1 - 2**-20)),
    np.where(w == 0, big_m, 1e-3),
    np.where(w % 2, -big_m, big_m),
    np.full(num_workers, big_m / 2),
  ]
  return np.stack(cols, 1).astype(F32)


@pytest.mark.parametrize("num_workers", [2, 3, 4, 5, 8, 16])
def test_adversarial_inputs_never_overflow(num_workers, monkeypatch):
  monkeypatch.setattr(ops, "exp_reduce", _overflow_to_zero(ops.exp_reduce))
  g = _adversarial(num_workers)
  count = 400
  est = monte_carlo_estimates(_tx(), jnp.asarray(np.tile(g, (1, 4))), count)
  est = est.reshape(count, 4, -1).reshape(-1, g.shape[1])
  mean = g.astype(np.float64).mean(0)
  assert np.all(np.isfinite(est))
  # Same-sign columns: never zero (an overflow), never the wrong sign.
  for c in (0, 1, 2, 3, 5):
    assert np.all(np.sign(est[:, c]) == np.sign(mean[c])), c
  # Root codes: |g^| = 2^-e S / W with e in [1, 127] (S = 2^(D+1) M).
  depth = collectives.tree_depth(num_workers)
  dec = F32(F32(2.0 ** (depth + 1) * F32(3.0)) / F32(num_workers))
  nz = est[est != 0]
  e = -np.log2(np.abs(nz) / np.float64(dec))
  assert np.all(e == np.round(e)) and e.min() >= 1 and e.max() <= 127
  if num_workers & (num_workers - 1) == 0:
    # Every doubling is exact: all +M decodes to M with root code 1, the
    # headroom used to the last bit.
    np.testing.assert_array_equal(est[:, 0], 3.0)
    assert e.min() == 1
  # And unbiased: an overflow saturating (ours) or vanishing (the
  # reference) would pull the +-M columns towards zero.
  bound = _variance_bound(g.astype(np.float64))
  tol = 5 * np.sqrt(bound / est.shape[0]) + 1e-12
  assert np.all(np.abs(est.mean(0) - mean) <= tol)


@pytest.mark.parametrize("num_workers", [2, 3])
def test_one_level_less_headroom_would_overflow(num_workers, monkeypatch):
  # The control for the test above: with S = 2^D M (one doubling short)
  # the same inputs overflow, which the wrapper turns into zeros.
  monkeypatch.setattr(ops, "exp_reduce", _overflow_to_zero(ops.exp_reduce))
  monkeypatch.setattr(
    collectives, "tree_depth", lambda w: math.ceil(math.log2(w)) - 1
  )
  g = jnp.asarray(_adversarial(num_workers)[:, :1])
  est = monte_carlo_estimates(_tx(), g, 64)
  assert np.any(est[:, 0] == 0)


# -----------------------------------------------------------------------------
# Replicas and parity.


@pytest.mark.parametrize("num_workers", [5])
def test_replicas_identical_across_modes_and_impls(num_workers):
  k1, k2 = jax.random.split(jax.random.PRNGKey(num_workers))
  grads = {
    "w": jax.random.normal(k1, (num_workers, 19, 7)),
    "b": jax.random.normal(k2, (num_workers, 5)).astype(jnp.float16),
  }
  impls = ["xla"] + (["ffi"] if gqsgd_jax.HAS_CPU or gqsgd_jax.HAS_CUDA else [])
  results = {}
  for impl in impls:
    tx = _tx(impl=impl)
    for mode in ("shard_map", "pmap"):
      per_worker, state = sharded_update(tx, grads, tx.init(None), mode=mode)
      assert_replicas_equal(per_worker)
      results[impl, mode] = (per_worker, state)
  first = results["xla", "shard_map"]
  for other in results.values():
    assert_trees_bitwise_equal(first, other)
  assert first[0]["b"].dtype == jnp.float16


def _bit_reverse(i: int, bits: int) -> int:
  return int(format(i, f"0{bits}b")[::-1], 2) if bits else 0


@pytest.mark.parametrize("num_workers", [2, 4])
def test_torch_parity_of_the_whole_reduction(num_workers):
  # The reference's compress, its pairwise reduce along our butterfly, and
  # its decompress, fed with the uniforms our kernels drew (see
  # torch_parity_test), give our transform's output bit for bit. With W a
  # power of two our scale 2^(D+1) M is the reference's 2 W M; grid
  # gradients make g / (2 W M) exact in float32.
  torch = pytest.importorskip("torch")
  import torch_parity_test as tp  # pylint: disable=g-import-not-at-top

  import torch_reference as ref  # pylint: disable=g-import-not-at-top

  # pylint: disable=protected-access
  grid, bits = tp._grid_gradient, tp._bits
  exp_uniforms, reduce_uniforms = tp._exp_uniforms, tp._reduce_uniforms
  # pylint: enable=protected-access
  n, norm = 1001, 2.0**-3
  rng = np.random.default_rng(num_workers)
  g = np.stack([grid(rng, n, norm) for _ in range(num_workers)])
  tx = _tx(impl="xla")
  state = tx.init(None)
  per_worker, _ = sharded_update(tx, jnp.asarray(g), state)

  _, step_key = jax.random.split(state.key)
  node_key = prng.fold(step_key, 0, 1)
  chunks = []
  for i in range(num_workers):
    seed = ops.seed_from_key(prng.fold(step_key, 0, 0, i))
    v = torch.from_numpy(g[i]) / (2 * num_workers * norm)
    codes = ref.exp_compress(v, exp_uniforms(seed, n))
    chunks.append(
      torch.cat([codes, torch.zeros((-n) % num_workers, dtype=torch.uint8)])
    )
  levels = num_workers.bit_length() - 1
  for level in range(levels):
    new = []
    for i in range(num_workers):
      half = chunks[i].shape[0] // 2
      bit = (i >> level) & 1
      keep = chunks[i][bit * half : (bit + 1) * half]
      theirs = chunks[i ^ (1 << level)][bit * half : (bit + 1) * half]
      seed = ops.seed_from_key(prng.fold(node_key, level + 1, i))
      new.append(
        ref.exp_reduce(keep, theirs, reduce_uniforms(bits(seed, half, 0)))
      )
    chunks = new
  # Worker i ends with block bitreverse(i) of the buffer.
  root = torch.cat(
    [chunks[_bit_reverse(j, levels)] for j in range(num_workers)]
  )[:n]
  np.testing.assert_array_equal(
    per_worker[0], ref.exp_decompress(root, norm).numpy()
  )
  assert np.count_nonzero(root.numpy()) > n // 2
