"""The two-shot reduction: codes all-to-all, exact sum, one re-quantization.

``global_quantize(reduction="two_shot")`` (standard dithering):

1. Every worker quantizes its bucket to ``bits``-bit codes with the full
   s = 2^(bits-1) - 1 levels per global scale (as the butterfly does), laid
   out as W shards of L elements (L a multiple of both word widths, the
   tail padded with zero codes; shards need not align with scale blocks,
   since the owner sums codes, which all share the same grid).
2. ``all_to_all``: worker i receives shard i of every worker's codes.
3. Worker i, the shard's *owner*, sums the W codes of each element exactly
   (int32, |S| <= W s) and re-quantizes the mean once, stochastically, to
   ``gather_bits``-bit codes with L_d levels. L_d = W s when that fits the
   gather width: the exact sum then travels as it is, with no
   re-quantization at all (e.g. 4-bit codes, 8-bit gather, W <= 18).
   Otherwise L_d = 2^(gather_bits-1) - 1.
4. ``all_gather`` of the owners' codes; every worker decodes the same bits.

Two collectives per bucket whatever W (the butterfly needs 2 log2 W
rounds), and the same (W-1)/W of the codes up and down as a ring
all-reduce: bits up, ``gather_bits`` down.

With ``gather_bits == bits`` the one re-quantization of the mean costs
about as much as one worker's whole quantization noise, undivided by W.
``owner_feedback`` keeps that error: each owner adds its previous
re-quantization error to its shard's mean before re-quantizing (error
feedback held where the sum is formed, as 1-bit Adam's server side does),
so the error is compensated over steps instead of adding up. The workers'
own quantization stays unbiased; the feedback makes each step's estimate
biased by the change of the memory, e_t - e_(t+1).
"""

import math

import jax
import jax.numpy as jnp

from gqsgd_jax._src import collectives
from gqsgd_jax._src import ops
from gqsgd_jax._src import reference
from gqsgd_jax._src import scales
from gqsgd_jax._src import wire

# The owner's exact sum is an int32 below W * 127 and is converted to float
# exactly, so any W up to 2^24 / 127 would do; the limit matches the
# butterfly's.
MAX_WORKERS = 2**16


def gather_levels(bits: int, gather_bits: int, num_workers: int) -> int:
  """Levels L_d of the gathered codes: W s if the sum fits, else the max."""
  exact = num_workers * wire.max_levels(bits)
  return min(exact, wire.max_levels(gather_bits))


def shard_size(n: int, num_workers: int, bits: int, gather_bits: int) -> int:
  """Elements per owner's shard: ceil(n / W), rounded up to whole words of
  both widths (shards need not align with the scale blocks)."""
  unit = math.lcm(wire.lanes_per_word(bits), wire.lanes_per_word(gather_bits))
  per = -(-n // num_workers)
  return max(unit, -(-per // unit) * unit)


def two_shot_mean(
  flat: jax.Array,
  global_max: jax.Array,
  seed: jax.Array,
  owner_seed: jax.Array,
  residual: jax.Array | None,
  *,
  bits: int,
  gather_bits: int,
  axis_name: collectives.AxisName,
  num_workers: int,
  block_size: int | None,
  impl: str,
) -> tuple[jax.Array, jax.Array | None]:
  """The workers' mean of one bucket, and the owner's new error memory.

  Args:
    flat: this worker's bucket, 1-D.
    global_max: the bucket's global max-abs (scalar) or its block maxima.
    seed: this worker's dither seed; ``owner_seed``: its seed as an owner.
    residual: float32[shard_size] error memory of this worker's shard
      (``owner_feedback``), or None.

  Returns:
    float32[n], identical on every worker, and the new memory (or None).
  """
  w = num_workers
  n = flat.shape[0]
  levels = wire.max_levels(bits)
  top = gather_levels(bits, gather_bits, w)
  shard = shard_size(n, w, bits, gather_bits)
  padded = shard * w
  if block_size is not None:  # zero blocks cover the padding
    global_max = jnp.pad(
      global_max,
      (0, ops.num_scale_blocks(padded, block_size) - global_max.shape[0]),
    )

  up, _ = scales.multipliers(global_max, lambda m: levels / m, lambda m: m)
  n_scales = ops.num_scale_blocks(n, block_size) if block_size else None
  codes = ops.quantize(
    flat,
    up[:n_scales] if block_size else up,
    seed,
    levels=levels,
    bits=bits,
    block_size=block_size,
    impl=impl,
  )
  lanes = wire.lanes_per_word(bits)
  zero_word = sum(levels << (bits * k) for k in range(lanes))
  codes = jnp.pad(
    codes, (0, padded // lanes - codes.shape[0]), constant_values=zero_word
  )
  rows = jax.lax.all_to_all(codes.reshape(w, -1), axis_name, 0, 0, tiled=True)

  # The owner's exact sum; its positions past n (the last word's unused
  # lanes, which pack as code 0) are zeroed.
  unpacked = reference.unpack(rows.reshape(-1), bits).reshape(w, shard)
  signed = unpacked.astype(jnp.int32) - levels
  # Halving adds over the worker axis: log2(W) vectorized adds (a list of
  # W row slices would grow the program with W). Integers: exact in any
  # order.
  while signed.shape[0] > 1:
    if signed.shape[0] % 2:
      signed = jnp.pad(signed, ((0, 1), (0, 0)))
    half = signed.shape[0] // 2
    signed = signed[:half] + signed[half:]
  total = signed[0]
  owner = jax.lax.axis_index(axis_name)
  position = owner * shard + jax.lax.iota(jnp.int32, shard)
  total = jnp.where(position < n, total, 0).astype(jnp.float32)

  if residual is None:
    # total * L_d / (W s) on the gathered grid; exactly total when L_d = W s.
    down_scale = jnp.float32(top / (w * levels))
    down = ops.quantize(
      total, down_scale, owner_seed, levels=top, bits=gather_bits, impl=impl
    )
    new_residual = None
  else:
    # The owner's elements' maxima (a gather XLA fuses into the loop).
    mine = global_max
    if block_size is not None:
      mine = global_max[position // block_size]
    to_grad, _ = scales.multipliers(
      mine, lambda m: m / (levels * w), lambda m: m
    )
    to_codes, from_codes = scales.multipliers(
      mine, lambda m: top / m, lambda m: m / top
    )
    target = total * to_grad + residual
    # Round to nearest: the memory carries the rounding error to the next
    # step, so a stochastic rounding's extra variance would buy nothing
    # (measured: it made the language example worse than no feedback).
    y = target * to_codes
    y = jnp.where(jnp.isfinite(y), y, 0.0)
    q = jnp.clip(jnp.round(y), -top, top).astype(jnp.int32)
    down = reference.pack((q + top).astype(jnp.uint32), gather_bits)
    sent = q.astype(jnp.float32) * jnp.nan_to_num(from_codes)
    # A non-finite step leaves the memory as it was rather than poisoning it.
    finite = jnp.all(jnp.isfinite(global_max))
    new_residual = jnp.where(finite, target - sent, residual)

  gathered = jax.lax.all_gather(down, axis_name, to="invarying").reshape(-1)
  _, back = scales.multipliers(global_max, lambda m: m, lambda m: m / top)
  mean = ops.dequantize(
    gathered,
    back,
    n=padded,
    bits=gather_bits,
    offset=top,
    block_size=block_size,
    impl=impl,
  )
  return mean[:n], new_residual
