"""JointSQ: joint sparsification and mixed-precision quantization.

Per compressed tensor with n elements and bit budget B = ceil(32 ρ n), every
element gets 0, 2, 4 or 8 bits. The choice is a multiple-choice knapsack
solved greedily: element j offers three incremental items (0→2, 2→4, 4→8
bits, weights 2, 2, 4) whose profit per bit under the error model
err(b) = x² 4^-b is c_t (x_j / max|x|)². The items are **sorted by profit**
and the longest prefix whose weights fit in B is taken (the reference cuts
in index order and starves high indices, B-JSQ-3). Profits of one element
decrease with the item type, so a prefix always takes an element's items in
order and its bit width is the number of its items taken.

Each class b ∈ {8, 4, 2} is quantized on its own grid: signed codes with
s_b = 2^(b-1) - 1 levels (127, 7, 1) of the class's max-abs norm, stochastic
rounding; an empty or all-zero class has norm 0 and decodes to 0 (B-JSQ-6).
The residual stays in the error-feedback memory.

Wire format of one tensor (bytes, per worker and step; ``JointSQLayout``):

* header, 24 B: the class norms f32[3] and counts int32[3] (k8, k4, k2).
* index, chosen at trace time as the cheapest for (n, B):
  - ``"positions"``: C = min(n, floor(B/2)) slots of uint16 (n <= 2^16) or
    int32, grouped by class (8, 4, 2) and ascending within a class, so the
    counts give every slot's class: 2C or 4C bytes.
  - ``"bitmap"``: 1 bit per element, then a 2-bit class per selected
    element in index order: ceil(n/8) + ceil(C/4) bytes.
  - ``"classmap"``: a 2-bit class per element (0 = not sent):
    ceil(n/4) bytes.
  Positions win for ρ below ~1/224, the bitmap up to ρ = 1/32, the class
  map above (the default ρ = 0.032 sits just above).
* codes: offset-binary codes from ``ops.quantize``, the 8-bit class bytes,
  then the 4-bit class (two per byte, from byte k8), then the 2-bit class
  (four per byte, from byte k8 + ceil(k4/2)); each class in index order.
  8 k8 + 4 k4 + 2 k2 <= B, so min(floor((B + 10)/8), n) bytes always hold
  the codes and the alignment padding.

The payloads of all compressed tensors travel in one ``all_gather`` of
uint8; every worker decodes all W payloads and averages them in worker
order, so the result is bit-identical everywhere. Other tensors (biases,
norms, small layers) are averaged exactly by one ``psum``.
"""

from collections.abc import Callable
import dataclasses
from fractions import Fraction
import functools
import math
from typing import Any, cast, NamedTuple, TypedDict, Unpack

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gqsgd_jax._src import bucketing
from gqsgd_jax._src import collectives
from gqsgd_jax._src import ffi as ffi_lib
from gqsgd_jax._src import ops
from gqsgd_jax._src import prng
from gqsgd_jax._src import reference
from gqsgd_jax._src import transform
from gqsgd_jax._src import worker_state
from gqsgd_jax._src.baselines import common

SELECTIONS = ("exact", "sampled")

# Which leaves to compress: None (the default rule), "reference" or a
# callable leaf -> bool (see compression_predicate).
Predicate = Callable[[jax.Array], bool] | str | None
# A pytree of JointSQLayout | None matching the params (see
# jointsq_layouts).
LayoutTree = Any
INDEX_FORMATS = ("auto", "positions", "bitmap", "classmap")
HEADER_BYTES = 24  # norms f32[3] + counts int32[3]
# Class c (= items taken by an element) -> bits; classes go on the wire in
# the order 8, 4, 2 so that the first two code regions are byte-aligned.
CLASS_BITS = (0, 2, 4, 8)
_WIRE_CLASSES = (3, 2, 1)
# Incremental profit per bit of the 0->2, 2->4 and 4->8 bit items under
# err(b) = x^2 4^-b (the reference's third constant has a typo).
PROFIT_DENSITY = (
  (1 - 4.0**-2) / 2,
  (4.0**-2 - 4.0**-4) / 2,
  (4.0**-4 - 4.0**-8) / 4,
)
ITEM_WEIGHT = (2, 2, 4)
# Bit packing of the maps (element 0 in the high lane), shared with the
# kernels' reference; any width that divides 8 works, 1 and 2 here.
_pack = reference.pack
_unpack = reference.unpack


def levels(bits: int) -> int:
  """Signed levels s_b = 2^(b-1) - 1 of a b-bit class (ternary at b=2)."""
  return 2 ** (bits - 1) - 1


def budget_bits(numel: int, compression_ratio: float) -> int:
  """B = ceil(32 ρ n), from the decimal value of ρ (0.032 n stays exact)."""
  return math.ceil(32 * Fraction(repr(float(compression_ratio))) * numel)


@dataclasses.dataclass(frozen=True)
class JointSQLayout:
  """Static wire layout of one compressed tensor (per worker and step)."""

  numel: int
  budget_bits: int
  index_format: str  # "positions", "bitmap" or "classmap"

  @property
  def item_capacity(self) -> int:
    """Items that can fit: each weighs at least 2 bits."""
    return min(3 * self.numel, self.budget_bits // 2)

  @property
  def capacity(self) -> int:
    """Elements that can be selected."""
    return min(self.numel, self.budget_bits // 2)

  @property
  def position_bytes(self) -> int:
    return 2 if self.numel <= 2**16 else 4

  def region_capacity(self, bits: int) -> int:
    """Elements a b-bit class can hold within the budget."""
    return min(self.numel, self.budget_bits // bits)

  @property
  def stream_bytes(self) -> int:
    return min((self.budget_bits + 10) // 8, self.numel)

  @property
  def index_bytes(self) -> int:
    return _index_bytes(self.index_format, self.numel, self.capacity)

  @property
  def payload_bytes(self) -> int:
    return HEADER_BYTES + self.index_bytes + self.stream_bytes

  def bits(self, counts: jax.typing.ArrayLike) -> dict[str, int]:
    """Bits of one payload given its counts (k8, k4, k2).

    ``code_bits`` (<= budget_bits) excludes index and header;
    ``with_index_bits`` adds the index a variable-length message would need
    (used positions only) and the header; ``payload_bits`` is what the
    fixed-capacity payload puts on the wire.
    """
    k8, k4, k2 = (int(c) for c in np.asarray(counts).reshape(3))
    code = 8 * k8 + 4 * k4 + 2 * k2
    if self.index_format == "positions":
      index = 8 * self.position_bytes * (k8 + k4 + k2)
    else:
      index = 8 * self.index_bytes
    return dict(
      budget_bits=self.budget_bits,
      code_bits=code,
      with_index_bits=code + index + 8 * HEADER_BYTES,
      payload_bits=8 * self.payload_bytes,
    )


def _index_bytes(index_format: str, numel: int, capacity: int) -> int:
  if index_format == "positions":
    return capacity * (2 if numel <= 2**16 else 4)
  if index_format == "bitmap":
    return -(-numel // 8) + -(-capacity // 4)
  return -(-numel // 4)


def make_layout(
  numel: int, compression_ratio: float, index_format: str = "auto"
) -> JointSQLayout:
  b = budget_bits(numel, compression_ratio)
  if index_format == "auto":
    cap = min(numel, b // 2)
    index_format = min(
      ("positions", "bitmap", "classmap"),
      key=lambda f: _index_bytes(f, numel, cap),
    )
  return JointSQLayout(numel, b, index_format)


def compression_predicate(
  predicate: Predicate, min_size: int
) -> Callable[[jax.Array], bool]:
  """Which leaves a sparsifier compresses: a callable leaf -> bool.

  None: ndim >= 2 and size >= min_size; "reference": conv kernels only
  (ndim == 4), as the JointSQ/DGC reference hooks. Empty leaves never.
  """
  rule: Callable[[jax.Array], bool]
  if predicate is None:
    rule = lambda x: x.ndim >= 2 and x.size >= min_size
  elif isinstance(predicate, str):
    if predicate != "reference":
      raise ValueError(
        "predicate must be None, 'reference' or a callable "
        f"leaf -> bool, got {predicate!r}"
      )
    rule = lambda x: x.ndim == 4
  elif callable(predicate):
    rule = predicate
  else:
    raise TypeError(
      "predicate must be None, 'reference' or a callable "
      f"leaf -> bool, got {predicate!r}"
    )
  return lambda x: np.size(x) > 0 and bool(rule(x))


def validate_size(value: object, name: str) -> int:
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or (value < 1)
  ):
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def validate_fraction(value: object, name: str) -> float:
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, float, np.integer, np.floating))
    or not 0 < value <= 1
  ):
    raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
  return float(value)


# --------------------------------------------------------------------------
# Selection: the MCKP greedy.


def _squares(v: jax.Array) -> jax.Array:
  """f32[n] (v / max|v|)^2, 0 for zero or non-finite elements: item t of
  element j has profit PROFIT_DENSITY[t] * squares[j]."""
  v = jnp.where(jnp.isfinite(v), v.astype(jnp.float32), 0.0)
  m = jnp.max(jnp.abs(v))
  a = jnp.where(m > 0, v / jnp.where(m > 0, m, 1.0), 0.0)
  return a * a


def item_profits(v: jax.Array) -> jax.Array:
  """f32[3n] profit densities, type-major (all 0->2 items, then 2->4, ...).

  Normalised by max|v| so that tiny gradients do not underflow to 0; zero
  or non-finite elements get profit 0 and are never selected.
  """
  dens = jnp.asarray(PROFIT_DENSITY, jnp.float32)
  return (dens[:, None] * _squares(v)[None, :]).reshape(-1)


# (threshold, rounds, count) of sampled_top's loop.
_Carry = tuple[jax.Array, jax.Array, jax.Array]


def sampled_top(
  scores: jax.Array,
  capacity: int,
  key: jax.Array,
  *,
  sample_ratio: float,
  rounds: int = 10,
) -> tuple[jax.Array, jax.Array]:
  """Up to ``capacity`` largest positive scores by a sampled threshold (§9.3).

  The threshold τ is the capacity-quantile of a random sample (with
  replacement); while fewer than 0.8 capacity scores pass, τ ← 0.8 τ (at
  most ``rounds`` times). If more than ``capacity`` pass, the exact top-k
  is taken (the reference keeps the first ones by position instead). The
  candidates are {score >= τ, score > 0}: a prefix of the exact order.

  Returns:
    (scores f32[capacity], indices int32[capacity]) sorted by score
    descending, ties by index; unused slots have score -1, index 0.
  """
  total = scores.shape[0]
  ns = max(1, math.ceil(total * sample_ratio))
  ks = min(ns, max(1, math.ceil(ns * capacity / total)))
  sample = scores[jax.random.randint(key, (ns,), 0, total)]
  tau0 = jax.lax.top_k(sample, ks)[0][-1]

  def count(tau: jax.Array) -> jax.Array:
    return jnp.sum((scores >= tau) & (scores > 0), dtype=jnp.int32)

  def adapt(c: _Carry) -> _Carry:
    tau, r, _ = c
    return 0.8 * tau, r + 1, count(0.8 * tau)

  def too_few(c: _Carry) -> jax.Array:
    tau, r, n = c
    return (r < rounds) & (n < 0.8 * capacity) & (tau > 0)

  tau, _, passed = jax.lax.while_loop(
    too_few, adapt, (tau0, jnp.int32(0), count(tau0))
  )

  def compact() -> tuple[jax.Array, jax.Array]:
    mask = (scores >= tau) & (scores > 0)
    slot = jnp.where(mask, jnp.cumsum(mask) - 1, capacity)
    idx = (
      jnp.zeros(capacity, jnp.int32)
      .at[slot]
      .set(jnp.arange(total, dtype=jnp.int32), mode="drop")
    )
    val = (
      jnp.full(capacity, -1.0, jnp.float32).at[slot].set(scores, mode="drop")
    )
    neg, idx = jax.lax.sort((-val, idx), num_keys=2)
    return -neg, idx

  return jax.lax.cond(
    passed > capacity, lambda: tuple(jax.lax.top_k(scores, capacity)), compact
  )


# The cut's search (see _threshold_classes): tensors of at least
# _SAMPLE_MIN elements first bracket it on every _SAMPLE_STRIDE-th element
# (odd, so that a row-major matrix's columns are all sampled), between the
# cuts of (1 +- _SAMPLE_MARGIN) times the budget; the elements with an
# item inside the bracket (about 2 _SAMPLE_MARGIN n / 3 of them for normal
# data) must fit n / _CANDIDATE_DIVISOR slots.
_SAMPLE_MIN = 2**15
_SAMPLE_STRIDE = 31
_SAMPLE_MARGIN = 0.04
_CANDIDATE_DIVISOR = 16
# Normal positive floats, tiny .. +inf, as bits (XLA flushes subnormals to
# zero, so a subnormal profit is no profit).
_TINY_BITS, _INF_BITS = 0x00800000, 0x7F800000


def _as_float(bits: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _item_weight(squares: jax.Array, tau: jax.Array) -> jax.Array:
  """Total weight of the items with profit >= tau (int32)."""
  per_element = sum(
    jnp.where(jnp.float32(d) * squares >= tau, jnp.int32(w), 0)
    for d, w in zip(PROFIT_DENSITY, ITEM_WEIGHT)
  )
  return jnp.sum(per_element, dtype=jnp.int32)


def _bisect(
  weight_from: Callable[[jax.Array], jax.Array],
  budget: jax.Array,
  lo: jax.Array,
  hi: jax.Array,
  steps: int = 31,
) -> jax.Array:
  """The largest threshold (float bits in [lo, hi)) whose weight exceeds
  the budget, given weight_from(lo) > budget >= weight_from(hi): bits
  order like the values for non-negative floats. ``steps`` halvings (31
  reach a single ulp from the whole range)."""

  def halve(
    _: int | jax.Array, bounds: tuple[jax.Array, jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    over = weight_from(mid) > budget
    return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

  # The first halving outside the loop types the carry as the data's
  # (varying over a shard_map axis or not). Once hi - lo <= 1 a halving
  # changes nothing, so the loop stops there: a narrow bracket (the
  # candidates' cut, ~2^20 ulps) needs ~20 counting passes, not 31.
  def more(c: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    i, lo, hi = c
    return (i < steps) & (hi - lo > 1)

  def step(
    c: tuple[jax.Array, jax.Array, jax.Array],
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    i, lo, hi = c
    return (i + 1, *halve(i, (lo, hi)))

  _, lo, _ = jax.lax.while_loop(more, step, (jnp.int32(1), *halve(0, (lo, hi))))
  return lo


def _full_cut(squares: jax.Array, budget: jax.Array) -> jax.Array:
  """The cut's bits by 31 counting passes over all the elements."""
  return _bisect(
    lambda bits: _item_weight(squares, _as_float(bits)),
    budget,
    jnp.uint32(_TINY_BITS),
    jnp.uint32(_INF_BITS),
  )


def _weights_at(squares: jax.Array, taus: jax.Array) -> jax.Array:
  """_item_weight at each of taus (f32[k]): int32[k]."""
  per_element = sum(
    jnp.where(jnp.float32(d) * squares >= taus[:, None], jnp.int32(w), 0)
    for d, w in zip(PROFIT_DENSITY, ITEM_WEIGHT)
  )
  return jnp.sum(per_element, axis=1, dtype=jnp.int32)


def _compact_slots(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each flagged element's slot among the flagged ones in index order:
  (slots int32[ceil(n / 32), 32], their count), any slot where not
  flagged. Bits of 32 elements make a word; slot = flagged elements before
  the word (a scan over n / 32 popcounts) + the popcount of the word's
  bits before the element: no scan over the n elements."""
  word, count = common.flag_words(mask)
  lane = np.arange(32)
  start = jax.lax.associative_scan(jnp.add, count) - count
  above = jnp.asarray(
    [0] + [(0xFFFFFFFF << (32 - int(j))) & 0xFFFFFFFF for j in lane[1:]],
    jnp.uint32,
  )
  slot = start[:, None] + jax.lax.population_count(
    word[:, None] & above
  ).astype(jnp.int32)
  return slot, jnp.sum(count)


def _bracketed_cut(squares: jax.Array, budget: int) -> jax.Array:
  """The cut's bits, exactly as ``_full_cut``, in ~5 passes over the
  elements instead of 31 (for large tensors).

  1. A strided sample of n / 31 elements gives thresholds lo < hi whose
     weights, extrapolated, are (1 + 4%) and (1 - 4%) of the budget (a
     normal sample of n / 62 items errs by ~1% for n = 450k).
  2. One pass checks the bracket: weight(lo) > budget >= weight(hi), and
     flags the candidates, the elements with an item in [lo, hi).
  3. If it holds and the candidates fit n / 16 slots, they are compacted
     (``_compact_slots`` and a scatter), and the cut is searched on them
     alone: weight(t) = weight(hi) + their items' weights in [t, hi).
  Else (a sample far off: the bracket misses; never seen on random data)
  the 31 passes over all elements. (Splitting the searches on the sample
  and the candidates 8 ways a step, 12 steps instead of 31, was 2x slower:
  the counting, not the loop, is their cost.)
  """
  n = squares.shape[0]
  cap = n // _CANDIDATE_DIVISOR
  dens = [jnp.float32(d) for d in PROFIT_DENSITY]
  sample = squares[::_SAMPLE_STRIDE]
  scale = sample.shape[0] / n
  goals = jnp.asarray(
    [
      math.floor(budget * (1 + _SAMPLE_MARGIN) * scale),
      math.floor(budget * (1 - _SAMPLE_MARGIN) * scale),
    ],
    jnp.int32,
  )
  # Both sample cuts in one loop (two thresholds a pass).
  lo, hi = jax.vmap(
    lambda goal: _bisect(
      lambda bits: _item_weight(sample, _as_float(bits)),
      goal,
      jnp.uint32(_TINY_BITS),
      jnp.uint32(_INF_BITS),
    )
  )(goals)
  hi = hi + 1  # weight <= its goal there
  lo = jnp.minimum(lo, hi - 1)
  t_lo, t_hi = _as_float(lo), _as_float(hi)
  goal = jnp.int32(budget)

  in_bracket = functools.reduce(
    jnp.logical_or,
    [(d * squares >= t_lo) & (d * squares < t_hi) for d in dens],
  )
  w_lo, w_hi = _weights_at(squares, jnp.stack([t_lo, t_hi]))
  slot, found = _compact_slots(in_bracket)
  ok = (w_lo > goal) & (w_hi <= goal) & (found <= cap)

  def on_candidates() -> jax.Array:
    values = jnp.pad(squares, (0, slot.size - n)).reshape(slot.shape)
    flags = jnp.pad(in_bracket, (0, slot.size - n)).reshape(slot.shape)
    cand = _scatter(values, jnp.where(flags, slot, cap), cap)

    def weight_from(bits: jax.Array) -> jax.Array:
      tau = _as_float(bits)
      per_element = sum(
        jnp.where((d * cand >= tau) & (d * cand < t_hi), jnp.int32(w), 0)
        for d, w in zip(dens, ITEM_WEIGHT)
      )
      return w_hi + jnp.sum(per_element, dtype=jnp.int32)

    return _bisect(weight_from, goal, lo, hi)

  return jax.lax.cond(ok, on_candidates, lambda: _full_cut(squares, goal))


def _threshold_classes(squares: jax.Array, budget: int) -> jax.Array:
  """The exact greedy's classes without sorting (int32[n]).

  The longest prefix of the items sorted by profit (ties by item index, as
  ``top_k``) that fits the budget is: every item above some profit p*, then
  the items equal to p* in index order while they fit. p* (the largest
  profit whose "all items >= p*" overflows the budget) is found by
  bisection on the float's bits, which order like the values for
  non-negative floats (``_full_cut``; for large tensors
  ``_bracketed_cut``, the same cut with most passes over a sample and the
  few elements near it). Each pass recomputes the three profits of an
  element from its square (the same f32 products as ``item_profits``):
  one pass over n floats rather than over 3n stored profits.
  """
  dens = [jnp.float32(d) for d in PROFIT_DENSITY]
  all_fit = _item_weight(squares, _as_float(jnp.uint32(_TINY_BITS))) <= budget
  if squares.shape[0] >= _SAMPLE_MIN:
    lo = jax.lax.cond(
      all_fit,
      # Typed like the data (varying over a shard_map axis or not).
      lambda: jnp.where(all_fit, jnp.uint32(_TINY_BITS), _TINY_BITS),
      lambda: _bracketed_cut(squares, budget),
    )
  else:
    lo = _full_cut(squares, jnp.int32(budget))
  budget = jnp.int32(budget)
  cut = jnp.where(all_fit, 0.0, _as_float(lo))
  p = jnp.stack([d * squares for d in dens])
  weight = jnp.asarray(ITEM_WEIGHT, jnp.int32)[:, None]
  above = jnp.where(all_fit, p > 0, p > cut)
  room = budget - jnp.sum(jnp.where(above, weight, 0), dtype=jnp.int32)
  tie = (p == cut) & (cut > 0)

  def some_ties() -> jax.Array:
    # Tie weights taken in item order (associative_scan: ~2.5x faster
    # than cumsum on XLA:CPU, exact on integers).
    tie_weight = jnp.where(tie, weight, 0).reshape(-1)
    used = jax.lax.associative_scan(jnp.add, tie_weight).reshape(p.shape)
    return above | (tie & (used <= room))

  # All items >= cut overflow the budget, so a single tied item never
  # fits: the scan is needed only for two or more (data with repeated
  # magnitudes). Under vmap the cond runs both branches.
  take = jax.lax.cond(
    jnp.sum(tie, dtype=jnp.int32) <= 1, lambda: above, some_ties
  )
  return jnp.sum(take, axis=0, dtype=jnp.int32)


def _exact_classes(squares: jax.Array, budget: int, impl: str) -> jax.Array:
  """``_threshold_classes`` on CPU by the kernel ``gqsgd_jointsq_select``
  (jointsq_kernels.h SelectClasses): a histogram of the squares brackets
  the cut, one pass counts above the bracket and collects the items inside
  it, which are sorted, and one pass writes the classes; three passes over
  the elements instead of the bisection's ~5-31."""
  out = jax.ShapeDtypeStruct(squares.shape, jnp.int32)

  def ffi_fn(squares: jax.Array) -> jax.Array:
    return jax.ffi.ffi_call(
      "gqsgd_jointsq_select", out, vmap_method="sequential"
    )(squares, budget=np.int64(budget))

  def xla_fn(squares: jax.Array) -> jax.Array:
    return _threshold_classes(squares, budget)

  return ops._select(impl, ffi_fn, xla_fn, frozenset({"cpu"}))(squares)  # pylint: disable=protected-access


def select(
  v: jax.Array,
  layout: JointSQLayout,
  key: jax.Array | None = None,
  *,
  selection: str = "exact",
  sample_ratio: float = 0.01,
  impl: str = "auto",
) -> jax.Array:
  """Class per element (int32[n], 0..3 = items taken) by the MCKP greedy.

  ``impl``: the exact greedy's kernel on CPU ("auto", "ffi") or its XLA
  twin ``_threshold_classes`` ("xla"), the same classes.
  """
  n, m = layout.numel, layout.item_capacity
  if m == 0:
    return jnp.zeros(n, jnp.int32)
  if selection == "exact":
    return _exact_classes(_squares(v), layout.budget_bits, impl)
  profits = item_profits(v)
  if key is None:
    raise ValueError("key: selection='sampled' needs a PRNG key")
  scores, items = sampled_top(profits, m, key, sample_ratio=sample_ratio)
  weights = jnp.asarray(ITEM_WEIGHT, jnp.int32)[items // n]
  # Items sorted by profit: the longest prefix within the budget.
  take = (scores > 0) & (jnp.cumsum(weights) <= layout.budget_bits)
  return jnp.zeros(n, jnp.int32).at[items % n].add(take.astype(jnp.int32))


# --------------------------------------------------------------------------
# Wire format.


# Fields of the 2-bit classes in a big-endian word of the class map: the
# low bit of each field.
_FIELD_LOW_BITS = np.uint32(0x55555555)


def _classes_and_ranks(
  classmap: jax.Array, n: int, *, padded: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Each element's class and rank among the elements of its class.

  Args:
    classmap: uint8[..., ceil(n / 4)], the 2-bit classes of the elements
      packed four to a byte (the "classmap" index format).
    n: elements.
    padded: return the 16 fields of each word as [..., ceil(n / 16), 16]
      (class 0 past n), for callers that keep that shape to the end:
      XLA:CPU fuses a reshape to [..., n] into the producer's loop as a
      division of every index by 16, ~5x slower than the 2-D loop.

  Returns:
    (cls, rank), int32[..., n] each (along the last axis; rank 0 where the
    class is 0), or [..., ceil(n / 16), 16] with ``padded``.

  Sixteen elements at a time: four class-map bytes make a big-endian
  uint32 (element 0 in bits 31-30); per class, a mask with one bit per
  element of that class (the low bit of its field) and its
  ``population_count`` give the word's class counts, whose exclusive
  prefix sums over the n / 16 words (``associative_scan``) give the
  elements of each class before the word; an element's rank adds the
  popcount of its class's mask above its field. One elementwise pass over
  the elements plus scans over 1/16 of them; this replaced a rank scan
  over per-byte counts and, before it, a ``cumsum`` of an [n, 4] one-hot
  (XLA:CPU's reduce-window), each the dominant cost of decoding in turn.
  """
  batch, size = classmap.shape[:-1], classmap.shape[-1]
  words = -(-size // 4)
  pad = [(0, 0)] * len(batch) + [(0, 4 * words - size)]
  byte = jnp.pad(classmap, pad).astype(jnp.uint32)
  byte = byte.reshape(*batch, words, 4)
  word = (
    (byte[..., 0] << 24)
    | (byte[..., 1] << 16)
    | (byte[..., 2] << 8)
    | byte[..., 3]
  )
  high = (word >> 1) & _FIELD_LOW_BITS
  low = word & _FIELD_LOW_BITS
  masks = {3: high & low, 2: high & ~low, 1: low & ~high}
  # Elements of each class before each word: one scan of the three
  # classes' word counts together (fewer, larger kernels than three).
  count = jnp.stack(
    [jax.lax.population_count(masks[k]).astype(jnp.int32) for k in (1, 2, 3)],
    axis=-2,
  )
  run = jax.lax.associative_scan(jnp.add, count, axis=-1) - count
  before = {k: run[..., k - 1, :] for k in (1, 2, 3)}
  lane = np.arange(16)
  shift = jnp.asarray(30 - 2 * lane, jnp.uint32)
  # The fields above lane l's (none for lane 0).
  above = jnp.asarray(
    [0] + [(0xFFFFFFFF << (32 - 2 * int(k))) & 0xFFFFFFFF for k in lane[1:]],
    jnp.uint32,
  )
  cls = ((word[..., None] >> shift) & 3).astype(jnp.int32)

  def of_class(values: dict) -> jax.Array:
    return jnp.where(
      cls == 3,
      values[3][..., None],
      jnp.where(cls == 2, values[2][..., None], values[1][..., None]),
    )

  rank = of_class(before) + jax.lax.population_count(
    of_class(masks) & above
  ).astype(jnp.int32)
  rank = jnp.where(cls > 0, rank, 0)

  if padded:
    return cls, rank
  return (
    cls.reshape(*batch, words * 16)[..., :n],
    rank.reshape(*batch, words * 16)[..., :n],
  )


def _stream_offsets(counts: jax.Array) -> jax.Array:
  """Byte offsets of the 8-, 4- and 2-bit code regions in the stream, and
  the end of the used bytes."""
  k8, k4, k2 = counts[0], counts[1], counts[2]
  o2 = k8 + (k4 + 1) // 2
  return jnp.stack([jnp.int32(0), k8, o2, o2 + (k2 + 3) // 4])


def _bytes(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1)


def _from_bytes(b: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
  width = np.dtype(dtype).itemsize
  return jax.lax.bitcast_convert_type(b.reshape(-1, width), dtype)


def _element_values(
  stream: jax.Array,
  cls: jax.Array,
  rank: jax.Array,
  norms: jax.Array,
  counts: jax.Array,
) -> jax.Array:
  """The decoded value of each element (or position slot) of one payload.

  The element of class c and rank k reads its code straight from the
  stream: lane k of the c-class region (codes packed element 0 in the high
  lane), and is (code - s_c) * (norm_c / s_c), the arithmetic of
  ``ops.dequantize``; 0 where cls == 0. One gather and an elementwise pass,
  shared by ``encode`` (x_hat) and ``decode``, so the two agree bit for
  bit. The select after the multiply also keeps XLA from contracting it
  with a consumer's add or subtract into an FMA (x_hat into the residual):
  the value is rounded before it is used, as the kernels' output was.

  Args:
    stream: uint8[stream_bytes], the payload's code stream.
    cls, rank: int32, class id (0..3) and rank within the class.
    norms: f32[3], the class norms in wire order (8, 4, 2 bits).
    counts: int32[3], (k8, k4, k2).
  """
  offsets = _stream_offsets(counts)
  s = [levels(CLASS_BITS[c]) for c in _WIRE_CLASSES]
  ok = norms >= common.TINY  # empty or all-zero class: 0, not 0/0
  # The kernels flush a subnormal scale to zero.
  scales = reference.flush_subnormal(
    jnp.where(ok, norms * _inverse_levels(), 0.0)
  )

  by_class = functools.partial(_by_class, cls)
  lanes_log2 = by_class([0, 1, 2])
  bits = by_class([CLASS_BITS[c] for c in _WIRE_CLASSES])
  region = by_class([offsets[0], offsets[1], offsets[2]])
  byte = jnp.take(stream, region + (rank >> lanes_log2), mode="clip")
  lane = rank & ((1 << lanes_log2) - 1)
  shift = ((1 << lanes_log2) - 1 - lane) * bits
  code = (byte.astype(jnp.int32) >> shift) & ((1 << bits) - 1)
  value = (code - by_class(s)).astype(jnp.float32) * by_class(
    [scales[0], scales[1], scales[2]]
  )
  return jnp.where(cls > 0, value, 0.0)


def _materialize(f: Callable[..., Any], probe: jax.Array, *args: Any) -> Any:
  """f(*args), computed in a conditional branch of its own.

  XLA materializes a branch's results, so nothing is fused across it: the
  fusion barrier that XLA:CPU lacks (it removes ``optimization_barrier``
  before fusing). ``probe``: a traced bool that is always true (a constant
  would fold the branch away); the other branch returns zeros typed like
  it (varying over a shard_map axis or not). Under vmap the cond becomes a
  select of both branches: the same values.
  """
  shapes = jax.eval_shape(f, *args)

  def zeros(p: jax.Array, *_: Any) -> Any:
    return jax.tree.map(
      lambda s: jnp.broadcast_to(jnp.where(p, 0, 0).astype(s.dtype), s.shape),
      shapes,
    )

  return jax.lax.cond(probe, lambda _, *a: f(*a), zeros, probe, *args)


def _codes(
  v: jax.Array,
  cls: jax.Array,
  rank: jax.Array,
  norms: jax.Array,
  *,
  seeds: jax.Array,
) -> jax.Array:
  """Signed codes q (int32, 0 where cls == 0) of each element: what
  ``ops.quantize`` of its class's values, compacted in index order, gives
  the element of that rank (``reference.stochastic_round`` with the class's
  scale, levels and random bits, which the kernels match bit for bit)."""
  s = [levels(CLASS_BITS[c]) for c in _WIRE_CLASSES]
  ok = norms >= common.TINY
  scale = jnp.where(
    ok, jnp.asarray(s, jnp.float32) / jnp.where(ok, norms, 1.0), 0.0
  )
  # reference.random_bits of each class's stream at index rank.
  keys = [reference.stream_key(seeds[c - 1], 0) for c in _WIRE_CLASSES]
  a = _by_class(cls, [k[0] for k in keys])
  b = _by_class(cls, [k[1] for k in keys])
  random = reference.mix32((rank.astype(jnp.uint32) ^ a) + b)
  lim = _by_class(cls, [jnp.float32(x) for x in s])
  q = reference.stochastic_round(
    v, _by_class(cls, [scale[0], scale[1], scale[2]]), cast(int, lim), random
  )
  return jnp.where(cls > 0, q, 0)


def _values_from_codes(
  q: jax.Array, cls: jax.Array, norms: jax.Array
) -> jax.Array:
  """q * (norm_c / s_c): ``_element_values``'s arithmetic on the codes."""
  ok = norms >= common.TINY
  scales = reference.flush_subnormal(
    jnp.where(ok, norms * _inverse_levels(), 0.0)
  )
  value = q.astype(jnp.float32) * _by_class(
    cls, [scales[0], scales[1], scales[2]]
  )
  return jnp.where(cls > 0, value, 0.0)


def _code_stream(
  q: jax.Array,
  cls: jax.Array,
  rank: jax.Array,
  counts: jax.Array,
  layout: JointSQLayout,
) -> jax.Array:
  """The code stream (see the module docstring): each code added into its
  lane (lanes are disjoint, so add is or); the lanes past a class's count
  in its last byte hold the code of a zero (s_c) up to the region's
  capacity, 0 beyond, as the kernels' packing of the class's region left
  them."""
  size = layout.stream_bytes
  s = [levels(CLASS_BITS[c]) for c in _WIRE_CLASSES]
  offsets = _stream_offsets(counts)
  lanes_log2 = _by_class(cls, [0, 1, 2])
  bits = _by_class(cls, [CLASS_BITS[c] for c in _WIRE_CLASSES])
  lane = rank & ((1 << lanes_log2) - 1)
  shift = ((1 << lanes_log2) - 1 - lane) * bits
  code = (q + _by_class(cls, s)).astype(jnp.uint32) << shift.astype(jnp.uint32)
  slot = jnp.where(
    cls > 0,
    _by_class(cls, [offsets[0], offsets[1], offsets[2]]) + (rank >> lanes_log2),
    size,
  )
  stream = (
    jnp.zeros(size + 1, jnp.uint8)
    .at[jnp.clip(slot, 0, size)]
    .add(code.astype(jnp.uint8), mode="promise_in_bounds")
  )
  k8, k4, k2 = counts[0], counts[1], counts[2]
  cap4 = layout.region_capacity(4)
  cap2 = layout.region_capacity(2)
  pad4 = jnp.where((k4 % 2 == 1) & (k4 < cap4), s[1], 0)
  used2 = k2 % 4
  pad2 = sum(
    jnp.where(
      (used2 != 0) & (lane2 >= used2) & (k2 - used2 + lane2 < cap2),
      s[2] << (2 * (3 - lane2)),
      0,
    )
    for lane2 in range(4)
  )
  stream = stream.at[k8 + k4 // 2].add(
    jnp.asarray(pad4, jnp.uint8), mode="promise_in_bounds"
  )
  stream = stream.at[offsets[2] + k2 // 4].add(
    jnp.asarray(pad2, jnp.uint8), mode="promise_in_bounds"
  )
  return stream[:size]


def _inverse_levels() -> jax.Array:
  """f32 1 / s_c in wire order: a class's scale is norm * (1 / s_c), what
  XLA:CPU made of norm / s_c (a division by a constant); explicit, so that
  the decode kernel can match it."""
  return jnp.asarray(
    [1 / levels(CLASS_BITS[c]) for c in _WIRE_CLASSES], jnp.float32
  )


def _by_class(cls: jax.Array, values: list) -> jax.Array:
  """values[r] (wire order 8, 4, 2) where cls is that class: selects,
  which fuse, rather than lookups in a table (gathers)."""
  out = values[2]
  for r in (1, 0):
    out = jnp.where(cls == _WIRE_CLASSES[r], values[r], out)
  return out


def _scatter(values: jax.Array, slot: jax.Array, size: int) -> jax.Array:
  """A zero buffer of ``size`` with values[i] at slot[i]; slot == size
  drops the value. The slots are computed here (each < size by the
  budget), so the scatter can promise in-bounds indices (with a spare
  entry for the dropped ones): XLA:CPU's bounds-checked scatter is ~5x
  slower. The clip keeps even a wrong slot inside the buffer."""
  slot = jnp.clip(slot, 0, size)
  buf = jnp.zeros(size + 1, values.dtype)
  return buf.at[slot].set(values, mode="promise_in_bounds")[:size]


def encode(
  v: jax.Array,
  layout: JointSQLayout,
  key: jax.Array,
  *,
  selection: str = "exact",
  sample_ratio: float = 0.01,
  impl: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Compresses one flat tensor.

  Args:
    v: float[n], the (error-corrected) tensor.
    layout: its ``JointSQLayout``.
    key: PRNG key of the rounding dither (and of the sampled threshold).
    selection: "exact" or "sampled" greedy.
    sample_ratio: sample size of the sampled threshold, as a fraction.
    impl: the exact selection's kernel ("auto": on CPU, "ffi") or its XLA
      twin ("xla"), the same classes; the codes are computed in XLA
      (``_codes``), bit for bit those of the quantize kernels.

  Returns:
    (payload uint8[layout.payload_bytes], x_hat float32[n], counts
    int32[3]): the message, the values it decodes to, and (k8, k4, k2).
    A tensor with a non-finite value sends NaN norms and decodes to NaN.
  """
  raw = v.reshape(-1).astype(jnp.float32)
  # One draw for all seeds: a dither seed per class and the sampling key.
  seeds = jax.random.bits(key, (4, 2), jnp.uint32)
  cls = select(
    jnp.where(jnp.isfinite(raw), raw, 0.0),
    layout,
    seeds[3],
    selection=selection,
    sample_ratio=sample_ratio,
    impl=impl,
  )
  if layout.index_format != "classmap":
    return _encode_classes(raw, cls, seeds, layout)
  # reference.random_bits' stream keys of the classes, wire order.
  keys = jnp.stack(
    [x for c in _WIRE_CLASSES for x in reference.stream_key(seeds[c - 1], 0)]
  )
  out = (
    jax.ShapeDtypeStruct((layout.payload_bytes,), jnp.uint8),
    jax.ShapeDtypeStruct((layout.numel,), jnp.float32),
    jax.ShapeDtypeStruct((3,), jnp.int32),
  )

  def ffi_fn(
    raw: jax.Array, cls: jax.Array, keys: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    payload, x_hat, counts = jax.ffi.ffi_call(
      "gqsgd_jointsq_encode_classmap", out, vmap_method="sequential"
    )(
      raw,
      cls,
      keys,
      cap4=np.int64(layout.region_capacity(4)),
      cap2=np.int64(layout.region_capacity(2)),
    )
    return payload, x_hat, counts

  def xla_fn(
    raw: jax.Array, cls: jax.Array, keys: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    del keys  # drawn again from the seeds
    return _encode_classes(raw, cls, seeds, layout)

  return ops._select(impl, ffi_fn, xla_fn, frozenset({"cpu"}))(raw, cls, keys)  # pylint: disable=protected-access


def _encode_classes(
  raw: jax.Array, cls: jax.Array, seeds: jax.Array, layout: JointSQLayout
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``encode`` given the classes: XLA, and the twin of the kernel
  ``gqsgd_jointsq_encode_classmap`` (jointsq_kernels.h EncodeClassmap)
  for the class map index, which does it in two passes over the
  elements."""
  finite = jnp.isfinite(raw)
  v = jnp.where(finite, raw, 0.0)
  classmap = _pack(cls.astype(jnp.uint32), 2)
  # Reductions, not scatters into 4 bins (serial loops on XLA:CPU).
  counts = jnp.stack(
    [jnp.sum(cls == c, dtype=jnp.int32) for c in _WIRE_CLASSES]
  )
  # The elements as [ceil(n / 16), 16] from here (see _classes_and_ranks),
  # materialized: fused into each consumer, the ranks were recomputed per
  # element in 1-D loops, ~10x slower than their own 2-D pass.
  fields, rank = _materialize(
    lambda cm: _classes_and_ranks(cm, layout.numel, padded=True),
    counts[0] >= 0,
    classmap,
  )
  norms = jnp.stack(
    [jnp.max(jnp.where(cls == c, jnp.abs(v), 0.0)) for c in _WIRE_CLASSES]
  )

  # Each element's code straight from its value, class and rank (the
  # rank is its counter in the class's dither stream, as when the class
  # was quantized compacted); x_hat from the code, and the stream by one
  # scatter of the codes into their lanes. (The compacted values, the
  # kernels' quantize and a gather of every x_hat byte back from the
  # stream cost ~3x this.)
  v_fields = jnp.pad(v, (0, fields.size - v.size)).reshape(fields.shape)
  q = _materialize(
    lambda *a: _codes(*a, seeds=seeds),
    counts[0] >= 0,
    v_fields,
    fields,
    rank,
    norms,
  )
  x_hat = _values_from_codes(q, fields, norms)
  stream = _code_stream(q, fields, rank, counts, layout)
  bad = ~jnp.all(finite)
  norms = jnp.where(bad, jnp.nan, norms)
  x_hat = jnp.where(bad, jnp.nan, x_hat).reshape(-1)[: layout.numel]

  index = _encode_index(cls, fields, rank, counts, classmap, layout)
  header = jnp.concatenate([_bytes(norms), _bytes(counts)])
  return jnp.concatenate([header, index, stream]), x_hat, counts


def _slot_classes(counts: jax.Array, cap: int) -> tuple[jax.Array, jax.Array]:
  """Class and rank of each position slot (grouped 8, 4, 2)."""
  t = jnp.arange(cap, dtype=jnp.int32)
  k8, k84 = counts[0], counts[0] + counts[1]
  cls = jnp.where(
    t < k8, 3, jnp.where(t < k84, 2, jnp.where(t < k84 + counts[2], 1, 0))
  )
  start = jnp.stack([jnp.int32(0), k84, k8, jnp.int32(0)])  # by class id
  return cls, t - start[cls]


def _encode_index(
  cls: jax.Array,
  fields: jax.Array,
  rank: jax.Array,
  counts: jax.Array,
  classmap: jax.Array,
  layout: JointSQLayout,
) -> jax.Array:
  """The index of one payload; cls int32[n], fields and rank the classes
  and ranks as [ceil(n / 16), 16] (see _classes_and_ranks)."""
  cap = layout.capacity
  if layout.index_format == "classmap":
    return classmap
  if layout.index_format == "bitmap":
    chosen = cls > 0
    bitmap = _pack(chosen.astype(jnp.uint32), 1)
    slot = jnp.where(chosen, jnp.cumsum(chosen) - 1, cap)
    classes = _scatter(cls.astype(jnp.uint32), slot, cap)
    return jnp.concatenate([bitmap, _pack(classes, 2)])
  # positions: grouped by class 8, 4, 2, ascending within a class.
  start = jnp.where(  # by class id 3, 2, 1
    fields == 3, 0, jnp.where(fields == 2, counts[0], counts[0] + counts[1])
  )
  slot = jnp.where(fields > 0, start + rank, cap)
  dtype = jnp.uint16 if layout.position_bytes == 2 else jnp.int32
  pos = jnp.arange(fields.size, dtype=jnp.int32).reshape(fields.shape)
  return _bytes(_scatter(pos.astype(dtype), slot, cap))


def decode(
  payload: jax.Array, layout: JointSQLayout, *, impl: str = "auto"
) -> jax.Array:
  """float32[n] values of one payload (``encode``'s x_hat, bit for bit).

  ``impl`` is accepted for symmetry with ``encode``; decoding is gathers
  and integer arithmetic in XLA (see ``_element_values``).
  """
  del impl
  return _decode_fields(payload, layout).reshape(-1)[: layout.numel]


def _decode_fields(payload: jax.Array, layout: JointSQLayout) -> jax.Array:
  """``decode``'s values, padded with zeros to [ceil(n / 16), 16] for the
  class map (see _classes_and_ranks), else f32[n]."""
  n, cap = layout.numel, layout.capacity
  norms = _from_bytes(payload[:12], jnp.float32)
  counts = _from_bytes(payload[12:HEADER_BYTES], jnp.int32)
  index = payload[HEADER_BYTES : HEADER_BYTES + layout.index_bytes]
  stream = payload[HEADER_BYTES + layout.index_bytes :]
  if layout.index_format == "positions":
    dtype = jnp.uint16 if layout.position_bytes == 2 else jnp.int32
    pos = _from_bytes(index, dtype).astype(jnp.int32)
    cls, rank = _slot_classes(counts, cap)
    out = (
      jnp.zeros(n, jnp.float32)
      .at[jnp.where(cls > 0, pos, n)]
      .set(_element_values(stream, cls, rank, norms, counts), mode="drop")
    )
  else:
    if layout.index_format == "classmap":
      cls, rank = _classes_and_ranks(index, n, padded=True)
      out = _element_values(stream, cls, rank, norms, counts)
    else:
      nmap = -(-n // 8)
      chosen = _unpack(index[:nmap], 1)[:n].astype(jnp.int32)
      classes = _unpack(index[nmap:], 2)[:cap].astype(jnp.int32)
      before = jax.lax.associative_scan(jnp.add, chosen) - chosen
      slot = jnp.clip(before, 0, max(cap - 1, 0))
      cls = jnp.where(chosen > 0, classes[slot] if cap else 0, 0)
      _, rank = _classes_and_ranks(_pack(cls.astype(jnp.uint32), 2), n)
      out = _element_values(stream, cls, rank, norms, counts)
  return jnp.where(jnp.any(jnp.isnan(norms)), jnp.nan, out)


# --------------------------------------------------------------------------
# The transform.


@worker_state.per_worker("error", "counts")
class JointSQState(NamedTuple):
  """State of ``jointsq``: error feedback, dither key, last step's counts."""

  # Per worker (see worker_state_specs): one flat f32[n] residual per leaf
  # in leaf order for compressed leaves, an unused f32[1] for the others
  # (orbax cannot checkpoint zero-size arrays).
  error: tuple
  key: jax.Array  # uint32[2] raw PRNG key, split once per step; shared
  # Per worker: int32[3 L], (k8, k4, k2) of each compressed leaf, last step
  # (int32[1] when nothing is compressed).
  counts: jax.Array


@dataclasses.dataclass(frozen=True)
class _Plan:
  compression_ratio: float
  index_format: str
  compresses: Callable[[jax.Array], bool]

  def layout(self, leaf: jax.Array) -> JointSQLayout:
    return make_layout(
      int(np.size(leaf)), self.compression_ratio, self.index_format
    )


def _plan(
  compression_ratio: float,
  predicate: Predicate,
  min_size: int,
  index_format: str,
) -> _Plan:
  ratio = validate_fraction(compression_ratio, "compression_ratio")
  min_size = validate_size(min_size, "min_size")
  if index_format not in INDEX_FORMATS:
    raise ValueError(
      f"index_format must be one of {INDEX_FORMATS}, got {index_format!r}"
    )
  return _Plan(ratio, index_format, compression_predicate(predicate, min_size))


class LayoutArgs(TypedDict, total=False):
  """The layout arguments of ``jointsq`` (see ``jointsq_bits``)."""

  compression_ratio: float
  predicate: Predicate
  min_size: int
  index_format: str


def jointsq_layouts(
  params: optax.Params,
  *,
  compression_ratio: float = 0.032,
  predicate: Predicate = None,
  min_size: int = 1024,
  index_format: str = "auto",
) -> LayoutTree:
  """The ``JointSQLayout`` of each leaf of ``params`` (None: sent dense).

  Takes the same layout arguments as ``jointsq``; sum ``payload_bytes``
  for the bytes each worker contributes to the step's all_gather.
  """
  plan = _plan(compression_ratio, predicate, min_size, index_format)
  return jax.tree.map(
    lambda x: plan.layout(x) if plan.compresses(x) else None, params
  )


def jointsq_bits(
  params: optax.Params,
  counts: jax.typing.ArrayLike,
  **layout_args: Unpack[LayoutArgs],
) -> dict[str, int]:
  """One worker's bits for a step, summed over the compressed leaves.

  Args:
    params: the model (or gradient) tree the transform was built for.
    counts: that worker's ``JointSQState.counts`` after the step.
    **layout_args: the layout arguments given to ``jointsq``
      (compression_ratio, predicate, min_size, index_format).

  Returns:
    dict of ``budget_bits``, ``code_bits`` (values only, never above the
    budget), ``with_index_bits`` (plus positions/maps and norms) and
    ``payload_bits`` (the fixed-capacity payload actually gathered).
  """
  layouts = [
    x
    for x in jax.tree.leaves(
      jointsq_layouts(params, **layout_args),
      is_leaf=lambda x: isinstance(x, JointSQLayout),
    )
    if x is not None
  ]
  counts = np.asarray(counts)[: 3 * len(layouts)].reshape(len(layouts), 3)
  total = dict(budget_bits=0, code_bits=0, with_index_bits=0, payload_bits=0)
  for layout, cnt in zip(layouts, counts):
    for k, v in layout.bits(cnt).items():
      total[k] += v
  return total


def jointsq(
  *,
  axis_name: collectives.AxisName = "data",
  compression_ratio: float = 0.032,
  predicate: Predicate = None,
  min_size: int = 1024,
  selection: str = "exact",
  sample_ratio: float = 0.01,
  index_format: str = "auto",
  key: jax.typing.ArrayLike = 0,
  impl: str = "auto",
) -> optax.GradientTransformation:
  """JointSQ with error feedback: the mean of compressed local gradients.

  Use inside ``jax.shard_map`` or ``jax.pmap`` over ``axis_name`` on local
  gradients. The error memory differs per worker: under ``shard_map`` pass
  the state with ``gqsgd_jax.worker_state_specs`` (and create it inside the
  map); under ``pmap`` keep one state per device.

  Args:
    axis_name: the data-parallel mesh axis.
    compression_ratio: ρ; each compressed tensor's code budget is
      B = ceil(32 ρ n) bits (index and norms come on top, see
      ``JointSQLayout.bits``).
    predicate: which leaves to compress: None (ndim >= 2 and size >=
      ``min_size``), "reference" (ndim == 4, conv kernels only) or a
      callable leaf -> bool. Other leaves are averaged exactly by ``psum``.
    min_size: size threshold of the default predicate.
    selection: "exact" (the greedy over all item profits) or "sampled" (the
      reference's sampled threshold, §9.3).
    sample_ratio: fraction of the items the sampled threshold looks at.
    index_format: "auto" (cheapest for each tensor), "positions", "bitmap"
      or "classmap".
    key: int seed or PRNG key of the rounding dither and the sampling.
    impl: "auto", "ffi" or "xla", checked and kept for a signature like
      the other compressors'. JointSQ's codec is XLA ops on every path:
      each code is computed from its value, class and rank in one pass,
      which on CPU is faster than packing the classes for the quantize
      kernel and gathering the codes back. Its stochastic rounding is the
      kernels' (the same counter hash, the same bits).

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``JointSQState``.

  Raises:
    ValueError: a bad argument (named in the message); at update time, an
      unbound ``axis_name`` or an error memory that does not match.

  Examples:
    >>> import optax, gqsgd_jax
    >>> tx = optax.chain(gqsgd_jax.jointsq(compression_ratio=0.01),
    ...                  optax.sgd(0.1))
  """
  plan = _plan(compression_ratio, predicate, min_size, index_format)
  if selection not in SELECTIONS:
    raise ValueError(
      f"selection must be one of {SELECTIONS}, got {selection!r}"
    )
  sample_ratio = validate_fraction(sample_ratio, "sample_ratio")
  ops.validate_impl(impl)
  init_key = prng.canonical_key(key)

  def init_fn(params: optax.Params) -> JointSQState:
    leaves = jax.tree.leaves(params)
    # Uncompressed leaves get an unused f32[1]: orbax cannot checkpoint
    # zero-size arrays.
    error = tuple(
      jnp.zeros(np.size(x) if plan.compresses(x) else 1, jnp.float32)
      for x in leaves
    )
    layers = sum(plan.compresses(x) for x in leaves)
    return JointSQState(
      error=error, key=init_key, counts=jnp.zeros(max(3 * layers, 1), jnp.int32)
    )

  def update_fn(
    updates: optax.Updates,
    state: JointSQState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, JointSQState]:
    del params
    num_workers = collectives.axis_size(axis_name)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths = [p for p, _ in paths_leaves]
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    bucketing.check_leaf_dtypes(leaves, paths)
    errors = list(state.error)
    comp = [i for i, x in enumerate(leaves) if plan.compresses(x)]
    sizes = [x.size if i in comp else 1 for i, x in enumerate(leaves)]
    if [e.shape for e in errors] != [(size,) for size in sizes]:
      raise ValueError(
        "JointSQState does not match the updates (was init called with "
        f"parameters of these shapes?): error memories "
        f"{[e.shape for e in errors]}, expected {[(z,) for z in sizes]} "
        f"for leaves {[jax.tree_util.keystr(p) for p in paths]}"
      )
    next_key, step_key = jax.random.split(state.key)
    worker = jax.lax.axis_index(axis_name)

    out = list(leaves)
    new_errors = list(errors)
    counts: dict[int, jax.Array] = {}  # by compressed layer
    # Tensors of one layout are encoded and decoded together (vmap), so a
    # model compiles one codec per distinct layout, not per tensor.
    groups: dict[JointSQLayout, list[tuple[int, int]]] = {}
    for layer, i in enumerate(comp):
      groups.setdefault(plan.layout(leaves[i]), []).append((layer, i))
    payloads = []
    for layout, members in groups.items():
      vs = jnp.stack(
        [
          errors[i] + leaves[i].reshape(-1).astype(jnp.float32)
          for _, i in members
        ]
      )
      keys = jnp.stack(
        [prng.fold(step_key, layer, worker) for layer, _ in members]
      )
      enc = functools.partial(
        encode,
        layout=layout,
        selection=selection,
        sample_ratio=sample_ratio,
        impl=impl,
      )
      if len(members) == 1:
        payload, x_hat, cnt = jax.tree.map(
          lambda x: x[None], enc(vs[0], key=keys[0])
        )
      else:
        # A loop over the tensors, not a vmap: the conds inside (the
        # greedy's tie scan, the cut's fallback) stay conds rather than
        # selects that run both branches.
        payload, x_hat, cnt = jax.lax.map(
          lambda vk, enc=enc: enc(vk[0], key=vk[1]), (vs, keys)
        )
      # A non-finite tensor sends NaN; the memory keeps its finite values.
      err = jnp.where(jnp.isnan(x_hat), vs, vs - x_hat)
      err = jnp.where(jnp.isfinite(err), err, 0.0)
      for g, (layer, i) in enumerate(members):
        new_errors[i] = err[g]
        counts[layer] = cnt[g]
      payloads.append(payload.reshape(-1))
    if comp:
      # One collective for every compressed tensor; typed replicated.
      gathered = jax.lax.all_gather(
        jnp.concatenate(payloads), axis_name, to="invarying"
      )
      start = 0
      for layout, members in groups.items():
        size = len(members) * layout.payload_bytes
        chunk = gathered[:, start : start + size].reshape(
          num_workers, len(members), layout.payload_bytes
        )
        start += size
        means = _mean(chunk, layout, num_workers, impl=impl)
        for g, (_, i) in enumerate(members):
          out[i] = means[g].reshape(leaves[i].shape).astype(leaves[i].dtype)
    dense = [i for i in range(len(leaves)) if i not in set(comp)]
    if dense:
      summed = jax.lax.psum([leaves[i] for i in dense], axis_name)
      for i, s in zip(dense, summed):
        # NaN where any worker's value is NaN or Inf (never Inf).
        out[i] = jnp.where(jnp.isfinite(s), s / num_workers, jnp.nan).astype(
          leaves[i].dtype
        )
    new_counts = (
      jnp.concatenate([counts[layer] for layer in range(len(comp))])
      if comp
      else state.counts
    )
    new_state = JointSQState(
      error=tuple(new_errors), key=next_key, counts=new_counts
    )
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return transform.transformation(init_fn, update_fn)


def _mean_kernel_is_fast() -> bool:
  """Whether the CPU mean kernel runs vectorized (AVX-512) on this host."""
  module = ffi_lib.host_emulation
  return module is not None and bool(module.jointsq_mean_vectorized())


def _mean(
  chunk: jax.Array,
  layout: JointSQLayout,
  num_workers: int,
  *,
  impl: str = "auto",
) -> jax.Array:
  """Decodes every worker's payloads (uint8[W, G, P]) and averages them,
  always in worker order: f32[G, n], the same bits on every worker.

  With the class map index, on CPU ("auto", "ffi"), one kernel call
  (``gqsgd_jointsq_mean_classmap``, jointsq_kernels.h MeanClassmap) walks
  each block of elements through every worker's payload: only the selected
  elements cost work, and the sums stay in cache. "auto" takes it only
  where its AVX-512 path runs (its portable loop is slower than XLA).
  Otherwise (and for "xla", its twin) XLA as below.

  A loop over the workers decodes one worker's payloads (vmapped over G)
  and adds them to the total, so a payload's decode and its add make one
  pass over memory that stays in cache. (A decode of all W x G payloads
  in one vmapped batch was ~4x slower at 450k elements, W materialized
  rows out of cache; a ``sum`` over a gathered worker axis is a slow
  strided reduction on XLA:CPU. The worker's own payload is decoded too:
  its encoder's x_hat has the same bits but is typed varying over the
  axis, and the mean must come out replicated.)
  """
  if layout.index_format == "classmap":
    out = jax.ShapeDtypeStruct((chunk.shape[1], layout.numel), jnp.float32)

    def ffi_fn(chunk: jax.Array) -> jax.Array:
      return jax.ffi.ffi_call(
        "gqsgd_jointsq_mean_classmap", out, vmap_method="sequential"
      )(chunk, numel=np.int64(layout.numel))

    xla_fn = functools.partial(
      _mean_xla, layout=layout, num_workers=num_workers
    )
    # The kernel's portable loop (no AVX-512) is ~5x slower than the twin:
    # "auto" takes the kernel only where it is vectorized.
    platforms = frozenset({"cpu"}) if _mean_kernel_is_fast() else frozenset()
    if impl == "ffi":
      platforms = frozenset({"cpu"})
    return ops._select(impl, ffi_fn, xla_fn, platforms)(chunk)  # pylint: disable=protected-access
  return _mean_xla(chunk, layout, num_workers)


def _mean_xla(
  chunk: jax.Array, layout: JointSQLayout, num_workers: int
) -> jax.Array:
  """``_mean`` in XLA."""
  _, groups, _ = chunk.shape
  dec = jax.vmap(functools.partial(_decode_fields, layout=layout))
  shape = jax.eval_shape(dec, chunk[0]).shape
  total = jax.lax.fori_loop(
    0,
    num_workers,
    lambda w, t: t + dec(chunk[w]),
    jnp.zeros(shape, jnp.float32),
  )
  # Times 1/W in f32 (what XLA:CPU made of "/ W"; the kernel does it too).
  total = total * np.float32(1 / num_workers)
  return total.reshape(groups, -1)[:, : layout.numel]
