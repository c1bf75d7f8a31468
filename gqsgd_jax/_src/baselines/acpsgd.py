"""ACP-SGD (alternating compressed PowerSGD) as an optax transform.

PowerSGD spends two all-reduces per step (P, then Q). ACP-SGD takes one
half of the power iteration per step and alternates:

* P-step (even steps): Q <- orth(Q); P_i = X_i Q; all-reduce P;
  output P Q^T / W;
* Q-step (odd steps): P <- orth(P); Q_i = X_i^T P; all-reduce Q;
  output P Q^T / W;

so each step sends only the Ps or only the Qs (about half of PowerSGD) in a
single ``psum``, together with the leaves that are not matrices (averaged
exactly). Every matrix is compressed (no minimum compression rate), with
r = min(rank, n, m). Error feedback keeps each worker's local residual
X_i - P_i Q^T (P-step) or X_i - P Q_i^T (Q-step).

The parity is the traced step counter, so both branches live in one
compiled function (``lax.cond``: each step runs, and sends, only its own).
The initial Q comes from a key shared by all workers (the reference draws it
from each process's unseeded device RNG, so replicas can drift: B-ACP-1).
"""

from collections.abc import Callable, Sequence
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

_HIGHEST = jax.lax.Precision.HIGHEST
_INIT, _DRAWS = range(2)


# (outs, rest_means, errors, ps, qs) of one P- or Q-step.
_HalfStep = tuple[
  list[jax.Array],
  list[jax.Array],
  list[jax.Array],
  tuple[jax.Array, ...],
  tuple[jax.Array, ...],
]


@worker_state.per_worker("error")
class AcpSgdState(NamedTuple):
  """State of ``acpsgd``: EF memories, P and Q per matrix, step, key."""

  # Per worker (see worker_state_specs): flat residual X_i - local
  # approximation per compressed matrix, in the leaf dtype; () without EF.
  error: tuple
  p: tuple  # f32[n, r] per matrix: last all-reduced (or orthonormal) P
  q: tuple  # f32[m, r] per matrix: last orthonormal (or all-reduced) Q
  # int32 scalar: steps taken; even = P-step, odd = Q-step. The field
  # shadows tuple.count, as in optax's states (mypy flags the override).
  count: jax.Array  # type: ignore[assignment]
  key: jax.Array  # uint32[2] shared PRNG key


def plan(
  leaves: Sequence[jax.Array], rank: int
) -> tuple[list[psgd.Matrix], list[int]]:
  """Compressed matrices (ndim >= 2, non-empty) and the other leaves."""
  mats: list[psgd.Matrix] = []
  rest: list[int] = []
  for i, leaf in enumerate(leaves):
    n, m = psgd.matrix_view(leaf.shape)
    if leaf.ndim >= 2 and n * m > 0:
      mats.append(psgd.Matrix(i, n, m, min(rank, n, m), np.dtype(leaf.dtype)))
    else:
      rest.append(i)
  return mats, rest


def acpsgd(
  *,
  axis_name: collectives.AxisName = "data",
  rank: int = 4,
  error_feedback: bool = True,
  orthogonalization_epsilon: float = orth.DEFAULT_EPSILON,
  key: jax.typing.ArrayLike = 0,
) -> optax.GradientTransformation:
  """ACP-SGD: alternating P/Q low-rank mean, one all-reduce per step.

  Use inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name`` on local
  gradients; the state holds per-worker error memories (under shard_map
  pass it with ``gqsgd_jax.worker_state_specs``).

  Args:
    axis_name: the data-parallel mesh axis.
    rank: approximation rank r (per matrix min(r, n, m)).
    error_feedback: add each worker's local residual to its next gradient.
    orthogonalization_epsilon: Gram-Schmidt epsilon (rank <= 2; the
      reference always uses QR, which gives the same projection).
    key: int seed or PRNG key of the initial Q, the same on every worker.

  Returns:
    An ``optax.GradientTransformation`` with an ``AcpSgdState``.

  Raises:
    ValueError: a bad argument (named in the message); at update time an
      unbound ``axis_name`` or a state that does not match the updates.
  """
  rank = psgd.validate_positive_int(rank, "rank")
  error_feedback = psgd.validate_bool(error_feedback, "error_feedback")
  epsilon = orth.validate_epsilon(orthogonalization_epsilon)
  init_key = prng.canonical_key(key)

  def init_fn(params: optax.Params) -> AcpSgdState:
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(params)]
    mats, _ = plan(leaves, rank)
    total = sum(mat.m * mat.r for mat in mats)
    flat = jax.random.normal(prng.fold(init_key, _INIT), (total,), jnp.float32)
    q = psgd.split_draw(flat, [(mat.m, mat.r) for mat in mats])
    error = tuple(jnp.zeros((mat.n * mat.m,), mat.dtype) for mat in mats)
    return AcpSgdState(
      error=error if error_feedback else (),
      p=tuple(jnp.zeros((mat.n, mat.r), jnp.float32) for mat in mats),
      q=tuple(q),
      count=jnp.zeros((), jnp.int32),
      key=init_key,
    )

  def half_step(
    xs: Sequence[jax.Array],
    rest: Sequence[jax.Array],
    state: AcpSgdState,
    mats: list[psgd.Matrix],
    *,
    q_step: bool,
    num_workers: int,
  ) -> _HalfStep:
    """One P- or Q-step; returns (outs, rest_means, errors, ps, qs)."""
    old_errors = [e.astype(jnp.float32) for e in state.error] or [
      jnp.zeros(mat.n * mat.m, jnp.float32) for mat in mats
    ]
    groups = psgd.group_matrices(mats)
    shapes = [
      (len(ids), mats[ids[0]].n if q_step else mats[ids[0]].m, mats[ids[0]].r)
      for ids in groups
    ]
    noise = psgd.draw_uniform(prng.fold(state.key, _DRAWS, state.count), shapes)
    fixed, sent = [], []
    for g, ids in enumerate(groups):
      mat = mats[ids[0]]
      x = jnp.stack([xs[j] for j in ids])
      # The factor kept from the last step, orthonormalised (all-zero
      # columns, e.g. after a zero gradient, re-drawn from the shared key).
      old = jnp.stack([(state.p if q_step else state.q)[j] for j in ids])
      f = orth.orthogonalize(orth.refresh_zero_columns(old, noise[g]), epsilon)
      xt = jnp.swapaxes(x, 1, 2) if q_step else x
      fixed.append(f)
      sent.append(jnp.matmul(xt, f, precision=_HIGHEST).astype(mat.dtype))
    summed = psgd.psum_packed(sent + list(rest), axis_name)
    rest_means = [
      jnp.where(jnp.isfinite(s), s / num_workers, jnp.nan).astype(r.dtype)
      for s, r in zip(summed[len(sent) :], rest)
    ]
    # Every matrix is in one group: all entries are set below.
    outs: list[jax.Array] = [jnp.zeros(0)] * len(mats)
    errors: list[jax.Array] = [jnp.zeros(0)] * len(mats)
    ps, qs = list(state.p), list(state.q)
    for g, ids in enumerate(groups):
      f, local, total = fixed[g], sent[g].astype(jnp.float32), summed[g]
      total = total.astype(jnp.float32)
      # A NaN/Inf in any worker's matrix reaches the all-reduced factor:
      # a flag per matrix, identical on every worker.
      finite = jnp.all(jnp.isfinite(total), axis=(1, 2))
      # All NaN, so the output P Q^T is NaN at every coordinate (a where on
      # this small factor, not on the n x m output).
      total = jnp.where(finite[:, None, None], total, jnp.nan)
      if q_step:  # f = P; local, total = Q_i, sum Q
        out = jnp.matmul(f, jnp.swapaxes(total, 1, 2), precision=_HIGHEST)
        approx = jnp.matmul(f, jnp.swapaxes(local, 1, 2), precision=_HIGHEST)
      else:  # f = Q; local, total = P_i, sum P
        out = jnp.matmul(total, jnp.swapaxes(f, 1, 2), precision=_HIGHEST)
        approx = jnp.matmul(local, jnp.swapaxes(f, 1, 2), precision=_HIGHEST)
      out = out / num_workers
      for k, j in enumerate(ids):
        # Such a step outputs NaN for the whole matrix and leaves its
        # residual and factors as they were, so one bad batch does not
        # poison every later step.
        ok = finite[k]
        outs[j] = out[k]
        errors[j] = jnp.where(
          ok, (xs[j] - approx[k]).reshape(-1), old_errors[j]
        )
        if q_step:
          new_p, new_q = f[k], total[k]
        else:
          new_p, new_q = total[k], f[k]
        ps[j] = jnp.where(ok, new_p, ps[j])
        qs[j] = jnp.where(ok, new_q, qs[j])
    return outs, rest_means, errors, tuple(ps), tuple(qs)

  def update_fn(
    updates: optax.Updates,
    state: AcpSgdState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, AcpSgdState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_float_leaves(
      leaves, [p for p, _ in paths_leaves], "ACP-SGD"
    )
    mats, rest = plan(leaves, rank)
    if [q.shape for q in state.q] != [(m.m, m.r) for m in mats]:
      raise ValueError(
        "AcpSgdState does not match the updates (was init "
        "called with parameters of these shapes?)"
      )
    xs = [
      leaves[mat.index].astype(jnp.float32).reshape(mat.n, mat.m)
      for mat in mats
    ]
    if error_feedback:
      xs = [
        x + e.astype(jnp.float32).reshape(x.shape)
        for x, e in zip(xs, state.error)
      ]
    rest_leaves = [leaves[i] for i in rest if leaves[i].size]

    Operands = tuple[list[jax.Array], list[jax.Array], AcpSgdState]

    def branch(q_step: bool) -> Callable[[Operands], _HalfStep]:
      def run(operands: Operands) -> _HalfStep:
        xs, rest_leaves, state = operands
        return half_step(
          xs, rest_leaves, state, mats, q_step=q_step, num_workers=num_workers
        )

      return run

    outs, rest_means, errors, ps, qs = jax.lax.cond(
      state.count % 2 == 1,
      branch(True),
      branch(False),
      (xs, rest_leaves, state),
    )
    new = [jnp.zeros(x.shape, x.dtype) for x in leaves]
    for mat, out in zip(mats, outs):
      new[mat.index] = out.reshape(leaves[mat.index].shape).astype(
        leaves[mat.index].dtype
      )
    for i, mean in zip([i for i in rest if leaves[i].size], rest_means):
      new[i] = mean
    error = tuple(e.astype(mat.dtype) for e, mat in zip(errors, mats))
    state = AcpSgdState(
      error=error if error_feedback else (),
      p=ps,
      q=qs,
      count=state.count + 1,
      key=state.key,
    )
    return jax.tree.unflatten(treedef, new), state

  return transform.transformation(init_fn, update_fn)
