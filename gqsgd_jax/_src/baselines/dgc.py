"""Deep gradient compression (DGC) as an optax transform.

Per worker and compressed tensor, momentum correction accumulates the
velocity u ← m u + g, v ← v + u; the k = ceil(density · n) largest |v|
are sent as (int32 index, value) pairs, and momentum-factor masking zeroes
u and v where a value was sent. Every worker all-gathers the pairs of all
workers (two collectives per step for all tensors: indices, then values),
scatter-adds them in worker order and divides by W, so the result is
bit-identical everywhere. Tensors that are not compressed send their
momentum u densely through one ``psum`` (the k = n limit of the same
rule, i.e. plain momentum SGD).

Because the momentum lives inside DGC, the outer optimizer must be plain
SGD: ``optax.chain(dgc(momentum=0.9), optax.sgd(lr))``. Chaining it with
``optax.sgd(lr, momentum=0.9)`` would apply momentum twice (the reference
does, B-DGC-2).

Wire per worker and step: k × (4 + value bytes) per compressed tensor
(bfloat16 values by default: (4 + 2)·k bytes; the values travel
as their uint16 bit patterns), plus the f32 momentum of the dense leaves.
The reference sends float16 values; bfloat16 has the same size but float32's
range, so small gradients are not flushed to zero and large ones do not
overflow (with float16 the clipped excess stays in v). Non-finite values
rank first, reach the output as NaN (on every worker, at their coordinate)
and are dropped from u and v.

Not implemented from the DGC paper: the sparsity warm-up schedule and local
gradient clipping (the reference has neither).
"""

from fractions import Fraction
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqsgd_jax._src import bucketing
from gqsgd_jax._src import collectives
from gqsgd_jax._src import prng
from gqsgd_jax._src import transform
from gqsgd_jax._src import worker_state
from gqsgd_jax._src.baselines import common
from gqsgd_jax._src.baselines import jointsq

SELECTIONS = ("exact", "sampled")
VALUE_DTYPES = (
  np.dtype(np.float32),
  np.dtype(jnp.bfloat16),
  np.dtype(np.float16),
)


@worker_state.per_worker("momentum", "velocity")
class DGCState(NamedTuple):
  """State of ``dgc``: per-worker momentum and velocity, sampling key."""

  # Per worker (see worker_state_specs): flat f32[n] momentum u per leaf
  # (an unused f32[1] for an empty leaf: orbax cannot save zero-size arrays).
  momentum: tuple
  # Per worker: flat f32[n] velocity v per compressed leaf, else an unused
  # f32[1] (orbax cannot checkpoint zero-size arrays).
  velocity: tuple
  key: jax.Array  # uint32[2] raw PRNG key (sampled threshold), split per step


def num_selected(numel: int, density: float) -> int:
  """Static k = ceil(density · n), at least 1."""
  return max(1, min(numel, math.ceil(Fraction(repr(float(density))) * numel)))


def dgc_wire_bytes(
  params: optax.Params,
  *,
  density: float = 0.001,
  predicate: jointsq.Predicate = None,
  min_size: int = 1024,
  value_dtype: jax.typing.DTypeLike = jnp.bfloat16,
) -> dict[str, int]:
  """Bytes each worker sends per step: sparse pairs and dense leaves.

  Dense leaves send their float32 momentum (4 bytes per element).
  """
  density = jointsq.validate_fraction(density, "density")
  compresses = jointsq.compression_predicate(
    predicate, jointsq.validate_size(min_size, "min_size")
  )
  value_bytes = _value_dtype(value_dtype).itemsize
  sparse = dense = 0
  for x in jax.tree.leaves(params):
    if compresses(x):
      sparse += num_selected(int(np.size(x)), density) * (4 + value_bytes)
    else:
      dense += 4 * int(np.size(x))  # the f32 momentum
  return dict(sparse_bytes=sparse, dense_bytes=dense)


def _value_dtype(value_dtype: jax.typing.DTypeLike) -> np.dtype:
  try:
    dtype = np.dtype(value_dtype)
  except TypeError:
    dtype = None
  if dtype not in VALUE_DTYPES:
    raise ValueError(
      f"value_dtype must be float32, bfloat16 or float16, got {value_dtype!r}"
    )
  return dtype


def _validate_momentum(momentum: object) -> float:
  if (
    isinstance(momentum, bool)
    or not isinstance(momentum, (int, float, np.integer, np.floating))
    or not (0 <= momentum < 1)
  ):
    raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
  return float(momentum)


def _to_wire(x: jax.Array, dtype: np.dtype) -> jax.Array:
  """Casts finite values without overflow (the excess stays in v)."""
  if dtype == np.float32:
    return x
  big = float(jnp.finfo(dtype).max)
  return jnp.where(jnp.isfinite(x), jnp.clip(x, -big, big), x).astype(dtype)


# The exact selection from _SAMPLE_MIN elements: a sample (every
# _SAMPLE_STRIDE-th element; odd, so a matrix's columns are all sampled)
# gives a lower bound, its k-quantile plus _SAMPLE_SIGMAS standard
# deviations of its count; the elements above it are the candidates. Below
# _SAMPLE_MIN, lax.top_k (fast for small n). Measured on one XLA:CPU
# device against lax.top_k: k = 4 525 of 452 k 0.41 vs 2.6 ms, k = 45 243
# of 452 k 2.6 vs 18 ms, k = 12 582 of 12.6 M 5.3 vs 28 ms, k = 125 829
# of 12.6 M 15 vs 144 ms; k = 566 of 56 554 0.19 vs 0.10 ms, yet the
# candidates win there too in the W = 8 recommendation update.
_SAMPLE_MIN = 2**15
_SAMPLE_STRIDE = 31
_SAMPLE_SIGMAS = 5.0
# Past the bits of +inf: no score reaches it.
_TOP_BITS = 0x7F800001


def _compact(flags: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
  """The indices of the first ``cap`` flagged elements, in index order
  (int32[cap]; slots past the count hold arbitrary indices < n), and the
  count.

  By gathers, not a scatter of all n elements (XLA:CPU scatters element by
  element): the flags become 32-bit words, a scan over the n / 32 word
  popcounts and a binary search per slot find each slot's word, and five
  popcount halvings its bit inside the word.
  """
  n = flags.shape[0]
  word, count = common.flag_words(flags)
  words = word.shape[0]
  end = jax.lax.associative_scan(jnp.add, count)
  slot = jnp.arange(cap, dtype=jnp.int32)
  w = jnp.minimum(jnp.searchsorted(end, slot, side="right"), words - 1)
  rank = slot - (end[w] - count[w])
  bits = word[w]
  pos = jnp.zeros(cap, jnp.int32)
  # The rank-th set bit from the top: skip each half with too few.
  for width in (16, 8, 4, 2, 1):
    c = jax.lax.population_count(bits >> (32 - width)).astype(jnp.int32)
    skip = rank >= c
    rank = jnp.where(skip, rank - c, rank)
    pos = jnp.where(skip, pos + width, pos)
    bits = jnp.where(skip, bits << width, bits)
  return jnp.minimum(w.astype(jnp.int32) * 32 + pos, n - 1), end[-1]


def _top_k_bits(bits: jax.Array, k: int, lo: jax.Array) -> jax.Array:
  """The positions (int32[k], ascending) of the k largest of ``bits``
  (non-negative floats' bits, which order like the values; ties by
  position), given at least k of them >= lo.

  The k-th largest by 31 counting passes (JointSQ's bisection), then every
  element above it and the ones equal to it in position order until there
  are k.
  """
  n = bits.shape[0]
  kth = jointsq._bisect(
    lambda t: jnp.sum(bits >= t, dtype=jnp.int32),
    jnp.int32(k - 1),
    lo,
    jnp.int32(_TOP_BITS),
  )
  at_least = bits >= kth
  extra = jnp.sum(at_least, dtype=jnp.int32) - k  # ties left out

  def drop_ties() -> jax.Array:
    # Only with more ties at the k-th score than fit (repeated values).
    tie = bits == kth
    tie_rank, ties = jointsq._compact_slots(tie)
    keep = tie_rank.reshape(-1)[:n] < ties - extra
    return (bits > kth) | (tie & keep)

  chosen = jax.lax.cond(extra > 0, drop_ties, lambda: at_least)
  return _compact(chosen, k)[0]


def _scores(v: jax.Array) -> jax.Array:
  """|v|, non-finite values first (+inf)."""
  return jnp.where(jnp.isfinite(v), jnp.abs(v), jnp.inf)


def _top_k_by_candidates(v: jax.Array, k: int) -> jax.Array:
  """The indices (int32[k], ascending) of the k largest ``_scores(v)``,
  ties by index: the same set as ``lax.top_k``, without its heap over n
  (n >= _SAMPLE_MIN).

  The candidates (at least the sample's bound, see _SAMPLE_SIGMAS) are
  compacted into ~k + 10 sqrt(k) slots and the k largest found among them
  (``_top_k_bits``). If they do not hold the k largest or overflow the
  slots (never on random data; e.g. fewer than k non-zeros), the same
  search runs on all the elements. The scores are computed where read,
  never stored: one pass over n less.
  """
  n = v.shape[0]
  as_bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
  sample = _scores(v[::_SAMPLE_STRIDE])
  m = sample.shape[0]
  ks = k * m / n
  spread = _SAMPLE_SIGMAS * math.sqrt(ks) + 1
  k_lo = min(m, math.ceil(ks + spread))  # more elements: a lower bound
  # min, not [-1]: then XLA:CPU keeps top_k's TopK call, not a full sort.
  lo = jnp.min(jax.lax.top_k(sample, k_lo)[0])
  cap = min(n, max(k, math.ceil((k_lo + spread) * n / m)))
  cand, found = _compact(_scores(v) >= lo, cap)

  # The branches compute their scores themselves: an array made out here
  # would be stored in full to enter the conditional.
  def on_candidates() -> jax.Array:
    # Unused slots hold -1: below every threshold searched.
    cand_bits = jnp.where(
      jnp.arange(cap) < found, as_bits(_scores(v[cand])), -1
    )
    return cand[_top_k_bits(cand_bits, k, as_bits(lo))]

  return jax.lax.cond(
    (found >= k) & (found <= cap),
    on_candidates,
    lambda: _top_k_bits(as_bits(_scores(v)), k, jnp.int32(0)),
  )


def select(
  v: jax.Array, k: int, key: jax.Array, selection: str, sample_ratio: float
) -> tuple[jax.Array, jax.Array]:
  """(indices int32[k], valid bool[k]) of the largest |v|; NaN/inf first.

  "exact": the k largest (ties by index), the set ``lax.top_k`` picks;
  from _SAMPLE_MIN elements by candidates (``_top_k_by_candidates``,
  ascending indices), which is faster there on XLA:CPU.
  """
  if selection == "exact" and v.shape[0] >= _SAMPLE_MIN:
    return _top_k_by_candidates(v, k), jnp.ones(k, bool)
  scores = _scores(v)
  if selection == "exact":
    _, idx = jax.lax.top_k(scores, k)
    return idx, jnp.ones(k, bool)
  # The sampled threshold never picks zeros: they would carry nothing.
  val, idx = jointsq.sampled_top(scores, k, key, sample_ratio=sample_ratio)
  return idx, val >= 0


def dgc(
  *,
  axis_name: collectives.AxisName = "data",
  density: float = 0.001,
  momentum: float = 0.9,
  predicate: jointsq.Predicate = None,
  min_size: int = 1024,
  value_dtype: jax.typing.DTypeLike = jnp.bfloat16,
  selection: str = "exact",
  sample_ratio: float = 0.01,
  key: jax.typing.ArrayLike = 0,
) -> optax.GradientTransformation:
  """DGC with momentum correction: the workers' mean sparse velocity.

  Use inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name`` on local
  gradients, followed by **plain SGD** (the momentum is applied here).
  The momentum and velocity differ per worker: under ``shard_map`` pass the
  state with ``gqsgd_jax.worker_state_specs`` (and create it inside the
  map); under ``pmap`` keep one state per device.

  Args:
    axis_name: the data-parallel mesh axis.
    density: fraction of each compressed tensor sent per step; the static
      k = ceil(density · n) (at least 1).
    momentum: the momentum m of the correction u ← m u + g.
    predicate: which leaves to compress: None (ndim >= 2 and size >=
      ``min_size``), "reference" (ndim == 4) or a callable leaf -> bool.
    min_size: size threshold of the default predicate.
    value_dtype: dtype of the sent values: bfloat16 (default), float16 or
      float32. Rounding error and float16 overflow stay in the velocity.
    selection: "exact" top-k, or "sampled" (a sampled threshold, at most k
      pairs; unused slots carry index n and are dropped by the receivers).
    sample_ratio: fraction of the elements the sampled threshold looks at.
    key: int seed or PRNG key of the sampling.

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``DGCState``.

  Raises:
    ValueError: a bad argument (named in the message); at update time, an
      unbound ``axis_name``.

  Examples:
    >>> import optax, gqsgd_jax
    >>> tx = optax.chain(gqsgd_jax.dgc(density=0.01), optax.sgd(0.1))
  """
  density = jointsq.validate_fraction(density, "density")
  momentum = _validate_momentum(momentum)
  compresses = jointsq.compression_predicate(
    predicate, jointsq.validate_size(min_size, "min_size")
  )
  wire_dtype = _value_dtype(value_dtype)
  if selection not in SELECTIONS:
    raise ValueError(
      f"selection must be one of {SELECTIONS}, got {selection!r}"
    )
  sample_ratio = jointsq.validate_fraction(sample_ratio, "sample_ratio")
  init_key = prng.canonical_key(key)

  def init_fn(params: optax.Params) -> DGCState:
    leaves = jax.tree.leaves(params)
    return DGCState(
      momentum=tuple(
        jnp.zeros(max(np.size(x), 1), jnp.float32) for x in leaves
      ),
      velocity=tuple(
        jnp.zeros(np.size(x) if compresses(x) else 1, jnp.float32)
        for x in leaves
      ),
      key=init_key,
    )

  def update_fn(
    updates: optax.Updates, state: DGCState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, DGCState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths = [p for p, _ in paths_leaves]
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_leaf_dtypes(leaves, paths)
    us, vs = list(state.momentum), list(state.velocity)
    comp = [i for i, x in enumerate(leaves) if compresses(x)]
    want_v = [(x.size if i in comp else 1,) for i, x in enumerate(leaves)]
    if [u.shape for u in us] != [(max(x.size, 1),) for x in leaves] or [
      v.shape for v in vs
    ] != want_v:
      raise ValueError(
        "DGCState does not match the updates (was init called with "
        "parameters of these shapes?): momentum "
        f"{[u.shape for u in us]}, velocity {[v.shape for v in vs]} for "
        f"leaves {[jax.tree_util.keystr(p) for p in paths]}"
      )
    next_key, step_key = jax.random.split(state.key)
    # The exact selection's indices are in bounds: XLA:CPU's bounds-checked
    # ("drop") scatter is ~5x slower.
    scatter_mode = "promise_in_bounds" if selection == "exact" else "drop"
    worker = jax.lax.axis_index(axis_name)

    # Empty leaves stay empty (a fresh, replicated array) and keep their
    # placeholder memory.
    out = [jnp.zeros(x.shape, x.dtype) for x in leaves]
    new_u, new_v = list(us), list(vs)
    indices, values, sizes = [], [], []
    for layer, i in enumerate(comp):
      n = leaves[i].size
      k = num_selected(n, density)
      u = momentum * us[i] + leaves[i].reshape(-1).astype(jnp.float32)
      v = vs[i] + u
      idx, valid = select(
        v, k, prng.fold(step_key, layer, worker), selection, sample_ratio
      )
      sent = _to_wire(jnp.where(valid, v[idx], 0.0), wire_dtype)
      # NaN for every non-finite value, so Inf on one worker cannot meet
      # -Inf or a finite value on another and come out as a number or Inf.
      sent = jnp.where(jnp.isfinite(sent), sent, jnp.nan).astype(wire_dtype)
      # Momentum-factor masking: clear u and v where a value left; v keeps
      # what the wire dtype could not carry.
      target = jnp.where(valid, idx, n)
      kept = v[idx] - sent.astype(jnp.float32)
      # Non-finite values went out (they rank first); keep them out of state.
      # Cleared before the masking scatters, which then write in place.
      new_v[i] = _finite(v).at[target].set(_finite(kept), mode=scatter_mode)
      new_u[i] = _finite(u).at[target].set(0.0, mode=scatter_mode)
      indices.append(target.astype(jnp.int32))
      values.append(sent)
      sizes.append(k)
    if comp:
      all_idx = jax.lax.all_gather(
        jnp.concatenate(indices), axis_name, to="invarying"
      )
      # The values travel as their bit patterns: XLA:CPU would otherwise
      # widen a bf16/f16 all-gather to f32 (twice the bytes).
      bits = jnp.uint16 if wire_dtype.itemsize == 2 else jnp.uint32
      all_val = jax.lax.bitcast_convert_type(
        jax.lax.all_gather(
          jax.lax.bitcast_convert_type(jnp.concatenate(values), bits),
          axis_name,
          to="invarying",
        ),
        wire_dtype,
      )
      # One accumulator for all compressed leaves, its last slot taking the
      # dropped pairs (index >= the leaf's size): one loop over the workers
      # instead of one per leaf, and in-bounds scatters.
      ns = [leaves[i].size for i in comp]
      starts = np.cumsum([0] + ns[:-1])
      slots = jnp.where(
        all_idx < np.repeat(ns, sizes).astype(np.int32),
        all_idx + np.repeat(starts, sizes).astype(np.int32),
        sum(ns),
      )
      total = _scatter_sum(slots, all_val, sum(ns) + 1, num_workers)
      for i, start, n in zip(comp, starts, ns):
        mean = total[start : start + n] / num_workers
        out[i] = mean.reshape(leaves[i].shape).astype(leaves[i].dtype)
    dense = [
      i for i in range(len(leaves)) if i not in set(comp) and leaves[i].size
    ]
    if dense:
      moms = [
        momentum * us[i] + leaves[i].reshape(-1).astype(jnp.float32)
        for i in dense
      ]
      summed = jax.lax.psum(moms, axis_name)
      for i, u, s in zip(dense, moms, summed):
        mean = jnp.where(jnp.isfinite(s), s / num_workers, jnp.nan)
        out[i] = mean.reshape(leaves[i].shape).astype(leaves[i].dtype)
        new_u[i] = jnp.where(jnp.isfinite(u), u, 0.0)
    new_state = DGCState(
      momentum=tuple(new_u), velocity=tuple(new_v), key=next_key
    )
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return transform.transformation(init_fn, update_fn)


def _finite(x: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _scatter_sum(
  slots: jax.Array, val: jax.Array, size: int, num_workers: int
) -> jax.Array:
  """Sum of every worker's pairs in worker order (slots unique per worker
  but the spare last one, so each scatter is deterministic)."""

  def add(w: jax.Array, acc: jax.Array) -> jax.Array:
    return acc.at[slots[w]].add(
      val[w].astype(jnp.float32), mode="promise_in_bounds"
    )

  return jax.lax.fori_loop(0, num_workers, add, jnp.zeros(size, jnp.float32))
