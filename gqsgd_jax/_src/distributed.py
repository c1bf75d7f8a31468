"""Multi-process runs through JAX's own multi-controller runtime.

``initialize`` wraps ``jax.distributed.initialize``: gloo collectives on CPU
(NCCL on GPUs is JAX's default), a short heartbeat so a dead peer is noticed
within seconds, and three ways to find the cluster, in order:

1. explicit arguments;
2. the ``GQSGD_COORDINATOR`` / ``GQSGD_NUM_PROCESSES`` / ``GQSGD_PROCESS_ID``
   variables that ``launch_local`` sets;
3. JAX's own auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU, ...).

``launch_local`` starts N copies of a command on this machine and supervises
them: when one fails, the others get ``grace_seconds`` to notice (JAX aborts
them once the heartbeat times out, gloo collectives fail at once), then are
killed, and the launcher exits non-zero naming the first failure. A run can
therefore never hang on a dead peer.
"""

import collections
from collections.abc import Mapping, Sequence
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, TextIO

ENV_COORDINATOR = "GQSGD_COORDINATOR"
ENV_NUM_PROCESSES = "GQSGD_NUM_PROCESSES"
ENV_PROCESS_ID = "GQSGD_PROCESS_ID"
ENV_LOCAL_DEVICES = "GQSGD_LOCAL_DEVICES"


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_device_count: int | None = None,
  heartbeat_timeout_seconds: int = 20,
  initialization_timeout: int = 120,
) -> None:
  """Joins this process to a multi-process JAX run (see module docstring).

  Call before any other JAX work. ``local_device_count`` sets how many CPU
  devices this process simulates (default: ``GQSGD_LOCAL_DEVICES`` or 1);
  it has no effect on GPU hosts.
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ
  if coordinator_address is None and ENV_COORDINATOR in env:
    coordinator_address = env[ENV_COORDINATOR]
    num_processes = int(env[ENV_NUM_PROCESSES])
    process_id = int(env[ENV_PROCESS_ID])
  if local_device_count is None:
    local_device_count = int(env.get(ENV_LOCAL_DEVICES, "1"))
  if local_device_count < 1:
    raise ValueError(
      f"local_device_count must be >= 1, got {local_device_count}"
    )
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms in ("", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", local_device_count)
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    initialization_timeout=initialization_timeout,
  )


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _RankOutput:
  """One process's output: shown, kept for its summary, logged to a file."""

  def __init__(
    self,
    rank: int,
    sink: TextIO,
    *,
    live: bool,
    log_path: str | os.PathLike[str] | None = None,
    keep: int = 20,
  ) -> None:
    self.prefix = f"[{rank}] "
    self.sink = sink
    self.live = live
    # Closed by pump() when the process's output ends.
    self.log = open(log_path, "w") if log_path else None  # noqa: SIM115
    self.tail: collections.deque[str] = collections.deque(maxlen=keep)
    self.lock = threading.Lock()

  def pump(self, stream: IO[str]) -> None:
    for line in iter(stream.readline, ""):
      if self.log:
        self.log.write(line)
        self.log.flush()
      if line.strip():
        self.tail.append(line.rstrip("\n"))
      if self.live:
        with self.lock:
          self.sink.write(f"{self.prefix}{line}")
          self.sink.flush()
    if self.log:
      self.log.close()

  def last_line(self) -> str:
    return self.tail[-1] if self.tail else "(no output)"


def launch_local(
  command: Sequence[str],
  num_processes: int,
  *,
  devices_per_process: int = 1,
  port: int | None = None,
  timeout_seconds: float | None = None,
  grace_seconds: float = 45.0,
  env: Mapping[str, str] | None = None,
  stdout: TextIO | None = None,
  verbose: bool = True,
  log_dir: str | os.PathLike[str] | None = None,
) -> int:
  """Runs ``command`` as ``num_processes`` cooperating processes on localhost.

  Each copy gets the ``GQSGD_*`` variables that ``initialize`` reads.

  Args:
    command: the program and its arguments, run once per process.
    num_processes: how many processes to start (ranks 0..N-1).
    devices_per_process: simulated CPU devices per process.
    port: coordinator port on 127.0.0.1 (default: a free one).
    timeout_seconds: kill everything after this long (exit code 124).
    grace_seconds: how long the others get to stop by themselves after one
      process fails, before they are killed.
    env: extra environment variables for every process.
    stdout: where the output goes (default ``sys.stdout``).
    verbose: True: every line of every process, prefixed with ``[rank]``.
      False: rank 0's lines as they come, then one summary line per rank
      when it exits (its exit code, run time and last line of output), and
      the last lines of any process that failed.
    log_dir: if set, each process's full output also goes to
      ``log_dir/rank<N>.log``.

  Returns:
    0 if all processes succeed, else the first failing process's exit code
    (124 on timeout).
  """
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(
      f"devices_per_process must be >= 1, got {devices_per_process}"
    )
  sink = stdout or sys.stdout
  address = f"127.0.0.1:{port or free_port()}"
  if log_dir is not None:
    pathlib.Path(log_dir).mkdir(parents=True, exist_ok=True)
  procs, pumps, outputs = [], [], []
  for rank in range(num_processes):
    child_env = dict(os.environ, **(env or {}))
    child_env.update(
      {
        ENV_COORDINATOR: address,
        ENV_NUM_PROCESSES: str(num_processes),
        ENV_PROCESS_ID: str(rank),
        ENV_LOCAL_DEVICES: str(devices_per_process),
        "PYTHONUNBUFFERED": "1",
      }
    )
    proc = subprocess.Popen(
      list(command),
      env=child_env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    output = _RankOutput(
      rank,
      sink,
      live=verbose or rank == 0,
      log_path=None
      if log_dir is None
      else (pathlib.Path(log_dir) / f"rank{rank}.log"),
    )
    pump = threading.Thread(
      target=output.pump, args=(proc.stdout,), daemon=True
    )
    pump.start()
    procs.append(proc)
    pumps.append(pump)
    outputs.append(output)
  if not verbose:
    sink.write(
      f"[launch] {num_processes} processes x {devices_per_process} "
      f"device(s); showing rank 0's output, then one line per rank"
      + (f"; full logs in {log_dir}" if log_dir is not None else "")
      + "\n"
    )
    sink.flush()

  start = time.monotonic()
  failure = None  # (rank, exit code)
  deadline = None
  summarized = set()
  while True:
    codes = [p.poll() for p in procs]
    if not verbose:
      for rank, code in enumerate(codes):
        if code is not None and rank not in summarized:
          summarized.add(rank)
          pumps[rank].join(timeout=5)
          _summarize(outputs[rank], code, time.monotonic() - start, sink)
    if failure is None:
      for rank, code in enumerate(codes):
        if code not in (None, 0):
          failure = (rank, code)
          deadline = time.monotonic() + grace_seconds
          sink.write(
            f"[launch] process {rank} exited with code {code}; "
            f"stopping the others within {grace_seconds:.0f} s\n"
          )
          break
    if all(c is not None for c in codes):
      break
    if deadline is not None and time.monotonic() > deadline:
      break
    if (
      timeout_seconds is not None
      and (time.monotonic() - start > timeout_seconds)
      and failure is None
    ):
      failure = (-1, 124)
      sink.write(f"[launch] timed out after {timeout_seconds:.0f} s\n")
      break
    time.sleep(0.1)

  killed = [rank for rank, proc in enumerate(procs) if proc.poll() is None]
  for rank in killed:
    os.killpg(procs[rank].pid, signal.SIGKILL)
  for proc in procs:
    proc.wait()
  for pump in pumps:
    pump.join(timeout=5)
  if not verbose:
    for rank, proc in enumerate(procs):
      if rank not in summarized:
        _summarize(
          outputs[rank], proc.returncode, time.monotonic() - start, sink
        )
  if failure is None:
    return 0
  codes = [proc.returncode for proc in procs]
  sink.write(
    f"[launch] exit codes {codes} after "
    f"{time.monotonic() - start:.1f} s"
    + (f"; killed {killed}" if killed else "")
    + "\n"
  )
  rank, code = failure
  if rank >= 0:
    sink.write(f"[launch] FAILED: process {rank} exited with code {code}\n")
  return code if code > 0 else 1


def _summarize(
  output: _RankOutput, code: int, seconds: float, sink: TextIO
) -> None:
  """The one line of a finished process (and its last lines if it failed)."""
  with output.lock:
    if code != 0 and not output.live:
      for line in output.tail:
        sink.write(f"{output.prefix}{line}\n")
    sink.write(
      f"{output.prefix}exit {code} after {seconds:.1f} s: "
      f"{output.last_line()}\n"
    )
    sink.flush()
