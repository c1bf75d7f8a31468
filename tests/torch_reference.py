"""PyTorch CPU model of the Global-QSGD reference (REF) kernels, per spec."""

# Written from the R sections of the spec (ALGORITHMS.md §0.1, §1.2, §2.1,
# §3.2, §3.3), not from the reference code. Every random choice takes
# its uniform draws as an explicit argument, so a test can feed the draws our
# counter-based generator produced and compare codes one by one. The
# reference's defects are reproduced on purpose (they are what the parity
# tests point at): 127/W levels (B-GQ-1), untrimmed 4-bit decode (B-GQ-2),
# exponent 0 stored as zero (B-GQ-3, B-GQ-5), clamp-up floor and float
# uniforms in the reduce (B-GQ-4).

import torch

# -----------------------------------------------------------------------------
# Standard dithering (§0.1, §1.2, §2.1).


def random_round(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
  """REF standard_dithering_random_round: ceil(y) if u < y - floor(y)."""
  frac = y - torch.floor(y)  # float32, the same rounding as our kernel's frac
  return torch.where(u < frac, torch.ceil(y), torch.floor(y))


def sd8_encode(
  g: torch.Tensor, norm: float, num_workers: int, u: torch.Tensor
) -> torch.Tensor:
  """8-bit hook steps 3-4: SR(g * 127 / (W * M)) as int8, levels 127/W."""
  y = g * 127.0 / (num_workers * norm)
  return random_round(y, u).to(torch.int8)


def int8_allreduce(codes: list[torch.Tensor]) -> torch.Tensor:
  """Step 5: the int8 sum of the workers' codes, wrapping modulo 256."""
  total = torch.stack([c.to(torch.int64) for c in codes]).sum(0)
  return ((total + 128) % 256 - 128).to(torch.int8)


def sd8_decode(total: torch.Tensor, norm: float) -> torch.Tensor:
  """Step 6: Q * M / 127 (the 1/W was folded into the encoding)."""
  return total.to(torch.float32) * norm / 127.0


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
  """byte k = code[2k] << 4 | code[2k+1]; odd length: last low nibble 0."""
  codes = codes.to(torch.uint8)
  if codes.numel() % 2:
    codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])
  return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
  """All 2 * len(packed) nibbles, high first; REF never trims (B-GQ-2)."""
  return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)


def sd4_encode(g: torch.Tensor, norm: float, u: torch.Tensor) -> torch.Tensor:
  """4-bit hook steps 2-4: offset code SR(3 g / M) + 3, nibble-packed."""
  y = 3.0 * g / norm
  q = random_round(y, u).to(torch.int32)
  return pack_nibbles(q + 3)


def sd4_decode(packed: torch.Tensor, norm: float) -> torch.Tensor:
  """4-bit step 6: (c - 3) / 3 * M over 2 * ceil(n / 2) values."""
  c = unpack_nibbles(packed).to(torch.float32)
  return (c - 3.0) / 3.0 * norm


# -----------------------------------------------------------------------------
# Exponential dithering (§3.2, §3.3). Byte = 128 * [v < 0] + e, value ±2^-e,
# e = 0 means zero.


def exp_compress(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
  """REF exponential_dithering_compress of v = g / (2 W M), |v| <= 1.

  |v| = mu * 2^E (frexp, mu in [1/2, 1)); keep 2^E if u < 2 mu - 1, else
  2^(E - 1); clamp the exponent to >= -127 (rounds tiny values *up*, B-GQ-4).
  For |v| > 1/2 the kept exponent can be 0, stored as e = 0, i.e. zero
  (B-GQ-5). |v| > 1 would give negative e, outside the documented contract.
  """
  if bool((v.abs() > 1).any()):
    raise ValueError("REF compress is only described for |v| <= 1")
  mu, big_e = torch.frexp(v.abs())
  p = 2.0 * mu - 1.0  # exact (Sterbenz)
  expo = torch.where(u < p, big_e, big_e - 1)
  expo = torch.clamp(expo, min=-127)
  e = -expo.to(torch.int32)
  byte = e + 128 * (v < 0).to(torch.int32)
  return torch.where(v == 0, 0, byte).to(torch.uint8)


def exp_decompress(codes: torch.Tensor, norm: float) -> torch.Tensor:
  """±2^-e * S / W = ±2^-e * 2M, zero for e = 0 (byte 0 or 128).

  Computed in float64 (exact for these powers of two) and rounded once to
  float32, so values below float32's normal range stay subnormal, as the
  reference's float32 arithmetic keeps them.
  """
  c = codes.to(torch.int64)
  e = c & 0x7F
  sign = torch.where((c & 0x80) != 0, -1.0, 1.0).to(torch.float64)
  value = torch.ldexp(torch.ones_like(sign), -e)
  value = torch.where(e > 0, sign * value, torch.zeros_like(value))
  return (value * (2.0 * norm)).to(torch.float32)


def geometric_k(r: torch.Tensor) -> torch.Tensor:
  """k = -floor(log2(max(r, 2^-126))) for float32 uniforms r in [0, 1).

  floor(log2(x)) is taken exactly from frexp (x = mu 2^E => E - 1) rather
  than from a float log2 that can round up next to a power of two.
  """
  x = torch.clamp(r.to(torch.float32), min=2.0**-126)
  _, big_e = torch.frexp(x)
  return (1 - big_e).to(torch.int64)


def exp_reduce(
  a: torch.Tensor, b: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
  """REF exponential_dithering_reduce, the case table of §3.3.

  Same sign: exponent e_big - 1 if k > t else e_big. Opposite signs:
  e_big + 1 if k > t - 1 else e_big. Doubling code 1 gives exponent 0, which
  is stored as zero (overflow, B-GQ-3).
  """
  a = a.to(torch.int64)
  b = b.to(torch.int64)
  k = geometric_k(r)
  ea, eb = a & 0x7F, b & 0x7F
  sa, sb = a & 0x80, b & 0x80
  a_dom = ea <= eb  # dominant = larger magnitude = smaller exponent code
  e_big = torch.where(a_dom, ea, eb)
  e_small = torch.where(a_dom, eb, ea)
  s_big = torch.where(a_dom, sa, sb)
  t = e_small - e_big
  same = sa == sb
  e_same = torch.where(k > t, e_big - 1, e_big)
  e_opp = torch.where(k > t - 1, e_big + 1, e_big)
  e_res = torch.where(same, e_same, e_opp)
  general = s_big | e_res  # e_res = 0 (overflow) reads as zero
  general = torch.where(~same & (t == 0), 0, general)  # exact cancellation
  out = torch.where(
    ea == 0, torch.where(eb == 0, 0, b), torch.where(eb == 0, a, general)
  )
  return out.to(torch.uint8)
