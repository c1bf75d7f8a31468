#!/usr/bin/env bash
# Installs everything (package, test extras, torch 2.13.0 CPU for the
# PyTorch-parity tests) and runs the test suite. Arguments replace pytest's
# default selection (tests examples).
#   NO_TORCH=1  skip the torch install (its tests then skip cleanly)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
bash "$repo/scripts/bootstrap.sh" test
if [[ -z "${NO_TORCH:-}" ]]; then
  # CPU build from the local wheel cache; a bare "torch" would pull CUDA.
  "$venv/bin/python" -m pip --disable-pip-version-check install -q \
    "torch==2.13.0"
fi
cd "$repo"
if [[ $# -eq 0 ]]; then set -- tests examples; fi
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
