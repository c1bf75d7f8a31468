"""Fast Walsh-Hadamard transform and the randomized Hadamard rotation (RHT).

THC rotates each chunk with ``H D`` before quantizing: ``D`` a
diagonal of random signs shared by all workers, ``H`` the orthonormal
Walsh-Hadamard matrix. After the rotation every coordinate is a signed
mixture of all inputs, so its magnitude concentrates around
``||x|| / sqrt(d)`` and one uniform grid fits all coordinates.

The transform is a chain of matrix products: the Sylvester matrix factors
over the bits of the index, H_d = H_(2^a) (x) H_(2^b) (x) ..., so each
group of at most ``MAX_GROUP_LOG2`` bits is one pass, a product by a small
±1 Hadamard block (at the highest precision: f32, not TF32, on GPUs). The
lowest group multiplies the (d / 2^a, 2^a) view from the right; every
other group is a batch of products from the left of (2^e, 2^lo) slices, so
every pass reads and writes in natural order (no transposes). At d = 2^23
that is 4 passes over memory, where radix-8 butterflies took 7 (6 of them
elementwise fusions that XLA:CPU computes with a per-element choice of the
operand, each slower than a product pass); the result equals a radix-2
butterfly's up to f32 rounding. Every pass but the last is scaled down by a
power of two and the last by the rest of d^-1/2, so no intermediate exceeds
||x|| (no overflow where the result is finite). The partial variant
applies the transform independently to blocks of 2^T consecutive elements
(the authors' "partial rotation").

On CPU, float32 takes an FFI kernel instead (xla_ffi/include/gqsgd/
hadamard_kernels.h): radix-2 butterflies, cache-blocked so that a 2^23
transform is about two passes over memory, not four product passes; its
result equals the products' up to f32 rounding (bit for bit a plain radix-2
loop's). GPUs, other dtypes, builds without the module and
GQSGD_JAX_DISABLE_FFI=1 keep the products.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gqsgd_jax._src import ops
from gqsgd_jax._src import reference

# Bits per product pass. Measured on one XLA:CPU core at d = 2^23, one pass
# costs about as much up to 64 x 64 blocks (15 ms, vs 5 ms for an
# elementwise pass) and grows beyond (19 ms at 128); one radix-8 butterfly
# pass over 3 bits took 22 ms.
MAX_GROUP_LOG2 = 6


# The largest block stack of ``_pass`` kept as a constant (8 MiB of f32).
_STACK_CONSTANT = 2**21


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


def _groups(k: int) -> list[tuple[int, int]]:
  """(lowest bit, bit count) of each pass: ceil(k / MAX_GROUP_LOG2) groups,
  the larger ones lowest. Non-increasing sizes keep every broadcast block
  stack of ``_pass`` (2^-lo of the data per 2^e) no larger than the data."""
  count = -(-k // MAX_GROUP_LOG2)
  sizes = [k // count + (i < k % count) for i in range(count)]
  return [(sum(sizes[:i]), e) for i, e in enumerate(sizes)]


def _pass(y: jax.Array, lo: int, e: int, scale: float) -> jax.Array:
  """scale (I (x) H_(2^e) (x) I_(2^lo)) on the flat y: bits lo .. lo + e - 1
  of the index in one product, at the highest precision (f32 products, not
  TF32 or bf16 passes, on GPUs)."""
  h = jnp.asarray(_sylvester(e) * np.float32(scale), y.dtype)
  f, inner = 1 << e, 1 << lo
  outer = y.size // (f * inner)

  def product(a: jax.Array, b: jax.Array, batched: bool = False) -> jax.Array:
    batch = ((0,), (0,)) if batched else ((), ())
    dims = (((a.ndim - 1,), (b.ndim - 2,)), batch)
    return jax.lax.dot_general(
      a,
      b,
      dims,
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=y.dtype,
    )

  if lo == 0:  # H is symmetric: rows times H
    return product(y.reshape(-1, f), h).reshape(-1)
  if outer == 1:
    return product(h, y.reshape(f, inner)).reshape(-1)
  # A batched product by stacked copies of H: XLA:CPU runs it as a loop of
  # plain products, where a product over the middle axis of the 3-D view
  # would transpose its operand first.
  # Up to _STACK_CONSTANT elements the stack is a constant of the program:
  # broadcast at run time, it is written out in every call, as large as
  # the data for the second group (a full pass). Contiguous: JAX lowers a
  # NumPy array with zero strides (np.broadcast_to's view) to a broadcast.
  if outer * f * f <= _STACK_CONSTANT:
    hs = jnp.asarray(
      np.ascontiguousarray(
        np.broadcast_to(_sylvester(e) * np.float32(scale), (outer, f, f))
      ),
      y.dtype,
    )
  else:
    hs = jnp.broadcast_to(h, (outer, f, f))
  return product(hs, y.reshape(outer, f, inner), batched=True).reshape(-1)


def _products(x: jax.Array, k: int) -> jax.Array:
  """The transform as ceil(k / MAX_GROUP_LOG2) product passes (the XLA
  path)."""
  # Each pass but the last scaled by 2^-ceil(e/2), at most its orthonormal
  # 2^-e/2, so no intermediate exceeds ||x||; the last makes up the rest of
  # d^-1/2 (a power of two for even k, so exact).
  y = x.reshape(-1)
  groups = _groups(k)
  applied = 0
  for lo, e in groups[:-1]:
    y = _pass(y, lo, e, 2.0 ** -((e + 1) // 2))
    applied += (e + 1) // 2
  lo, e = groups[-1]
  return _pass(y, lo, e, 2.0 ** (applied - k / 2)).reshape(x.shape)


def _kernel(x: jax.Array) -> jax.Array:
  """The CPU kernel on every row (last axis) of a float32 x."""
  # Rows are independent and the handler takes every leading axis as rows,
  # so a vmapped call is one call on the stacked rows.
  return jax.ffi.ffi_call(
    "gqsgd_hadamard",
    jax.ShapeDtypeStruct(x.shape, x.dtype),
    vmap_method="broadcast_all",
  )(x)


def hadamard_transform(x: jax.Array, *, impl: str = "auto") -> jax.Array:
  """Orthonormal Walsh-Hadamard transform along the last axis.

  ``H`` is the Sylvester (natural-order) Hadamard matrix scaled by
  ``d^-1/2``: symmetric and orthogonal, so the transform is its own inverse.

  Args:
    x: float array whose last axis has a power-of-two length d.
    impl: "auto" (the CPU kernel for float32 on CPU where the FFI module is
      registered, the matrix products elsewhere), "ffi" (the kernel; float32
      on CPU only) or "xla" (the products).

  Returns:
    ``x @ H`` with the shape and dtype of ``x``.

  Raises:
    ValueError: the last axis is not a power of two, or impl="ffi" for a
      dtype other than float32.
  """
  ops.validate_impl(impl)
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("x must have at least one axis")
  k = _log2_exact(x.shape[-1], "the last axis of x")
  if k == 0 or x.size == 0:
    return x
  if x.dtype != jnp.float32:
    if impl == "ffi":
      raise ValueError(
        f"impl='ffi' transforms float32 only, got {x.dtype}; use impl='auto'"
      )
    return _products(x, k)
  return ops._select(
    impl,
    _kernel,
    functools.partial(_products, k=k),
    frozenset({"cpu"}),
  )(x)


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
  counter hash (``reference.random_bits``: one integer mix per element).

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
  x: jax.Array, block_log2: int | None = None, *, impl: str = "auto"
) -> jax.Array:
  """``hadamard_transform`` of a 1-D x, whole (None) or on consecutive
  blocks of 2^block_log2 elements (the partial rotation)."""
  y = _blocks(jnp.asarray(x), block_log2)
  return hadamard_transform(y, impl=impl).reshape(-1)


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
