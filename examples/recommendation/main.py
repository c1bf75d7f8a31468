"""Trains the recommendation example, e.g. with --compressor gqsgd --bits 4.

A DeepFwFM CTR model on synthetic Criteo-shaped clicks (or --data
train.txt in Criteo's TSV format); reports test AUC and log-loss.
Multi-process: ``python -m gqsgd_jax.launch -n 2 -- python
examples/recommendation/main.py`` (or --distributed under SLURM and the
like).
"""

import pathlib
import sys

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from examples import common


def _add_args(parser) -> None:
  parser.add_argument(
    "--data",
    help="a Criteo-format TSV (label, 13 "
    "integer and 26 hex categorical fields), its last 10%% "
    "held out (default: synthetic clicks)",
  )
  parser.add_argument("--max-rows", type=int, help="rows of --data to read")


def main(argv=None) -> None:
  common.main("recommendation", __doc__.splitlines()[0], _add_args, argv)


if __name__ == "__main__":
  main()
