#!/usr/bin/env bash
# Lint, format and type checks (about 10 s): ruff check and ruff format
# --check over the Python, clang-format (.clang-format: Google style) over
# xla_ffi/, and mypy over gqsgd_jax (settings in pyproject.toml). Runs every
# check, then fails if any failed. Installs the pinned `lint` extra of
# pyproject.toml into the virtualenv if a tool is missing or at another
# version.
#
#   VENV  virtualenv to use (default: .venv; if missing, a light one with
#         the tools, jax, optax and numpy is created)
#   FIX=1 apply ruff's fixes, ruff format and clang-format -i instead of
#         checking (then mypy still checks)
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
cd "$repo"
if [[ ! -x "$venv/bin/python" ]]; then
  # A light virtualenv: the tools, and for mypy the libraries whose types
  # the package uses (no build of the package itself).
  echo "[lint] creating $venv"
  "${PYTHON:-$(command -v python3.11 || command -v python3)}" -m venv \
    "$venv" || exit 1
  "$venv/bin/python" -m pip --disable-pip-version-check install -q \
    "${JAX_SPEC:-jax==0.10.2}" "optax>=0.2.4" "numpy>=1.26" || exit 1
fi
# The pins live in one place: pyproject.toml's lint extra.
mapfile -t pins < <("$venv/bin/python" - <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as f:
  extra = tomllib.load(f)["project"]["optional-dependencies"]["lint"]
print("\n".join(extra))
EOF
)
if ! "$venv/bin/python" - "${pins[@]}" <<'EOF' 2>/dev/null
import importlib.metadata, sys
for pin in sys.argv[1:]:
  name, version = pin.split("==")
  assert importlib.metadata.version(name) == version, pin
EOF
then
  echo "[lint] installing ${pins[*]}"
  "$venv/bin/python" -m pip --disable-pip-version-check install -q \
    "${pins[@]}" || exit 1
fi

failed=()
run() {  # run NAME COMMAND...: one check, its outcome remembered
  local name=$1 start=$SECONDS
  shift
  echo "=== $name"
  if "$@"; then
    echo "[lint] $name: ok ($(( SECONDS - start )) s)"
  else
    echo "[lint] $name: FAILED ($(( SECONDS - start )) s)"
    failed+=("$name")
  fi
}

mapfile -t cpp < <(find xla_ffi -type f \( -name '*.h' -o -name '*.cc' \
  -o -name '*.cu' -o -name '*.cuh' \) | sort)
if [[ -n "${FIX:-}" ]]; then
  run "ruff check --fix" "$venv/bin/ruff" check --fix .
  run "ruff format" "$venv/bin/ruff" format .
  run "clang-format -i" "$venv/bin/clang-format" -i "${cpp[@]}"
else
  run "ruff check" "$venv/bin/ruff" check --output-format concise .
  run "ruff format --check" "$venv/bin/ruff" format --check \
    --output-format concise .
  run "clang-format" "$venv/bin/clang-format" --dry-run --Werror \
    "${cpp[@]}"
fi
run "mypy gqsgd_jax" "$venv/bin/mypy"

if (( ${#failed[@]} )); then
  echo "[lint] failed: ${failed[*]}"
  exit 1
fi
echo "[lint] all checks passed"
