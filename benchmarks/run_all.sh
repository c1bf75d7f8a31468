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
"$python" benchmarks/variance_vs_workers.py "${quick[@]}"
"$python" benchmarks/wire_model.py  # analytic: instant
if [[ $(id -u) -eq 0 ]]; then
  "$python" benchmarks/cluster_benchmark.py "${quick[@]}"
  # No quick mode: it always rewrites results/hierarchical_cluster.md.
  if [[ ${#quick[@]} -eq 0 ]]; then
    "$python" benchmarks/cluster_hierarchical.py
  fi
else
  echo "skipping benchmarks/cluster_benchmark.py and cluster_hierarchical.py:" \
    "need root (netns + tc)"
fi
# Not here: benchmarks/frontier.py (training runs of every scale
# configuration on the examples, hours on 2 cores); results/frontier.md
# lists the commands that produced it.
