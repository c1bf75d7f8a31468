#!/usr/bin/env bash
# Builds the documentation (docs/, Sphinx + MyST) with warnings as errors.
# HTML goes to build/docs/html (or $1). Installs the docs extra into the
# virtualenv if Sphinx is missing; the package itself is imported from the
# checkout, so no compiled module is needed to build the API reference.
#
#   VENV  virtualenv to use (default: .venv; created by scripts/bootstrap.sh
#         if missing)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
out=${1:-$repo/build/docs/html}
if [[ ! -x "$venv/bin/python" ]]; then
  bash "$repo/scripts/bootstrap.sh" docs
fi
if ! "$venv/bin/python" -c "import sphinx, myst_parser, furo" 2>/dev/null; then
  echo "[docs] installing sphinx, myst-parser, furo"
  "$venv/bin/python" -m pip --disable-pip-version-check install -q \
    "sphinx>=8" "myst-parser>=4" "furo>=2024.8"
fi
start=$(date +%s)
# -W: warnings are errors; --keep-going: report all of them, then fail;
# -E: read every page again (no stale cache).
"$venv/bin/python" -m sphinx -W --keep-going -E -q -b html \
  "$repo/docs" "$out"
echo "[docs] built $out/index.html in $(( $(date +%s) - start )) s"
