"""Wire formats of the integer codes: lane layout and level counts."""

import numpy as np


def validate_bits(bits: object) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"bits must be an int in [2, 8], got {bits!r}")
  if not 2 <= bits <= 8:
    raise ValueError(f"bits must be in [2, 8], got {bits}")
  return int(bits)


def lanes_per_word(bits: int, signed_codes: bool = False) -> int:
  """Codes per word: 8 // bits in uint8 words, else 32 // bits in uint32."""
  if signed_codes:
    return 1
  return 8 // bits if 8 % bits == 0 else 32 // bits


def word_dtype(bits: int, signed_codes: bool = False) -> np.dtype:
  if signed_codes:
    return np.dtype(np.int8)
  return np.dtype(np.uint8 if 8 % bits == 0 else np.uint32)


def num_words(n: int, bits: int, signed_codes: bool = False) -> int:
  per = lanes_per_word(bits, signed_codes)
  return -(-n // per)


def wire_bits_per_element(bits: int, signed_codes: bool = False) -> float:
  """Bits on the wire per element (uint32 words waste 32 mod bits bits)."""
  return (
    8
    * word_dtype(bits, signed_codes).itemsize
    / lanes_per_word(bits, signed_codes)
  )


def max_levels(bits: int, signed_codes: bool = False) -> int:
  """Largest per-worker level count s a single code can carry."""
  return 127 if signed_codes else (2**bits - 1) // 2


def psum_levels(bits: int, num_workers: int, signed_codes: bool = False) -> int:
  """Levels s such that the sum of W codes never overflows the lane.

  Signed int8: W * s <= 127 (the reference's 127/W reaches +128, B-GQ-1).
  Offset-binary lanes: codes in [0, 2s] and W * 2s <= 2^bits - 1, so a lane
  sum never carries into its neighbour.
  """
  if signed_codes:
    return 127 // num_workers
  return (2**bits - 1) // (2 * num_workers)
