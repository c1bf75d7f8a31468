#!/usr/bin/env bash
# The main job: data-parallel Flax training on 8 simulated CPU devices with
# Global-QSGD (4-bit) and the f32 baseline; prints accuracy and wire bytes.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/bootstrap.sh" examples
exec "${VENV:-$repo/.venv}/bin/python" "$repo/examples/main_job.py" "$@"
