"""Checks that every FFI kernel is bit-identical to its pure-XLA twin.

Runs each op with impl="ffi" and impl="xla" on the same inputs and compares
the raw bits. Inputs mix ordinary values with the edge cases the kernels
branch on (zeros, subnormals, +-inf, NaN, values beyond the clamp), so a
change to the CPU loops that alters any rounding or select shows up here.

The CPU module carries several copies of each kernel (baseline, AVX2,
AVX-512; see xla_ffi/src/cpu_executor.h) and uses the widest one the CPU
has. --all-isas re-runs the check once per level, capped through the
GQSGD_JAX_CPU_ISA environment variable, so every copy this CPU can run is
compared.

Usage:
  python benchmarks/check_bit_identity.py              # full check
  python benchmarks/check_bit_identity.py --quick      # sizes 0, 1, 7, 65539
  python benchmarks/check_bit_identity.py --all-isas   # each ISA level

Prints every mismatch and exits non-zero if there was any.
"""

import argparse
import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import gqsgd_jax as gq
from gqsgd_jax._src import wire

SIZES = (0, 1, 7, 65539, 1048577)
QUICK_SIZES = (0, 1, 7, 65539)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SEEDS = (np.array([0, 0], np.uint32), np.array([0xDEADBEEF, 12345], np.uint32))
ISA_LEVELS = ("baseline", "x86-64-v3", "x86-64-v4")


def _inputs(n: int, dtype, rng: np.random.Generator) -> jax.Array:
  """Normal values plus edge cases, sprinkled through the whole array."""
  x = rng.standard_normal(n).astype(np.float32)
  x *= np.exp2(rng.integers(-30, 4, n)).astype(np.float32)
  specials = np.array(
    [
      0.0,
      -0.0,
      np.inf,
      -np.inf,
      np.nan,
      1e-40,
      -1e-45,
      1e30,
      -1e30,
      0.5,
      -0.5,
      1.0,
      65504.0,
    ],
    np.float32,
  )
  if n:
    idx = rng.integers(0, n, min(n, 4 * specials.size))
    x[idx] = np.resize(specials, idx.size)
  return jnp.asarray(x).astype(dtype)


def _same_bits(a: jax.Array, b: jax.Array) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return (
    a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  )


class Checker:
  """Runs one op both ways and records mismatches."""

  def __init__(self):
    self.failures = []
    self.count = 0

  def check(self, name: str, fn, *args, **kwargs):
    self.count += 1
    got = fn(*args, impl="ffi", **kwargs)
    want = fn(*args, impl="xla", **kwargs)
    if not _same_bits(got, want):
      got, want = np.asarray(got), np.asarray(want)
      detail = f"shape {got.shape} vs {want.shape}"
      if got.shape == want.shape and got.size:
        flat_got = got.reshape(-1).view(f"u{got.itemsize}")
        flat_want = want.reshape(-1).view(f"u{want.itemsize}")
        bad = np.flatnonzero(flat_got != flat_want)
        first = bad[0]
        detail = (
          f"{bad.size} of {got.size} differ, first at {first}: "
          f"ffi={got.reshape(-1)[first]!r} "
          f"xla={want.reshape(-1)[first]!r}"
        )
      self.failures.append(f"{name}: {detail}")
      print(f"MISMATCH {name}: {detail}", flush=True)


def check_standard(c: Checker, sizes, rng):
  """block_max_abs, quantize (all bits, signed), dequantize, average."""
  for n, dtype, seed in itertools.product(sizes, DTYPES, SEEDS):
    x = _inputs(n, dtype, rng)
    tag = f"n={n} {jnp.dtype(dtype).name} seed={seed[0]:#x}"
    for block in (1, 64, 4096):
      c.check(f"block_max_abs B={block} {tag}", gq.block_max_abs, x, block)
    for bits, signed in [(8, True)] + [(b, False) for b in range(2, 9)]:
      levels = wire.max_levels(bits, signed)
      for scale in (np.float32(levels / 3.0), np.float32(1e-3)):
        c.check(
          f"quantize bits={bits} signed={signed} scale={scale} {tag}",
          gq.quantize,
          x,
          scale,
          seed,
          levels=levels,
          bits=bits,
          signed_codes=signed,
        )
      if dtype != jnp.float32:
        continue  # the code paths below do not depend on the input dtype
      codes = gq.quantize(
        x,
        np.float32(levels / 3.0),
        seed,
        levels=levels,
        bits=bits,
        signed_codes=signed,
        impl="xla",
      )
      for offset in (levels, 2 * levels):
        c.check(
          f"dequantize bits={bits} signed={signed} offset={offset} {tag}",
          gq.dequantize,
          codes,
          np.float32(0.37),
          n=n,
          bits=bits,
          offset=offset,
          signed_codes=signed,
        )
      if signed:
        continue
      other = gq.quantize(
        x[::-1],
        np.float32(levels / 2.0),
        seed[::-1],
        levels=levels,
        bits=bits,
        impl="xla",
      )
      for n_a, n_b in ((1, 1), (3, 5), (64, 64), (1, 127)):
        c.check(
          f"average bits={bits} n=({n_a},{n_b}) {tag}",
          gq.average,
          codes,
          other,
          np.int32(n_a),
          np.int32(n_b),
          seed,
          bits=bits,
        )


def check_exponential(c: Checker, sizes, rng):
  """exp_encode (several floors), exp_decode and exp_reduce."""
  for n, dtype, seed in itertools.product(sizes, DTYPES, SEEDS):
    x = _inputs(n, dtype, rng)
    tag = f"n={n} {jnp.dtype(dtype).name} seed={seed[0]:#x}"
    for floor_code, scale in itertools.product(
      (1, 8, 24, 126, 127), (np.float32(0.25), np.float32(3e-20))
    ):
      c.check(
        f"exp_encode floor={floor_code} scale={scale} {tag}",
        gq.exp_encode,
        x,
        scale,
        seed,
        floor_code=floor_code,
      )
    if dtype != jnp.float32:
      continue
    a = jnp.asarray(rng.integers(0, 256, n, dtype=np.uint8))
    b = jnp.asarray(rng.integers(0, 256, n, dtype=np.uint8))
    # Close exponents exercise the carry/cancel branches of ExpReduce.
    b_near = jnp.asarray(
      (np.asarray(a) & 0x80) ^ (rng.integers(0, 2, n, dtype=np.uint8) << 7)
      | np.clip(
        (np.asarray(a) & 0x7F).astype(np.int32) + rng.integers(-2, 3, n), 0, 127
      ).astype(np.uint8)
    )
    for scale in (
      np.float32(1.5),
      np.float32(2e-38),
      np.float32(3e38),
      np.float32(np.inf),
      np.float32(np.nan),
      np.float32(0.0),
    ):
      c.check(f"exp_decode scale={scale} {tag}", gq.exp_decode, a, scale)
    # Block scales: runs of one scale in the contiguous host loop.
    block_scales = np.float32([1.5, 2e-38, 0.0, 3e38] * -(-n // 256))[
      : -(-n // 64)
    ]
    c.check(
      f"exp_decode block scales {tag}",
      gq.exp_decode,
      a,
      block_scales,
      block_size=64,
    )
    c.check(f"exp_reduce random {tag}", gq.exp_reduce, a, b, seed)
    c.check(f"exp_reduce near {tag}", gq.exp_reduce, a, b_near, seed)


def run_all_isas(quick: bool) -> int:
  """Re-runs this script in a subprocess per ISA level."""
  status = 0
  for isa in ISA_LEVELS:
    print(f"== GQSGD_JAX_CPU_ISA={isa}", flush=True)
    cmd = [sys.executable, __file__] + (["--quick"] if quick else [])
    env = dict(os.environ, GQSGD_JAX_CPU_ISA=isa)
    status = max(status, subprocess.run(cmd, env=env, check=False).returncode)
  return status


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help=f"sizes {QUICK_SIZES} instead of {SIZES}",
  )
  parser.add_argument(
    "--all-isas",
    action="store_true",
    help=f"run once per CPU kernel copy {ISA_LEVELS}",
  )
  args = parser.parse_args(argv)
  if args.all_isas:
    return run_all_isas(args.quick)
  if not gq.HAS_CPU:
    print("no CPU FFI module registered: nothing to compare", file=sys.stderr)
    return 2
  rng = np.random.default_rng(0)
  sizes = QUICK_SIZES if args.quick else SIZES
  c = Checker()
  check_standard(c, sizes, rng)
  check_exponential(c, sizes, rng)
  if c.failures:
    print(f"FAILED: {len(c.failures)} of {c.count} comparisons differ")
    return 1
  print(
    f"OK: {c.count} comparisons bit-identical "
    f"(sizes {sizes}, backend {jax.default_backend()})"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
