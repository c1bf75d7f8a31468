"""What the launcher prints: every line (verbose) or a summary per rank."""

import io
import sys
import textwrap

import gqsgd_jax

# A stand-in for a training script: no JAX, so the test takes a second.
_CHILD = textwrap.dedent("""
    import os, sys
    rank = int(os.environ["GQSGD_PROCESS_ID"])
    for i in range(5):
      print(f"detail {i} of rank {rank}", flush=True)
    if rank == int(sys.argv[1]):
      sys.exit(3)
    print(f"DONE rank {rank}")
""")


def _launch(tmp_path, fail_rank=-1, **kwargs):
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  out = io.StringIO()
  code = gqsgd_jax.launch_local(
    [sys.executable, str(script), str(fail_rank)],
    3,
    stdout=out,
    grace_seconds=5,
    timeout_seconds=60,
    **kwargs,
  )
  return code, out.getvalue().splitlines()


def test_quiet_mode_shows_rank_0_and_one_line_per_other_rank(tmp_path):
  code, lines = _launch(tmp_path, verbose=False, log_dir=tmp_path / "logs")
  assert code == 0
  for rank in (1, 2):
    mine = [line for line in lines if line.startswith(f"[{rank}] ")]
    assert len(mine) == 1, lines
    assert mine[0].startswith(f"[{rank}] exit 0 after ")
    assert mine[0].endswith(f": DONE rank {rank}")
  assert sum(line.startswith("[0] detail") for line in lines) == 5
  # The details are in the files, all of them.
  for rank in range(3):
    log = (tmp_path / "logs" / f"rank{rank}.log").read_text().splitlines()
    assert log == [f"detail {i} of rank {rank}" for i in range(5)] + [
      f"DONE rank {rank}"
    ]


def test_quiet_mode_shows_the_last_lines_of_a_failed_rank(tmp_path):
  code, lines = _launch(tmp_path, fail_rank=2, verbose=False)
  assert code == 3
  assert [line for line in lines if line.startswith("[2] detail")] == [
    f"[2] detail {i} of rank 2" for i in range(5)
  ]
  assert "[launch] FAILED: process 2 exited with code 3" in lines


def test_verbose_mode_shows_every_line(tmp_path):
  code, lines = _launch(tmp_path)
  assert code == 0
  for rank in range(3):
    assert sum(line.startswith(f"[{rank}] ") for line in lines) == 6, lines
