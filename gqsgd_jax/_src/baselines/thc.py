"""THC (tensor homomorphic compression) as an optax transform.

Per chunk of the gradient, on every worker:

1. error feedback: x = g + e (e: this worker's memory, zero-padded size);
2. rotation: x~ = H D x, the randomized Hadamard transform with signs D
   shared by all workers and fixed across steps (as the authors' code);
3. global range: N = max over workers of ||x||_2 (one ``pmax`` for all
   chunks of the step), clipping threshold t = z N / sqrt(d') with z the
   standard-normal upper quantile of ``overflow_prob``;
4. codes c = SR(clip((x~ + t) / delta, 0, q - 1)), delta = 2t / (q - 1),
   with each worker's own dither;
5. homomorphic aggregation: ``psum`` of the integer codes in the smallest
   wire dtype whose sum cannot overflow (``wire_dtype``);
6. decode: x^ = H^-1 D^-1 (-t + delta * sum(c) / W), the padding dropped;
7. EF update: e = x - H^-1 D^-1 (-t + delta c), the local quantization and
   clipping error.

Implementation: since D is fixed, the memory is kept rotated, e~ = H D e, so
x~ = H D g + e~ and e~ <- x~ - (-t + delta c): two transforms per step (the
gradient's and the mean's), each a fast Walsh-Hadamard transform
(``hadamard``: a CPU kernel in two passes over memory, elsewhere a few
matrix products by small Hadamard blocks). The signs come from the kernels'
counter hash and the rounding bits from the quantize kernel (up to 128
levels; beyond, the same counter hash). The fused buffer is never built:
each chunk is assembled from its leaves' pieces, and the leaves from the
chunks' pieces, by in-place updates (XLA:CPU computes a concatenation with a
per-element choice of the operand, several times slower than a copy); the
memory is kept chunk by chunk, so its update is one elementwise pass per
chunk; the norms take one pass (a sum of squares) unless it overflows or
underflows. Each chunk is rotated and quantized prescaled by a power of two,
sigma = 2^-ceil(T/2) for a rotation of 2^T elements (the same codes, exact
scalings), so that finite gradients near float32's largest value neither
overflow in the rotation nor in the norm (||sigma H D x|| <= max|x|); a
finite estimate beyond float32's range saturates. A chunk whose prescaled
norm sigma N is below float32's smallest normal (N < 2^-126 / sigma, about
5e-35 at 2^23 elements) is treated as zero: sent as zeros, kept whole in
memory.

Layout. Leaves are flattened to float32 and, with ``granularity="fused"``
(default), concatenated into one buffer; ``"leaf"`` treats each leaf on its
own, as the authors do per tensor. A buffer is split into power-of-two
chunks (the Hadamard size): chunks of ``chunk_size`` (default 2^23, the
authors' 8 Mi cap), then the binary decomposition of the rest, padded with
zeros only to a multiple of ``MIN_CHUNK`` (or to the next power of two for
a buffer smaller than that). Padding is sent on the wire, so this keeps it
below MIN_CHUNK elements per buffer where "pad every tensor to 2^ceil(log2
d)" can double the traffic. Each chunk has its own norm N and grid.

Deviation from the spec: the threshold is capped, t = N min(z / sqrt(d'),
1). Since |x~_j| <= ||x|| <= N, a larger t can never clip anything and only
coarsens the grid (this matters for chunks with d' < z^2). With
``overflow_prob=0`` the cap is the threshold: clipping is impossible and the
estimate is unbiased.

The lookup-table (non-uniform) variant of THC is not implemented.
"""

from collections.abc import Sequence
import dataclasses
import math
from statistics import NormalDist
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
from gqsgd_jax._src import reference
from gqsgd_jax._src import transform
from gqsgd_jax._src import worker_state
from gqsgd_jax._src.baselines import common
from gqsgd_jax._src.baselines import hadamard
from gqsgd_jax._src.baselines.common import WireBytes

GRANULARITIES = ("fused", "leaf")
# Smallest chunk a large buffer is cut into (and the padding granule): small
# enough that padding costs < 4 KiB per buffer, large enough that a rotated
# chunk has many coordinates to spread its energy over.
MIN_CHUNK = 1024
MAX_LEVELS = 2**16
# float16 represents every integer up to 2^11 exactly, and every partial sum
# of non-negative integer codes is at most the total, so a float16 psum of
# codes is exact in any summation order while the total stays <= 2048.
_F16_EXACT = 2048
_F32_MAX = float(np.finfo(np.float32).max)


@worker_state.per_worker("error")
class ThcState(NamedTuple):
  """State of ``thc``: error-feedback memories and PRNG keys."""

  # Per worker (see worker_state_specs): per buffer, a tuple of one f32[d]
  # per chunk (``plan_chunks``), this worker's EF memory in the rotated
  # domain (H D e of the chunk); () without error feedback.
  error: tuple
  key: jax.Array  # uint32[2] dither key, split once per step; shared
  rotation_key: jax.Array  # uint32[2] Hadamard signs' key; shared, fixed


def wire_dtype(num_workers: int, levels: int = 16) -> np.dtype:
  """The dtype of the homomorphic ``psum``: sums reach W (q - 1).

  * uint8 while W (q - 1) <= 255 (W <= 17 workers at q = 16);
  * float16 carrying exact integers while W (q - 1) <= 2048 (W <= 136 at
    q = 16). Not uint16/int16: NCCL has no 16-bit integer reduction and
    XLA:GPU widens such all-reduces to 32 bits, so they would not save a
    byte; float16 sums are native and exact in this range;
  * int32 beyond, up to 2^31 - 1.

  Raises:
    ValueError: W (q - 1) does not fit int32.
  """
  top = num_workers * (levels - 1)
  if top <= 255:
    return np.dtype(np.uint8)
  if top <= _F16_EXACT:
    return np.dtype(np.float16)
  if top <= 2**31 - 1:
    return np.dtype(np.int32)
  raise ValueError(
    f"levels={levels} with {num_workers} workers: code sums "
    "would overflow int32"
  )


def clip_quantile(overflow_prob: float) -> float:
  """z with P(N(0,1) > z) = overflow_prob (inf for 0: no clipping)."""
  if overflow_prob == 0:
    return math.inf
  return -NormalDist().inv_cdf(overflow_prob)


def plan_chunks(n: int, chunk_size: int = 2**23) -> tuple[int, ...]:
  """Power-of-two chunk sizes covering n elements with little padding."""
  if n <= 0:
    return ()
  if n <= MIN_CHUNK:
    return (1 << (n - 1).bit_length(),)
  padded = -(-n // MIN_CHUNK) * MIN_CHUNK
  chunks = [chunk_size] * (padded // chunk_size)
  rest = padded % chunk_size
  size = chunk_size // 2
  while rest:
    if rest >= size:
      chunks.append(size)
      rest -= size
    size //= 2
  return tuple(chunks)


@dataclasses.dataclass(frozen=True)
class _Buffer:
  """Leaves (flat indices) concatenated into one buffer, and its chunks."""

  leaf_ids: tuple[int, ...]
  sizes: tuple[int, ...]
  chunks: tuple[int, ...]

  @property
  def size(self) -> int:
    return sum(self.sizes)

  @property
  def padded(self) -> int:
    return sum(self.chunks)


def _plan(
  sizes: Sequence[int], granularity: str, chunk_size: int
) -> list[_Buffer]:
  ids = [i for i, n in enumerate(sizes) if n]
  groups = [ids] if granularity == "fused" and ids else [[i] for i in ids]
  return [
    _Buffer(
      tuple(g),
      tuple(sizes[i] for i in g),
      plan_chunks(sum(sizes[i] for i in g), chunk_size),
    )
    for g in groups
  ]


def _leaf_sizes(tree: optax.Params) -> list[int]:
  return [
    int(np.prod(np.shape(x), dtype=np.int64)) for x in jax.tree.leaves(tree)
  ]


def wire_bytes(
  sizes: Sequence[int],
  num_workers: int,
  *,
  levels: int = 16,
  granularity: str = "fused",
  chunk_size: int = 2**23,
) -> WireBytes:
  """Analytic bytes per step and device of ``thc`` for leaves of ``sizes``.

  One ``psum`` of the padded codes in ``wire_dtype`` and one f32 ``pmax`` of
  the chunk norms, m bytes of results in all. A bandwidth-optimal (ring)
  all-reduce sends and receives 2 (W - 1) / W m per device: independent of
  W, unlike an all-gather.
  """
  plan = _plan([int(n) for n in sizes], granularity, chunk_size)
  itemsize = wire_dtype(num_workers, levels).itemsize
  result = sum(b.padded for b in plan) * itemsize + 4 * sum(
    len(b.chunks) for b in plan
  )
  ring = 2 * (num_workers - 1) / num_workers * result
  return WireBytes(sent=ring, received=ring, result=result)


def _robust_norm(x: jax.Array) -> jax.Array:
  """||x||_2 without overflow or underflow; +inf if x has NaN/Inf.

  The max-abs comes from ``nonfinite.max_abs``, which is +inf for a
  non-finite x whatever XLA's ``max`` does with NaN.
  """
  m = nonfinite.max_abs(x)
  safe = jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)
  n = m * jnp.sqrt(jnp.sum(jnp.square(x / safe)))
  n = jnp.where(m == 0, 0.0, n)
  return jnp.where(jnp.isfinite(m) & jnp.isfinite(n), n, jnp.inf)


# Below this sum of squares, squares of small elements may have underflowed
# (each lost term < 2^-126, at most 2^30 of them): ``_robust_norm`` then.
_SUMSQ_MIN = 2.0**-70


def _norm(x: jax.Array) -> jax.Array:
  """||x||_2 (as ``_robust_norm``) in one pass in the common case.

  The plain sum of squares is exact up to rounding when it is finite and
  not tiny; otherwise (NaN/Inf, overflow, underflow) the robust two-pass
  norm runs instead.
  """
  s = jnp.sum(jnp.square(x))
  fast = jnp.isfinite(s) & (s >= _SUMSQ_MIN)
  return jax.lax.cond(fast, lambda: jnp.sqrt(s), lambda: _robust_norm(x))


def _stochastic_round(y: jax.Array, seed: jax.Array, levels: int) -> jax.Array:
  """SR of y in [0, levels - 1] to integer codes: up iff 24 random bits <
  floor(frac * 2^24), the kernels' StochasticRound rule (the up-probability
  is frac rounded down to 2^-24, never above frac).

  Up to 128 levels the quantize kernel rounds (int8 codes, its counter-hash
  bits); beyond, its pure-jnp twin on the same counter hash
  (``reference.stochastic_round`` of ``reference.random_bits``, int32
  codes). The kernel, though a custom call that reads y written out in
  full, is the faster: XLA:CPU computes the twin's hash about twice as
  slowly, and once more in every fusion that reads the codes.
  """
  if levels - 1 <= 127:
    return ops.quantize(
      y, jnp.float32(1), seed, levels=levels - 1, bits=8, signed_codes=True
    )
  bits = reference.random_bits(seed, y.size).reshape(y.shape)
  return reference.stochastic_round(y, jnp.float32(1), levels - 1, bits)


def _signs_seed(rotation_key: jax.Array, buffer: int, chunk: int) -> jax.Array:
  """The counter-hash seed of the signs of chunk ``chunk`` of ``buffer``."""
  return ops.seed_from_key(prng.fold(rotation_key, buffer, chunk))


def chunk_signs(
  rotation_key: jax.Array, buffer: int, chunk: int, d: int
) -> jax.Array:
  """The Hadamard signs D of chunk ``chunk`` of buffer ``buffer`` (f32[d]).

  Shared by all workers and fixed across steps; recomputed each step by
  the kernels' counter hash (cheap) rather than kept in the state.
  """
  return hadamard.counter_signs(_signs_seed(rotation_key, buffer, chunk), d)


@dataclasses.dataclass(frozen=True)
class _Step:
  """Static settings of one step's chunk reductions."""

  levels: int
  z: float
  block_log2: int | None
  wire: np.dtype
  axis_name: collectives.AxisName
  num_workers: int


def _block(d: int, cfg: _Step) -> int | None:
  """The rotation's block_log2 for a chunk of d elements (None: whole)."""
  block = cfg.block_log2
  return None if block is not None and (1 << block) >= d else block


def _prescale(d: int, cfg: _Step) -> float:
  """sigma = 2^-ceil(T/2) for a rotation of 2^T elements (the chunk or its
  blocks): a chunk is rotated and quantized as sigma x, a power of two, so
  the same codes (up to the transforms' rounding) with no overflow where x
  is finite: ||sigma H D x|| <= sigma 2^(T/2) max|x| <= max|x|."""
  block = _block(d, cfg)
  size = d if block is None else 1 << block
  return 2.0 ** -((size.bit_length()) // 2)


def _threshold(norm: jax.Array, d: int, cfg: _Step) -> jax.Array:
  """The clipping threshold t of a chunk of d elements (capped at N)."""
  return norm * np.float32(min(cfg.z / math.sqrt(d), 1.0))


def _chunk_mean(
  rotated: jax.Array,
  norm: jax.Array,
  seed: jax.Array,
  cfg: _Step,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Steps 3-6 for one rotated chunk: (H of the sum of the codes, still to be
  decoded by ``_decode`` and multiplied by the signs D; this worker's
  dequantized contribution -t + delta c in the rotated domain; whether the
  chunk was quantized).

  ``rotated`` and ``norm`` are prescaled by ``_prescale`` (N is already
  the max over workers), and so are the results.
  """
  d = rotated.shape[0]
  ok = jnp.isfinite(norm) & (norm >= common.TINY)
  t = _threshold(norm, d, cfg)
  delta = t * np.float32(2 / (cfg.levels - 1))
  inv_delta = jnp.where(ok, (cfg.levels - 1) / (2 * t), 0.0)
  y = jnp.clip((rotated + t) * inv_delta, 0.0, cfg.levels - 1)
  y = jnp.where(ok, y, 0.0)  # NaN/Inf chunks: send anything finite
  codes = _stochastic_round(y, seed, cfg.levels)
  if codes.dtype == jnp.int8 and cfg.wire == np.uint8:
    wire = jax.lax.bitcast_convert_type(codes, jnp.uint8)  # codes >= 0
  else:
    wire = codes.astype(cfg.wire)
  total = jax.lax.psum(wire, cfg.axis_name)
  # The mean is t (c sum(c) - 1) with c = 2 / ((q - 1) W), so its transform
  # is t (c H sum(c) - H 1), H 1 = sqrt(size) e_0 per rotated block: the
  # decoding moves past the transform (whose passes are products: nothing
  # fuses into them) into the pass that writes the estimate out. t stays a
  # factor outside, so nothing inside overflows where t does not.
  unsigned = hadamard.transform_blocks(
    total.astype(jnp.float32), _block(d, cfg)
  )
  local = codes.astype(jnp.float32) * delta - t
  return unsigned, local, ok


def _decode(
  unsigned: jax.Array, t: jax.Array, pos: int, d: int, cfg: _Step
) -> jax.Array:
  """Elements pos .. pos + len(unsigned) - 1 of H(mean) from those of
  H(sum(c)) (see ``_chunk_mean``), prescaled as they are."""
  block = _block(d, cfg)
  size = d if block is None else 1 << block
  first = (jax.lax.iota(jnp.int32, unsigned.shape[0]) + pos) & (size - 1) == 0
  c = np.float32(2 / ((cfg.levels - 1) * cfg.num_workers))
  return t * (unsigned * c - jnp.where(first, np.float32(math.sqrt(size)), 0))


def _new_error(
  local: jax.Array,
  x: jax.Array,
  old: jax.Array,
  norm: jax.Array,
  finite: jax.Array,
  inv_scale: float,
) -> jax.Array:
  """The EF memory after a step (step 7): x - local (``_prescale``d, and
  scaled back by ``inv_scale``), guarded for degenerate chunks.

  Sub-tiny chunks stay whole in memory. A non-finite step (``finite``
  false: some chunk of the buffer has a NaN/Inf norm) leaves the memory as
  it was, so one bad batch (e.g. skipped by ``apply_if_finite``) does not
  poison every later step.
  """
  ok = norm >= common.TINY  # norm is finite where finite holds
  new = jnp.where(ok, x - local, x) * np.float32(inv_scale)
  return jnp.where(finite, new, old)


def _segments(
  buf: _Buffer, off: int, d: int
) -> list[tuple[int, int, int, int]]:
  """The leaves in elements off .. off + d - 1 of ``buf``: (leaf index,
  start in the leaf, start in the chunk, length) for each (none for the
  padding)."""
  out = []
  start = 0
  for i, n in zip(buf.leaf_ids, buf.sizes):
    lo, hi = max(start, off), min(start + n, off + d)
    if lo < hi:
      out.append((i, lo - start, lo - off, hi - lo))
    start += n
  return out


def _validate(
  levels: object,
  overflow_prob: object,
  block_log2: object,
  granularity: str,
  chunk_size: object,
) -> None:
  if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
    raise TypeError(f"levels must be an int, got {levels!r}")
  if not 2 <= levels <= MAX_LEVELS:
    raise ValueError(f"levels must be in [2, {MAX_LEVELS}], got {levels}")
  if (
    isinstance(overflow_prob, bool)
    or not isinstance(overflow_prob, (int, float, np.floating))
    or not (0 <= overflow_prob < 0.5)
  ):
    raise ValueError(
      f"overflow_prob must be a float in [0, 0.5), got {overflow_prob!r}"
    )
  if (
    isinstance(chunk_size, bool)
    or not isinstance(chunk_size, (int, np.integer))
    or chunk_size < MIN_CHUNK
    or (chunk_size & (chunk_size - 1))
  ):
    raise ValueError(
      f"chunk_size must be a power of two >= {MIN_CHUNK}, got {chunk_size!r}"
    )
  if block_log2 is not None and (
    isinstance(block_log2, bool)
    or not isinstance(block_log2, (int, np.integer))
    or not 1 <= block_log2 <= 30
  ):
    raise ValueError(
      f"block_log2 must be None or an int in [1, 30], got {block_log2!r}"
    )
  if granularity not in GRANULARITIES:
    raise ValueError(
      f"granularity must be one of {GRANULARITIES}, got {granularity!r}"
    )


def thc(
  *,
  axis_name: collectives.AxisName = "data",
  levels: int = 16,
  overflow_prob: float = 1e-4,
  error_feedback: bool = True,
  block_log2: int | None = None,
  granularity: str = "fused",
  chunk_size: int = 2**23,
  key: jax.typing.ArrayLike = 0,
) -> optax.GradientTransformation:
  """THC: rotate, clip, quantize on a shared grid, sum the integer codes.

  Use inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name`` on local
  gradients; every worker receives the same estimate of the mean.

  The error memories in the state differ per worker: create the state inside
  the map and pass it with ``gqsgd_jax.worker_state_specs`` under
  ``shard_map`` (memories sharded over ``axis_name``, keys replicated), or
  mapped over the devices under ``pmap``.

  Args:
    axis_name: the data-parallel mesh axis.
    levels: q, the number of quantization levels (default 16: 4-bit codes).
    overflow_prob: per-coordinate clipping probability p for Gaussian
      rotated coordinates; t = z_(1-p) N / sqrt(d'). 0 disables clipping
      (t = N, unbiased).
    error_feedback: keep the local quantization and clipping error and add
      it to the next step's gradient (the authors' default).
    block_log2: None for the full rotation of each chunk; T for the partial
      rotation on blocks of 2^T elements.
    granularity: "fused" (all leaves in one buffer) or "leaf".
    chunk_size: largest Hadamard size, a power of two (default 2^23).
    key: int seed or PRNG key. The same on every worker: the rotation is
      drawn from it as is, the dither after folding in the worker index.

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``ThcState``.

  Raises:
    ValueError/TypeError: a bad argument (named in the message); at update
      time, an unbound ``axis_name``, a gradient tree that does not match
      the state's memories, or a non-float leaf.
  """
  _validate(levels, overflow_prob, block_log2, granularity, chunk_size)
  z = clip_quantile(float(overflow_prob))
  init_key = prng.canonical_key(key)
  dither_key, rotation_key = jax.random.split(init_key)

  def init_fn(params: optax.Params | None) -> ThcState:
    if not error_feedback:
      return ThcState(error=(), key=dither_key, rotation_key=rotation_key)
    if params is None:
      raise ValueError(
        "thc(error_feedback=True).init needs params (the "
        "error memories take their shapes)"
      )
    plan = _plan(_leaf_sizes(params), granularity, chunk_size)
    error = tuple(
      tuple(jnp.zeros(d, jnp.float32) for d in b.chunks) for b in plan
    )
    # Typed as varying when init runs inside shard_map (the memories differ
    # per worker), so a lax.scan carry keeps one type across steps; the
    # identity where the axis is not bound (``jax.pmap(tx.init)``).
    error = collectives.varying(error, axis_name)
    return ThcState(error=error, key=dither_key, rotation_key=rotation_key)

  def update_fn(
    updates: optax.Updates, state: ThcState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, ThcState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    dtype = wire_dtype(num_workers, levels)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_leaf_dtypes(leaves, [p for p, _ in paths_leaves])
    plan = _plan([x.size for x in leaves], granularity, chunk_size)
    if error_feedback:
      want = tuple(b.chunks for b in plan)
      got = tuple(
        tuple(np.shape(c)[0] for c in e) if isinstance(e, tuple) else None
        for e in state.error
      )
      if want != got:
        raise ValueError(
          f"state.error holds chunks of sizes {got}, the updates need "
          f"{want}: init the state with params of the updates' shapes"
        )
    next_key, step_key = jax.random.split(state.key)

    cfg = _Step(
      levels=levels,
      z=z,
      block_log2=block_log2,
      wire=dtype,
      axis_name=axis_name,
      num_workers=num_workers,
    )
    chunks = [
      (b, c, off, d)
      for b, buf in enumerate(plan)
      for c, (off, d) in enumerate(
        zip(np.cumsum((0,) + buf.chunks[:-1]), buf.chunks)
      )
    ]
    flat_leaves = [x.reshape(-1) for x in leaves]
    # The kernels' seeds of every chunk at once (batched threefry: a few
    # ops per step, not a few per chunk): the shared signs' ...
    ids = (
      np.asarray([b for b, _, _, _ in chunks], np.int32),
      np.asarray([c for _, c, _, _ in chunks], np.int32),
    )
    seeds = jax.vmap(lambda b, c: _signs_seed(state.rotation_key, b, c))(*ids)
    # ... and each worker's own dither.
    dither = jax.vmap(
      lambda b, c: ops.seed_from_key(prng.worker_key(step_key, axis_name, b, c))
    )(*ids)
    # Step 2, with the memory kept in the rotated domain: the rotation is
    # fixed across steps, so H D (g + e) = H D g + e~ and the residual
    # needs no transform back (two transforms per step, not three).
    rotated = []
    for (b, c, off, d), seed in zip(chunks, seeds):
      sigma = np.float32(_prescale(d, cfg))
      # sigma D x, assembled from the leaves' pieces in place: the buffer of
      # concatenated leaves is never built (XLA's concatenation branches
      # per element), and the transform (a kernel or a matrix product)
      # reads it as it is. (XLA:CPU copies the buffer once before the last
      # in-place write, which the transform reads as its operand; one
      # elementwise pass of the signs over the whole chunk instead measured
      # slower, the hash and the choice of the piece per element.)
      pieces = [
        (
          pos,
          flat_leaves[i][lo : lo + n].astype(jnp.float32)
          * (hadamard.counter_signs(seed, n, start=pos) * sigma),
        )
        for i, lo, pos, n in _segments(plan[b], off, d)
      ]
      x = bucketing.place(pieces, d, jnp.float32)
      r = hadamard.transform_blocks(x, _block(d, cfg))
      if error_feedback:
        r = r + state.error[b][c] * sigma
      rotated.append(r)
    # One pmax for the norms of every chunk (||x~|| = ||x||: orthonormal).
    norms = (
      jax.lax.pmax(jnp.stack([_norm(r) for r in rotated]), axis_name)
      if chunks
      else jnp.zeros((0,))
    )
    # A non-finite chunk makes its whole buffer NaN (as a bucket of
    # global_quantize): no finite number comes out of a step that saw
    # NaN/Inf in any chunk of that buffer on any worker; and it leaves that
    # buffer's memory as it was.
    finite = [
      jnp.all(
        jnp.isfinite(
          norms[np.asarray([j for j, ch in enumerate(chunks) if ch[0] == b])]
        )
      )
      for b in range(len(plan))
    ]

    # Per leaf: (position in the leaf, values) pieces of the estimate.
    leaf_pieces: list[list] = [[] for _ in leaves]
    # One memory per chunk: each new one is a single elementwise pass (in
    # place where the state is donated). A memory per buffer took in-place
    # updates of its chunks, and without donation XLA:CPU copied the whole
    # buffer before them and again before the last one.
    new_error = [list(e) for e in state.error]
    for j, (b, c, off, d) in enumerate(chunks):
      unsigned, local, ok = _chunk_mean(
        rotated[j],
        norms[j],
        dither[j],
        cfg,
      )
      inv_sigma = 1 / _prescale(d, cfg)
      for i, lo, pos, n in _segments(plan[b], off, d):
        # x^ = D H(mean): the signs of this piece, the prescaling undone (a
        # finite estimate beyond float32 saturates); zero or sub-tiny chunks
        # decode to exact (+) zeros, a buffer with a NaN/Inf chunk to NaN.
        value = _decode(
          unsigned[pos : pos + n], _threshold(norms[j], d, cfg), pos, d, cfg
        ) * (
          hadamard.counter_signs(seeds[j], n, start=pos) * np.float32(inv_sigma)
        )
        value = jnp.clip(value, -_F32_MAX, _F32_MAX)
        value = jnp.where(
          finite[b] & ok, value, jnp.where(finite[b], 0.0, jnp.nan)
        )
        # The estimate may exceed a 16-bit leaf's range where the inputs
        # were near it: saturate rather than turn a finite step into inf.
        leaf_pieces[i].append(
          (lo, bucketing.cast_saturating(value, leaves[i].dtype))
        )
      if error_feedback:
        new_error[b][c] = _new_error(
          local, rotated[j], state.error[b][c], norms[j], finite[b], inv_sigma
        )

    out_leaves = [
      bucketing.place(p, x.size, x.dtype).reshape(x.shape)
      for p, x in zip(leaf_pieces, leaves)
    ]
    return (
      jax.tree_util.tree_unflatten(treedef, out_leaves),
      ThcState(
        error=tuple(tuple(e) for e in new_error),
        key=next_key,
        rotation_key=state.rotation_key,
      ),
    )

  return transform.transformation(init_fn, update_fn)
