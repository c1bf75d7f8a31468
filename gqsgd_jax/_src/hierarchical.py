"""Hierarchical reduction over a 2-D mesh: compress only the slow links.

A cluster of H hosts with L devices each is a 2-D mesh, e.g. axes
``("host", "local")``: the local axis joins the devices of one host over a
fast link (NVLink, NVSwitch), the host axis joins hosts over a slower
network. ``hierarchical(inner, local_axis=...)`` wraps a reduction
``inner`` that runs over the host axis (e.g.
``global_quantize(bits=4, axis_name="host")``) so that, per step:

1. each device flattens its gradient leaves into one buffer per wire dtype,
   pads it to a multiple of L and reduce-scatters the mean over
   ``local_axis`` in full precision (g / L, or in ``wire_dtype``, e.g.
   bf16): device l of a host now holds block l of its host's mean
   gradient;
2. ``inner`` reduces that 1/L block over the host axis only: the
   compressed wire carries 1/L of the model per device, its worker count
   W is the number of hosts (more levels for the integer psum, fewer
   butterfly re-quantizations than W = H L) and no compressed byte uses the
   fast link;
3. the reduced blocks are all-gathered over ``local_axis``, so every device
   of every host ends with the same estimate of the mean of all H L
   gradients.

The reduce-scatter is an ``all_to_all`` of the L blocks followed by a sum
in float32 in local-index order, not ``lax.psum_scatter``: it sends the
same (L-1)/L of the buffer, its sum is the same bits on every platform
whatever the collective library's reduction order, and XLA:CPU's
multi-process (gloo) reduce-scatter was measured to return corrupted
blocks when another collective (e.g. a metric's ``pmean`` over all
devices) runs concurrently in the same program (jaxlib 0.10.2), while
``all_to_all`` and ``all_gather`` were not.

Why a combinator rather than a ``local_axis`` argument of each compressor:
the two stages are independent (any reduction over the host axis can take
the place of ``inner``, including the uncompressed ``psum_mean`` as a
baseline), it keeps every compressor a one-axis transform, and it composes
with optax like any other transform::

  tx = optax.chain(
      gqsgd_jax.hierarchical(
          gqsgd_jax.global_quantize(bits=4, axis_name="host"),
          local_axis="local"),
      optax.sgd(0.1))

Use it inside ``jax.shard_map`` over a mesh with both axes, on per-device
gradients (differentiate with respect to
``gqsgd_jax.varying(params, ("host", "local"))``). The result is replicated
over both axes, so updates can leave the map with ``out_specs=P()``.
(``jax.pmap`` binds one axis per map, and a 2-D mesh would need nested
pmaps, which JAX does not support well: use ``shard_map``.)

Supported inners: transforms whose state does not depend on the gradient
values or shapes and evolves the same on every device, such as
``global_quantize`` (a PRNG key) and ``psum_mean`` (no state); their state
stays replicated (``P()``). The inner sees a tuple of 1-D blocks (one per
wire dtype), not the model's leaves, so per-leaf options of the inner
(granularity="leaf", a leaf's own bucket) apply to the blocks. Inners with
per-worker memories (error feedback, low-rank factors: a state with
``per_worker_fields``) are rejected, since their memories would be per
block and their shapes per model.

Randomness: the devices of one host run the inner with the same state, so
a dithering inner draws the same random stream for its L blocks. The blocks
hold disjoint coordinates and every coordinate is still rounded with noise
independent across hosts (and across steps), so each coordinate's
estimate is unbiased with the same variance; only the noises of
coordinates j and j + N/L are correlated, which leaves the mean squared
error, a sum of per-coordinate variances, unchanged.

Non-finite values: a NaN or Inf in any device's gradient makes the whole
update NaN on every device (one check on the gathered, already identical
result: no extra collective), so ``apply_if_finite`` sees the same decision
everywhere.
"""

from collections.abc import Sequence
from typing import cast, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqsgd_jax._src import bucketing
from gqsgd_jax._src import collectives
from gqsgd_jax._src import transform
from gqsgd_jax._src import worker_state


class HierarchicalState(NamedTuple):
  """State of ``hierarchical``: the inner transform's state."""

  inner_state: optax.OptState  # replicated (see the module docstring)


def _per_worker_fields(state: optax.OptState) -> list[str]:
  """Names of the state types in ``state`` that keep per-worker memories."""
  stateful = worker_state.per_worker_fields
  nodes = jax.tree.leaves(state, is_leaf=lambda n: bool(stateful(n)))
  return [type(n).__name__ for n in nodes if stateful(n)]


def _groups(
  leaves: Sequence[jax.Array], wire: np.dtype | None
) -> dict[np.dtype, list[int]]:
  """{wire dtype: [leaf index, ...]} for the non-empty leaves, in order."""
  groups: dict[np.dtype, list[int]] = {}
  for i, leaf in enumerate(leaves):
    if leaf.size:
      groups.setdefault(wire or jnp.dtype(leaf.dtype), []).append(i)
  return groups


def hierarchical(
  inner: optax.GradientTransformation,
  *,
  local_axis: collectives.AxisName = "local",
  wire_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  """Mean over a 2-D mesh, full precision inside hosts, ``inner`` across.

  See the module docstring for the algorithm and its conditions.

  Args:
    inner: the reduction over the slow (host) axis, e.g.
      ``global_quantize(bits=4, axis_name="host")``; it must not reduce over
      ``local_axis``.
    local_axis: the fast mesh axis (devices of one host).
    wire_dtype: float dtype of the exchange inside a host and of the
      blocks the inner reduces (e.g. ``jnp.bfloat16``); None keeps each
      leaf's dtype (one buffer per dtype). The result is cast back to each
      leaf's dtype, saturating finite values.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    ``HierarchicalState``.

  Raises:
    ValueError: ``inner`` is not a gradient transformation or keeps
      per-worker state, or ``wire_dtype`` is not a float dtype; at update
      time, an unbound ``local_axis``.
    TypeError: a gradient leaf that is not floating point.

  Examples:
    >>> import optax, gqsgd_jax
    >>> tx = optax.chain(
    ...     gqsgd_jax.hierarchical(
    ...         gqsgd_jax.global_quantize(bits=4, axis_name="host"),
    ...         local_axis="local"),
    ...     optax.sgd(0.1))
  """
  if not (
    callable(getattr(inner, "init", None))
    and callable(getattr(inner, "update", None))
  ):
    raise ValueError(
      "inner must be an optax.GradientTransformation, got "
      f"{type(inner).__name__}"
    )
  wire = None if wire_dtype is None else jnp.dtype(wire_dtype)
  if wire is not None and not jnp.issubdtype(wire, jnp.floating):
    raise ValueError(f"wire_dtype must be a float dtype, got {wire}")

  def init_fn(params: optax.Params) -> HierarchicalState:
    state = inner.init(params)
    stateful = _per_worker_fields(state)
    if stateful:
      raise ValueError(
        f"inner keeps per-worker state ({', '.join(stateful)}), which "
        "hierarchical does not support: use an inner with replicated "
        "state such as global_quantize or psum_mean"
      )
    return HierarchicalState(state)

  def update_fn(
    updates: optax.Updates,
    state: HierarchicalState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, HierarchicalState]:
    del params
    num_local = collectives.axis_size(local_axis)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_float_leaves(
      leaves, [p for p, _ in paths_leaves], "hierarchical"
    )
    groups = _groups(leaves, wire)

    blocks, sizes = [], []
    for dtype, ids in groups.items():
      # Divide before summing (as psum_mean): the sum of L values near the
      # dtype's max would overflow, their mean cannot.
      parts = [
        (leaves[i].reshape(-1).astype(jnp.float32) / num_local).astype(dtype)
        for i in ids
      ]
      flat = bucketing.join(parts)
      n = flat.shape[0]
      sizes.append(n)
      flat = jnp.pad(flat, (0, (-n) % num_local))  # zeros: exact, no effect
      # Row j of `mine`: device j's copy of this device's block (see the
      # module docstring for why not psum_scatter).
      mine = jax.lax.all_to_all(
        flat.reshape(num_local, -1), local_axis, 0, 0, tiled=True
      )
      total = mine[0].astype(jnp.float32)
      for j in range(1, num_local):
        total = total + mine[j].astype(jnp.float32)
      blocks.append(total.astype(dtype))

    reduced_tree, inner_state = inner.update(tuple(blocks), state.inner_state)
    # A gradient transformation keeps its input's structure: one block each.
    reduced = cast(tuple[jax.Array, ...], reduced_tree)
    out = [jnp.zeros(x.shape, x.dtype) for x in leaves]
    if not groups:
      return (
        jax.tree_util.tree_unflatten(treedef, out),
        HierarchicalState(inner_state),
      )

    gathered = [
      jax.lax.all_gather(r, local_axis, tiled=True, to="invarying")
      for r in reduced
    ]
    # Identical on every device already, so this check needs no collective.
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in gathered]))
    saturate = bucketing.cast_saturating
    for (dtype, ids), full, n in zip(groups.items(), gathered, sizes):
      full = jnp.where(finite, full[:n], jnp.nan).astype(dtype)
      offsets = np.cumsum([0] + [leaves[i].size for i in ids])
      for j, i in enumerate(ids):
        piece = full[offsets[j] : offsets[j + 1]].reshape(leaves[i].shape)
        out[i] = saturate(piece, leaves[i].dtype)
    return (
      jax.tree_util.tree_unflatten(treedef, out),
      HierarchicalState(inner_state),
    )

  return transform.transformation(init_fn, update_fn)
