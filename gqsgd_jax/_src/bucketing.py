"""Tensor fusion: a static plan that packs gradient leaves into flat buckets.

Like PyTorch DDP, leaves are taken in reverse order (roughly the order in
which backprop produces them) and packed into buckets of at most
``bucket_bytes``; a bucket holds one dtype. The plan depends only on shapes
and dtypes, so it is computed at trace time and costs nothing at run time.
"""

from collections.abc import Sequence
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# A leaf or its abstract value: what a bucket plan reads (shape, dtype).
LeafLike = jax.Array | jax.ShapeDtypeStruct

GRANULARITIES = ("bucket", "leaf", "global")
SUPPORTED_DTYPES = (
  np.dtype(np.float32),
  np.dtype(jnp.bfloat16),
  np.dtype(np.float16),
)


@dataclasses.dataclass(frozen=True)
class Bucket:
  """Leaves (by flat index) fused into one buffer, in buffer order."""

  leaf_ids: tuple[int, ...]
  sizes: tuple[int, ...]
  dtype: np.dtype

  @property
  def size(self) -> int:
    return sum(self.sizes)


def validate_granularity(granularity: str) -> str:
  if granularity not in GRANULARITIES:
    raise ValueError(
      f"granularity must be one of {GRANULARITIES}, got {granularity!r}"
    )
  return granularity


def validate_bucket_bytes(bucket_bytes: object) -> int:
  if (
    isinstance(bucket_bytes, bool)
    or not isinstance(bucket_bytes, (int, np.integer))
    or bucket_bytes < 1
  ):
    raise ValueError(
      f"bucket_bytes must be a positive int, got {bucket_bytes!r}"
    )
  return int(bucket_bytes)


def check_leaf_dtypes(
  leaves: Sequence[LeafLike], paths: Sequence[jax.tree_util.KeyPath]
) -> None:
  for leaf, path in zip(leaves, paths):
    if jnp.dtype(leaf.dtype) not in SUPPORTED_DTYPES:
      raise TypeError(
        f"gradient leaf {jax.tree_util.keystr(path)} has dtype "
        f"{leaf.dtype}; supported: float32, bfloat16, float16"
      )


def check_float_leaves(
  leaves: Sequence[LeafLike],
  paths: Sequence[jax.tree_util.KeyPath],
  method: str,
) -> None:
  """Raises TypeError naming the first gradient leaf that is not floating
  point (any float dtype; ``check_leaf_dtypes`` is stricter, it admits
  only the kernels' f32, bf16 and f16). ``method`` names the caller in the
  message; ``paths`` are the leaves' key paths."""
  for leaf, path in zip(leaves, paths):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
        f"gradient leaf {jax.tree_util.keystr(path)} has "
        f"dtype {leaf.dtype}; {method} needs floats"
      )


def plan_buckets(
  leaves: Sequence[LeafLike], *, bucket_bytes: int, per_leaf: bool = False
) -> list[Bucket]:
  """Packs non-empty leaves into buckets (reverse leaf order, one dtype each).

  A leaf larger than ``bucket_bytes`` gets a bucket of its own; with
  ``per_leaf`` every leaf does.
  """
  buckets: list[Bucket] = []
  ids: list[int] = []
  sizes: list[int] = []
  dtype: np.dtype | None = None
  nbytes = 0

  def close() -> None:
    if ids:
      assert dtype is not None  # set with the first id
      buckets.append(Bucket(tuple(ids), tuple(sizes), dtype))

  for i in reversed(range(len(leaves))):
    leaf = leaves[i]
    size = int(np.prod(leaf.shape, dtype=np.int64))
    if size == 0:
      continue
    leaf_dtype = np.dtype(leaf.dtype)
    leaf_bytes = size * leaf_dtype.itemsize
    if ids and (
      per_leaf or leaf_dtype != dtype or nbytes + leaf_bytes > bucket_bytes
    ):
      close()
      ids, sizes, nbytes = [], [], 0
    ids.append(i)
    sizes.append(size)
    dtype = leaf_dtype
    nbytes += leaf_bytes
  close()
  return buckets


def place(
  pieces: Sequence[tuple[int, jax.Array]], n: int, dtype: jax.typing.DTypeLike
) -> jax.Array:
  """A 1-D array of n elements of ``dtype`` from (start, values) pieces,
  zeros where no piece lands. A single piece covering everything is
  returned as it is (cast).

  The pieces are written in place into a zero buffer, not concatenated:
  XLA:CPU's fusion emitters (jaxlib 0.10's default) compute a
  concatenation with a per-element choice of the operand, ~30x slower than
  a copy (16.8 M floats in 6 pieces: ~1 s vs 30 ms, which made
  Global-QSGD's step 2.4x slower than f32 at that size). The offsets pass
  through an optimization barrier: at offsets XLA can see, it rewrites the
  updates into pads and the same per-element choice.
  """
  if len(pieces) == 1 and pieces[0][0] == 0 and pieces[0][1].shape[0] == n:
    return pieces[0][1].astype(dtype)
  out = jnp.zeros(n, dtype)
  if n >= 2**31:  # beyond int32 offsets: static (slower) updates
    for start, values in pieces:
      out = out.at[start : start + values.shape[0]].set(values.astype(dtype))
    return out
  zero = jax.lax.optimization_barrier(jnp.int32(0))
  for start, values in pieces:
    out = jax.lax.dynamic_update_slice(
      out, values.astype(dtype), (zero + start,)
    )
  return out


def join(parts: Sequence[jax.Array]) -> jax.Array:
  """1-D arrays of one dtype, one after the other in one buffer (``place``
  at consecutive offsets)."""
  starts = np.cumsum([0] + [p.shape[0] for p in parts]).tolist()
  return place(list(zip(starts, parts)), starts[-1], parts[0].dtype)


def flatten_bucket(bucket: Bucket, leaves: Sequence[jax.Array]) -> jax.Array:
  """The bucket's leaves, flattened, one after the other (see ``join``)."""
  return join([leaves[i].reshape(-1) for i in bucket.leaf_ids])


def cast_saturating(x: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
  """Casts to dtype; finite values beyond its range (rounding in a wider
  wire format, e.g. f16 65504 -> bf16 65536) saturate instead of becoming
  inf. Infinities and NaNs pass through."""
  if jnp.dtype(x.dtype) == jnp.dtype(dtype):
    return x
  big = float(jnp.finfo(dtype).max)
  clipped = jnp.clip(x.astype(jnp.float32), -big, big)
  return jnp.where(jnp.isfinite(x), clipped, x.astype(jnp.float32)).astype(
    dtype
  )


def unflatten_buckets(
  buckets: Sequence[Bucket],
  flats: Sequence[jax.Array],
  leaves: Sequence[LeafLike],
) -> list[jax.Array]:
  """Splits bucket buffers back into leaves of the original shape and dtype.

  Empty leaves (in no bucket) come back as empty arrays. A finite value
  beyond a 16-bit leaf's range (e.g. a mean decoded on a scale rounded up
  past float16's largest value) saturates instead of becoming inf.
  """
  out = [jnp.zeros(leaf.shape, leaf.dtype) for leaf in leaves]
  for bucket, flat in zip(buckets, flats):
    offsets = np.cumsum((0,) + bucket.sizes)
    for j, i in enumerate(bucket.leaf_ids):
      piece = flat[offsets[j] : offsets[j + 1]]
      out[i] = cast_saturating(piece.reshape(leaves[i].shape), leaves[i].dtype)
  return out
