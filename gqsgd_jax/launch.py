"""Runs a command as N cooperating JAX processes on this machine.

    python -m gqsgd_jax.launch -n 4 [--devices-per-process 2] -- \
        python examples/vision/main.py --steps 100

The command calls ``gqsgd_jax.initialize_distributed()`` first; on a cluster
(SLURM, Open MPI, ...) run it under the scheduler instead, and the same call
picks up JAX's auto-detection.

By default the launcher shows rank 0's output and one summary line per
rank (``[rank] exit CODE after SECONDS s: LAST LINE``), plus the last lines
of a rank that fails; ``--verbose`` shows every line of every rank and
``--log-dir DIR`` keeps each rank's full output in ``DIR/rank<N>.log``.
"""

import argparse
from collections.abc import Sequence
import sys

from gqsgd_jax._src.distributed import launch_local


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m gqsgd_jax.launch",
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  parser.add_argument("-n", "--num-processes", type=int, required=True)
  parser.add_argument(
    "--devices-per-process",
    type=int,
    default=1,
    help="simulated CPU devices per process",
  )
  parser.add_argument(
    "--port",
    type=int,
    default=None,
    help="coordinator port on 127.0.0.1 (default: free)",
  )
  parser.add_argument(
    "--timeout",
    type=float,
    default=None,
    help="kill everything after this many seconds",
  )
  parser.add_argument(
    "--grace",
    type=float,
    default=45.0,
    help="seconds the others get after one process fails",
  )
  parser.add_argument(
    "-v",
    "--verbose",
    action="store_true",
    help="show every line of every process",
  )
  parser.add_argument(
    "--log-dir",
    default=None,
    help="write each process's full output to LOG_DIR/rank<N>.log",
  )
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("missing the command to run (after --)")
  return launch_local(
    command,
    args.num_processes,
    devices_per_process=args.devices_per_process,
    port=args.port,
    timeout_seconds=args.timeout,
    grace_seconds=args.grace,
    verbose=args.verbose,
    log_dir=args.log_dir,
  )


if __name__ == "__main__":
  sys.exit(main())
