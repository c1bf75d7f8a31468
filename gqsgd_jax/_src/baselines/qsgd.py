"""QSGD as an optax transform: local norms, int8 codes, all-gather.

Each worker scales its gradient bucket by its *own* norm n_i (L-infinity by
default, as the reference; L2 as the paper), rounds stochastically to int8
codes with s levels and its own dither, and all-gathers the codes and the
norms (one ``all_gather`` for all bucket norms). Every worker then decodes
all W messages, g^ = (1/W) sum_i q_i n_i / s, in the same order, so the
replicas are bit-identical.

This is the all-gather baseline Global-QSGD is measured against: there is no
common grid, so codes cannot be summed on the wire and every device receives
W times the payload (``wire_bytes``).
"""

from collections.abc import Sequence
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqsgd_jax._src import bucketing
from gqsgd_jax._src import collectives
from gqsgd_jax._src import nonfinite
from gqsgd_jax._src import ops
from gqsgd_jax._src import prng
from gqsgd_jax._src import transform
from gqsgd_jax._src.baselines import common
from gqsgd_jax._src.baselines.common import WireBytes

NORMS = ("linf", "l2")


class QsgdState(NamedTuple):
  """State of ``qsgd``: the PRNG key of the dither."""

  key: jax.Array  # uint32[2] raw PRNG key, split once per step


def wire_bytes(
  sizes: Sequence[int],
  num_workers: int,
  *,
  granularity: str = "bucket",
  bucket_bytes: int = 25 * 2**20,
  dtypes: Sequence[jax.typing.DTypeLike] | None = None,
) -> WireBytes:
  """Analytic bytes per step and device of ``qsgd`` for leaves of ``sizes``.

  Each worker's message is its n int8 codes and B f32 norms (B buckets),
  m = n + 4B bytes. All-gathering them delivers W m bytes to every device
  (result), of which (W - 1) m come from the others (received); and every
  message must reach W - 1 devices, so each device also transmits (W - 1) m
  (directly or forwarded along a ring). Both grow linearly with W, where an
  all-reduce of the same codes would stay at about 2 m.

  Args:
    sizes: element counts of the gradient leaves.
    num_workers: W.
    granularity, bucket_bytes: as for ``qsgd`` (they set B).
    dtypes: the leaves' dtypes (a bucket holds one dtype); float32 if None.
  """
  dtypes = dtypes or [np.float32] * len(sizes)
  leaves = [jax.ShapeDtypeStruct((int(n),), d) for n, d in zip(sizes, dtypes)]
  buckets = bucketing.plan_buckets(
    leaves, bucket_bytes=bucket_bytes, per_leaf=granularity == "leaf"
  )
  message = sum(b.size for b in buckets) + 4 * len(buckets)
  others = float((num_workers - 1) * message)
  return WireBytes(sent=others, received=others, result=num_workers * message)


def _local_norm(flat: jax.Array, norm: str) -> jax.Array:
  """The bucket's L-inf or L2 norm in f32; +inf if it holds NaN/Inf."""
  x = flat.astype(jnp.float32)
  # +inf for a non-finite bucket whatever XLA's max does with NaN.
  m = nonfinite.max_abs(x)
  if norm == "l2":
    # Scaled by the max so that huge finite gradients do not overflow.
    safe = jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)
    n = jnp.where(m == 0, 0.0, m * jnp.sqrt(jnp.sum(jnp.square(x / safe))))
    m = jnp.where(jnp.isfinite(m), n, m)
  return jnp.where(jnp.isfinite(m), m, jnp.inf)


def qsgd(
  *,
  axis_name: collectives.AxisName = "data",
  levels: int = 127,
  norm: str = "linf",
  reference_compatible: bool = False,
  granularity: str = "bucket",
  bucket_bytes: int = 25 * 2**20,
  key: jax.typing.ArrayLike = 0,
  impl: str = "auto",
) -> optax.GradientTransformation:
  """QSGD with int8 codes and an all-gather: the unbiased mean on every worker.

  Use inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name``, on local
  gradients.

  Args:
    axis_name: the data-parallel mesh axis.
    levels: s, the number of positive levels, 1..127 (codes in [-s, s]).
    norm: "linf" (max-abs, the reference's choice) or "l2" (the paper's).
    reference_compatible: quantize as the reference's ``qsgd_hook``:
      y = g 127 / (W n_i), i.e. 127 / W levels per worker (codes up to
      ceil(127 / W)), decoded as q n_i / 127. W^2 times the variance of the
      default and kept only for comparisons (B-GQ-7). ``levels`` must then
      stay 127.
    granularity: one norm per "bucket" (default), per "leaf", or one
      "global" norm per worker for the whole model.
    bucket_bytes: fusion cap per bucket (default 25 MiB, as DDP).
    key: int seed or PRNG key of the dither.
    impl: quantization kernel: "auto", "ffi" or "xla".

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``QsgdState``.

  Raises:
    ValueError/TypeError: a bad argument (named in the message); at update
      time, an unbound ``axis_name`` or a non-float leaf.
  """
  if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
    raise TypeError(f"levels must be an int in [1, 127], got {levels!r}")
  if not 1 <= levels <= 127:
    raise ValueError(f"levels must be in [1, 127], got {levels}")
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  if not isinstance(reference_compatible, (bool, np.bool_)):
    raise TypeError(
      f"reference_compatible must be a bool, got {reference_compatible!r}"
    )
  if reference_compatible and levels != 127:
    raise ValueError(
      "levels is fixed by reference_compatible=True (127/W "
      f"per worker), got levels={levels}"
    )
  bucketing.validate_granularity(granularity)
  bucket_bytes = bucketing.validate_bucket_bytes(bucket_bytes)
  ops.validate_impl(impl)
  init_key = prng.canonical_key(key)

  def init_fn(params: optax.Params) -> QsgdState:
    del params
    return QsgdState(key=init_key)

  def update_fn(
    updates: optax.Updates, state: QsgdState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, QsgdState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    if reference_compatible:
      numerator = 127.0 / num_workers  # the reference's fractional levels
      clamp = math.ceil(numerator)
    else:
      numerator, clamp = float(levels), levels
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_leaf_dtypes(leaves, [p for p, _ in paths_leaves])
    buckets = bucketing.plan_buckets(
      leaves, bucket_bytes=bucket_bytes, per_leaf=granularity == "leaf"
    )
    next_key, step_key = jax.random.split(state.key)
    if not buckets:
      empty = [jnp.zeros(x.shape, x.dtype) for x in leaves]
      return (
        jax.tree_util.tree_unflatten(treedef, empty),
        QsgdState(key=next_key),
      )

    flats = [bucketing.flatten_bucket(b, leaves) for b in buckets]
    local = jnp.stack([_local_norm(f, norm) for f in flats])
    if granularity == "global":
      local = jnp.broadcast_to(jnp.max(local), local.shape)
    ok = jnp.isfinite(local) & (local >= common.TINY)
    scale = jnp.where(ok, numerator / local, 0.0)
    # One all-gather for every bucket's norm: (W, B), invariant (replicated).
    norms = jax.lax.all_gather(local, axis_name, to="invarying")
    # Decode scale of worker i: n_i / (s W), or n_i / 127 for the reference
    # (its 1/W is folded into the levels); NaN if any worker's norm is not
    # finite, so a non-finite gradient never decodes to numbers.
    denom = 127.0 if reference_compatible else numerator * num_workers
    dec = jnp.where(norms >= common.TINY, norms / denom, 0.0)
    dec = jnp.where(jnp.isfinite(norms), dec, jnp.nan)

    means = []
    for b, flat in enumerate(flats):
      seed = ops.seed_from_key(prng.worker_key(step_key, axis_name, b))
      codes = ops.quantize(
        flat, scale[b], seed, levels=clamp, bits=8, signed_codes=True, impl=impl
      )
      gathered = jax.lax.all_gather(codes, axis_name, to="invarying")
      # Every worker sums the same W rows in the same order: bit-identical.
      means.append(
        collectives.pairwise_sum(
          [
            gathered[w].astype(jnp.float32) * dec[w, b]
            for w in range(num_workers)
          ]
        )
      )
    out = bucketing.unflatten_buckets(buckets, means, leaves)
    return (jax.tree_util.tree_unflatten(treedef, out), QsgdState(key=next_key))

  return transform.transformation(init_fn, update_fn)
