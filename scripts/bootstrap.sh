#!/usr/bin/env bash
# Creates (or reuses) a virtualenv and installs gqsgd_jax into it, editable,
# with the given extras. Sourced by main_job.sh and test.sh.
#
#   VENV            virtualenv directory (default: .venv)
#   PYTHON          interpreter for a new virtualenv (default: python3.11,
#                   else python3)
#   GQSGD_JAX_CUDA  AUTO (default: build the CUDA module if nvcc is found),
#                   ON (required) or OFF
#   JAX_SPEC        jax requirement (default: the version pinned below)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
extras=${1:-test}

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[bootstrap] creating $venv with $python"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# Build requirements first: the build runs without isolation so that the FFI
# headers come from the very jax the package will run with.
"${pip[@]}" install -q "${JAX_SPEC:-jax==0.10.2}" "scikit-build-core>=0.10" \
  "nanobind>=2.4" ninja "cmake>=3.25"
echo "[bootstrap] building gqsgd_jax (CUDA module: ${GQSGD_JAX_CUDA:-AUTO})"
"${pip[@]}" install -q --no-build-isolation -e "$repo[$extras]" \
  -Ccmake.define.GQSGD_JAX_CUDA="${GQSGD_JAX_CUDA:-AUTO}" \
  -Cbuild-dir="$repo/build/$(basename "$venv")"
"$venv/bin/python" - <<'PY'
import jax, gqsgd_jax
print(f"[bootstrap] jax {jax.__version__}; gqsgd_jax FFI modules: "
      f"cpu={gqsgd_jax.HAS_CPU} cuda={gqsgd_jax.HAS_CUDA}")
PY
