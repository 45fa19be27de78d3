#!/usr/bin/env bash
# Run an experiment matrix as a Slurm job array: task k of N runs shard k/N
# of the grid (the synthesis groups g with g % N == k, one after another).
#
#     sbatch --array=0-15 tools/slurm_matrix.sh configs/matrix/demo.py
#     # afterwards, on any node:
#     python tools/run_matrix.py configs/matrix/demo.py \
#         --collect work_dirs/matrix/demo/collected.json
#
# The array must be contiguous (0-N or 1-N; the shard index is the task id
# minus the lowest one).  A re-submitted array skips the finished cells and
# re-runs killed ones.  Extra arguments go to tools/run_matrix.py (e.g.
# --work-dir DIR).  The demo grid has 36 synthesis groups: at most 36 tasks
# are useful.
#SBATCH --job-name=dfq-matrix
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
#SBATCH --time=24:00:00
#SBATCH --output=work_dirs/matrix/slurm-%A_%a.out
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch --array=0-N tools/slurm_matrix.sh GRID.py [run_matrix args]" >&2
    exit 2
fi
GRID=$1
shift
: "${SLURM_ARRAY_TASK_ID:?not a Slurm array task (submit with sbatch --array)}"
: "${SLURM_ARRAY_TASK_COUNT:?not a Slurm array task}"
INDEX=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
exec "$PYTHON" tools/run_matrix.py "$GRID" --run \
    --shard "$INDEX/$SLURM_ARRAY_TASK_COUNT" "$@"
