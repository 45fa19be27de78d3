#!/usr/bin/env bash
# The test suite: set up .venv if needed, then pytest.  .ci/run calls this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
# Under CPU contention torch's default threading is ~10x slower here.
export OMP_NUM_THREADS=1
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
