#!/usr/bin/env bash
# Regenerates every results file under benchmarks/results/ (see BENCHMARKS.md).
# The emulated-cluster part needs root (network namespaces, tc); without root
# it is skipped with a message. Pass --quick for a smoke run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
cd "$repo"
"$python" benchmarks/kernel_benchmark.py "${quick[@]}"
"$python" benchmarks/global_quantize_benchmark.py "${quick[@]}"
if [[ $(id -u) -eq 0 ]]; then
  "$python" benchmarks/cluster_benchmark.py "${quick[@]}"
else
  echo "skipping benchmarks/cluster_benchmark.py: needs root (netns + tc)"
fi
