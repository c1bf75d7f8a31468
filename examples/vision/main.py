"""Trains the vision example, e.g. with --compressor gqsgd --bits 4."""

import argparse
import dataclasses
import json
import pathlib
import sys

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from examples import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--compressor", choices=common.COMPRESSORS)
  parser.add_argument("--bits", type=int, help="bits per coordinate (gqsgd)")
  parser.add_argument("--workers", type=int,
                      help="data-parallel devices (default: 8 simulated CPU "
                      "devices, or every GPU)")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--seed", type=int)
  parser.add_argument("--batch-size", type=int, help="global batch size")
  parser.add_argument("--lr", type=float, dest="learning_rate")
  parser.add_argument("--log", help="write the run's JSON log here")
  parser.add_argument("--data", help=".npz with x_train/y_train/x_test/y_test "
                      "(default: scikit-learn's digits)")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  # Before anything starts JAX's backend.
  common.request_cpu_devices(args.workers or 8)
  from examples.vision import train
  from examples.vision.configs import default

  overrides = {k: v for k, v in vars(args).items() if v is not None}
  config = dataclasses.replace(default.get_config(), **overrides)
  final = train.train_and_evaluate(config)
  print(json.dumps(final, indent=1))


if __name__ == "__main__":
  main()
