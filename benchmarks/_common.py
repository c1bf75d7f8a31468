"""Shared helpers for the benchmarks: timing and a machine description."""

from collections.abc import Callable
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jaxlib

# ISA levels of the CPU kernel copies (xla_ffi/src/cpu_executor.h) and the
# /proc/cpuinfo flags each one needs (the ones that matter here).
_ISA_FLAGS = (
  ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
  ("x86-64-v3", {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}),
)


def median_times(
  thunks: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
  """Median wall seconds of each thunk, each call ending in block_until_ready.

  The thunks must already be compiled. They are called round-robin, one
  call of each per round, so that a change in the load of the machine
  during the run affects all of them alike rather than whichever ran then.
  """
  return median_wall_and_cpu(thunks, repeats, warmup)[0]


def median_wall_and_cpu(
  thunks: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> tuple[dict[str, float], dict[str, float]]:
  """Like median_times, plus the median process CPU seconds (all threads).

  On an idle machine wall ~= CPU / busy cores; a wall time well above that
  means other processes held the cores.
  """
  for _ in range(warmup):
    for thunk in thunks.values():
      jax.block_until_ready(thunk())
  wall = {name: [] for name in thunks}
  cpu = {name: [] for name in thunks}
  for _ in range(repeats):
    for name, thunk in thunks.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(thunk())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  median = lambda d: {name: statistics.median(ts) for name, ts in d.items()}
  return median(wall), median(cpu)


def _cpuinfo_field(name: str) -> str | None:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(name):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model() -> str:
  return (
    _cpuinfo_field("model name") or platform.processor() or platform.machine()
  )


def kernel_isa() -> str:
  """The CPU kernel copy the FFI module should pick on this machine."""
  flags = set((_cpuinfo_field("flags") or "").split())
  best = "baseline"
  for isa, needed in _ISA_FLAGS:
    if needed <= flags:
      best = isa
      break
  cap = os.environ.get("GQSGD_JAX_CPU_ISA")
  if cap:
    order = ["baseline", "x86-64-v3", "x86-64-v4"]
    cap = cap if cap in order else "baseline"
    best = order[min(order.index(best), order.index(cap))]
    return f"{best} (capped by GQSGD_JAX_CPU_ISA={cap})"
  return best


def load_average() -> str:
  try:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "unknown"


def machine_lines() -> list[str]:
  """Markdown bullet lines: date, CPU, cores, versions, command."""
  command = " ".join(
    shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]
  )
  return [
    f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
    f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores visible; "
    f"FFI kernel copy: {kernel_isa()}",
    f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend "
    f"{jax.default_backend()}, Python {platform.python_version()}",
    f"- Command: `python {command}`",
  ]
