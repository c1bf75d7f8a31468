"""Collective payload of a compiled step, read from its optimized HLO.

Counts the result bytes of every cross-device collective in the program a
device runs (per step, per device): what the method puts on the wire,
independent of how the backend then routes it. Use it on
``jax.jit(step).lower(...).compile()`` or a pmapped function's compiled
form; scalars (norm ``pmax``) are reported separately from the payload.
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


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str  # e.g. "all-reduce"
  dtype: str  # HLO element type, e.g. "s8"
  elements: int

  @property
  def bytes(self) -> int:
    return self.elements * _DTYPE_BYTES[self.dtype]


def _arrays(shape: str):
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    yield dtype, size


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an HLO module (async -start ops counted once)."""
  found = []
  for line in hlo_text.splitlines():
    m = _INSTR.search(line)
    if not m:
      continue
    arrays = list(_arrays(m.group("shape")))
    if m.group("start") and m.group("op") == "collective-permute":
      arrays = arrays[:1]  # (operand, result, contexts...): count one buffer
    elif m.group("start") and m.group("op") in ("all-gather", "all-reduce"):
      arrays = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
    found.extend(Collective(m.group("op"), d, n) for d, n in arrays)
  return found


@dataclasses.dataclass(frozen=True)
class WireReport:
  """Collective bytes per step and device, split by size and kind."""
  payload_bytes: int  # buffers with more than `scalar_elements` elements
  scalar_bytes: int  # norms, maxima, flags
  float_payload_bytes: int  # payload in floating-point dtypes
  by_op: dict

  @property
  def total_bytes(self) -> int:
    return self.payload_bytes + self.scalar_bytes


def wire_report(compiled_or_text, scalar_elements: int = 64) -> WireReport:
  """Collective bytes of a compiled step (``jax.stages.Compiled`` or text)."""
  text = compiled_or_text if isinstance(compiled_or_text, str) else (
      compiled_or_text.as_text())
  payload = scalar = floats = 0
  by_op = collections.Counter()
  for c in collectives(text):
    by_op[c.op] += c.bytes
    if c.elements > scalar_elements:
      payload += c.bytes
      if c.dtype.startswith(("f", "bf")):
        floats += c.bytes
    else:
      scalar += c.bytes
  return WireReport(payload, scalar, floats, dict(by_op))
