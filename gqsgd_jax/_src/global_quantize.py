"""Global-QSGD as an optax transform: quantize on one global grid, sum integers.

Every worker scales each block of B contiguous elements of its gradient
buckets by the same global max-abs M_b (the max over workers of the block's
max-abs; one ``pmax`` for all blocks of all buckets of a step), rounds
stochastically with its own random stream, and the integer codes are reduced
without decompression. One scale per bucket, per leaf or for the whole
model are options (``granularity``); so is the scale's wire format: f32, or a
rounded-up bf16 or power-of-two exponent byte reduced by an integer pmax
(``scale_format``). A scale below a block's values would clamp them, so the
compact formats round up; a non-finite value anywhere in a bucket gives NaN
for the whole bucket on every worker. The reductions:

* ``reduction="psum"``: a native integer all-reduce. bits=8 uses int8 codes
  with s = floor(127 / W) levels per worker; fewer bits use offset-binary
  lanes packed into uint8/uint32 words with s = floor((2^bits - 1) / (2W)),
  so neither the int8 sum nor any lane sum can overflow.
* ``reduction="butterfly"``: recursive halving/doubling over ``ppermute``,
  each step re-quantizing the weighted average SR((n_a a + n_b b)/(n_a+n_b)),
  so codes keep the full 2^(bits-1) - 1 levels for any W.
* ``reduction="auto"``: psum while it leaves every worker at least
  ``AUTO_MIN_PSUM_LEVELS`` levels, the butterfly beyond (see README).

``dithering="exponential"`` encodes sign + exponent bytes scaled by
2^(D+1) M (D = butterfly depth, headroom that makes overflow impossible) and
reduces them with the pairwise stochastic reduce along the butterfly.

The result is the unbiased estimate of the workers' mean gradient,
bit-identical on every worker, in each leaf's dtype.
"""

from collections.abc import Callable
import functools
from typing import NamedTuple, TypedDict

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
from gqsgd_jax._src import wire

REDUCTIONS = ("auto", "psum", "butterfly")
DITHERINGS = ("standard", "exponential")
GRANULARITIES = ("block",) + bucketing.GRANULARITIES
SCALE_FORMATS = ("f32", "bf16", "e8m0")
# "auto" keeps the native integer psum while each worker still has at least
# this many levels (15 codes, the resolution of a 4-bit butterfly).
AUTO_MIN_PSUM_LEVELS = 7
# The butterfly's weighted averages (math.h RoundedAverage) are exact for
# counts n_a + n_b up to 2^16, so it serves up to 2^16 workers.
MAX_BUTTERFLY_WORKERS = ops.MAX_AVERAGE_COUNT
# Buckets whose global max-abs is below this decode to zeros: it keeps every
# scale and decoded step a normal float32, where XLA:CPU (flush-to-zero) and
# CUDA (subnormals) compute the same bits.
_TINY = 2.0**-100
# Exponential dithering scales by 2^(D+1) M with a single multiply: above
# this max-abs, 1 / (2^(D+1) M) leaves the normal float32 range. Such a
# bucket decodes to NaN (an overflow signal that apply_if_finite can skip),
# never to silently wrong numbers.
_EXP_HUGE = 2.0**100


class GlobalQuantizeState(NamedTuple):
  """State of ``global_quantize``: the PRNG key of the dither."""

  key: jax.Array  # uint32[2] raw PRNG key, split once per step


def choose_reduction(reduction: str, bits: int, num_workers: int) -> str:
  """Resolves "auto" and checks that W fits the chosen wire format.

  Raises:
    ValueError: naming the reduction, ``bits`` and W, when the integer psum
      would overflow (W * levels beyond the code) or W exceeds the
      butterfly's ``MAX_BUTTERFLY_WORKERS``; for "auto", when neither can
      serve W.
  """
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}")
  signed = bits == 8
  psum_levels = wire.psum_levels(bits, num_workers, signed)
  psum_limit = wire.max_levels(8, True) if signed else wire.max_levels(bits)
  chosen = reduction
  if reduction == "auto":
    chosen = "psum" if psum_levels >= AUTO_MIN_PSUM_LEVELS else "butterfly"
    if num_workers > MAX_BUTTERFLY_WORKERS:  # psum_levels < 1 here too
      raise ValueError(
        f"reduction='auto' with bits={bits} cannot serve {num_workers} "
        f"workers: the butterfly supports at most {MAX_BUTTERFLY_WORKERS} "
        f"and the integer psum at most {psum_limit}"
      )
  if chosen == "psum" and psum_levels < 1:
    raise ValueError(
      f"reduction='psum' with bits={bits} cannot serve {num_workers} "
      f"workers (at most {psum_limit}: the integer sum would overflow); "
      "use reduction='butterfly' or more bits"
    )
  if chosen == "butterfly" and num_workers > MAX_BUTTERFLY_WORKERS:
    raise ValueError(
      f"reduction='butterfly' with bits={bits} supports at most "
      f"{MAX_BUTTERFLY_WORKERS} workers (the weighted averages' integer "
      f"math), got {num_workers}"
    )
  return chosen


def _seed(key: jax.Array, *data: int | jax.Array) -> jax.Array:
  return ops.seed_from_key(prng.fold(key, *data))


def _scales(
  global_max: jax.Array,
  enc: Callable[[jax.Array], jax.Array],
  dec: Callable[[jax.Array], jax.Array],
  *,
  huge: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Quantize and decode multipliers from a bucket's max-abs value(s).

  ``global_max`` is the bucket's scalar max-abs or its vector of block
  maxima. A block below ``_TINY`` encodes and decodes as zeros. Any
  non-finite block (or, with ``huge``, one above it) makes the decode
  multiplier NaN for the whole bucket: a non-finite gradient anywhere in a
  bucket gives NaN for every element of that bucket, on every worker.
  """
  finite = jnp.isfinite(global_max)
  if huge is not None:
    finite &= global_max <= huge
  ok = finite & (global_max >= _TINY)
  scale = jnp.where(ok, enc(global_max), 0.0)
  inv = jnp.where(ok, dec(global_max), 0.0)
  inv = jnp.where(jnp.all(finite), inv, jnp.nan)
  return scale.astype(jnp.float32), inv.astype(jnp.float32)


def _psum_mean(
  flat: jax.Array,
  global_max: jax.Array,
  seed: jax.Array,
  *,
  bits: int,
  axis_name: collectives.AxisName,
  num_workers: int,
  block_size: int | None,
  impl: str,
) -> jax.Array:
  signed = bits == 8
  levels = wire.psum_levels(bits, num_workers, signed)
  scale, inv = _scales(
    global_max, lambda m: levels / m, lambda m: m / (levels * num_workers)
  )
  codes = ops.quantize(
    flat,
    scale,
    seed,
    levels=levels,
    bits=bits,
    signed_codes=signed,
    block_size=block_size,
    impl=impl,
  )
  total = jax.lax.psum(codes, axis_name)
  offset = 0 if signed else levels * num_workers
  return ops.dequantize(
    total,
    inv,
    n=flat.shape[0],
    bits=bits,
    offset=offset,
    signed_codes=signed,
    block_size=block_size,
    impl=impl,
  )


def _butterfly_mean(
  flat: jax.Array,
  global_max: jax.Array,
  seed: jax.Array,
  node_key: jax.Array,
  *,
  bits: int,
  axis_name: collectives.AxisName,
  num_workers: int,
  block_size: int | None,
  impl: str,
) -> jax.Array:
  levels = wire.max_levels(bits)
  scale, inv = _scales(global_max, lambda m: levels / m, lambda m: m / levels)
  codes = ops.quantize(
    flat,
    scale,
    seed,
    levels=levels,
    bits=bits,
    block_size=block_size,
    impl=impl,
  )
  worker = jax.lax.axis_index(axis_name)

  def combine(
    mine: jax.Array,
    theirs: jax.Array,
    n_mine: jax.Array,
    n_theirs: jax.Array,
    stage: int,
  ) -> jax.Array:
    return ops.average(
      mine,
      theirs,
      n_mine,
      n_theirs,
      _seed(node_key, stage, worker),
      bits=bits,
      impl=impl,
    )

  # The combine works on codes only: the reduce-scatter's shards need not
  # align with the scale blocks.
  root = collectives.butterfly_allreduce(
    codes, combine, axis_name=axis_name, num_workers=num_workers
  )
  return ops.dequantize(
    root,
    inv,
    n=flat.shape[0],
    bits=bits,
    offset=levels,
    block_size=block_size,
    impl=impl,
  )


def _exponential_mean(
  flat: jax.Array,
  global_max: jax.Array,
  seed: jax.Array,
  node_key: jax.Array,
  *,
  floor_code: int,
  axis_name: collectives.AxisName,
  num_workers: int,
  block_size: int | None,
  impl: str,
) -> jax.Array:
  # S = 2^(D+1) M: each worker's |v| <= 2^-(D+1) (code >= D+1), and each of
  # the D tree levels doubles a magnitude at most once, so the root code is
  # >= 1: no overflow for any W (the reference's 2WM only covers powers of
  # two with a tree, B-GQ-3).
  depth = collectives.tree_depth(num_workers)
  headroom = float(2 ** (depth + 1))
  scale, dec = _scales(
    global_max,
    lambda m: 1.0 / (headroom * m),
    lambda m: headroom * m / num_workers,
    huge=_EXP_HUGE,
  )
  codes = ops.exp_encode(
    flat, scale, seed, floor_code=floor_code, block_size=block_size, impl=impl
  )
  worker = jax.lax.axis_index(axis_name)

  def combine(
    mine: jax.Array,
    theirs: jax.Array,
    n_mine: jax.Array,
    n_theirs: jax.Array,
    stage: int,
  ) -> jax.Array:
    del n_mine, n_theirs  # the reduce sums; the mean comes from S / W
    return ops.exp_reduce(
      mine, theirs, _seed(node_key, stage, worker), impl=impl
    )

  root = collectives.butterfly_allreduce(
    codes, combine, axis_name=axis_name, num_workers=num_workers
  )
  return ops.exp_decode(root, dec, block_size=block_size, impl=impl)


def _block_max(flat: jax.Array, block_size: int) -> jax.Array:
  """Local max-abs of each block of ``block_size`` elements (tail padded)."""
  blocks = ops.num_scale_blocks(flat.shape[0], block_size)
  padded = jnp.pad(flat, (0, blocks * block_size - flat.shape[0]))
  return nonfinite.max_abs(padded.reshape(blocks, block_size), axis=1)


# Scale formats on the wire: (encode f32 max-abs -> wire word, decode).
# Both compact encodings round the max-abs *up* (a scale below a value
# would clamp it: bias) and are monotone as unsigned integers, so an integer
# pmax of the words is the word of the float max. +inf (a non-finite block)
# encodes to the format's inf. A finite max-abs above the format's largest
# finite value (2^127 for e8m0, 3.3895314e38 for bf16) saturates to it:
# the kernels then clamp the few values above the scale to the top level
# (finite, within the integer headroom, biased only in that band at the top
# of the float32 range) instead of turning a finite step into NaN.
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


_SCALE_CODECS = {
  "f32": (lambda m: m, lambda m: m),
  "bf16": (_bf16_encode, _bf16_decode),
  "e8m0": (_e8m0_encode, _e8m0_decode),
}


def global_quantize(
  bits: int = 4,
  *,
  axis_name: collectives.AxisName = "data",
  reduction: str = "auto",
  dithering: str = "standard",
  granularity: str | None = None,
  block_size: int | None = None,
  scale_format: str | None = None,
  bucket_bytes: int = 25 * 2**20,
  key: jax.typing.ArrayLike = 0,
  floor_code: int = 127,
  impl: str = "auto",
) -> optax.GradientTransformation:
  """Global-QSGD: unbiased mean of the workers' gradients over integer wires.

  Use inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name``, on local
  (per-worker) gradients; every worker receives the same mean estimate.

  Args:
    bits: bits per coordinate on the wire, 2..8. Exponential dithering
      uses bytes (sign + 7-bit exponent) and needs bits=8.
    axis_name: the data-parallel mesh axis.
    reduction: "psum" (native integer all-reduce), "butterfly" (ppermute
      with requantizing averages, any W) or "auto". Exponential dithering
      always uses the butterfly.
    dithering: "standard" (uniform levels) or "exponential" (powers of two).
    granularity: one scale per "block" of ``block_size`` contiguous
      elements of a bucket, per "bucket", per "leaf", or one "global" scale
      for the whole model. Default: see ``default_config`` ("bucket" for
      exponential dithering).
    block_size: elements per block scale (a power of two); only with
      granularity="block". Default: see ``default_config``.
    scale_format: how the scales travel in the step's one max-reduction:
      "f32" (exact max-abs, 4 bytes), "bf16" (rounded up to bfloat16, 2 bytes,
      an integer pmax) or "e8m0" (rounded up to a power of two, 1 byte, an
      integer pmax). Default: see ``default_config``.
    bucket_bytes: fusion cap per bucket (default 25 MiB, as DDP).
    key: int seed or PRNG key of the dither.
    floor_code: exponential dithering's smallest level 2^-floor_code.
    impl: kernels: "auto" (FFI where built, else XLA), "ffi" or "xla".

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    ``GlobalQuantizeState``.

  Raises:
    ValueError: bad ``bits``, ``reduction``, ``dithering``, ``granularity``,
      ``bucket_bytes`` or ``impl``; at update time, an unbound
      ``axis_name`` or a worker count the wire format cannot serve.

  Examples:
    >>> import optax, gqsgd_jax
    >>> tx = optax.chain(gqsgd_jax.global_quantize(bits=4), optax.sgd(0.1))
  """
  bits = wire.validate_bits(bits)
  if reduction not in REDUCTIONS:
    raise ValueError(
      f"reduction must be one of {REDUCTIONS}, got {reduction!r}"
    )
  if dithering not in DITHERINGS:
    raise ValueError(
      f"dithering must be one of {DITHERINGS}, got {dithering!r}"
    )
  if dithering == "exponential":
    if bits != 8:
      raise ValueError(
        "dithering='exponential' sends sign + 7-bit exponent "
        f"bytes and needs bits=8, got bits={bits}"
      )
    if reduction == "psum":
      raise ValueError(
        "dithering='exponential' needs a custom reduction: "
        "use reduction='butterfly' or 'auto'"
      )
  if not 1 <= floor_code <= 127:
    raise ValueError(f"floor_code must be in [1, 127], got {floor_code}")
  if dithering == "exponential" and granularity is None:
    # Exponential levels are relative to each value's own magnitude, so
    # block scales buy it nothing (measured) and would only add scale bytes.
    granularity = "bucket"
  granularity, block_size, scale_format = _resolve_scales(
    bits, granularity, block_size, scale_format
  )
  bucket_bytes = bucketing.validate_bucket_bytes(bucket_bytes)
  ops.validate_impl(impl)
  init_key = prng.canonical_key(key)

  def init_fn(params: optax.Params) -> GlobalQuantizeState:
    del params
    return GlobalQuantizeState(key=init_key)

  def update_fn(
    updates: optax.Updates,
    state: GlobalQuantizeState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, GlobalQuantizeState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    if dithering == "exponential":
      strategy = "exponential"
      choose_reduction("butterfly", bits, num_workers)
    else:
      strategy = choose_reduction(reduction, bits, num_workers)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths = [p for p, _ in paths_leaves]
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_leaf_dtypes(leaves, paths)
    buckets = bucketing.plan_buckets(
      leaves, bucket_bytes=bucket_bytes, per_leaf=granularity == "leaf"
    )
    next_key, step_key = jax.random.split(state.key)
    if not buckets:  # only empty leaves
      empty = [jnp.zeros(x.shape, x.dtype) for x in leaves]
      return (
        jax.tree_util.tree_unflatten(treedef, empty),
        GlobalQuantizeState(key=next_key),
      )

    flats = [bucketing.flatten_bucket(b, leaves) for b in buckets]
    # One pmax for all scales (bucket or block maxima) of the step.
    if granularity == "block":
      assert block_size is not None  # _resolve_scales sets it for "block"
      local = [_block_max(f, block_size) for f in flats]
    else:
      local = [nonfinite.max_abs(f).reshape(1) for f in flats]
    encode, decode = _SCALE_CODECS[scale_format]
    all_max = decode(jax.lax.pmax(encode(jnp.concatenate(local)), axis_name))
    if granularity == "global":
      all_max = jnp.broadcast_to(jnp.max(all_max), all_max.shape)
    bounds = np.cumsum([0] + [m.shape[0] for m in local])
    if granularity == "block":
      global_max = [all_max[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    else:
      global_max = [all_max[a] for a in bounds[:-1]]

    worker = jax.lax.axis_index(axis_name)
    # (flat, global_max, seed[, node_key]) -> the bucket's mean
    reduce_fn: Callable[..., jax.Array]
    if strategy == "psum":
      reduce_fn = functools.partial(_psum_mean, bits=bits)
    elif strategy == "butterfly":
      reduce_fn = functools.partial(_butterfly_mean, bits=bits)
    else:
      reduce_fn = functools.partial(_exponential_mean, floor_code=floor_code)
    reduce_fn = functools.partial(
      reduce_fn,
      axis_name=axis_name,
      num_workers=num_workers,
      impl=impl,
      block_size=block_size if granularity == "block" else None,
    )
    means = []
    for b, flat in enumerate(flats):
      # Dither: independent per (step, bucket, worker). Tree nodes: per
      # (step, bucket, stage, reducing worker), see collectives.py.
      seed = _seed(step_key, b, 0, worker)
      if strategy == "psum":
        means.append(reduce_fn(flat, global_max[b], seed))
      else:
        node_key = jax.random.fold_in(jax.random.fold_in(step_key, b), 1)
        means.append(reduce_fn(flat, global_max[b], seed, node_key))
    out = bucketing.unflatten_buckets(buckets, means, leaves)
    return (
      jax.tree_util.tree_unflatten(treedef, out),
      GlobalQuantizeState(key=next_key),
    )

  return transform.transformation(init_fn, update_fn)


class ScaleConfig(TypedDict):
  """A scale configuration: ``global_quantize``'s scale options."""

  granularity: str
  block_size: int
  scale_format: str


def default_config(bits: int) -> ScaleConfig:
  """The scale configuration ``global_quantize(bits)`` uses by default.

  Chosen from measurements (benchmarks/results/frontier.md): one scale
  per block, the block size and format with the best measured quality
  within scale bytes <= 2% of the code bytes. 8 bits: blocks of 256 with
  f32 scales (language perplexity +0.8%, recommendation AUC -0.01 pt vs f32
  at W = 8, int8 psum). 4 bits: blocks of 256 with bf16 scales rounded up
  (as good as f32 per scale, at half the bytes, and far better than a
  power-of-two exponent byte, which wastes up to one bit of the 7 levels).
  Other widths keep the byte budget with f32 scales.
  """
  bits = wire.validate_bits(bits)
  return _DEFAULTS.get(bits, _DEFAULTS[None]).copy()


# bits -> defaults; None: every other bit width.
_DEFAULTS: dict[int | None, ScaleConfig] = {
  2: ScaleConfig(granularity="block", block_size=1024, scale_format="f32"),
  3: ScaleConfig(granularity="block", block_size=512, scale_format="f32"),
  4: ScaleConfig(granularity="block", block_size=256, scale_format="bf16"),
  5: ScaleConfig(granularity="block", block_size=512, scale_format="f32"),
  None: ScaleConfig(granularity="block", block_size=256, scale_format="f32"),
}


def _resolve_scales(
  bits: int,
  granularity: str | None,
  block_size: int | None,
  scale_format: str | None,
) -> tuple[str, int | None, str]:
  """Fills unset scale options from ``default_config`` and validates them."""
  defaults = default_config(bits)
  if granularity is None:
    granularity = defaults["granularity"]
    if block_size is None:
      block_size = defaults["block_size"]
    if scale_format is None:
      scale_format = defaults["scale_format"]
  if granularity not in GRANULARITIES:
    raise ValueError(
      f"granularity must be one of {GRANULARITIES}, got {granularity!r}"
    )
  if scale_format is None:
    scale_format = (
      defaults["scale_format"] if granularity == "block" else ("f32")
    )
  if scale_format not in SCALE_FORMATS:
    raise ValueError(
      f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}"
    )
  if granularity == "block":
    if block_size is None:
      block_size = defaults.get("block_size") or 256
    block_size = ops.validate_block_size(block_size)
  elif block_size is not None:
    raise ValueError(
      f"block_size needs granularity='block', got granularity={granularity!r}"
    )
  return granularity, block_size, scale_format
