"""Throughput of each kernel: FFI vs its pure-XLA twin vs streaming ops.

GB/s = (bytes read + bytes written) / median wall time, counting only the
array operands and results (scalars and seeds are negligible), with
1 GB = 1e9 bytes.

Every kernel is timed two ways, both compiled once outside the timed loop
and ending each call with block_until_ready:

* per call: ``jax.jit(op)`` on device arrays, as an unfused call site sees
  it. This includes XLA allocating the output buffer, and a fresh buffer's
  first-touch page faults are part of that (very costly on some VMs).
* in a loop: the marginal time of one more op inside a jitted
  ``lax.fori_loop`` whose trip count is a runtime argument,
  (T(1 + K iterations) - T(1 iteration)) / K. XLA reuses the loop's buffers,
  so this is the kernel's own throughput. Each iteration changes the seed
  (or the scale) so that XLA cannot hoist the op out of the loop.

The streaming references are plain XLA ops over the same number of
elements, measured the same two ways in the same run: ``x * 2`` with the
input donated (in place; reads and writes 4 bytes per element) and an
f32 -> bf16 cast (reads 4, writes 2; in the loop ``(x * i)`` is cast so
that it is not loop-invariant). The faster one is the "stream" bound of the
FFI/stream column.

Usage:
  python benchmarks/kernel_benchmark.py                  # 16M elements
  python benchmarks/kernel_benchmark.py --quick          # CI smoke test
  python benchmarks/kernel_benchmark.py --filter quantize --output -
"""

import argparse
from collections.abc import Callable
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import gqsgd_jax as gq
from gqsgd_jax._src import ffi as ffi_lib
from gqsgd_jax._src import wire
from gqsgd_jax._src.baselines import hadamard

import _common

DEFAULT_OUTPUT = os.path.join(
  os.path.dirname(__file__), "results", "kernels.md"
)
# (bits, signed_codes) configurations of the standard-dithering kernels.
QUANTIZE_CONFIGS = ((8, True), (8, False), (4, False), (2, False), (3, False))
IMPLS = ("ffi", "xla")


@dataclasses.dataclass(frozen=True)
class Case:
  """One kernel configuration, runnable with either impl."""

  name: str
  op: Callable  # op(*args, impl=...) -> array
  args: tuple
  # vary(args, i) -> args of loop iteration i; None: per call only (an op
  # whose only operand is its input, which XLA would hoist out of a loop).
  vary: Callable | None
  bytes_moved: int  # bytes read + written per call


@dataclasses.dataclass(frozen=True)
class Timing:
  """Median seconds per op of one kernel (or streaming op)."""

  name: str
  bytes_moved: int
  call: dict[str, float]  # impl -> seconds per call
  loop: dict[str, float]  # impl -> marginal seconds per op in a loop
  loop_cpu: dict[str, float]  # impl -> marginal process CPU seconds, ditto


def _nbytes(*arrays) -> int:
  return sum(int(a.size) * a.dtype.itemsize for a in arrays)


def _vary_seed(position: int) -> Callable:
  def vary(args, i):
    seed = args[position] ^ i.astype(jnp.uint32)
    return args[:position] + (seed,) + args[position + 1 :]

  return vary


def _vary_scale(position: int) -> Callable:
  def vary(args, i):
    scale = args[position] * (1 + i).astype(jnp.float32)
    return args[:position] + (scale,) + args[position + 1 :]

  return vary


def _config_name(bits: int, signed: bool) -> str:
  return f"bits={bits}" + (" signed" if signed else "")


def build_cases(n: int) -> list[Case]:
  """The benchmarked kernels on n-element inputs."""
  rng = np.random.default_rng(0)
  x32 = jnp.asarray(rng.standard_normal(n, dtype=np.float32))
  inputs = {"f32": x32, "bf16": x32.astype(jnp.bfloat16)}
  seed = jnp.asarray([1234, 5678], jnp.uint32)
  amax = float(jnp.max(jnp.abs(x32))) if n else 1.0
  cases = []

  def codes_of(x, bits, signed, s=seed):
    levels = wire.max_levels(bits, signed)
    return gq.quantize(
      x,
      jnp.float32(levels / amax),
      s,
      levels=levels,
      bits=bits,
      signed_codes=signed,
      impl="xla",
    )

  for bits, signed in QUANTIZE_CONFIGS:
    levels = wire.max_levels(bits, signed)
    op = functools.partial(
      gq.quantize, levels=levels, bits=bits, signed_codes=signed
    )
    codes = codes_of(x32, bits, signed)
    for dtype, x in inputs.items():
      cases.append(
        Case(
          f"quantize {_config_name(bits, signed)} ({dtype})",
          op,
          (x, jnp.float32(levels / amax), seed),
          _vary_seed(2),
          _nbytes(x, codes),
        )
      )

  for bits, signed in QUANTIZE_CONFIGS:
    levels = wire.max_levels(bits, signed)
    codes = codes_of(x32, bits, signed)
    op = functools.partial(
      gq.dequantize, n=n, bits=bits, offset=levels, signed_codes=signed
    )
    cases.append(
      Case(
        f"dequantize {_config_name(bits, signed)}",
        op,
        (codes, jnp.float32(amax / levels)),
        _vary_scale(1),
        _nbytes(codes, x32),
      )
    )

  for bits, signed in QUANTIZE_CONFIGS:
    if signed:
      continue
    a = codes_of(x32, bits, False)
    b = codes_of(x32[::-1], bits, False, seed[::-1])
    cases.append(
      Case(
        f"average {_config_name(bits, False)}",
        functools.partial(gq.average, bits=bits),
        (a, b, jnp.int32(3), jnp.int32(5), seed),
        _vary_seed(4),
        _nbytes(a, b, a),
      )
    )

  exp_scale = jnp.float32(0.5 / amax)
  exp_codes = gq.exp_encode(x32, exp_scale, seed, impl="xla")
  for dtype, x in inputs.items():
    cases.append(
      Case(
        f"exp_encode ({dtype})",
        gq.exp_encode,
        (x, exp_scale, seed),
        _vary_seed(2),
        _nbytes(x, exp_codes),
      )
    )
  cases.append(
    Case(
      "exp_decode",
      gq.exp_decode,
      (exp_codes, jnp.float32(amax * 2)),
      _vary_scale(1),
      _nbytes(exp_codes, x32),
    )
  )
  other = gq.exp_encode(x32[::-1], exp_scale, seed[::-1], impl="xla")
  cases.append(
    Case(
      "exp_reduce",
      gq.exp_reduce,
      (exp_codes, other, seed),
      _vary_seed(2),
      _nbytes(exp_codes, other, exp_codes),
    )
  )
  # CPU only: on a GPU block_max_abs is XLA's own reduction (no FFI handler).
  for block in (1024, 2**16) if jax.default_backend() == "cpu" else ():
    cases.append(
      Case(
        f"block_max_abs B={block} (f32)",
        functools.partial(gq.block_max_abs, block_size=block),
        (x32,),
        None,
        _nbytes(x32) + 4 * -(-n // block),
      )
    )
  # THC's Hadamard transform (CPU kernel) vs its matrix-product passes, on
  # rows of up to 2^23 elements (THC's chunk size); per call only.
  if jax.default_backend() == "cpu":
    block_log2 = min(23, (n & -n).bit_length() - 1)
    cases.append(
      Case(
        f"hadamard rows of 2^{block_log2} (f32)",
        functools.partial(hadamard.transform_blocks, block_log2=block_log2),
        (x32,),
        None,
        _nbytes(x32, x32),
      )
    )
  return cases


def _loop_fn(op: Callable, vary: Callable, args: tuple) -> Callable:
  """trips -> result of ``trips`` iterations of op(*vary(args, i)).

  Compiled once; the trip count is a runtime operand, so XLA can neither
  unroll the loop nor specialise it.
  """
  out = jax.eval_shape(op, *args)

  def run(trips, *args):
    body = lambda i, _: op(*vary(args, i))
    return jax.lax.fori_loop(0, trips, body, jnp.zeros(out.shape, out.dtype))

  compiled = jax.jit(run).lower(jnp.int32(1), *args).compile()
  return lambda trips: compiled(trips, *args)


def _time(
  name: str,
  bytes_moved: int,
  call: dict,
  loop: dict,
  repeats: int,
  loop_trips: int,
) -> Timing:
  """Times per-call thunks and loop functions, all interleaved."""
  thunks = dict(call)
  one, more = jnp.int32(1), jnp.int32(1 + loop_trips)
  for impl, fn in loop.items():
    thunks[f"{impl} loop 1"] = functools.partial(fn, one)
    thunks[f"{impl} loop K"] = functools.partial(fn, more)
  wall, cpu = _common.median_wall_and_cpu(thunks, repeats)
  marginal = lambda t: {
    impl: (t[f"{impl} loop K"] - t[f"{impl} loop 1"]) / loop_trips
    for impl in loop
  }
  return Timing(
    name,
    bytes_moved,
    {impl: wall[impl] for impl in call},
    marginal(wall),
    marginal(cpu),
  )


def time_case(case: Case, repeats: int, loop_trips: int) -> Timing:
  call, loop = {}, {}
  for impl in IMPLS:
    op = functools.partial(case.op, impl=impl)
    call[impl] = functools.partial(
      jax.jit(op).lower(*case.args).compile(), *case.args
    )
    if case.vary is not None:
      loop[impl] = _loop_fn(op, case.vary, case.args)
  return _time(case.name, case.bytes_moved, call, loop, repeats, loop_trips)


class _Chained:
  """Calls a donating fn on its own previous output."""

  def __init__(self, fn: Callable, x: jax.Array):
    self.fn, self.x = fn, x

  def __call__(self) -> jax.Array:
    self.x = self.fn(self.x)
    return self.x


def time_streaming(n: int, repeats: int, loop_trips: int) -> list[Timing]:
  """The streaming references (stored under the "xla" impl)."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal(n, np.float32))
  double = jax.jit(lambda v: v * 2, donate_argnums=0)
  double_loop = (
    jax.jit(lambda trips, v: jax.lax.fori_loop(0, trips, lambda i, v: v * 2, v))
    .lower(jnp.int32(1), x)
    .compile()
  )
  rows = [
    _time(
      "x * 2, f32 -> f32 (donated)",
      8 * n,
      {"xla": _Chained(double.lower(x).compile(), jnp.copy(x))},
      {"xla": lambda trips: double_loop(trips, x)},
      repeats,
      loop_trips,
    )
  ]
  cast = lambda v: v.astype(jnp.bfloat16)
  vary = lambda args, i: (args[0] * (1 + i).astype(jnp.float32),)
  rows.append(
    _time(
      "cast f32 -> bf16",
      6 * n,
      {"xla": functools.partial(jax.jit(cast).lower(x).compile(), x)},
      {"xla": _loop_fn(cast, vary, (x,))},
      repeats,
      loop_trips,
    )
  )
  return rows


def gbps(bytes_moved: int, seconds: float) -> float:
  return bytes_moved / seconds / 1e9 if seconds > 0 else float("nan")


def _kernel_table(rows: list[Timing], kind: str, bound: float) -> list[str]:
  """Per call: ms and GB/s per impl. In a loop: also the CPU ms."""
  cpu = kind == "loop"
  impl_cols = "ms | CPU ms | GB/s" if cpu else "ms | GB/s"
  out = [
    f"| kernel | MB moved | FFI {impl_cols.replace(' | ', ' | FFI ')} | "
    f"XLA {impl_cols.replace(' | ', ' | XLA ')} | FFI/XLA | FFI/stream |",
    "|---|" + "---:|" * (7 + 2 * cpu),
  ]
  for r in rows:
    t = getattr(r, kind)
    if not t:  # per call only
      continue
    cells = [r.name, f"{r.bytes_moved / 1e6:.1f}"]
    for impl in IMPLS:
      cells.append(f"{t[impl] * 1e3:.2f}")
      if cpu:
        cells.append(f"{r.loop_cpu[impl] * 1e3:.2f}")
      cells.append(f"{gbps(r.bytes_moved, t[impl]):.1f}")
    ffi, xla = gbps(r.bytes_moved, t["ffi"]), gbps(r.bytes_moved, t["xla"])
    cells += [f"{ffi / xla:.2f}", f"{ffi / bound:.2f}"]
    out.append("| " + " | ".join(cells) + " |")
  return out


def render(
  n: int,
  repeats: int,
  loop_trips: int,
  load: tuple[str, str],
  stream: list[Timing],
  rows: list[Timing],
) -> str:
  """The Markdown report."""
  bound = {
    kind: max(gbps(r.bytes_moved, getattr(r, kind)["xla"]) for r in stream)
    for kind in ("call", "loop")
  }
  out = [
    f"# Kernel throughput, {n:,} elements",
    "",
    *_common.machine_lines(),
    f"- Load average (1, 5, 15 min) at start: {load[0]}; at end: {load[1]}",
    "",
    "GB/s = (bytes read + bytes written) / median time, 1 GB = 1e9 "
    "bytes, array operands and results only. Medians of "
    f"{repeats} interleaved calls. Per call: `jax.jit(op)` on device "
    "arrays, including XLA's allocation of the output. In a loop: "
    f"marginal time of one op in a jitted `fori_loop` ((T(1 + "
    f"{loop_trips}) - T(1)) / {loop_trips} iterations), buffers "
    "reused; CPU ms is the process CPU time per op (all threads): on "
    "an idle machine ms ~= CPU ms / cores used, a larger ms means "
    "other processes held the cores. `FFI/XLA` and `FFI/stream` are "
    "throughput ratios; stream is the faster streaming reference "
    f"measured the same way ({bound['call']:.1f} GB/s per call, "
    f"{bound['loop']:.1f} GB/s in a loop). See the docstring of "
    "benchmarks/kernel_benchmark.py.",
    "",
    "## Streaming references (plain XLA)",
    "",
    "| op | MB moved | per call ms | GB/s | in loop ms | CPU ms | GB/s |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in stream:
    call, loop = r.call["xla"], r.loop["xla"]
    out.append(
      f"| {r.name} | {r.bytes_moved / 1e6:.1f} | {call * 1e3:.2f} | "
      f"{gbps(r.bytes_moved, call):.1f} | {loop * 1e3:.2f} | "
      f"{r.loop_cpu['xla'] * 1e3:.2f} | "
      f"{gbps(r.bytes_moved, loop):.1f} |"
    )
  out += [
    "",
    "## Kernels in a loop (buffers reused)",
    "",
    *_kernel_table(rows, "loop", bound["loop"]),
    "",
    "## Kernels per call (output allocated by XLA)",
    "",
    *_kernel_table(rows, "call", bound["call"]),
  ]
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--size", type=int, default=1 << 24, help="elements per array (default 16M)"
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=20,
    help="timed calls per kernel and impl (default 20)",
  )
  parser.add_argument(
    "--loop-trips",
    type=int,
    default=5,
    help="extra loop iterations K of the in-loop timing",
  )
  parser.add_argument(
    "--output",
    default=None,
    help=f"Markdown file, '-' for stdout (default "
    f"{os.path.relpath(DEFAULT_OUTPUT)}; stdout with "
    "--quick)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="smoke test: 65536 elements, 3 repeats"
  )
  parser.add_argument(
    "--filter", default="", help="only kernels whose name contains this string"
  )
  args = parser.parse_args(argv)
  if args.quick:
    args.size, args.repeats = 1 << 16, 3
  output = args.output or ("-" if args.quick else DEFAULT_OUTPUT)
  if jax.default_backend() not in ffi_lib.REGISTERED_PLATFORMS:
    print(
      f"no FFI module registered for {jax.default_backend()}: nothing "
      "to compare",
      file=sys.stderr,
    )
    return 2

  load_start = _common.load_average()
  stream = time_streaming(args.size, args.repeats, args.loop_trips)
  rows = []
  for case in build_cases(args.size):
    if args.filter not in case.name:
      continue
    row = time_case(case, args.repeats, args.loop_trips)
    rows.append(row)
    rate = {
      f"{kind} {impl}": gbps(row.bytes_moved, getattr(row, kind)[impl])
      for kind in ("loop", "call")
      for impl in IMPLS
      if impl in getattr(row, kind)
    }
    print(
      f"{row.name:30s} GB/s "
      + ", ".join(f"{k} {v:.2f}" for k, v in rate.items()),
      file=sys.stderr,
      flush=True,
    )
  report = render(
    args.size,
    args.repeats,
    args.loop_trips,
    (load_start, _common.load_average()),
    stream,
    rows,
  )
  if output == "-":
    sys.stdout.write(report)
  else:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      f.write(report)
    print(f"wrote {output}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
