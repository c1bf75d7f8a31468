"""Collective building blocks over one named axis (shard_map or pmap).

* ``axis_size``: the worker count, with a clear error when the axis is not
  bound (the transform was called outside shard_map/pmap).
* ``butterfly_allreduce``: recursive-halving reduce-scatter and
  recursive-doubling all-gather over ``lax.ppermute`` (spec §3.6) for a custom,
  possibly stochastic and non-associative combine. Every element is reduced
  by a balanced tree computed once, on exactly one device per level, so the
  result is identical on all workers and each level may use the reducing
  device's own random stream (spec §0.3). A worker count that is not a power
  of two is folded in first: the W - 2^L extra workers hand their buffer to a
  partner, which adds one tree level (depth ceil(log2 W)).
* ``varying``: the idiom that keeps JAX from inserting an f32 all-reduce.
"""

from collections.abc import Callable
import math

import jax
import jax.numpy as jnp
import numpy as np


def axis_size(axis_name) -> int:
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError as e:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound: call the transform's update "
        "inside jax.shard_map or jax.pmap over that mesh axis") from e


def tree_depth(num_workers: int) -> int:
  """Depth D of the butterfly's reduction tree, ceil(log2 W)."""
  return 0 if num_workers <= 1 else math.ceil(math.log2(num_workers))


def varying(tree, axis_name="data"):
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
  def cast(x):
    try:
      return jax.lax.pcast(x, axis_name, to="varying")
    except (ValueError, TypeError, NameError):
      return x
  return jax.tree.map(cast, tree)


# combine(mine, theirs, n_mine, n_theirs, stage) -> combined buffer, where
# n_* are int32 scalars (worker counts behind each operand) and stage is a
# static int (0: fold of the extra workers, 1..L: butterfly levels).
Combine = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, int],
                   jax.Array]


def _group_counts(counts: np.ndarray, level: int, num_workers: int):
  """Per worker: workers behind its chunk and its partner's at ``level``."""
  p = len(counts)
  block = 1 << level
  mine = np.ones(num_workers, np.int32)
  theirs = np.ones(num_workers, np.int32)
  for i in range(p):
    start = (i // block) * block
    mine[i] = counts[start:start + block].sum()
    partner = i ^ block
    pstart = (partner // block) * block
    theirs[i] = counts[pstart:pstart + block].sum()
  return mine, theirs


def butterfly_allreduce(x: jax.Array, combine: Combine, *, axis_name,
                        num_workers: int) -> jax.Array:
  """All-reduces the 1-D buffer ``x`` with ``combine`` over ``axis_name``.

  Sent per device: (P-1)/P of the buffer in each phase (P = 2^floor(log2 W)),
  plus one full buffer each way for the extra workers when W is not a power
  of two.
  """
  w = num_workers
  if w == 1:
    return x
  levels = int(math.floor(math.log2(w)))
  p = 1 << levels
  extra = w - p
  i = jax.lax.axis_index(axis_name)
  n = x.shape[0]
  chunk = jnp.pad(x, (0, (-n) % p))

  counts = np.ones(p, np.int32)
  if extra:
    counts[:extra] = 2
    received = jax.lax.ppermute(chunk, axis_name,
                                perm=[(p + j, j) for j in range(extra)])
    one = jnp.int32(1)
    chunk = jnp.where(i < extra, combine(chunk, received, one, one, 0), chunk)

  for level in range(levels):
    half = chunk.shape[0] // 2
    bit = (i >> level) & 1
    keep = jax.lax.dynamic_slice_in_dim(chunk, bit * half, half)
    send = jax.lax.dynamic_slice_in_dim(chunk, (1 - bit) * half, half)
    received = jax.lax.ppermute(
        send, axis_name, perm=[(j, j ^ (1 << level)) for j in range(p)])
    mine, theirs = _group_counts(counts, level, w)
    chunk = combine(keep, received, jnp.asarray(mine)[i],
                    jnp.asarray(theirs)[i], level + 1)

  for level in reversed(range(levels)):
    bit = (i >> level) & 1
    received = jax.lax.ppermute(
        chunk, axis_name, perm=[(j, j ^ (1 << level)) for j in range(p)])
    chunk = jnp.where(bit == 1, jnp.concatenate([received, chunk]),
                      jnp.concatenate([chunk, received]))

  if extra:
    received = jax.lax.ppermute(chunk, axis_name,
                                perm=[(j, p + j) for j in range(extra)])
    chunk = jnp.where(i >= p, received, chunk)
  return chunk[:n]
