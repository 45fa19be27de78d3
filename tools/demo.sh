#!/usr/bin/env bash
# The main job on the embedded demo: set up .venv if needed, then run the demo
# benchmark (tools/run_demo.py) on both demo models.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$ROOT/.venv/bin/python" tools/run_demo.py "$@"
