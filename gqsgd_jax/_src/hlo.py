"""Collective payload of a compiled step, read from its optimized HLO.

Every collective of the program a device runs (per step) is reported, in
two views:

* **result bytes** (``payload_bytes``, ``scale_bytes``, ``by_op``): the size
  of what each collective produces, e.g. the all-reduced buffer once.
* **sent bytes** (``sent_bytes``): what each device transmits when every
  collective runs a bandwidth-optimal algorithm over its group of G
  devices: all-reduce (ring: reduce-scatter + all-gather) 2(G-1)/G of the
  buffer, all-gather (G-1)/G of the gathered result, reduce-scatter (G-1)/G
  of its input, all-to-all (G-1)/G, collective-permute the whole buffer.
  This is the figure that turns into time on a bandwidth-bound link and the
  one to compare across methods (an f32 all-reduce sends ~8 bytes per
  element, a 4-bit butterfly ~1).

Collectives are split by role, never by size: an all-reduce whose
reduction is max, min, and or or is a **scale** collective (the workers
agree on a scale, a norm bound or a flag); every other collective (sums,
gathers, permutes, all-to-all) carries **payload**, however small, so a
10-element f32 bias all-reduce is f32 payload.

Use it on ``jax.jit(step).lower(...).compile()`` or a pmapped function's
compiled form. XLA:CPU promotes bf16 all-reduces to f32, and the report
shows what the compiled program really does.
"""

import collections
from collections.abc import Iterator
import dataclasses
import re

import jax
import numpy as np

_OPS = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "collective-permute",
  "all-to-all",
  "collective-broadcast",
)
_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTR = re.compile(
  r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>"
  + "|".join(_OPS)
  + r")(?P<start>-start)?\("
)


_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
# Newer XLA: replica_groups=mesh['data'=8, 'model'=2] {'data'}
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'\s*=\s*(\d+)")
_TO_APPLY = re.compile(r"to_apply=%?([\w.\-]+)")
# A computation's header line, e.g. "%region_8.9 (a: f32[], b: f32[]) ->".
_COMPUTATION = re.compile(
  r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->.*\{\s*$"
)
_ROOT = re.compile(r"^\s*ROOT\s+\S+\s*=\s*\S+\s+([\w\-]+)\(")
_REDUCERS = {
  "add": "sum",
  "maximum": "max",
  "minimum": "min",
  "and": "and",
  "or": "or",
  "multiply": "prod",
}
# Reductions that agree on a value (scale, bound, flag) rather than sum data.
_SCALE_REDUCERS = frozenset(("max", "min", "and", "or"))


@dataclasses.dataclass(frozen=True)
class Collective:
  """One buffer of one collective in the compiled program.

  Attributes:
    op: the HLO collective, e.g. ``"all-reduce"``.
    dtype: the HLO element type, e.g. ``"s8"``.
    elements: number of elements of the buffer (see ``bytes``).
    group_size: devices per replica group, if the HLO states it.
    reducer: an all-reduce's reduction (``"sum"``, ``"max"``, ``"min"``,
      ``"and"``, ``"or"``, ...), ``None`` for other collectives or when the
      reduction's computation is not in the text.
  """

  op: str
  dtype: str
  elements: int
  group_size: int | None = None
  reducer: str | None = None

  @property
  def bytes(self) -> int:
    return self.elements * _DTYPE_BYTES[self.dtype]

  @property
  def kind(self) -> str:
    """``"scale"`` for max/min/and/or all-reduces, else ``"payload"``."""
    if self.op == "all-reduce" and self.reducer in _SCALE_REDUCERS:
      return "scale"
    return "payload"

  def sent_bytes(self, default_group_size: int | None = None) -> float:
    """Bytes one device sends with a bandwidth-optimal algorithm."""
    if self.op == "collective-permute":
      return float(self.bytes)
    g = self.group_size or default_group_size
    if g is None:  # unknown group: wire_report(..., num_devices=G) sets it
      return float("nan")
    if self.op == "reduce-scatter":
      # The buffer counted is the result, 1/G of the input; each device
      # sends (G-1)/G of the input, i.e. G-1 result-sized blocks.
      return float(self.bytes * (g - 1))
    share = (g - 1) / g
    return self.bytes * share * (2.0 if self.op == "all-reduce" else 1.0)


def _arrays(shape: str) -> Iterator[tuple[str, int]]:
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    yield dtype, size


def _group_size(line: str) -> int | None:
  m = _GROUPS_MESH.search(line)
  if m:
    sizes = {a: int(n) for a, n in _MESH_AXIS.findall(m.group(1))}
    axes = re.findall(r"'([^']+)'", m.group(2))
    return int(np.prod([sizes[a] for a in axes])) if axes else 1
  m = _GROUPS_IOTA.search(line)
  if m:
    return int(m.group(2))
  m = _GROUPS_LIST.search(line)
  if m:
    return len([d for d in m.group(1).split(",") if d])
  return None


def _reducers(hlo_text: str) -> dict[str, str]:
  """Maps each computation's name to the op of its ROOT instruction."""
  roots: dict[str, str] = {}
  current: str | None = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      continue
    m = _ROOT.match(line)
    if m and current is not None:
      roots[current] = _REDUCERS.get(m.group(1), m.group(1))
      current = None
  return roots


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an HLO module (async -start ops counted once)."""
  reducers = _reducers(hlo_text)
  found: list[Collective] = []
  for line in hlo_text.splitlines():
    m = _INSTR.search(line)
    if not m:
      continue
    group = _group_size(line)
    reducer = None
    if m.group("op") == "all-reduce":
      apply = _TO_APPLY.search(line)
      reducer = reducers.get(apply.group(1)) if apply else None
    arrays = list(_arrays(m.group("shape")))
    if m.group("start") and m.group("op") == "collective-permute":
      arrays = arrays[:1]  # (operand, result, contexts...): count one buffer
    elif m.group("start") and m.group("op") in ("all-gather", "all-reduce"):
      arrays = arrays[len(arrays) // 2 :] if len(arrays) > 1 else arrays
    found.extend(
      Collective(m.group("op"), d, n, group, reducer) for d, n in arrays
    )
  return found


@dataclasses.dataclass(frozen=True)
class WireReport:
  """Collective bytes per step and device of a compiled program.

  Every collective is counted, in exactly one of ``payload_bytes`` and
  ``scale_bytes``, split by role, not by size: an all-reduce whose
  reduction is max, min, and or or is a scale collective (the workers agree
  on a scale, a bound or a flag); every other collective carries payload,
  however small.

  Attributes:
    payload_bytes: result bytes of the data-carrying collectives (sums,
      gathers, permutes, all-to-all), whatever their size.
    scale_bytes: result bytes of the max/min/and/or all-reduces (scales,
      maxima, agreement flags).
    float_payload_bytes: the part of ``payload_bytes`` in floating-point
      dtypes (0 for a compressor whose payload is all integer codes).
    by_op: result bytes per collective kind, e.g. ``{"all-reduce": 40}``.
    sent_bytes: bytes each device transmits when every collective runs a
      bandwidth-optimal algorithm over its group of G devices: all-reduce
      2(G-1)/G of the buffer, all-gather (G-1)/G of the result,
      reduce-scatter and all-to-all (G-1)/G of the input, permute all of
      it. The figure to compare methods by; NaN if a group size is unknown.
    collectives: every collective buffer, in program order.
  """

  payload_bytes: int
  scale_bytes: int
  float_payload_bytes: int
  by_op: dict[str, int]
  sent_bytes: float
  collectives: tuple[Collective, ...] = ()

  @property
  def total_bytes(self) -> int:
    """``payload_bytes + scale_bytes``: every collective's result bytes."""
    return self.payload_bytes + self.scale_bytes

  @property
  def scalar_bytes(self) -> int:
    """The former name of ``scale_bytes``."""
    return self.scale_bytes


def wire_report(
  compiled_or_text: jax.stages.Compiled | str, num_devices: int | None = None
) -> WireReport:
  """Collective bytes of a compiled step.

  Args:
    compiled_or_text: a ``jax.stages.Compiled`` (e.g.
      ``jax.jit(step).lower(...).compile()``) or its optimized HLO text.
    num_devices: the group size for collectives whose HLO does not state
      one (it usually does); only ``sent_bytes`` uses it.

  Returns:
    A ``WireReport`` of every collective.

  Raises:
    ValueError: the compiled program has no HLO text.
  """
  text = (
    compiled_or_text
    if isinstance(compiled_or_text, str)
    else (compiled_or_text.as_text())
  )
  if text is None:
    raise ValueError(
      "compiled_or_text: this compiled program has no HLO "
      "text to read the collectives from"
    )
  payload = scale = floats = 0
  sent = 0.0
  by_op: collections.Counter[str] = collections.Counter()
  found = tuple(collectives(text))
  for c in found:
    by_op[c.op] += c.bytes
    sent += c.sent_bytes(num_devices)
    if c.kind == "scale":
      scale += c.bytes
    else:
      payload += c.bytes
      if c.dtype.startswith(("f", "bf")):
        floats += c.bytes
  return WireReport(payload, scale, floats, dict(by_op), sent, found)
