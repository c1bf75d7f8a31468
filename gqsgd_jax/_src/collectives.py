"""Collective building blocks over one named axis (shard_map or pmap).

* ``axis_size``: the worker count, with a clear error when the axis is not
  bound (the transform was called outside shard_map/pmap).
* ``butterfly_allreduce``: recursive-halving reduce-scatter over
  ``lax.ppermute`` and an all-gather for a custom,
  possibly stochastic and non-associative combine. Every element is reduced
  by a balanced tree computed once, on exactly one device per level, so the
  result is identical on all workers and each level may use the reducing
  device's own random stream. A worker count that is not a power
  of two is folded in first: the W - 2^L extra workers hand their buffer to a
  partner, which adds one tree level (depth ceil(log2 W)).
* ``varying``: the idiom that keeps JAX from inserting an f32 all-reduce.
"""

from collections.abc import Callable, Hashable
import math
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

# A mesh axis name, as jax.lax takes it (a str in practice).
AxisName = Hashable

_Tree = TypeVar("_Tree")


def axis_size(axis_name: AxisName) -> int:
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError as e:
    raise ValueError(
      f"axis_name={axis_name!r} is not bound: call the transform's update "
      "inside jax.shard_map or jax.pmap over that mesh axis"
    ) from e


def tree_depth(num_workers: int) -> int:
  """Depth D of the butterfly's reduction tree, ceil(log2 W)."""
  return 0 if num_workers <= 1 else math.ceil(math.log2(num_workers))


def varying(tree: _Tree, axis_name: AxisName = "data") -> _Tree:
  """Marks replicated values (e.g. params) as varying over ``axis_name``.

  Under ``jax.shard_map(check_vma=True)``, ``jax.grad`` with respect to
  replicated params transposes the implicit broadcast into an f32 ``psum``:
  the gradients arrive already all-reduced and the compressor saves nothing.
  Differentiate with respect to ``varying(params)`` instead, so gradients
  stay local until the compressor reduces them::

    grads = jax.grad(loss_fn)(gqsgd_jax.varying(params, "data"), batch)

  Under ``jax.pmap`` (or ``check_vma=False``) values are already per-device
  and this is the identity.
  """

  try:
    jax.lax.axis_size(axis_name)
  except NameError:
    # Not inside a map over axis_name (e.g. a transform's init under a pmap
    # without that axis name): nothing can be varying over it.
    return tree

  def cast(x: jax.Array) -> jax.Array:
    try:
      return jax.lax.pcast(x, axis_name, to="varying")
    except (ValueError, TypeError, NameError):
      return x

  return jax.tree.map(cast, tree)


def pairwise_sum(rows: list[jax.Array]) -> jax.Array:
  """Sum of equal-shaped arrays by a fixed balanced tree of adds.

  Used instead of ``sum(axis=0)`` over a gathered worker axis: XLA:CPU
  reduces a leading axis with a strided loop many times slower than the
  elementwise adds, which it fuses into one pass over the W rows. The tree
  is static, so every worker adds in the same order (bit-identical).
  """
  while len(rows) > 1:
    rows = [
      rows[i] + rows[i + 1] if i + 1 < len(rows) else rows[i]
      for i in range(0, len(rows), 2)
    ]
  return rows[0]


# combine(mine, theirs, n_mine, n_theirs, stage) -> combined buffer, where
# n_* are int32 scalars (worker counts behind each operand) and stage is a
# static int (0: fold of the extra workers, 1..L: butterfly levels).
Combine = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, int], jax.Array]


def _group_counts(
  counts: np.ndarray, level: int, num_workers: int
) -> tuple[np.ndarray, np.ndarray]:
  """Per worker: workers behind its chunk and its partner's at ``level``."""
  p = len(counts)
  block = 1 << level
  mine = np.ones(num_workers, np.int32)
  theirs = np.ones(num_workers, np.int32)
  for i in range(p):
    start = (i // block) * block
    mine[i] = counts[start : start + block].sum()
    partner = i ^ block
    pstart = (partner // block) * block
    theirs[i] = counts[pstart : pstart + block].sum()
  return mine, theirs


def _bit_reverse(i: int, bits: int) -> int:
  return int(format(i, f"0{bits}b")[::-1], 2) if bits else 0


def butterfly_allreduce(
  x: jax.Array, combine: Combine, *, axis_name: AxisName, num_workers: int
) -> jax.Array:
  """All-reduces the 1-D buffer ``x`` with ``combine`` over ``axis_name``.

  Sent per device: (P-1)/P of the buffer in the reduce-scatter (P =
  2^floor(log2 W)) and the all-gather; when W is not a power of two, one
  full buffer from each extra worker to its partner, and the all-gather
  carries W blocks of N/P instead of P.
  """
  w = num_workers
  if w == 1:  # nothing to reduce; the gather only retypes x as replicated
    return jax.lax.all_gather(x, axis_name, to="invarying").reshape(-1)
  levels = int(math.floor(math.log2(w)))
  p = 1 << levels
  extra = w - p
  i = jax.lax.axis_index(axis_name)
  n = x.shape[0]
  chunk = jnp.pad(x, (0, (-n) % p))

  counts = np.ones(p, np.int32)
  if extra:
    counts[:extra] = 2
    received = jax.lax.ppermute(
      chunk, axis_name, perm=[(p + j, j) for j in range(extra)]
    )
    one = jnp.int32(1)
    chunk = jnp.where(i < extra, combine(chunk, received, one, one, 0), chunk)

  for level in range(levels):
    half = chunk.shape[0] // 2
    bit = (i >> level) & 1
    keep = jax.lax.dynamic_slice_in_dim(chunk, bit * half, half)
    send = jax.lax.dynamic_slice_in_dim(chunk, (1 - bit) * half, half)
    received = jax.lax.ppermute(
      send, axis_name, perm=[(j, j ^ (1 << level)) for j in range(p)]
    )
    mine, theirs = _group_counts(counts, level, w)
    chunk = combine(
      keep, received, jnp.asarray(mine)[i], jnp.asarray(theirs)[i], level + 1
    )

  # All-gather phase. After the reduce-scatter, worker i < P owns block
  # bitreverse(i) of the buffer. A native all_gather (to="invarying") is the
  # recursive doubling XLA/NCCL implement best, and unlike a ppermute
  # all-gather its result is typed as replicated, so under
  # shard_map(check_vma=True) updates can leave with out_specs=P(). The
  # extra workers receive the result too; their blocks are ignored.
  gathered = jax.lax.all_gather(chunk, axis_name, to="invarying")
  order = [_bit_reverse(j, levels) for j in range(p)]
  chunk = gathered[np.asarray(order)].reshape(-1)
  return chunk[:n]
