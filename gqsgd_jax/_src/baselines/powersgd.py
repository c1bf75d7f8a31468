"""PowerSGD (Vogels et al., 2019) as an optax transform.

Each gradient leaf is viewed as a matrix n x m (n = shape[0]). Leaves worth
compressing, (n + m) r * min_compression_rate < n m, are replaced by a rank-r
approximation P Q^T found by one step of subspace iteration per training
step: P = sum_i X_i Q, orthonormalise P, Q = mean_i X_i^T P. The others are
averaged exactly. Per step: one ``psum`` for all Ps, one for all Qs, one for
the uncompressed leaves, each a single concatenated buffer per dtype.

Like PyTorch's ``powerSGD_hook``:

* the first ``start_iter`` steps are plain averaging (a traced step counter
  and ``lax.cond``, so warm-up and compression are one compiled function);
* error feedback adds each worker's residual x_i - output to its next
  gradient (for uncompressed leaves the residual x_i - mean is zero-mean
  and only keeps the arithmetic identical to the reference);
* warm start reuses last step's averaged Q.

Differences from the reference (B-PS-1 in the docs' differences page): the
default orthogonalisation epsilon is 1e-8, so a zero column cannot turn into
NaN; an all-zero factor column (e.g. after a step with a zero gradient) is
re-drawn from the shared key instead of staying zero forever; Q comes from a
JAX key shared by all workers rather than a NumPy seed.
"""

from collections.abc import Callable, Sequence
import dataclasses
import math
from typing import NamedTuple, NotRequired, TypedDict, Unpack

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqsgd_jax._src import bucketing
from gqsgd_jax._src import collectives
from gqsgd_jax._src import nonfinite
from gqsgd_jax._src import prng
from gqsgd_jax._src import transform
from gqsgd_jax._src import worker_state
from gqsgd_jax._src.baselines import orthogonalize as orth

# Streams of the shared key (fold_in tags), so draws never collide.
_INIT_Q, _DRAWS = range(2)
_HIGHEST = jax.lax.Precision.HIGHEST


@worker_state.per_worker("error")
class PowerSGDState(NamedTuple):
  """State of ``powersgd``: EF memories, warm-start Qs, step, shared key."""

  # Per worker (see worker_state_specs): one flat residual per leaf in the
  # leaf's dtype, or with batched=True one per bucket, zero-padded to
  # side^2; () without error feedback.
  error: tuple
  # f32[m, r] per compressed matrix in leaf order (batched: f32[side, r]
  # per bucket); identical on all workers.
  q: tuple
  # int32 scalar: steps taken, warm-up included. The field shadows
  # tuple.count, as in optax's states (mypy flags the override).
  count: jax.Array  # type: ignore[assignment]
  key: jax.Array  # uint32[2] shared PRNG key of the Q draws


@dataclasses.dataclass(frozen=True)
class Matrix:
  """A leaf (or bucket) compressed as an n x m matrix of rank r."""

  index: int  # leaf index, or bucket index when batched
  n: int
  m: int
  r: int
  dtype: np.dtype  # wire dtype of its factors (the leaf's dtype)


# reduce(arrays) -> their sums over the workers (see power_round).
Reduce = Callable[[list[jax.Array]], list[jax.Array]]


class RoundArgs(TypedDict):
  """The keyword arguments of ``power_round`` that ``ef_power_step`` passes
  through."""

  axis_name: collectives.AxisName
  num_workers: int
  epsilon: float
  key: jax.Array
  count: jax.Array
  warm_start: NotRequired[bool]
  reduce: NotRequired[Reduce]


def validate_positive_int(value: object, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def validate_nonnegative_int(value: object, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= 0, got {value!r}")
  if value < 0:
    raise ValueError(f"{name} must be an int >= 0, got {value!r}")
  return int(value)


def validate_bool(value: object, name: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool, got {value!r}")
  return bool(value)


def matrix_view(shape: Sequence[int]) -> tuple[int, int]:
  """(n, m) of the reference's ``tensor.view(shape[0], -1)``."""
  if not shape:
    return 1, 1
  return int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))


def plan_matrices(
  leaves: Sequence[jax.Array],
  *,
  rank: int,
  min_compression_rate: float,
) -> tuple[list[Matrix], list[int]]:
  """Static split of the leaves into compressed matrices and the rest."""
  mats: list[Matrix] = []
  rest: list[int] = []
  for i, leaf in enumerate(leaves):
    n, m = matrix_view(leaf.shape)
    r = min(n, m, rank)
    if leaf.ndim >= 2 and (n + m) * r * min_compression_rate < n * m:
      mats.append(Matrix(i, n, m, r, np.dtype(leaf.dtype)))
    else:
      rest.append(i)
  return mats, rest


def group_matrices(mats: list[Matrix]) -> list[list[int]]:
  """Indices into ``mats`` of same-shaped matrices, batched together."""
  groups: dict[tuple, list[int]] = {}
  for j, mat in enumerate(mats):
    groups.setdefault((mat.n, mat.m, mat.r, mat.dtype), []).append(j)
  return list(groups.values())


def psum_packed(
  arrays: Sequence[jax.Array], axis_name: collectives.AxisName
) -> list[jax.Array]:
  """All-reduces ``arrays`` as one buffer per dtype (``bucketing.join``)."""
  if not arrays:
    return []
  by_dtype: dict[np.dtype, list[int]] = {}
  for i, a in enumerate(arrays):
    by_dtype.setdefault(np.dtype(a.dtype), []).append(i)
  buffers = [
    bucketing.join([arrays[i].reshape(-1) for i in ids])
    for ids in by_dtype.values()
  ]
  sums = jax.lax.psum(buffers, axis_name)
  out = list(arrays)  # every entry is replaced by its sum below
  for ids, total in zip(by_dtype.values(), sums):
    offset = 0
    for i in ids:
      size = arrays[i].size
      out[i] = total[offset : offset + size].reshape(arrays[i].shape)
      offset += size
  return out


def split_draw(
  flat: jax.Array, shapes: Sequence[tuple[int, ...]]
) -> list[jax.Array]:
  """Slices one flat draw into arrays of the given shapes."""
  sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  offsets = np.cumsum([0] + sizes)
  return [
    flat[offsets[i] : offsets[i + 1]].reshape(s) for i, s in enumerate(shapes)
  ]


def draw_uniform(
  key: jax.Array, shapes: Sequence[tuple[int, ...]]
) -> list[jax.Array]:
  """f32 U[-1, 1) arrays of the given shapes, for per-step draws.

  One generator call per step keeps the program small. Uniform rather than
  normal: a start column only has to be generic (almost surely not
  orthogonal to the subspace sought), and XLA copies the normal sampler's
  inverse-erf polynomial into every consumer, which multiplies compile time.
  """
  total = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
  flat = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
  return split_draw(flat, shapes)


def initial_qs(mats: list[Matrix], key: jax.Array) -> tuple[jax.Array, ...]:
  """N(0, 1) starting Qs from the shared key (same on every worker)."""
  shapes = [(mat.m, mat.r) for mat in mats]
  total = sum(mat.m * mat.r for mat in mats)
  flat = jax.random.normal(prng.fold(key, _INIT_Q), (total,), jnp.float32)
  return tuple(split_draw(flat, shapes))


def power_round(
  xs: Sequence[jax.Array],
  qs: Sequence[jax.Array],
  mats: list[Matrix],
  *,
  axis_name: collectives.AxisName,
  num_workers: int,
  epsilon: float,
  key: jax.Array,
  count: jax.Array,
  warm_start: bool = True,
  masks: Sequence[jax.Array] | None = None,
  reduce: Reduce | None = None,
) -> tuple[list[jax.Array], tuple[jax.Array, ...]]:
  """One PowerSGD round on every compressed matrix.

  Args:
    xs: f32[n, m] per matrix: this worker's (error-compensated) gradient.
    qs: f32[m, r] per matrix: last step's averaged Q (warm start).
    mats: the static ``Matrix`` of each entry.
    axis_name, num_workers: the data-parallel axis.
    epsilon: Gram-Schmidt epsilon.
    key, count: shared key and step, for fresh or re-drawn columns.
    warm_start: use ``qs``; otherwise draw a fresh Q every step.
    masks: optional f32[r] per matrix (1 = active column), for L-GreCo's
      per-layer ranks below the static width r.
    reduce: optional all-reduce of the factors, called with one
      [k, rows, r] array per group of ``group_matrices(mats)`` (first the
      Ps, then the Qs) and returning their sums; default ``psum_packed``.

  Returns:
    (outs, new_qs): f32[n, m] approximations P Q^T of the workers' mean
    and the averaged f32[m, r] Qs, both identical on every worker.
  """
  groups = group_matrices(mats)
  if reduce is None:
    reduce = lambda arrays: psum_packed(arrays, axis_name)

  def stack(values: Sequence[jax.Array], ids: list[int]) -> jax.Array:
    return jnp.stack([values[j] for j in ids])

  def masked(a: jax.Array, mask: jax.Array | None) -> jax.Array:
    return a if mask is None else a * mask

  # Fresh Qs (no warm start) or replacements for dead columns of Q and P.
  shapes: list[tuple[int, ...]] = []
  for ids in groups:
    mat = mats[ids[0]]
    shapes += [(len(ids), mat.m, mat.r), (len(ids), mat.n, mat.r)]
  noise = draw_uniform(prng.fold(key, _DRAWS, count), shapes)

  xg: list[jax.Array] = []
  pg: list[jax.Array] = []
  mg: list[jax.Array | None] = []
  for g, ids in enumerate(groups):
    mat = mats[ids[0]]
    x = stack(xs, ids)
    mask = None if masks is None else stack(masks, ids)[:, None, :]
    if warm_start:
      q = orth.refresh_zero_columns(stack(qs, ids), noise[2 * g])
    else:
      q = noise[2 * g]
    q = masked(orth.orthogonalize(masked(q, mask), epsilon), mask)
    xg.append(x)
    mg.append(mask)
    pg.append(jnp.matmul(x, q, precision=_HIGHEST).astype(mat.dtype))

  # P is orthonormalised next, so the sum needs no division by W.
  pg = reduce(pg)
  qg: list[jax.Array] = []
  for g, ids in enumerate(groups):
    p = orth.refresh_zero_columns(pg[g].astype(jnp.float32), noise[2 * g + 1])
    p = masked(orth.orthogonalize(masked(p, mg[g]), epsilon), mg[g])
    pg[g] = p
    q = jnp.matmul(jnp.swapaxes(xg[g], 1, 2), p, precision=_HIGHEST)
    qg.append(q.astype(mats[ids[0]].dtype))
  qg = reduce(qg)

  outs: dict[int, jax.Array] = {}  # by matrix: every one is in a group
  new_qs: dict[int, jax.Array] = {}
  for g, ids in enumerate(groups):
    q = qg[g].astype(jnp.float32) / num_workers
    out = jnp.matmul(pg[g], jnp.swapaxes(q, 1, 2), precision=_HIGHEST)
    for k, j in enumerate(ids):
      outs[j] = out[k]
      new_qs[j] = q[k]
  return (
    [outs[j] for j in range(len(mats))],
    tuple(new_qs[j] for j in range(len(mats))),
  )


def mean_leaves(
  leaves: Sequence[jax.Array], axis_name: collectives.AxisName, num_workers: int
) -> list[jax.Array]:
  """Exact mean of every leaf (warm-up, uncompressed leaves); NaN where a
  worker's value is NaN or Inf."""
  live = [i for i, x in enumerate(leaves) if x.size]
  sums = psum_packed([leaves[i] for i in live], axis_name)
  out = [jnp.zeros(x.shape, x.dtype) for x in leaves]
  for i, s in zip(live, sums):
    out[i] = _nan_if_not_finite(s / num_workers).astype(leaves[i].dtype)
  return out


def _nan_if_not_finite(x: jax.Array) -> jax.Array:
  """NaN where a mean is Inf: a non-finite gradient always reads as NaN."""
  return jnp.where(jnp.isfinite(x), x, jnp.nan)


def ef_power_step(
  leaves: Sequence[jax.Array],
  error: tuple[jax.Array, ...],
  qs: Sequence[jax.Array],
  mats: list[Matrix],
  *,
  error_feedback: bool,
  masks: Sequence[jax.Array] | None = None,
  **round_kwargs: Unpack[RoundArgs],
) -> tuple[
  list[jax.Array], tuple[jax.Array, ...], tuple[jax.Array, ...], list[jax.Array]
]:
  """Error feedback around one ``power_round``, leaf by leaf.

  Args:
    leaves: this worker's gradient leaves (``mats`` index into them).
    error: flat residual per leaf (ignored without error feedback).
    qs: warm-start Q per matrix.
    mats: the compressed leaves; the others are averaged exactly.
    error_feedback: add the residuals and return the new ones.
    masks: optional active-column masks (see ``power_round``).
    **round_kwargs: axis_name, num_workers, epsilon, key, count, warm_start.

  Returns:
    (outs, error, qs, matrices): leaf-shaped mean estimates, new residuals
    x_i - output (as the reference: for uncompressed leaves x_i - mean,
    zero-mean over workers), the new Qs, and the error-compensated f32
    matrices that were compressed.
  """
  xs = [x.reshape(-1) for x in leaves]
  if error_feedback:
    xs = [x + e.astype(x.dtype) if x.size else x for x, e in zip(xs, error)]
  comp = {mat.index for mat in mats}
  rest = [i for i in range(len(leaves)) if i not in comp]
  matrices = [
    xs[mat.index].astype(jnp.float32).reshape(mat.n, mat.m) for mat in mats
  ]
  old_qs = qs
  outs, new_qs = power_round(matrices, qs, mats, masks=masks, **round_kwargs)
  # A NaN/Inf in any worker's matrix reaches the all-reduced P, hence the
  # averaged Q: a flag identical on every worker. Such a step outputs NaN
  # for the whole matrix and leaves its Q and residual as they were, so one
  # bad batch does not poison every later step.
  finite = [nonfinite.all_finite(q) for q in new_qs]
  new_qs = tuple(
    jnp.where(ok, q, old) for ok, q, old in zip(finite, new_qs, old_qs)
  )
  flat = list(xs)
  for mat, out, ok in zip(mats, outs, finite):
    flat[mat.index] = jnp.where(ok, out.reshape(-1), jnp.nan).astype(
      xs[mat.index].dtype
    )
  means = mean_leaves(
    [xs[i] for i in rest],
    round_kwargs["axis_name"],
    round_kwargs["num_workers"],
  )
  for i, mean in zip(rest, means):
    flat[i] = mean
  if error_feedback:
    ok_by_leaf = {mat.index: f for mat, f in zip(mats, finite)}
    # Exactly averaged leaves: element by element (the mean is non-finite
    # exactly where some worker's value is).
    error = tuple(
      e
      if not x.size
      else jnp.where(ok_by_leaf[i], x - o, e.astype(x.dtype))
      if i in ok_by_leaf
      else jnp.where(jnp.isfinite(x - o), x - o, e.astype(x.dtype))
      for i, (x, o, e) in enumerate(zip(xs, flat, error))
    )
  new = [o.reshape(x.shape) for o, x in zip(flat, leaves)]
  return new, error, new_qs, matrices


def _batched_layout(
  leaves: Sequence[jax.Array], *, rank: int, bucket_bytes: int
) -> tuple[list[bucketing.Bucket], list[Matrix]]:
  buckets = bucketing.plan_buckets(leaves, bucket_bytes=bucket_bytes)
  mats: list[Matrix] = []
  for b, bucket in enumerate(buckets):
    side = math.isqrt(bucket.size - 1) + 1  # ceil(sqrt(N))
    mats.append(Matrix(b, side, side, min(rank, side), bucket.dtype))
  return buckets, mats


# (leaves, error memories, Qs): the operands of both branches of a step.
_Operands = tuple[list[jax.Array], tuple[jax.Array, ...], tuple[jax.Array, ...]]
# (mean estimates per leaf, new error memories, new Qs).
_Compressed = tuple[
  list[jax.Array], tuple[jax.Array, ...], tuple[jax.Array, ...]
]


def powersgd(
  *,
  axis_name: collectives.AxisName = "data",
  rank: int = 1,
  start_iter: int = 1000,
  min_compression_rate: float = 2,
  error_feedback: bool = True,
  warm_start: bool = True,
  orthogonalization_epsilon: float = orth.DEFAULT_EPSILON,
  key: jax.typing.ArrayLike = 0,
  batched: bool = False,
  bucket_bytes: int = 25 * 2**20,
) -> optax.GradientTransformation:
  """PowerSGD: rank-r approximation of the workers' mean gradient.

  Use inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name`` on local
  gradients (``jax.grad`` w.r.t. ``gqsgd_jax.varying(params)`` under
  shard_map). The state holds per-worker error memories: under shard_map
  create and pass it with ``gqsgd_jax.worker_state_specs``.

  Args:
    axis_name: the data-parallel mesh axis.
    rank: approximation rank r (per matrix: min(n, m, r)).
    start_iter: steps of plain averaging before compression starts (the
      reference's ``start_powerSGD_iter``; JAX has no bucket rebuild, so 0
      is allowed, and then the warm-up branch is not even compiled).
    min_compression_rate: compress a leaf only if (n + m) r times this is
      below n m; the others (all vectors) are averaged exactly.
    error_feedback: add each worker's compression residual to its next
      gradient.
    warm_start: start each step from last step's Q (a power iteration);
      otherwise draw a fresh Q every step.
    orthogonalization_epsilon: added to column norms in Gram-Schmidt
      (rank <= 2); 0 is the reference's default, with which a zero column
      yields NaN (B-PS-1).
    key: int seed or PRNG key, the same on every worker (shared Q draws).
    batched: the reference's ``batched_powerSGD_hook``: each bucket of
      ``bucket_bytes`` is flattened, zero-padded to a ceil(sqrt(N))^2 square
      and compressed as one matrix.
    bucket_bytes: bucket cap for ``batched`` (default 25 MiB, as DDP).

  Returns:
    An ``optax.GradientTransformation`` with a ``PowerSGDState``.

  Raises:
    ValueError: a bad argument (named in the message); at update time an
      unbound ``axis_name`` or a state that does not match the updates.

  Examples:
    >>> import optax, gqsgd_jax
    >>> tx = optax.chain(gqsgd_jax.powersgd(rank=4, start_iter=10),
    ...                  optax.sgd(0.1))
  """
  rank = validate_positive_int(rank, "rank")
  start_iter = validate_nonnegative_int(start_iter, "start_iter")
  if (
    isinstance(min_compression_rate, bool)
    or not isinstance(min_compression_rate, (int, float, np.number))
    or not 0 < min_compression_rate < float("inf")
  ):
    raise ValueError(
      "min_compression_rate must be a positive number, got "
      f"{min_compression_rate!r}"
    )
  error_feedback = validate_bool(error_feedback, "error_feedback")
  warm_start = validate_bool(warm_start, "warm_start")
  batched = validate_bool(batched, "batched")
  epsilon = orth.validate_epsilon(orthogonalization_epsilon)
  bucket_bytes = bucketing.validate_bucket_bytes(bucket_bytes)
  init_key = prng.canonical_key(key)

  def layout(
    leaves: Sequence[jax.Array],
  ) -> tuple[list[bucketing.Bucket] | None, list[Matrix]]:
    if batched:
      return _batched_layout(leaves, rank=rank, bucket_bytes=bucket_bytes)
    mats, _ = plan_matrices(
      leaves, rank=rank, min_compression_rate=min_compression_rate
    )
    return None, mats

  def error_sizes(
    leaves: Sequence[jax.Array],
    buckets: list[bucketing.Bucket] | None,
    mats: list[Matrix],
  ) -> list[tuple[int, np.dtype]]:
    if batched:
      return [(mat.n * mat.m, mat.dtype) for mat in mats]
    return [(max(leaf.size, 1), leaf.dtype) for leaf in leaves]

  def init_fn(params: optax.Params) -> PowerSGDState:
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(params)]
    if batched:
      bucketing.check_leaf_dtypes(
        leaves, [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
      )
    buckets, mats = layout(leaves)
    error = (
      tuple(
        jnp.zeros((size,), dtype)
        for size, dtype in error_sizes(leaves, buckets, mats)
      )
      if error_feedback
      else ()
    )
    return PowerSGDState(
      error=error,
      q=initial_qs(mats, init_key),
      count=jnp.zeros((), jnp.int32),
      key=init_key,
    )

  def check_state(
    state: PowerSGDState,
    leaves: Sequence[jax.Array],
    buckets: list[bucketing.Bucket] | None,
    mats: list[Matrix],
  ) -> None:
    expected = [(m.m, m.r) for m in mats]
    got = [tuple(q.shape) for q in state.q]
    sizes = [s for s, _ in error_sizes(leaves, buckets, mats)]
    errs = [e.shape[0] for e in state.error]
    if got != expected or (error_feedback and errs != sizes):
      raise ValueError(
        "PowerSGDState does not match the updates (was init called with "
        f"parameters of these shapes?): Qs {got} vs {expected}"
      )

  def compress(
    leaves: Sequence[jax.Array],
    error: tuple[jax.Array, ...],
    state: PowerSGDState,
    num_workers: int,
  ) -> _Compressed:
    """Error feedback + one power round; returns (outs, error, qs)."""
    buckets, mats = layout(leaves)
    if not batched:
      new, error, qs, _ = ef_power_step(
        leaves,
        error,
        state.q,
        mats,
        error_feedback=error_feedback,
        **round_args(state, num_workers),
      )
      return new, error, qs
    # Each bucket as one zero-padded square "leaf", all compressed.
    assert buckets is not None  # layout makes them when batched
    squares = []
    for b, mat in zip(buckets, mats):
      flat = bucketing.flatten_bucket(b, leaves)
      squares.append(
        jnp.pad(flat, (0, mat.n * mat.m - flat.shape[0])).reshape(mat.n, mat.m)
      )
    outs, error, qs, _ = ef_power_step(
      squares,
      error,
      state.q,
      mats,
      error_feedback=error_feedback,
      **round_args(state, num_workers),
    )
    outs = [o.reshape(-1)[: b.size] for o, b in zip(outs, buckets)]
    return bucketing.unflatten_buckets(buckets, outs, leaves), error, qs

  def round_args(state: PowerSGDState, num_workers: int) -> RoundArgs:
    return RoundArgs(
      axis_name=axis_name,
      num_workers=num_workers,
      epsilon=epsilon,
      key=state.key,
      count=state.count,
      warm_start=warm_start,
    )

  def update_fn(
    updates: optax.Updates,
    state: PowerSGDState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, PowerSGDState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_float_leaves(
      leaves, [p for p, _ in paths_leaves], "PowerSGD"
    )
    buckets, mats = layout(leaves)
    check_state(state, leaves, buckets, mats)

    def compressed(operands: _Operands) -> _Compressed:
      leaves, error, qs = operands
      return compress(leaves, error, state._replace(q=qs), num_workers)

    def warmup(operands: _Operands) -> _Compressed:
      leaves, error, qs = operands
      return mean_leaves(leaves, axis_name, num_workers), error, qs

    # Residuals are per worker; typing them so lets the warm-up branch (which
    # keeps them) match the compressed one even for a state passed with P().
    operands = (leaves, collectives.varying(state.error, axis_name), state.q)
    if start_iter == 0:
      new, error, qs = compressed(operands)
    else:
      new, error, qs = jax.lax.cond(
        state.count >= start_iter, compressed, warmup, operands
      )
    state = PowerSGDState(
      error=error, q=qs, count=state.count + 1, key=state.key
    )
    return jax.tree.unflatten(treedef, new), state

  return transform.transformation(init_fn, update_fn)
