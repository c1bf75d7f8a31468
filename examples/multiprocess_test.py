"""The examples as several processes (jax.distributed, gloo on CPU).

Runs ``examples/<name>/main.py`` for a few steps under
``gqsgd_jax.launch_local`` and checks that every process ends with the same
parameters (the PARAMS_DIGEST line each prints).
"""

import dataclasses
import io
import os
import pathlib
import re
import sys

import pytest

from examples.language import train
from examples.language.configs import default
from examples.vision.train_test import _require_devices
import gqsgd_jax

_EXAMPLES = pathlib.Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(
  os.environ.get("JAX_PLATFORMS", "") not in ("", "cpu"),
  reason="multi-process tests simulate hosts with CPU devices",
)


def _digests(log: str) -> list[tuple[int, str, int, int]]:
  """(launcher rank, digest, process index, global devices) per process."""
  return [
    (int(r), d, int(p), int(n))
    for r, d, p, n in re.findall(
      r"\[(\d+)\] PARAMS_DIGEST (\w+) process (\d+)/\d+ devices (\d+)", log
    )
  ]


# reduction="two_shot": "auto" would pick the butterfly for 2 processes x
# 2 devices (an axis over processes of several devices each) and the
# two-shot reduction for 4 devices of one process; the comparison below
# needs the same reduction in both runs (and covers the all-to-all over
# gloo).
_RUN = dict(
  compressor="gqsgd",
  bits=4,
  reduction="two_shot",
  steps=4,
  seq_len=16,
  batch_size=8,
)


def test_language_processes_end_with_identical_parameters(tmp_path):
  num_processes, devices = 2, 2
  log_path = tmp_path / "run.json"
  command = [
    sys.executable,
    str(_EXAMPLES / "language" / "main.py"),
    "--no-progress",
    "--log",
    str(log_path),
  ]
  for k, v in _RUN.items():
    command += [f"--{k.replace('_', '-')}", str(v)]
  out = io.StringIO()
  code = gqsgd_jax.launch_local(
    command,
    num_processes,
    devices_per_process=devices,
    timeout_seconds=240,
    stdout=out,
    env={"JAX_PLATFORMS": "cpu"},
  )
  log = out.getvalue()
  assert code == 0, log[-3000:]
  digests = _digests(log)
  assert sorted(r for r, *_ in digests) == list(range(num_processes)), log
  # Launcher rank == JAX process index; the mesh spans every process.
  assert all(
    r == p and n == num_processes * devices for r, _, p, n in digests
  ), digests
  assert len({d for _, d, _, _ in digests}) == 1, digests
  # Process 0 alone writes the log, with the whole run's metrics.
  assert log_path.exists()
  assert '"processes": 2' in log_path.read_text()

  # The same run on 4 devices of this one process: the same global batches,
  # and Global-QSGD sums integers, so the params match bit for bit.
  _require_devices(num_processes * devices)
  config = dataclasses.replace(
    default.get_config(), workers=4, progress=False, **_RUN
  )
  assert train.train_and_evaluate(config)["params_digest"] == digests[0][1]


def test_digest_line_format():
  assert _digests("[1] PARAMS_DIGEST ab12 process 1/2 devices 4\n") == [
    (1, "ab12", 1, 4)
  ]
