"""Runs a command as N cooperating JAX processes on this machine.

    python -m gqsgd_jax.launch -n 4 [--devices-per-process 2] -- \
        python examples/vision/main.py --steps 100

The command calls ``gqsgd_jax.initialize_distributed()`` first; on a cluster
(SLURM, Open MPI, ...) run it under the scheduler instead, and the same call
picks up JAX's auto-detection.
"""

import argparse
import sys

from gqsgd_jax._src.distributed import launch_local


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m gqsgd_jax.launch",
      description=__doc__.splitlines()[0])
  parser.add_argument("-n", "--num-processes", type=int, required=True)
  parser.add_argument("--devices-per-process", type=int, default=1,
                      help="simulated CPU devices per process")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port on 127.0.0.1 (default: free)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="kill everything after this many seconds")
  parser.add_argument("--grace", type=float, default=45.0,
                      help="seconds the others get after one process fails")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("missing the command to run (after --)")
  return launch_local(command, args.num_processes,
                      devices_per_process=args.devices_per_process,
                      port=args.port, timeout_seconds=args.timeout,
                      grace_seconds=args.grace)


if __name__ == "__main__":
  sys.exit(main())
