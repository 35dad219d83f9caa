#!/bin/bash
#SBATCH --job-name=hpcc-arr-0123456789abcdef0123456789abcdef
#SBATCH --comment=hpcc-array:0123456789abcdef0123456789abcdef
#SBATCH --array=0-3%4
#SBATCH --export=ALL
#SBATCH --no-requeue
#SBATCH --output=/srv/hpcc/runs/run-0/attempt-0/slurm-array-%a.out
#SBATCH --error=/srv/hpcc/runs/run-0/attempt-0/slurm-array-%a.err
#SBATCH --chdir=/srv/hpcc/runs/run-0/attempt-0
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=256M
#SBATCH --time=0-00:01:00

# hpc-compute: constant body. The job's command, environment and name live in spec.json in the
# attempt directory; the job-side wrapper reads them and starts the sealed runtime without a shell.
PYTHON=/usr/bin/python3
# a job array: task N runs the attempt in the Nth directory (each with its own spec.json)
ATTEMPT_DIRS=(
  /srv/hpcc/runs/run-0/attempt-0
  /srv/hpcc/runs/run-1/attempt-1
  /srv/hpcc/runs/run-2/attempt-2
  '/srv/hpcc/runs/it'"'"'s here/a'
)
ATTEMPT_DIR=${ATTEMPT_DIRS[$SLURM_ARRAY_TASK_ID]}
WRAPPER="$ATTEMPT_DIR/hpcc_wrapper.py"
cd "$ATTEMPT_DIR" || exit 120
exec "$PYTHON" "$WRAPPER" "$ATTEMPT_DIR" >"$ATTEMPT_DIR/slurm.out" 2>"$ATTEMPT_DIR/slurm.err"
