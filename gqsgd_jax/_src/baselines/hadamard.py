"""Fast Walsh-Hadamard transform and the randomized Hadamard rotation (RHT).

THC rotates each chunk with ``H D`` before quantizing: ``D`` a
diagonal of random signs shared by all workers, ``H`` the orthonormal
Walsh-Hadamard matrix. After the rotation every coordinate is a signed
mixture of all inputs, so its magnitude concentrates around
``||x|| / sqrt(d)`` and one uniform grid fits all coordinates.

The transform runs as log2(d) butterfly stages on reshaped views (no d x d
matrix, O(d log d) adds), all in the input's float dtype. The partial
variant applies the transform independently to blocks of 2^T consecutive
elements (the authors' "partial rotation"), which costs T instead of
log2(d) stages per element.
"""

import jax
import jax.numpy as jnp
import numpy as np

from gqsgd_jax._src import reference


def _log2_exact(n: int, name: str) -> int:
  if n < 1 or n & (n - 1):
    raise ValueError(f"{name} must be a power of two, got {n}")
  return n.bit_length() - 1


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
  batch = x.shape[:-1]
  h = 1
  for _ in range(k):
    # Stage: pairs (j, j + h) inside every block of 2h become (a + b, a - b).
    y = x.reshape(batch + (d // (2 * h), 2, h))
    a, b = y[..., 0, :], y[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(batch + (d,))
    h *= 2
  # One scaling at the end (exact for even k): 2^-floor(k/2) * 2^-(k mod 2)/2.
  scale = 2.0 ** -(k // 2) * (np.sqrt(0.5) if k % 2 else 1.0)
  return x * jnp.asarray(scale, x.dtype)


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
  seed: jax.Array, n: int, dtype: jax.typing.DTypeLike = jnp.float32
) -> jax.Array:
  """``n`` random ±1 of ``dtype`` from a uint32[2] seed, by the kernels'
  counter hash (``reference.random_bits``: two integer mixes per element).

  A cheap stand-in for ``random_signs`` when the signs are recomputed every
  step: the same seed gives the same signs, with no threefry rounds.
  """
  bits = reference.random_bits(seed, n)
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
