#!/usr/bin/env bash
# Creates (or reuses) a virtualenv and installs gqsgd_jax into it, editable,
# with the given extras. Sourced by main_job.sh and test.sh.
#
#   VENV            virtualenv directory (default: .venv)
#   PYTHON          interpreter for a new virtualenv (default: python3.11,
#                   else python3)
#   GQSGD_JAX_GPU   unset or 0: CPU jax. 1 or cuda13: jax with its CUDA 13
#                   plugin (pip extra jax[cuda13], NVIDIA driver >= 580);
#                   cuda12: jax[cuda12] (driver >= 525). Implies
#                   GQSGD_JAX_CUDA=ON unless that is set.
#   GQSGD_JAX_CUDA  AUTO (default: build the CUDA module if nvcc is found),
#                   ON (required) or OFF
#   JAX_SPEC        jax requirement (default: the version pinned below)
#
# Prints one line per step with its duration; pip's and the compiler's full
# output goes to $VENV/bootstrap.log (shown if a step fails).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
extras=${1:-test}
jax_spec=${JAX_SPEC:-jax==0.10.2}
cuda=${GQSGD_JAX_CUDA:-AUTO}
case "${GQSGD_JAX_GPU:-0}" in
  0|"") ;;
  1|cuda13) gpu_extra=cuda13 ;;
  cuda12) gpu_extra=cuda12 ;;
  *) echo "[bootstrap] GQSGD_JAX_GPU must be 0, 1, cuda13 or cuda12," \
       "got '$GQSGD_JAX_GPU'" >&2; exit 2 ;;
esac
if [[ -n "${gpu_extra:-}" ]]; then
  # jax[cuda13]==0.10.2: the extra goes between the name and the version.
  jax_spec="${jax_spec/jax/jax[$gpu_extra]}"
  extras="$extras,$gpu_extra"
  cuda=${GQSGD_JAX_CUDA:-ON}
fi

t0=$(date +%s)
say() { echo "[bootstrap +$(( $(date +%s) - t0 ))s] $*"; }
# Runs a step quietly into the log; on failure shows the log's tail.
run() {
  local what=$1; shift
  say "$what"
  echo "=== $what: $*" >> "$log"
  if ! "$@" >> "$log" 2>&1; then
    tail -n 40 "$log" >&2
    say "FAILED: $what (full log: $log)" >&2
    exit 1
  fi
}

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[bootstrap] creating $venv with $python"
  "$python" -m venv "$venv"
fi
log=$venv/bootstrap.log
: > "$log"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
run "upgrading pip" "${pip[@]}" install --upgrade pip
# Build requirements first: the build runs without isolation so that the FFI
# headers come from the very jax the package will run with.
run "installing $jax_spec and the build tools (cmake, ninja, nanobind)" \
  "${pip[@]}" install "$jax_spec" "scikit-build-core>=0.10" \
  "nanobind>=2.4" ninja "cmake>=3.25"
# The compile takes minutes on two cores: say that it is still going.
( while sleep 20; do say "... still building"; done ) &
ticker=$!
trap 'kill "$ticker" 2>/dev/null || true' EXIT
run "building gqsgd_jax (CUDA module: $cuda), installing extras [$extras]" \
  "${pip[@]}" install --no-build-isolation -e "$repo[$extras]" \
  -Ccmake.define.GQSGD_JAX_CUDA="$cuda" \
  -Cbuild-dir="$repo/build/$(basename "$venv")"
kill "$ticker" 2>/dev/null || true
"$venv/bin/python" - <<'PY'
import jax, gqsgd_jax
print(f"[bootstrap] ready: jax {jax.__version__} ({jax.default_backend()}, "
      f"{jax.device_count()} device(s)); gqsgd_jax FFI modules: "
      f"cpu={gqsgd_jax.HAS_CPU} cuda={gqsgd_jax.HAS_CUDA}")
PY
