"""Global-QSGD as an optax transform: quantize on one global grid, sum integers.

Every worker scales its gradient bucket by the same global max-abs M (one
``pmax`` for all buckets of a step), rounds stochastically with its own
random stream, and the integer codes are reduced without decompression:

* ``reduction="psum"``: a native integer all-reduce. bits=8 uses int8 codes
  with s = floor(127 / W) levels per worker; fewer bits use offset-binary
  lanes packed into uint8/uint32 words with s = floor((2^bits - 1) / (2W)),
  so neither the int8 sum nor any lane sum can overflow (spec §1.4, §2).
* ``reduction="butterfly"``: recursive halving/doubling over ``ppermute``,
  each step re-quantizing the weighted average SR((n_a a + n_b b)/(n_a+n_b))
  (spec §2.3), so codes keep the full 2^(bits-1) - 1 levels for any W.
* ``reduction="auto"``: psum while it leaves every worker at least
  ``AUTO_MIN_PSUM_LEVELS`` levels, the butterfly beyond (see README).

``dithering="exponential"`` (spec §3) encodes sign + exponent bytes scaled by
2^(D+1) M (D = butterfly depth, headroom that makes overflow impossible) and
reduces them with the pairwise stochastic reduce along the butterfly.

The result is the unbiased estimate of the workers' mean gradient,
bit-identical on every worker, in each leaf's dtype.
"""

import functools
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
from gqsgd_jax._src import wire

REDUCTIONS = ("auto", "psum", "butterfly")
DITHERINGS = ("standard", "exponential")
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
          f"and the integer psum at most {psum_limit}")
  if chosen == "psum" and psum_levels < 1:
    raise ValueError(
        f"reduction='psum' with bits={bits} cannot serve {num_workers} "
        f"workers (at most {psum_limit}: the integer sum would overflow); "
        "use reduction='butterfly' or more bits")
  if chosen == "butterfly" and num_workers > MAX_BUTTERFLY_WORKERS:
    raise ValueError(
        f"reduction='butterfly' with bits={bits} supports at most "
        f"{MAX_BUTTERFLY_WORKERS} workers (the weighted averages' integer "
        f"math), got {num_workers}")
  return chosen


def _seed(key, *data) -> jax.Array:
  return ops.seed_from_key(prng.fold(key, *data))


def _psum_mean(flat, global_max, seed, *, bits, axis_name, num_workers, impl):
  signed = bits == 8
  levels = wire.psum_levels(bits, num_workers, signed)
  ok = jnp.isfinite(global_max) & (global_max >= _TINY)
  scale = jnp.where(ok, levels / global_max, 0.0)
  codes = ops.quantize(flat, scale, seed, levels=levels, bits=bits,
                       signed_codes=signed, impl=impl)
  total = jax.lax.psum(codes, axis_name)
  inv = jnp.where(ok, global_max / (levels * num_workers), 0.0)
  inv = jnp.where(jnp.isfinite(global_max), inv, jnp.nan)
  offset = 0 if signed else levels * num_workers
  return ops.dequantize(total, inv, n=flat.shape[0], bits=bits, offset=offset,
                        signed_codes=signed, impl=impl)


def _butterfly_mean(flat, global_max, seed, node_key, *, bits, axis_name,
                    num_workers, impl):
  levels = wire.max_levels(bits)
  ok = jnp.isfinite(global_max) & (global_max >= _TINY)
  scale = jnp.where(ok, levels / global_max, 0.0)
  codes = ops.quantize(flat, scale, seed, levels=levels, bits=bits, impl=impl)
  worker = jax.lax.axis_index(axis_name)

  def combine(mine, theirs, n_mine, n_theirs, stage):
    return ops.average(mine, theirs, n_mine, n_theirs,
                       _seed(node_key, stage, worker), bits=bits, impl=impl)

  root = collectives.butterfly_allreduce(codes, combine, axis_name=axis_name,
                                         num_workers=num_workers)
  inv = jnp.where(ok, global_max / levels, 0.0)
  inv = jnp.where(jnp.isfinite(global_max), inv, jnp.nan)
  return ops.dequantize(root, inv, n=flat.shape[0], bits=bits, offset=levels,
                        impl=impl)


def _exponential_mean(flat, global_max, seed, node_key, *, floor_code,
                      axis_name, num_workers, impl):
  # S = 2^(D+1) M: each worker's |v| <= 2^-(D+1) (code >= D+1), and each of
  # the D tree levels doubles a magnitude at most once, so the root code is
  # >= 1: no overflow for any W (the reference's 2WM only covers powers of
  # two with a tree, B-GQ-3).
  depth = collectives.tree_depth(num_workers)
  headroom = float(2**(depth + 1))
  in_range = jnp.isfinite(global_max) & (global_max <= _EXP_HUGE)
  ok = in_range & (global_max >= _TINY)
  scale = jnp.where(ok, 1.0 / (headroom * global_max), 0.0)
  codes = ops.exp_encode(flat, scale, seed, floor_code=floor_code, impl=impl)
  worker = jax.lax.axis_index(axis_name)

  def combine(mine, theirs, n_mine, n_theirs, stage):
    del n_mine, n_theirs  # the reduce sums; the mean comes from S / W
    return ops.exp_reduce(mine, theirs, _seed(node_key, stage, worker),
                          impl=impl)

  root = collectives.butterfly_allreduce(codes, combine, axis_name=axis_name,
                                         num_workers=num_workers)
  dec = jnp.where(ok, headroom * global_max / num_workers, 0.0)
  dec = jnp.where(in_range, dec, jnp.nan)
  return ops.exp_decode(root, dec, impl=impl)


def global_quantize(
    bits: int = 4,
    *,
    axis_name="data",
    reduction: str = "auto",
    dithering: str = "standard",
    granularity: str = "bucket",
    bucket_bytes: int = 25 * 2**20,
    key=0,
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
    granularity: scale per "bucket" (default), per "leaf", or one "global"
      scale for the whole model.
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
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got "
                     f"{reduction!r}")
  if dithering not in DITHERINGS:
    raise ValueError(f"dithering must be one of {DITHERINGS}, got "
                     f"{dithering!r}")
  if dithering == "exponential":
    if bits != 8:
      raise ValueError("dithering='exponential' sends sign + 7-bit exponent "
                       f"bytes and needs bits=8, got bits={bits}")
    if reduction == "psum":
      raise ValueError("dithering='exponential' needs a custom reduction: "
                       "use reduction='butterfly' or 'auto'")
  if not 1 <= floor_code <= 127:
    raise ValueError(f"floor_code must be in [1, 127], got {floor_code}")
  bucketing.validate_granularity(granularity)
  bucket_bytes = bucketing.validate_bucket_bytes(bucket_bytes)
  ops.validate_impl(impl)
  init_key = prng.canonical_key(key)

  def init_fn(params):
    del params
    return GlobalQuantizeState(key=init_key)

  def update_fn(updates, state, params=None):
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
    buckets = bucketing.plan_buckets(leaves, bucket_bytes=bucket_bytes,
                                     per_leaf=granularity == "leaf")
    next_key, step_key = jax.random.split(state.key)
    if not buckets:  # only empty leaves
      empty = [jnp.zeros(x.shape, x.dtype) for x in leaves]
      return (jax.tree_util.tree_unflatten(treedef, empty),
              GlobalQuantizeState(key=next_key))

    flats = [bucketing.flatten_bucket(b, leaves) for b in buckets]
    # One pmax for all bucket maxima of the step.
    local_max = jnp.stack([nonfinite.max_abs(f) for f in flats])
    global_max = jax.lax.pmax(local_max, axis_name)
    if granularity == "global":
      global_max = jnp.broadcast_to(jnp.max(global_max), global_max.shape)

    worker = jax.lax.axis_index(axis_name)
    common = dict(axis_name=axis_name, num_workers=num_workers, impl=impl)
    if strategy == "psum":
      reduce_fn = functools.partial(_psum_mean, bits=bits, **common)
    elif strategy == "butterfly":
      reduce_fn = functools.partial(_butterfly_mean, bits=bits, **common)
    else:
      reduce_fn = functools.partial(_exponential_mean, floor_code=floor_code,
                                    **common)
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
    return (jax.tree_util.tree_unflatten(treedef, out),
            GlobalQuantizeState(key=next_key))

  return optax.GradientTransformation(init_fn, update_fn)
