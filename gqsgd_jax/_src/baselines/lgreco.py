"""L-GreCo: PowerSGD with per-layer ranks chosen by a dynamic program (§7).

Runs PowerSGD (``powersgd.ef_power_step``) with one rank per compressed
matrix. Every ``adjust_every`` compressed steps the ranks are re-chosen:

1. during the last ``acc_iters`` steps of each period every worker sums its
   error-compensated matrices A_l;
2. for every layer and candidate rank r in [floor(gamma r0), ceil(beta r0)]
   the rank-r approximation error E_l(r) of A_l is estimated (subspace
   iteration, or exactly from singular values);
3. a knapsack-style DP picks the ranks of least total size sum r_l (n + m)
   whose total error stays within alpha times that of the uniform rank r0.

Static shapes: every matrix keeps P and Q of width w = min(r_max, n, m)
with the columns at or beyond its rank masked to zero, so a rank change does
not recompile and kept columns stay warm. On the wire only the live columns
travel: each all-reduce packs the first r_l columns of every matrix back to
back into a buffer of the uniform ranks' size, sum_l min(r0, n_l, m_l) n_l
elements for the Ps (m_l for the Qs), exactly what ``powersgd(rank=r0)``
sends. A rank choice that would not fit either buffer (the DP bounds
sum r_l (n_l + m_l), not the P and Q sides apart) falls back to the uniform
ranks, so the wire never exceeds uniform-rank PowerSGD's.

Replica consistency: the error table is made identical on every worker
(worker 0's, broadcast by a ``pmax`` of a table that is -inf elsewhere, as
the reference's masked broadcast; or computed from the all-reduced
accumulators with ``inputs="mean"``), and
the DP, a deterministic NumPy function, runs on the host of every device
via ``jax.pure_callback`` on those identical inputs, so every worker picks
the same ranks without a further broadcast.

Differences from the reference (§7.3): NaN errors are sanitised (to +inf);
an infeasible DP, or one whose answer is larger than the uniform ranks that
are within budget, falls back to the uniform ranks; candidates are >= 1 and
ranks above min(n, m) are never chosen; the discretisation is conservative
(ceil) over a "total <= K buckets" table, so a chosen configuration really
meets the budget; squared errors can be summed (``aggregation="fro2"``);
new Q columns come from the key shared by all workers.
"""

from collections.abc import Callable, Sequence
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
from gqsgd_jax._src.baselines import orthogonalize as orth
from gqsgd_jax._src.baselines import powersgd as psgd

ERROR_METHODS = ("power", "svd")
AGGREGATIONS = ("fro", "fro2")
INPUTS = ("worker0", "mean")
_TABLE = 7  # fold_in tag of the error-estimation draws
_HIGHEST = jax.lax.Precision.HIGHEST


@worker_state.per_worker("error", "acc")
class LGrecoState(NamedTuple):
  """State of ``lgreco``: PowerSGD's plus ranks and error accumulators."""

  # Per worker (see worker_state_specs): flat residual per leaf, leaf dtype;
  # () without error feedback.
  error: tuple
  # Per worker: f32[n * m] per compressed matrix, the sum of its
  # error-compensated gradients over the current accumulation window.
  acc: tuple
  # f32[m, w] per compressed matrix, w = min(r_max, n, m); columns at or
  # beyond the matrix's rank are zero. Identical on all workers.
  q: tuple
  ranks: jax.Array  # int32[L], current rank per compressed matrix
  # int32 scalar: steps taken, warm-up included. The field shadows
  # tuple.count, as in optax's states (mypy flags the override).
  count: jax.Array  # type: ignore[assignment]
  key: jax.Array  # uint32[2] shared PRNG key


# -----------------------------------------------------------------------------
# The dynamic program (host, NumPy).


def lgreco_dp(
  errors: np.typing.ArrayLike,
  sizes: np.typing.ArrayLike,
  budget: float,
  num_buckets: int = 10000,
) -> tuple[np.ndarray, bool]:
  """Least total size with total discretised error within the budget.

  Each error is discretised conservatively to ceil(E / (budget / K))
  buckets, so any configuration the DP accepts satisfies sum E <= budget.

  Args:
    errors: [L, C] non-negative errors (+inf: candidate not allowed).
    sizes: [L, C] sizes (+inf: candidate not allowed).
    budget: the total error allowed (>= 0).
    num_buckets: K, the discretisation of the budget.

  Returns:
    (choice, feasible): int [L] candidate index per layer (of least total
    size; among those, of least total discretised error) and whether any
    configuration fits. When infeasible, choice is all zeros.
  """
  errors = np.asarray(errors, np.float64)
  sizes = np.asarray(sizes, np.float64)
  num_layers, num_cands = errors.shape
  k = int(num_buckets)
  none = np.zeros(num_layers, np.int64)
  if not (np.isfinite(budget) and budget >= 0):
    return none, False
  bad = ~np.isfinite(errors) | ~np.isfinite(sizes) | (errors < 0)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    if budget > 0:
      # K * (E / B), not E / (B / K): an error equal to the budget is then
      # exactly K buckets, so a single-layer uniform choice stays feasible.
      cost = np.ceil(k * (errors / budget))
    else:  # only exact (zero-error) candidates fit a zero budget
      cost = np.where(errors == 0, 0.0, k + 1.0)
  cost = np.where(bad | ~(cost <= k), k + 1, cost).astype(np.int64)

  # best[b]: least size of the layers so far with total cost <= b.
  best = np.zeros(k + 1)
  choices = np.zeros((num_layers, k + 1), np.int64)
  for layer in range(num_layers):
    new = np.full(k + 1, np.inf)
    for c in range(num_cands):
      step = cost[layer, c]
      if step > k:
        continue
      cand = np.full(k + 1, np.inf)
      cand[step:] = best[: k + 1 - step] + sizes[layer, c]
      better = cand < new
      new[better] = cand[better]
      choices[layer, better] = c
    best = new
  if not np.isfinite(best[k]):
    return none, False
  # The least budget reaching the least size = least total error among the
  # least-size configurations.
  b = int(np.argmax(best <= best[k]))
  choice = np.zeros(num_layers, np.int64)
  for layer in reversed(range(num_layers)):
    c = choices[layer, b]
    choice[layer] = c
    b -= cost[layer, c]
  return choice, True


def choose_ranks(
  errors: np.typing.ArrayLike,
  dims: Sequence[tuple[int, int]],
  candidates: np.typing.ArrayLike,
  base_rank: int,
  *,
  alpha: float = 1.0,
  num_buckets: int = 10000,
  aggregation: str = "fro",
) -> np.ndarray:
  """Per-layer ranks from an error table; the uniform ranks when in doubt.

  Args:
    errors: [L, C] estimated errors E_l(r) of candidate ranks (NaN = +inf).
    dims: [(n, m)] per layer.
    candidates: the C candidate ranks.
    base_rank: r0 (a candidate), the uniform configuration.
    alpha: budget = alpha * the uniform configuration's total error.
    num_buckets: the DP's discretisation K.
    aggregation: "fro" sums errors (the reference), "fro2" squared errors.

  Returns:
    int32 [L] ranks, each a candidate in [1, min(n, m)].
  """
  candidates = np.asarray(candidates, np.int64)
  errors = np.asarray(errors, np.float64).reshape(len(dims), -1)
  errors = np.where(np.isnan(errors), np.inf, np.maximum(errors, 0.0))
  if aggregation == "fro2":
    errors = errors**2
  limit = np.array([min(n, m) for n, m in dims])[:, None]
  allowed = candidates[None, :] <= limit
  sizes = np.where(
    allowed,
    candidates[None, :] * np.array([n + m for n, m in dims])[:, None],
    np.inf,
  )
  errors = np.where(allowed, errors, np.inf)
  # The uniform configuration: min(r0, n, m) per layer. Its total error is
  # the budget; if a layer's is unknown (not a candidate, NaN), so is the
  # budget, and the uniform ranks stay.
  uniform = np.minimum(base_rank, limit[:, 0])
  base = [np.flatnonzero(candidates == u) for u in uniform]
  if any(len(b) == 0 for b in base):
    return uniform.astype(np.int32)
  base_errors = errors[np.arange(len(dims)), [int(b[0]) for b in base]]
  budget = alpha * float(np.sum(base_errors))
  choice, feasible = lgreco_dp(errors, sizes, budget, num_buckets)
  ranks = candidates[choice]
  uniform_size = float(np.sum(uniform * np.array([n + m for n, m in dims])))
  chosen_size = float(np.sum(sizes[np.arange(len(dims)), choice]))
  # The uniform ranks meet a budget alpha >= 1 exactly; the conservative
  # discretisation may have ruled them out and kept only larger choices.
  if not feasible or (alpha >= 1 and chosen_size > uniform_size):
    ranks = uniform
  assert np.all((ranks >= 1) & (ranks <= limit[:, 0])), ranks
  return ranks.astype(np.int32)


def uniform_ranks(mats: Sequence[psgd.Matrix], base_rank: int) -> np.ndarray:
  """int32 [L]: min(r0, n, m) per matrix, the ranks of ``powersgd``."""
  return np.array([min(base_rank, m.n, m.m) for m in mats], np.int32)


def fits_wire(
  ranks: np.typing.ArrayLike, mats: Sequence[psgd.Matrix], base_rank: int
) -> bool:
  """Whether ``ranks`` fit the packed P and Q buffers of the uniform ranks
  (per dtype: sum r_l n_l and sum r_l m_l at most the uniform ranks')."""
  live = np.minimum(np.asarray(ranks), [m.r for m in mats])
  base = uniform_ranks(mats, base_rank)
  for dtype in {m.dtype for m in mats}:
    ids = [j for j, m in enumerate(mats) if m.dtype == dtype]
    for side in ("n", "m"):
      dims = np.array([getattr(mats[j], side) for j in ids])
      if np.sum(live[ids] * dims) > np.sum(base[ids] * dims):
        return False
  return True


# -----------------------------------------------------------------------------
# Error estimates (device).


def _residual_norms(a: jax.Array, p: jax.Array) -> jax.Array:
  """||A - P_r P_r^T A||_F for r = 1..w, by rank-1 downdates (no cancellation
  of ||A||^2 - ||P^T A||^2, which loses small errors)."""
  b = jnp.matmul(jnp.swapaxes(p, 1, 2), a, precision=_HIGHEST)  # [k, w, m]

  def body(
    resid: jax.Array, cols: tuple[jax.Array, jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    pj, bj = cols  # [k, n], [k, m]
    resid = resid - pj[:, :, None] * bj[:, None, :]
    return resid, jnp.sqrt(jnp.sum(resid * resid, axis=(1, 2)))

  _, norms = jax.lax.scan(
    body, a, (jnp.moveaxis(p, 2, 0), jnp.moveaxis(b, 1, 0))
  )
  return norms.T  # [k, w]


def _error_table(
  accs: Sequence[jax.Array],
  mats: list[psgd.Matrix],
  groups: list[list[int]],
  candidates: Sequence[int],
  *,
  method: str,
  iters: int,
  key: jax.Array,
  epsilon: float,
) -> jax.Array:
  """f32 [L, C]: estimated rank-r errors of each accumulated matrix."""
  table: dict[int, jax.Array] = {}  # by matrix: every one is in a group
  shapes = [(len(ids), mats[ids[0]].m, mats[ids[0]].r) for ids in groups]
  starts = psgd.draw_uniform(key, shapes) if method == "power" else []
  for g, ids in enumerate(groups):
    mat = mats[ids[0]]
    a = jnp.stack([accs[j].reshape(mat.n, mat.m) for j in ids])
    if method == "svd":
      s = jnp.linalg.svd(a, compute_uv=False)  # [k, min(n, m)]
      # tail[r] = sqrt(sum_{i >= r} s_i^2), summed small-to-large.
      tail = jnp.sqrt(jnp.cumsum((s * s)[:, ::-1], axis=1)[:, ::-1])
      by_rank = jnp.concatenate(
        [tail[:, 1:], jnp.zeros_like(tail[:, :1])], axis=1
      )[:, : mat.r]
    else:
      # Subspace iteration with w columns: orthonormalising column by
      # column keeps the first r columns the iterate of an r-column start,
      # so one run estimates every candidate r <= w (the reference runs
      # one per rank).
      q = orth.orthogonalize(starts[g], epsilon)
      at = jnp.swapaxes(a, 1, 2)
      for _ in range(iters):
        p = orth.orthogonalize(jnp.matmul(a, q, precision=_HIGHEST), epsilon)
        q = orth.orthogonalize(jnp.matmul(at, p, precision=_HIGHEST), epsilon)
      p = orth.orthogonalize(jnp.matmul(a, q, precision=_HIGHEST), epsilon)
      by_rank = _residual_norms(a, p)
    cols = [
      by_rank[:, r - 1] if r <= mat.r else jnp.full((len(ids),), jnp.inf)
      for r in candidates
    ]
    rows = jnp.stack(cols, axis=1)
    for k, j in enumerate(ids):
      table[j] = rows[k]
  return jnp.stack([table[j] for j in range(len(mats))])


# -----------------------------------------------------------------------------
# The transform.


def _validate_fraction(
  value: object, name: str, low: float, high: float
) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a number, got {value!r}")
  if not low <= value <= high or math.isnan(value):
    raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
  return float(value)


# (leaves or their means, error memories, accumulators, Qs, ranks): the
# operands and results of both branches of a step.
_Operands = tuple[
  list[jax.Array],
  tuple[jax.Array, ...],
  tuple[jax.Array, ...],
  tuple[jax.Array, ...],
  jax.Array,
]


def lgreco(
  *,
  axis_name: collectives.AxisName = "data",
  rank: int = 4,
  start_iter: int = 1000,
  min_compression_rate: float = 2,
  error_feedback: bool = True,
  warm_start: bool = True,
  orthogonalization_epsilon: float = orth.DEFAULT_EPSILON,
  key: jax.typing.ArrayLike = 0,
  adjust_every: int = 100,
  gamma: float = 0.5,
  beta: float = 2.0,
  alpha: float = 1.0,
  error_method: str = "power",
  power_iters: int = 5,
  acc_iters: int = 10,
  num_buckets: int = 10000,
  aggregation: str = "fro",
  inputs: str = "worker0",
) -> optax.GradientTransformation:
  """L-GreCo: PowerSGD with per-layer ranks re-chosen every F steps.

  Use like ``powersgd`` (inside shard_map/pmap, state via
  ``gqsgd_jax.worker_state_specs``).

  Args:
    axis_name: the data-parallel mesh axis.
    rank: the base rank r0; it also decides which layers are compressed
      (as ``powersgd``'s ``min_compression_rate`` test) and is every layer's
      rank until the first adjustment.
    start_iter: plain-averaging steps before compression starts.
    min_compression_rate: see ``powersgd``.
    error_feedback: see ``powersgd``.
    warm_start: see ``powersgd``.
    orthogonalization_epsilon: see ``powersgd``.
    key: int seed or PRNG key, the same on every worker.
    adjust_every: F, compressed steps between rank adjustments.
    gamma: smallest candidate rank floor(gamma r0) (at least 1).
    beta: largest candidate rank ceil(beta r0), the static width r_max.
    alpha: error budget, alpha x the uniform ranks' total error.
    error_method: "power" (``power_iters`` subspace iterations) or "svd".
    power_iters: iterations of the "power" estimate.
    acc_iters: the accumulation window, the last steps of each period.
    num_buckets: K, the DP's discretisation of the budget.
    aggregation: "fro" (sum of Frobenius errors, the reference) or "fro2"
      (sum of squared errors, which is what adds up over layers).
    inputs: whose matrices decide: "worker0" (the reference: worker 0's
      local ones; its error table is broadcast, L x C floats) or "mean"
      (the workers' mean, one f32 all-reduce of all accumulators per
      adjustment).

  Returns:
    An ``optax.GradientTransformation`` with an ``LGrecoState``.

  Raises:
    ValueError: a bad argument (named in the message); at update time an
      unbound ``axis_name`` or a state that does not match the updates.
  """
  rank = psgd.validate_positive_int(rank, "rank")
  start_iter = psgd.validate_nonnegative_int(start_iter, "start_iter")
  if (
    isinstance(min_compression_rate, bool)
    or not isinstance(min_compression_rate, (int, float, np.number))
    or not 0 < min_compression_rate < float("inf")
  ):
    raise ValueError(
      "min_compression_rate must be a positive number, got "
      f"{min_compression_rate!r}"
    )
  error_feedback = psgd.validate_bool(error_feedback, "error_feedback")
  warm_start = psgd.validate_bool(warm_start, "warm_start")
  epsilon = orth.validate_epsilon(orthogonalization_epsilon)
  adjust_every = psgd.validate_positive_int(adjust_every, "adjust_every")
  gamma = _validate_fraction(gamma, "gamma", 0.0, 1.0)
  beta = _validate_fraction(beta, "beta", 1.0, 1e6)
  alpha = _validate_fraction(alpha, "alpha", 0.0, 1e12)
  if alpha == 0:
    raise ValueError("alpha must be > 0, got 0")
  if error_method not in ERROR_METHODS:
    raise ValueError(
      f"error_method must be one of {ERROR_METHODS}, got {error_method!r}"
    )
  power_iters = psgd.validate_positive_int(power_iters, "power_iters")
  acc_iters = psgd.validate_positive_int(acc_iters, "acc_iters")
  if acc_iters > adjust_every:
    raise ValueError(
      f"acc_iters must be <= adjust_every ({adjust_every}), got {acc_iters}"
    )
  num_buckets = psgd.validate_positive_int(num_buckets, "num_buckets")
  if aggregation not in AGGREGATIONS:
    raise ValueError(
      f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}"
    )
  if inputs not in INPUTS:
    raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
  init_key = prng.canonical_key(key)
  candidates = tuple(
    range(max(1, math.floor(gamma * rank)), math.ceil(beta * rank) + 1)
  )
  r_max = candidates[-1]

  def layout(leaves: Sequence[jax.Array]) -> list[psgd.Matrix]:
    """Compressed matrices (decided with r0), at static width w."""
    mats, _ = psgd.plan_matrices(
      leaves, rank=rank, min_compression_rate=min_compression_rate
    )
    return [
      psgd.Matrix(m.index, m.n, m.m, min(r_max, m.n, m.m), m.dtype)
      for m in mats
    ]

  def init_fn(params: optax.Params) -> LGrecoState:
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(params)]
    mats = layout(leaves)
    qs = psgd.initial_qs(mats, init_key)
    # Only the first r0 columns are live until the first adjustment.
    qs = tuple(q * (jnp.arange(mat.r) < rank) for q, mat in zip(qs, mats))
    error = tuple(jnp.zeros((max(x.size, 1),), x.dtype) for x in leaves)
    return LGrecoState(
      error=error if error_feedback else (),
      acc=tuple(jnp.zeros((m.n * m.m,), jnp.float32) for m in mats),
      q=qs,
      ranks=jnp.full((len(mats),), rank, jnp.int32),
      count=jnp.zeros((), jnp.int32),
      key=init_key,
    )

  def host_choose(mats: list[psgd.Matrix]) -> Callable[[jax.Array], np.ndarray]:
    dims = [(m.n, m.m) for m in mats]

    def choose(table: jax.Array) -> np.ndarray:
      ranks = choose_ranks(
        np.asarray(table),
        dims,
        candidates,
        rank,
        alpha=alpha,
        num_buckets=num_buckets,
        aggregation=aggregation,
      )
      return (
        ranks if fits_wire(ranks, mats, rank) else uniform_ranks(mats, rank)
      )

    return choose

  def packed_psum(
    arrays: list[jax.Array], mats: list[psgd.Matrix], ranks: jax.Array
  ) -> list[jax.Array]:
    """Sums the live columns of the factors (one [k, rows, w] array per
    group), packed into buffers of the uniform ranks' size per dtype."""
    groups = psgd.group_matrices(mats)
    base = uniform_ranks(mats, rank)
    live = [jnp.minimum(ranks[j], m.r) for j, m in enumerate(mats)]
    # dtype -> [(group, position in group, matrix)]
    members: dict[np.dtype, list[tuple[int, int, int]]] = {}
    for g, ids in enumerate(groups):
      for k, j in enumerate(ids):
        members.setdefault(np.dtype(arrays[g].dtype), []).append((g, k, j))
    # Per group, by position: every entry is set below.
    out: list[dict[int, jax.Array]] = [{} for _ in groups]
    for entries in members.values():
      rows = np.array([arrays[g].shape[1] for g, _, _ in entries])
      width = np.array([arrays[g].shape[2] for g, _, _ in entries])
      capacity = int(sum(base[j] * r for (_, _, j), r in zip(entries, rows)))
      sizes = rows * width
      source = np.cumsum(sizes) - sizes  # of each factor in ``flat``
      flat = bucketing.join([arrays[g][k].reshape(-1) for g, k, _ in entries])
      # On the wire each factor's first r_l columns, column-major (where
      # they are a prefix), back to back: its live elements and their start.
      used = jnp.stack(
        [live[j] * int(r) for (_, _, j), r in zip(entries, rows)]
      )
      end = jnp.cumsum(used)
      start = end - used
      # The buffer is one gather (each slot finds its factor among the L
      # ends) and the sums come back by one gather, straight from and to
      # the factors' row-major layout: no scatter, no transposes, and a
      # few kernels whatever the number of factors (a kernel per factor
      # dominates on CPU at these sizes).
      slot = jnp.arange(capacity, dtype=jnp.int32)
      owner = jnp.searchsorted(end, slot, side="right", method="compare_all")
      owner = jnp.minimum(owner, len(entries) - 1)
      at = slot - start[owner]  # column-major position in the factor
      n_rows = jnp.asarray(rows, jnp.int32)[owner]
      src = (
        jnp.asarray(source, jnp.int32)[owner]
        + (at % n_rows) * jnp.asarray(width, jnp.int32)[owner]
        + at // n_rows
      )
      buf = jnp.where(slot < end[-1], flat.at[src].get(mode="clip"), 0)
      total = jax.lax.psum(buf, axis_name)
      # Back: element (i, c) of factor e, row-major, is slot
      # start_e + c rows_e + i if column c is live.
      factor = np.repeat(np.arange(len(entries)), sizes)
      inside = np.arange(int(sizes.sum())) - source[factor]
      i, c = inside // width[factor], inside % width[factor]
      col_major = (c * rows[factor] + i).astype(np.int32)
      dest = start[factor] + col_major
      flat = jnp.where(
        col_major < used[factor], total.at[dest].get(mode="clip"), 0
      )
      for (g, k, _), first, r, w in zip(entries, source, rows, width):
        out[g][k] = flat[first : first + r * w].reshape(r, w)
    return [
      jnp.stack([o[k] for k in range(len(ids))]) for o, ids in zip(out, groups)
    ]

  def adjust(
    accs: Sequence[jax.Array],
    state: LGrecoState,
    mats: list[psgd.Matrix],
    num_workers: int,
  ) -> jax.Array:
    """New ranks from the accumulators; identical on every worker."""
    if inputs == "mean":
      accs = [a / num_workers for a in psgd.psum_packed(list(accs), axis_name)]
    table = _error_table(
      accs,
      mats,
      psgd.group_matrices(mats),
      candidates,
      method=error_method,
      iters=power_iters,
      key=prng.fold(state.key, _TABLE, state.count),
      epsilon=epsilon,
    )
    if inputs == "worker0":
      # Worker 0's table on every worker: a max over a table that is -inf
      # elsewhere. NaN (an unknown error) is +inf first, which the DP reads
      # the same way, so XLA's NaN semantics in max do not matter.
      first = jax.lax.axis_index(axis_name) == 0
      table = jnp.where(jnp.isnan(table), jnp.inf, table)
      table = jax.lax.pmax(jnp.where(first, table, -jnp.inf), axis_name)
    ranks = jax.pure_callback(
      host_choose(mats), jax.ShapeDtypeStruct((len(mats),), jnp.int32), table
    )
    return ranks

  def update_fn(
    updates: optax.Updates,
    state: LGrecoState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, LGrecoState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_float_leaves(
      leaves, [p for p, _ in paths_leaves], "L-GreCo"
    )
    mats = layout(leaves)
    if [q.shape for q in state.q] != [(m.m, m.r) for m in mats]:
      raise ValueError(
        "LGrecoState does not match the updates (was init "
        "called with parameters of these shapes?)"
      )

    def compressed(operands: _Operands) -> _Operands:
      leaves, error, acc, qs, ranks = operands
      masks = [
        (jnp.arange(m.r) < ranks[j]).astype(jnp.float32)
        for j, m in enumerate(mats)
      ]
      new, error, qs, matrices = psgd.ef_power_step(
        leaves,
        error,
        qs,
        mats,
        error_feedback=error_feedback,
        masks=masks,
        axis_name=axis_name,
        num_workers=num_workers,
        epsilon=epsilon,
        key=state.key,
        count=state.count,
        warm_start=warm_start,
        reduce=lambda arrays: packed_psum(arrays, mats, ranks),
      )
      phase = (state.count - start_iter) % adjust_every
      window = phase >= adjust_every - acc_iters
      # A non-finite gradient (its step outputs NaN) adds nothing.
      acc = tuple(
        jnp.where(window & jnp.isfinite(x.reshape(-1)), a + x.reshape(-1), a)
        for a, x in zip(acc, matrices)
      )
      if mats:
        ranks = jax.lax.cond(
          phase == adjust_every - 1,
          lambda a: adjust(a, state, mats, num_workers),
          lambda a: ranks,
          acc,
        )
        acc = tuple(jnp.where(phase == adjust_every - 1, 0.0, a) for a in acc)
      return new, error, acc, qs, ranks

    def warmup(operands: _Operands) -> _Operands:
      leaves, error, acc, qs, ranks = operands
      means = psgd.mean_leaves(leaves, axis_name, num_workers)
      return means, error, acc, qs, ranks

    # Per-worker fields typed as such, so both branches of the conds match
    # even for a state passed replicated.
    operands = (
      leaves,
      collectives.varying(state.error, axis_name),
      collectives.varying(state.acc, axis_name),
      state.q,
      state.ranks,
    )
    if start_iter == 0:
      new, error, acc, qs, ranks = compressed(operands)
    else:
      new, error, acc, qs, ranks = jax.lax.cond(
        state.count >= start_iter, compressed, warmup, operands
      )
    state = LGrecoState(
      error=error,
      acc=acc,
      q=qs,
      ranks=ranks,
      count=state.count + 1,
      key=state.key,
    )
    return jax.tree.unflatten(treedef, new), state

  return transform.transformation(init_fn, update_fn)
