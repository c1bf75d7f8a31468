"""Trains the vision example, e.g. with --compressor gqsgd --bits 4.

Multi-process: ``python -m gqsgd_jax.launch -n 2 -- python
examples/vision/main.py`` (or --distributed under SLURM and the like).
"""

import pathlib
import sys

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from examples import common


def _add_args(parser) -> None:
  parser.add_argument(
    "--data",
    help=".npz with x_train/y_train/x_test/y_test "
    "(default: scikit-learn's digits)",
  )


def main(argv=None) -> None:
  common.main("vision", __doc__.splitlines()[0], _add_args, argv)


if __name__ == "__main__":
  main()
