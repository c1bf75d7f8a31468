"""Collective payload of a compiled step, read from its optimized HLO.

Two views of the collectives in the program a device runs (per step):

* **result bytes** of every collective (``payload_bytes``,
  ``scalar_bytes``, ``by_op``): the size of what each collective produces,
  e.g. the all-reduced buffer once.
* **sent bytes** (``sent_bytes``): what each device transmits when every
  collective runs a bandwidth-optimal algorithm over its group of G
  devices: all-reduce (ring: reduce-scatter + all-gather) 2(G-1)/G of the
  buffer, all-gather (G-1)/G of the gathered result, reduce-scatter (G-1)/G
  of its input, all-to-all (G-1)/G, collective-permute the whole buffer.
  This is the figure that turns into time on a bandwidth-bound link and the
  one to compare across methods (an f32 all-reduce sends ~8 bytes per
  element, a 4-bit butterfly ~1).

Use it on ``jax.jit(step).lower(...).compile()`` or a pmapped function's
compiled form; collectives of at most ``scalar_elements`` elements (norms,
maxima, also tiny bias vectors) are reported separately from the payload.
XLA:CPU promotes bf16 all-reduces to f32, and the report shows what the
compiled program really does.
"""

import collections
import dataclasses
import re

import numpy as np

_OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
        "all-to-all", "collective-broadcast")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTR = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>" + "|".join(_OPS) +
    r")(?P<start>-start)?\(")


_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
# Newer XLA: replica_groups=mesh['data'=8, 'model'=2] {'data'}
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'\s*=\s*(\d+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str  # e.g. "all-reduce"
  dtype: str  # HLO element type, e.g. "s8"
  elements: int
  group_size: int | None = None  # devices per replica group, if stated

  @property
  def bytes(self) -> int:
    return self.elements * _DTYPE_BYTES[self.dtype]

  def sent_bytes(self, default_group_size: int | None = None) -> float:
    """Bytes one device sends with a bandwidth-optimal algorithm."""
    if self.op == "collective-permute":
      return float(self.bytes)
    g = self.group_size or default_group_size
    if g is None:  # unknown group: wire_report(..., num_devices=G) sets it
      return float("nan")
    share = (g - 1) / g
    return self.bytes * share * (2.0 if self.op == "all-reduce" else 1.0)


def _arrays(shape: str):
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


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an HLO module (async -start ops counted once)."""
  found = []
  for line in hlo_text.splitlines():
    m = _INSTR.search(line)
    if not m:
      continue
    group = _group_size(line)
    arrays = list(_arrays(m.group("shape")))
    if m.group("start") and m.group("op") == "collective-permute":
      arrays = arrays[:1]  # (operand, result, contexts...): count one buffer
    elif m.group("start") and m.group("op") in ("all-gather", "all-reduce"):
      arrays = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
    found.extend(Collective(m.group("op"), d, n, group) for d, n in arrays)
  return found


@dataclasses.dataclass(frozen=True)
class WireReport:
  """Collective bytes per step and device, split by size and kind."""
  payload_bytes: int  # buffers with more than `scalar_elements` elements
  scalar_bytes: int  # norms, maxima, flags
  float_payload_bytes: int  # payload in floating-point dtypes
  by_op: dict  # result bytes per collective kind
  sent_bytes: float  # bytes each device transmits (see module docstring)

  @property
  def total_bytes(self) -> int:
    return self.payload_bytes + self.scalar_bytes


def wire_report(compiled_or_text, scalar_elements: int = 64,
                num_devices: int | None = None) -> WireReport:
  """Collective bytes of a compiled step (``jax.stages.Compiled`` or text).

  ``num_devices`` is the group size for collectives whose HLO does not state
  one (it usually does).
  """
  text = compiled_or_text if isinstance(compiled_or_text, str) else (
      compiled_or_text.as_text())
  payload = scalar = floats = 0
  sent = 0.0
  by_op = collections.Counter()
  for c in collectives(text):
    by_op[c.op] += c.bytes
    sent += c.sent_bytes(num_devices)
    if c.elements > scalar_elements:
      payload += c.bytes
      if c.dtype.startswith(("f", "bf")):
        floats += c.bytes
    else:
      scalar += c.bytes
  return WireReport(payload, scalar, floats, dict(by_op), sent)
