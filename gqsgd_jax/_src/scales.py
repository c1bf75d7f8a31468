"""Global-QSGD's scales: block maxima, their wire formats, the multipliers.

Every worker measures the max-abs of each scale group of its gradient (a
block of B elements, a bucket, a leaf), the workers agree on the max over
workers with one max-reduction, and each quantizer turns those global maxima
into a quantize multiplier (levels / M) and a decode multiplier.

Scale wire formats (``CODECS``: encode the f32 max-abs to a wire word, decode
it back). Both compact encodings round the max-abs *up* (a scale below a
value would clamp it: bias) and are monotone as unsigned integers, so an
integer pmax of the words is the word of the float max. +inf (a non-finite
block) encodes to the format's inf. A finite max-abs above the format's
largest finite value (2^127 for e8m0, 3.3895314e38 for bf16) saturates to
it: the kernels then clamp the few values above the scale to the top level
(finite, within the integer headroom, biased only in that band at the top
of the float32 range) instead of turning a finite step into NaN.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gqsgd_jax._src import ops

FORMATS = ("f32", "bf16", "e8m0")
# Groups whose global max-abs is below this decode to zeros: it keeps every
# scale and decoded step a normal float32, where XLA:CPU (flush-to-zero) and
# CUDA (subnormals) compute the same bits.
TINY = 2.0**-100


def block_max(
  flat: jax.Array, block_size: int, *, impl: str = "auto"
) -> jax.Array:
  """Local max-abs of each block of ``block_size`` elements (short tail)."""
  return ops.block_max_abs(flat, block_size, impl=impl)


def multipliers(
  global_max: jax.Array,
  enc: Callable[[jax.Array], jax.Array],
  dec: Callable[[jax.Array], jax.Array],
  *,
  huge: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Quantize and decode multipliers ``enc(M)``, ``dec(M)`` of the maxima.

  ``global_max`` is a bucket's scalar max-abs or its vector of block
  maxima. A block below ``TINY`` encodes and decodes as zeros. Any
  non-finite block (or, with ``huge``, one above it) makes the decode
  multiplier NaN for the whole bucket: a non-finite gradient anywhere in a
  bucket gives NaN for every element of that bucket, on every worker.
  """
  finite = jnp.isfinite(global_max)
  if huge is not None:
    finite &= global_max <= huge
  ok = finite & (global_max >= TINY)
  scale = jnp.where(ok, enc(global_max), 0.0)
  inv = jnp.where(ok, dec(global_max), 0.0)
  inv = jnp.where(jnp.all(finite), inv, jnp.nan)
  return scale.astype(jnp.float32), inv.astype(jnp.float32)


def _e8m0_encode(m: jax.Array) -> jax.Array:
  u = jax.lax.bitcast_convert_type(m, jnp.uint32)
  e = (u >> 23) + ((u & 0x7FFFFF) != 0).astype(jnp.uint32)
  return jnp.where(u >= 0x7F800000, 255, jnp.minimum(e, 254)).astype(jnp.uint8)


def _e8m0_decode(e: jax.Array) -> jax.Array:
  # 2^(e - 127); e = 0 decodes to 0 (a zero block), e = 255 to +inf.
  return jax.lax.bitcast_convert_type(e.astype(jnp.uint32) << 23, jnp.float32)


def _bf16_encode(m: jax.Array) -> jax.Array:
  u = jax.lax.bitcast_convert_type(m, jnp.uint32)
  up = jnp.minimum((u + 0xFFFF) >> 16, 0x7F7F)
  return jnp.where(u >= 0x7F800000, 0x7F80, up).astype(jnp.uint16)


def _bf16_decode(h: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(h.astype(jnp.uint32) << 16, jnp.float32)


Codec = tuple[
  Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]
]

CODECS: dict[str, Codec] = {
  "f32": (lambda m: m, lambda m: m),
  "bf16": (_bf16_encode, _bf16_decode),
  "e8m0": (_e8m0_encode, _e8m0_decode),
}
