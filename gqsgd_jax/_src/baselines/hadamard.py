"""Fast Walsh-Hadamard transform and the randomized Hadamard rotation (RHT).

THC rotates each chunk with ``H D`` before quantizing: ``D`` a
diagonal of random signs shared by all workers, ``H`` the orthonormal
Walsh-Hadamard matrix. After the rotation every coordinate is a signed
mixture of all inputs, so its magnitude concentrates around
``||x|| / sqrt(d)`` and one uniform grid fits all coordinates.

The transform is blocked (no d x d matrix): with d = f_1 ... f_m, the
Sylvester matrix factors as H_d = H_f1 (x) ... (x) H_fm, so viewing x as an
array of shape (f_1, ..., f_m) the transform multiplies each axis by a small
Hadamard matrix H_f (f <= 2^``MAX_FACTOR_LOG2``, entries ±1). Each factor is
one matrix multiply that contracts the last axis and writes its result
axis first (a transposed product, no separate transpose), so after m
multiplies the axes are back in order: ceil(log2(d) / 6) passes over memory
instead of the log2(d) of a butterfly (4 instead of 23 at d = 2^23), at 2^6
multiply-adds per element and pass. Below 2^``MIN_BLOCKED_LOG2`` elements
(in cache, where a pass is cheap) one product by H_32 does the lowest 5 bits
and butterfly stages the rest. The products run at the highest precision
(f32 on GPUs, not TF32), so the result equals the butterfly's up to f32
rounding. The partial variant applies the transform independently to
blocks of 2^T consecutive elements (the authors' "partial rotation").
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gqsgd_jax._src import reference

# Largest Hadamard factor of the blocked transform: 2^6 = 64 multiply-adds
# per element and pass, few passes (4 at 2^23).
MAX_FACTOR_LOG2 = 6
# Transforms smaller than 2^MIN_BLOCKED_LOG2 (4 MiB of f32, about a cache)
# run as butterflies: in cache a pass is cheap and the butterfly's log2(d)
# adds per element beat the products' 2^6 multiply-adds.
MIN_BLOCKED_LOG2 = 20
# The butterfly's first pass: a product by H_32 (the lowest 5 bits).
LOW_PRODUCT_LOG2 = 5


def _log2_exact(n: int, name: str) -> int:
  if n < 1 or n & (n - 1):
    raise ValueError(f"{name} must be a power of two, got {n}")
  return n.bit_length() - 1


def factor_logs(k: int, max_log2: int = MAX_FACTOR_LOG2) -> tuple[int, ...]:
  """log2 of the Hadamard factors of a transform of size 2^k: as few as
  ``max_log2`` allows, as even as possible (fewest multiply-adds)."""
  if k <= 0:
    return ()
  m = -(-k // max_log2)
  return tuple(k // m + (i < k % m) for i in range(m))


@functools.cache
def _sylvester(e: int) -> np.ndarray:
  """The (unnormalised, ±1) Sylvester Hadamard matrix of size 2^e."""
  h = np.ones((1, 1), np.float32)
  for _ in range(e):
    h = np.block([[h, h], [h, -h]])
  return h


def _scale(k: int) -> float:
  """d^-1/2 for d = 2^k (a power of two for even k)."""
  return 2.0 ** -(k // 2) * (float(np.sqrt(0.5)) if k % 2 else 1.0)


def _dot(h: np.ndarray, y: jax.Array, transposed: bool) -> jax.Array:
  """y @ h (contracting y's last axis), or its transpose h^T y^T: the
  contracted axis first (a 2-D y). At the highest precision: f32 products,
  not TF32 or bf16 passes, on GPUs."""
  dims = (((0,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
  lhs, rhs = (jnp.asarray(h, y.dtype), y) if transposed else (y, h)
  return jax.lax.dot_general(
    lhs,
    jnp.asarray(rhs, y.dtype),
    dims,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=y.dtype,
  )


def _butterfly(x: jax.Array, k: int) -> jax.Array:
  """The transform of a small x: one product for the lowest
  ``LOW_PRODUCT_LOG2`` bits (a pass instead of that many), then one
  radix-2 butterfly stage per remaining bit (in cache a pass is cheap, and
  a stage costs one add per element)."""
  d = x.shape[-1]
  batch = x.shape[:-1]
  low = min(k, LOW_PRODUCT_LOG2)
  if low == k:
    h = _sylvester(k) * np.float32(_scale(k))
    return _dot(h, x.reshape(-1, d), transposed=False).reshape(x.shape)
  h = _sylvester(low) * np.float32(2.0 ** -((low + 1) // 2))
  x = _dot(h, x.reshape(-1, 1 << low), transposed=False).reshape(x.shape)
  step = 1 << low
  for s in range(k - low):
    # Stage: pairs (j, j + h) inside every block of 2h become (a + b, a - b),
    # halved on every other stage: no intermediate exceeds ||x||.
    y = x.reshape(batch + (d // (2 * step), 2, step))
    a, b = y[..., 0, :], y[..., 1, :]
    if s % 2 == 0:
      a, b = a * jnp.asarray(0.5, x.dtype), b * jnp.asarray(0.5, x.dtype)
    x = jnp.stack([a + b, a - b], axis=-2).reshape(batch + (d,))
    step *= 2
  # What the halvings left of d^-1/2: 1, sqrt(2) or 2.
  left = (low + 1) // 2 + (k - low + 1) // 2 - k / 2
  return x if left == 0 else x * jnp.asarray(2.0**left, x.dtype)


def hadamard_transform(x: jax.Array) -> jax.Array:
  """Orthonormal Walsh-Hadamard transform along the last axis.

  ``H`` is the Sylvester (natural-order) Hadamard matrix scaled by
  ``d^-1/2``: symmetric and orthogonal, so the transform is its own inverse.

  Args:
    x: float array whose last axis has a power-of-two length d.

  Returns:
    ``x @ H`` with the shape and dtype of ``x``.

  Raises:
    ValueError: the last axis is not a power of two.
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("x must have at least one axis")
  d = x.shape[-1]
  k = _log2_exact(d, "the last axis of x")
  shape = x.shape
  if k == 0:
    return x
  if k < MIN_BLOCKED_LOG2:
    return _butterfly(x, k)
  logs = factor_logs(k)
  rows = int(np.prod(shape[:-1], dtype=np.int64))
  # y: (f_j, ..., f_m, rows, f_1, ..., f_{j-1}) flattened to 2-D around the
  # axis to contract next (the last one); the product H^T y^T puts the
  # contracted axis first. After m products: (f_1, ..., f_m, rows).
  # Each factor scaled by 2^-ceil(e/2), at most its orthonormal 2^-e/2, so
  # no intermediate exceeds ||x||; the last one makes up the rest of d^-1/2
  # (a power of two for even d, so exact).
  left = sum((e + 1) // 2 for e in logs) - k / 2
  y = x.reshape(-1)
  for j, e in enumerate(reversed(logs)):
    scale = 2.0 ** -((e + 1) // 2) * (2.0**left if j == len(logs) - 1 else 1)
    h = _sylvester(e) * np.float32(scale)
    y = _dot(h, y.reshape(-1, 1 << e), transposed=True).reshape(-1)
  if rows > 1:
    y = y.reshape(d, rows).T
  return y.reshape(shape)


def random_signs(
  key: jax.Array, n: int, dtype: jax.typing.DTypeLike = jnp.float32
) -> jax.Array:
  """``n`` random ±1 of ``dtype`` from ``key``.

  Pass the same key on every worker (shared randomness);
  a worker-specific key would rotate each worker differently and the
  homomorphic sum of their codes would mean nothing.
  """
  return jax.random.rademacher(key, (n,), dtype=dtype)


def counter_signs(
  seed: jax.Array,
  n: int,
  dtype: jax.typing.DTypeLike = jnp.float32,
  *,
  start: int = 0,
) -> jax.Array:
  """``n`` random ±1 of ``dtype`` from a uint32[2] seed, by the kernels'
  counter hash (``reference.random_bits``: two integer mixes per element).

  A cheap stand-in for ``random_signs`` when the signs are recomputed every
  step: the same seed gives the same signs, with no threefry rounds.
  ``start``: the signs of elements start .. start + n - 1 of the sequence
  (a piece of a longer vector, elementwise equal to a slice of it).
  """
  bits = reference.random_bits(seed, n, start=start)
  return (1 - 2 * (bits >> 31).astype(jnp.int32)).astype(dtype)


def _blocks(x: jax.Array, block_log2: int | None) -> jax.Array:
  """``x`` as rows of the transform size (one row of all of x if None)."""
  d = x.shape[0]
  if block_log2 is None:
    _log2_exact(d, "the length of x")
    return x.reshape(1, d)
  if block_log2 < 0:
    raise ValueError(f"block_log2 must be >= 0, got {block_log2}")
  block = 1 << block_log2
  if d % block:
    raise ValueError(
      f"the length of x ({d}) must be a multiple of 2^block_log2 = {block}"
    )
  return x.reshape(-1, block)


def transform_blocks(x: jax.Array, block_log2: int | None = None) -> jax.Array:
  """``hadamard_transform`` of a 1-D x, whole (None) or on consecutive
  blocks of 2^block_log2 elements (the partial rotation)."""
  return hadamard_transform(_blocks(jnp.asarray(x), block_log2)).reshape(-1)


def randomized_hadamard(
  x: jax.Array, signs: jax.Array, *, block_log2: int | None = None
) -> jax.Array:
  """The rotation ``H (signs * x)`` of a 1-D ``x``.

  Args:
    x: float[d]; d a power of two, or a multiple of 2^block_log2.
    signs: ±1 of length d (``random_signs`` with a key shared by workers).
    block_log2: None for the full transform; T for the partial transform
      on consecutive blocks of 2^T elements, each normalised by 2^-T/2.

  Returns:
    The rotated vector, float[d] in x's dtype; ``inverse_randomized_hadamard``
    undoes it.
  """
  x = jnp.asarray(x)
  if x.ndim != 1 or signs.shape != x.shape:
    raise ValueError(
      f"x must be 1-D and signs of the same shape, got "
      f"{x.shape} and {signs.shape}"
    )
  y = _blocks(x * signs.astype(x.dtype), block_log2)
  return hadamard_transform(y).reshape(-1)


def inverse_randomized_hadamard(
  y: jax.Array, signs: jax.Array, *, block_log2: int | None = None
) -> jax.Array:
  """Undoes ``randomized_hadamard``: ``signs * H y`` (H is self-inverse)."""
  y = jnp.asarray(y)
  if y.ndim != 1 or signs.shape != y.shape:
    raise ValueError(
      f"y must be 1-D and signs of the same shape, got "
      f"{y.shape} and {signs.shape}"
    )
  x = hadamard_transform(_blocks(y, block_log2)).reshape(-1)
  return x * signs.astype(x.dtype)
