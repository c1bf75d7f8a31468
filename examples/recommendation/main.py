"""Trains the recommendation example, e.g. with --compressor gqsgd --bits 4.

A DeepFwFM CTR model on synthetic Criteo-shaped clicks (or --data
train.txt in Criteo's TSV format); reports test AUC and log-loss.
Multi-process: ``python -m gqsgd_jax.launch -n 2 -- python
examples/recommendation/main.py`` (or --distributed under SLURM and the
like).
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
  parser.add_argument("--data", help="a Criteo-format TSV (label, 13 "
                      "integer and 26 hex categorical fields), its last 10%% "
                      "held out (default: synthetic clicks)")
  parser.add_argument("--max-rows", type=int, help="rows of --data to read")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  # Before anything starts JAX's backend.
  common.setup_devices(args.workers, args.distributed)
  from examples.recommendation import train
  from examples.recommendation.configs import default

  config = dataclasses.replace(default.get_config(),
                               **common.config_overrides(args))
  print(common.report(train.train_and_evaluate(config)), flush=True)


if __name__ == "__main__":
  main()
