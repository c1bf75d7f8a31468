"""Multi-process runs (jax.distributed, gloo on CPU) through launch_local."""

import io
import os
import re
import sys
import time

import pytest

import gqsgd_jax

_WORKER = os.path.join(os.path.dirname(__file__), "mp_worker.py")
pytestmark = pytest.mark.skipif(
  os.environ.get("JAX_PLATFORMS", "") not in ("", "cpu"),
  reason="multi-process tests simulate hosts with CPU devices",
)


def _launch(num_processes, devices_per_process, *args, timeout=120):
  out = io.StringIO()
  start = time.monotonic()
  code = gqsgd_jax.launch_local(
    [sys.executable, _WORKER, *args],
    num_processes,
    devices_per_process=devices_per_process,
    timeout_seconds=timeout,
    stdout=out,
    env={"JAX_PLATFORMS": "cpu"},
  )
  return code, out.getvalue(), time.monotonic() - start


@pytest.mark.parametrize("num_processes,devices", [(2, 2), (4, 1)])
def test_processes_end_with_identical_parameters(num_processes, devices):
  code, log, _ = _launch(num_processes, devices, "--steps", "5")
  assert code == 0, log[-3000:]
  digests = re.findall(r"\[(\d+)\] DIGEST (\w+) devices (\d+)", log)
  assert len(digests) == num_processes, log[-3000:]
  assert len({d for _, d, _ in digests}) == 1, digests
  assert all(int(n) == num_processes * devices for _, _, n in digests)


@pytest.mark.parametrize("num_processes,devices", [(2, 2), (4, 1)])
def test_hierarchical_across_processes_matches_one_process(
  num_processes, devices
):
  # A (host, local) = (2, 2) mesh. 2 processes x 2 devices: one process per
  # host, the float all-to-all/all-gather inside a process, the integer
  # reduction over gloo. 4 processes x 1 device: every collective over gloo
  # (the emulated cluster's layout). Either way the same mesh in this one
  # process ends bit-identical.
  code, log, _ = _launch(
    num_processes, devices, "--hierarchical", "--hosts", "2", "--steps", "3"
  )
  assert code == 0, log[-3000:]
  digests = re.findall(r"\[(\d+)\] DIGEST (\w+) devices (\d+)", log)
  assert len(digests) == num_processes, log[-3000:]
  assert all(n == "4" for *_, n in digests), log[-3000:]
  assert len({d for _, d, _ in digests}) == 1, digests

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import _hierarchical_step as hs  # pylint: disable=g-import-not-at-top
  from conftest import require_devices  # pylint: disable=g-import-not-at-top

  mesh = hs.host_mesh(require_devices(4), 2)
  data = [hs.device_data(i) for i in range(4)]
  sharding = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(hs.AXES)
  )
  a, b = (
    jax.device_put(np.stack([d[i] for d in data]), sharding) for i in (0, 1)
  )
  assert hs.train(mesh, a, b, 3) == digests[0][1]


def test_a_dead_process_stops_the_run_within_60_seconds():
  # Rank 2 of 3 exits abruptly mid-training. The survivors' gloo collectives
  # fail, JAX's heartbeat marks rank 2 dead, and the launcher reports it and
  # stops everything: a non-zero exit and a clear message, never a hang.
  code, log, elapsed = _launch(
    3, 1, "--steps", "10000", "--die-at", "20", "--die-rank", "2"
  )
  assert code == 17, log[-3000:]
  assert "[launch] FAILED: process 2 exited with code 17" in log
  # The survivors stopped by themselves (JAX aborts them), not by our kill.
  codes = re.search(r"\[launch\] exit codes \[(.*?)\]", log).group(1)
  assert "killed" not in log, log[-3000:]
  assert all(int(c) != 0 for c in codes.split(",")), codes
  assert elapsed < 60 + 20, elapsed  # 60 s budget after start-up (~10 s)
