#!/usr/bin/env bash
# One-command GPU check for a CUDA host that already has jax with its CUDA
# plugin installed (it may be offline: nothing is downloaded).
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# 1. builds gqsgd_jax (CPU + CUDA FFI modules) against the installed jax, in
#    a virtualenv that sees the system's packages (--system-site-packages);
# 2. runs every `requires_cuda` test on the GPUs present (one GPU is enough
#    for the kernel tests; multi-GPU tests skip cleanly);
# 3. runs the kernel benchmark on the GPU.
# Log and results go to OUT_DIR (check.log, pytest.log, kernels_gpu.md,
# summary.txt). Finishes in under 8 minutes on one H200.
#
#   PYTHON      interpreter that has jax + CUDA plugin (default: python3)
#   VENV        virtualenv to use (default: .venv-gpu, created from PYTHON
#               with --system-site-packages); an existing one is reused
#   CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES (default: native)
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
venv=${VENV:-$repo/.venv-gpu}
exec > >(tee "$out/check.log") 2>&1
step() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }
status=0

step "host: $(hostname); $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';')"
step "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
if [[ ! -x "$venv/bin/python" ]]; then
  step "creating $venv (system site packages: the installed jax)"
  "$python" -m venv --system-site-packages "$venv" || exit 1
fi
"$venv/bin/python" -c 'import jax; print("[gpu_check] jax", jax.__version__, jax.devices())' || exit 1
if ! "$venv/bin/python" -c 'import jax; jax.devices("gpu")' 2>/dev/null; then
  step "no CUDA GPU visible to jax (is the jax CUDA plugin installed?)"
  exit 2
fi

step "building gqsgd_jax with the CUDA module (no downloads)"
if ! timeout 300 "$venv/bin/python" -m pip --disable-pip-version-check install \
    -q --no-index --no-deps --no-build-isolation -e "$repo" \
    -Ccmake.define.GQSGD_JAX_CUDA=ON \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-native}" \
    -Cbuild-dir="$repo/build/gpu"; then
  step "BUILD FAILED"; exit 1
fi
"$venv/bin/python" -c 'import gqsgd_jax as g; print("[gpu_check] FFI modules: cpu", g.HAS_CPU, "cuda", g.HAS_CUDA)'

step "requires_cuda tests"
cd "$repo"
# Only the files that hold GPU tests: the others need packages (flax,
# orbax, torch) a GPU host may not have, and run in CI anyway.
mapfile -t gpu_files < <(grep -l "requires_cuda" tests/*_test.py)
JAX_PLATFORMS=cuda,cpu timeout 240 "$venv/bin/python" -m pytest -q \
  -p no:cacheprovider -m requires_cuda -rs "${gpu_files[@]}" \
  > "$out/pytest.log" 2>&1
rc=$?
tail -n 15 "$out/pytest.log"
(( rc == 0 )) || { step "TESTS FAILED (rc=$rc)"; status=1; }

step "kernel benchmark on the GPU"
JAX_PLATFORMS=cuda timeout 150 "$venv/bin/python" \
  benchmarks/kernel_benchmark.py --output "$out/kernels_gpu.md" \
  || { step "BENCHMARK FAILED"; status=1; }

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null)"
  echo "tests: $(tail -n 1 "$out/pytest.log")"
  echo "status: $status"
} > "$out/summary.txt"
step "done (status $status): $out"
exit $status
