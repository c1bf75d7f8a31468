"""Trains the vision example, e.g. with --compressor gqsgd --bits 4.

Multi-process: ``python -m gqsgd_jax.launch -n 2 -- python
examples/vision/main.py`` (or --distributed under SLURM and the like).
"""

import argparse
import dataclasses
import pathlib
import sys

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from examples import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_run_args(parser)
  parser.add_argument("--data", help=".npz with x_train/y_train/x_test/y_test "
                      "(default: scikit-learn's digits)")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  # Before anything starts JAX's backend.
  common.setup_devices(args.workers, args.distributed)
  from examples.vision import train
  from examples.vision.configs import default

  config = dataclasses.replace(default.get_config(),
                               **common.config_overrides(args))
  print(common.report(train.train_and_evaluate(config)), flush=True)


if __name__ == "__main__":
  main()
