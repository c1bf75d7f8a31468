"""Trains the language example, e.g. with --compressor gqsgd --bits 4.

A byte-level causal Transformer on CPython's pydoc topics (or --data
FILE.txt); reports held-out perplexity per byte. Multi-process: ``python -m
gqsgd_jax.launch -n 2 -- python examples/language/main.py`` (or
--distributed under SLURM and the like).
"""

import pathlib
import sys

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from examples import common


def _add_args(parser) -> None:
  parser.add_argument("--seq-len", type=int, help="bytes of context")
  parser.add_argument(
    "--data",
    help="a UTF-8 text file, its last 10%% held "
    "out (default: CPython's pydoc_data topics)",
  )


def main(argv=None) -> None:
  common.main("language", __doc__.splitlines()[0], _add_args, argv)


if __name__ == "__main__":
  main()
