"""Non-finite gradients: detecting them robustly, skipping them consistently.

``max_abs`` is the one place that computes a max-abs statistic (a scale, a
norm) that must carry a non-finite input. It never relies on ``max`` to
propagate NaN: XLA:CPU's reductions (jaxlib 0.10.2 and 0.12 alike) drop NaN
for arrays of 4096 elements or more (the max of 4095 ones and a trailing NaN
is -inf), so a NaN-carrying max is computed as "max of the finite values,
+inf if any value is not finite", from two reductions that are correct
whatever XLA's NaN semantics.


``optax.apply_if_finite`` decides from the gradients it is given. Wrapped
around a compressor those are the *local* gradients, so when one worker sees
a NaN the workers disagree: under ``shard_map`` the branches do not even
type-check, under ``pmap`` the replicas diverge or wait forever on a
collective only some of them run. This version agrees first (one scalar
``pmin`` over the axis) and then selects between the new and the old state
instead of branching, so every worker runs the same collectives and takes
the same decision.

(``optax.apply_if_finite`` placed *after* a compressor, on the mean gradient,
is safe as is: that input is identical on every worker.)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gqsgd_jax._src import collectives
from gqsgd_jax._src import transform


def all_finite(x: jax.Array) -> jax.Array:
  """bool[]: every element of ``x`` is finite (True for an empty array)."""
  return jnp.all(jnp.isfinite(x))


def max_abs(
  x: jax.typing.ArrayLike, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
  """max |x| in float32 over ``axis``; +inf where any element is NaN or Inf.

  An empty reduction gives 0. The maximum is taken over the finite values
  only, so NaN never reaches XLA's ``max`` (see the module docstring).
  """
  x = jnp.asarray(x)
  finite = jnp.isfinite(x)
  mags = jnp.where(finite, jnp.abs(x.astype(jnp.float32)), 0.0)
  m = jnp.max(mags, axis=axis, initial=0.0)
  return jnp.where(jnp.all(finite, axis=axis), m, jnp.inf)


class ApplyIfFiniteState(NamedTuple):
  """State of ``apply_if_finite`` (the fields of optax's version)."""

  notfinite_count: jax.Array  # int32[], consecutive non-finite steps
  last_finite: jax.Array  # bool[], whether the last step was finite
  total_notfinite: jax.Array  # int32[], non-finite steps so far
  inner_state: optax.OptState


def apply_if_finite(
  inner: optax.GradientTransformation,
  max_consecutive_errors: int,
  *,
  axis_name: collectives.AxisName = "data",
) -> optax.GradientTransformation:
  """Skips a step on every worker if any worker's gradients are non-finite.

  A skipped step returns zero updates and leaves ``inner``'s state (keys,
  error-feedback memories, ...) exactly as it was. After more than
  ``max_consecutive_errors`` skipped steps in a row the update is applied
  anyway, as in ``optax.apply_if_finite``.

  Args:
    inner: the transformation to guard (e.g. a chain starting with a
      compressor).
    max_consecutive_errors: non-negative int.
    axis_name: the data-parallel axis over which workers agree.
  """
  if (
    isinstance(max_consecutive_errors, bool)
    or not isinstance(max_consecutive_errors, int)
    or max_consecutive_errors < 0
  ):
    raise ValueError(
      "max_consecutive_errors must be a non-negative int, got "
      f"{max_consecutive_errors!r}"
    )

  def init_fn(params: optax.Params) -> ApplyIfFiniteState:
    return ApplyIfFiniteState(
      jnp.zeros([], jnp.int32),
      jnp.array(True),
      jnp.zeros([], jnp.int32),
      inner.init(params),
    )

  def update_fn(
    updates: optax.Updates,
    state: ApplyIfFiniteState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, ApplyIfFiniteState]:
    collectives.axis_size(axis_name)  # clear error when unbound
    leaves = jax.tree.leaves(updates)
    local = (
      jnp.all(jnp.stack([all_finite(x) for x in leaves]))
      if leaves
      else jnp.array(True)
    )
    finite = jax.lax.pmin(local.astype(jnp.int32), axis_name) == 1
    count = jnp.where(finite, 0, state.notfinite_count + 1)
    apply = finite | (count > max_consecutive_errors)
    new_updates, new_inner = inner.update(updates, state.inner_state, params)
    out = jax.tree.map(
      lambda u: jnp.where(apply, u, jnp.zeros_like(u)), new_updates
    )
    inner_state = jax.tree.map(
      lambda n, o: jnp.where(apply, n, o), new_inner, state.inner_state
    )
    total = state.total_notfinite + jnp.logical_not(finite).astype(jnp.int32)
    return out, ApplyIfFiniteState(count, finite, total, inner_state)

  return transform.transformation(init_fn, update_fn)
