"""Uncompressed baselines: the mean gradient by a float all-reduce."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gqsgd_jax._src import bucketing
from gqsgd_jax._src import collectives
from gqsgd_jax._src import transform


class PsumMeanState(NamedTuple):
  """``psum_mean`` is stateless."""


def psum_mean(
  *,
  axis_name: collectives.AxisName = "data",
  wire_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  """The workers' mean gradient by ``lax.psum`` (the f32/bf16 baseline).

  Args:
    axis_name: the data-parallel mesh axis.
    wire_dtype: dtype on the wire (e.g. ``jnp.bfloat16``); None keeps each
      leaf's dtype. The result is cast back to the leaf's dtype.
  """
  wire = None if wire_dtype is None else jnp.dtype(wire_dtype)
  if wire is not None and not jnp.issubdtype(wire, jnp.floating):
    raise ValueError(f"wire_dtype must be a float dtype, got {wire}")

  def init_fn(params: optax.Params) -> PsumMeanState:
    del params
    return PsumMeanState()

  def update_fn(
    updates: optax.Updates,
    state: PsumMeanState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, PsumMeanState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    leaves, treedef = jax.tree.flatten(updates)
    # Divide before summing (as DDP does): the sum of W finite values near
    # the dtype's max would overflow, their mean cannot.
    sent = [(x / num_workers).astype(wire or x.dtype) for x in leaves]
    summed = jax.lax.psum(sent, axis_name)  # one all-reduce for all leaves
    means = [
      bucketing.cast_saturating(s, x.dtype) for s, x in zip(summed, leaves)
    ]
    return jax.tree.unflatten(treedef, means), state

  return transform.transformation(init_fn, update_fn)
