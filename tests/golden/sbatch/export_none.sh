#!/bin/bash
#SBATCH --job-name=hpcc-3f2b8c1e-9d4a-4e7b-8a61-0c5d2e7f9a10
#SBATCH --comment=hpcc:3f2b8c1e-9d4a-4e7b-8a61-0c5d2e7f9a10
#SBATCH --export=NONE
#SBATCH --no-requeue
#SBATCH --output=/srv/hpcc/runs/run-1/3f2b8c1e-9d4a-4e7b-8a61-0c5d2e7f9a10/slurm.out
#SBATCH --error=/srv/hpcc/runs/run-1/3f2b8c1e-9d4a-4e7b-8a61-0c5d2e7f9a10/slurm.err
#SBATCH --chdir=/srv/hpcc/runs/run-1/3f2b8c1e-9d4a-4e7b-8a61-0c5d2e7f9a10
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=1024M
#SBATCH --time=0-01:00:00

# hpc-compute: constant body. The job's command, environment and name live in spec.json in the
# attempt directory; the job-side wrapper reads them and starts the sealed runtime without a shell.
PYTHON=/usr/bin/python3
WRAPPER=/srv/hpcc/runs/run-1/3f2b8c1e-9d4a-4e7b-8a61-0c5d2e7f9a10/hpcc_wrapper.py
ATTEMPT_DIR=/srv/hpcc/runs/run-1/3f2b8c1e-9d4a-4e7b-8a61-0c5d2e7f9a10
exec "$PYTHON" "$WRAPPER" "$ATTEMPT_DIR"
