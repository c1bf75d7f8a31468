"""Quantize inputs whose roundings the kernels' tie draw decides.

The quantize kernels round y = x * scale up iff r24 < floor(frac * 2^24),
with r24 = r16 << 8 | r8: r16 is half of one hash per pair of elements, r8
a second draw taken only when r16 equals the threshold's top 16 bits (a
2^-16 event, too rare for random inputs to exercise). These inputs put the
threshold's top bits on r16 for a given fraction of the elements, so the
second draw decides their rounding, and give the rounded values an oracle
computes from the C++ RandomBits alone (not from the twin under test).
"""

import numpy as np


def _random_bits(emulation, seed: np.ndarray, n: int, stream: int):
  out = np.zeros(n, np.uint32)
  emulation.random_bits_at(seed, 0, stream, out)
  return out.astype(np.int64)


def tied_inputs(emulation, seed: np.ndarray, n: int, tie_fraction: float):
  """(x, scale, expected q) with scale 4 and y = x * scale in [-1, 1).

  y = (f * 2^24 + t) / 2^24 for f in {-1, 0} and a 24-bit t is exact in
  float32, and so is x = y / 4. Tied elements get t = r16 << 8 | t_lo for a
  random t_lo; the others a t whose top 16 bits differ from r16.
  """
  rng = np.random.default_rng(n)
  pairs = _random_bits(emulation, seed, (n + 1) // 2, 0)
  r16 = np.stack([pairs & 0xFFFF, pairs >> 16], axis=1).reshape(-1)[:n]
  r8 = _random_bits(emulation, seed, n, 1) >> 24
  tied = rng.random(n) < tie_fraction
  top = np.where(tied, r16, (r16 + rng.integers(1, 2**16, n)) % 2**16)
  t = (top << 8) | rng.integers(0, 256, n)
  f = rng.integers(-1, 1, n)
  y = (f * 2**24 + t).astype(np.float64) / 2**24
  x = (y / 4).astype(np.float32)
  assert np.array_equal(x.astype(np.float64) * 4, y), "inputs must be exact"
  expected = f + (((r16 << 8) | r8) < t)
  return x, np.float32(4.0), expected
