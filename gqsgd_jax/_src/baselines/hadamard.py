"""Fast Walsh-Hadamard transform and the randomized Hadamard rotation (RHT).

THC rotates each chunk with ``H D`` before quantizing: ``D`` a
diagonal of random signs shared by all workers, ``H`` the orthonormal
Walsh-Hadamard matrix. After the rotation every coordinate is a signed
mixture of all inputs, so its magnitude concentrates around
``||x|| / sqrt(d)`` and one uniform grid fits all coordinates.

The transform is blocked: the Sylvester matrix factors over the bits of
the index, H_d = H_(2^a) (x) H_(2^b) (x) ..., so groups of bits can be
transformed in one pass each. The lowest ``LOW_PRODUCT_LOG2`` bits go first,
as one matrix product of the (d / 64, 64) view by a small ±1 Hadamard block
H_64 (at the highest precision: f32, not TF32, on GPUs); the remaining bits
follow in radix-4 (radix-8 for large d) butterfly stages, each one pass that
computes its outputs from 4 (8) inputs. At d = 2^23 that is 7 passes over
memory instead of a radix-2 butterfly's 23, with the same O(d log d) adds
up to the product's 64 multiply-adds per element; the result equals the
butterfly's up to f32 rounding. Every pass is scaled down by a power of two
(no intermediate exceeds ||x||, so no overflow where the result is finite).
The partial variant applies the transform independently to blocks of 2^T
consecutive elements (the authors' "partial rotation").
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gqsgd_jax._src import reference

# The first pass: a product by H_64 (the lowest 6 bits of the index).
LOW_PRODUCT_LOG2 = 6
# Then radix-4 butterfly stages (2 bits a pass), radix-8 (3 bits) from 2^21
# elements on, where the passes leave the caches.
RADIX8_MIN_LOG2 = 21


def _log2_exact(n: int, name: str) -> int:
  if n < 1 or n & (n - 1):
    raise ValueError(f"{name} must be a power of two, got {n}")
  return n.bit_length() - 1


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


def _product(x: jax.Array, e: int, scale: float) -> jax.Array:
  """scale H_(2^e) applied to consecutive blocks of 2^e elements of x's
  last axis: one matrix product, at the highest precision (f32 products,
  not TF32 or bf16 passes, on GPUs)."""
  h = _sylvester(e) * np.float32(scale)
  y = jax.lax.dot_general(
    x.reshape(-1, 1 << e),
    jnp.asarray(h, x.dtype),
    (((1,), (0,)), ((), ())),
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=x.dtype,
  )
  return y.reshape(x.shape)


def _stage(x: jax.Array, r: int, h: int, scale: float) -> jax.Array:
  """scale (H_(2^r) (x) I_h) on x's last axis: bits log2(h) .. log2(h) +
  r - 1 of the index in one pass (a radix-2^r butterfly, computed per
  output element)."""
  d = x.shape[-1]
  batch = x.shape[:-1]
  f = 1 << r
  y = x.reshape(batch + (d // (f * h), f, h))
  v = [y[..., j, :] * jnp.asarray(scale, x.dtype) for j in range(f)]
  step = 1
  while step < f:
    w = list(v)
    for j in range(f):
      if not j & step:
        w[j], w[j | step] = v[j] + v[j | step], v[j] - v[j | step]
    v = w
    step *= 2
  return jnp.stack(v, axis=-2).reshape(x.shape)


def hadamard_transform(
  x: jax.Array, *, product_last: bool = False
) -> jax.Array:
  """Orthonormal Walsh-Hadamard transform along the last axis.

  ``H`` is the Sylvester (natural-order) Hadamard matrix scaled by
  ``d^-1/2``: symmetric and orthogonal, so the transform is its own inverse.

  Args:
    x: float array whose last axis has a power-of-two length d.
    product_last: run the butterfly passes before the product (the same
      transform: the passes commute) so that elementwise work producing x
      fuses into the first pass (a product reads its operand as is).

  Returns:
    ``x @ H`` with the shape and dtype of ``x``.

  Raises:
    ValueError: the last axis is not a power of two.
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("x must have at least one axis")
  k = _log2_exact(x.shape[-1], "the last axis of x")
  if k == 0:
    return x
  low = min(k, LOW_PRODUCT_LOG2)
  if low == k:
    return _product(x, k, _scale(k))
  # Each pass of e bits scaled by 2^-ceil(e/2), at most its orthonormal
  # 2^-e/2, so no intermediate exceeds ||x||; the end makes up the rest of
  # d^-1/2 (a power of two for even k, so exact).
  applied = (low + 1) // 2
  y = x if product_last else _product(x, low, 2.0**-applied)
  radix = 3 if k >= RADIX8_MIN_LOG2 else 2
  done = low
  while done < k:
    r = min(radix, k - done)
    y = _stage(y, r, 1 << done, 2.0 ** -((r + 1) // 2))
    applied += (r + 1) // 2
    done += r
  if product_last:
    y = _product(y, low, 2.0 ** -((low + 1) // 2))
  left = applied - k / 2
  return y if left == 0 else y * jnp.asarray(2.0**left, y.dtype)


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


def transform_blocks(
  x: jax.Array, block_log2: int | None = None, *, product_last: bool = False
) -> jax.Array:
  """``hadamard_transform`` of a 1-D x, whole (None) or on consecutive
  blocks of 2^block_log2 elements (the partial rotation)."""
  y = _blocks(jnp.asarray(x), block_log2)
  return hadamard_transform(y, product_last=product_last).reshape(-1)


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
