#!/usr/bin/env bash
# Install everything the tests need and run them all:
#   python deps (pip), then the project's Ansible playbook (bubblewrap, sshd, Postgres, munge,
#   MariaDB, slurmdbd, slurmctld, slurmd with two fake GPUs), then pytest.
# Fails loudly: any step that fails stops the run with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "test-all.sh provisions a single-node Slurm and Postgres on this machine: run it as root" >&2
  exit 2
fi

step "python dependencies"
python3 -m pip install -q -e '.[dev]'

step "cluster and services (ansible/playbooks/dev-cluster.yml)"
ansible-playbook -i ansible/inventory/localhost.yml ansible/playbooks/dev-cluster.yml

step "lint: ruff, mypy --strict, ansible-lint"
ruff check .
mypy --strict hpc_compute
ansible-lint ansible/

step "tests"
export HPCC_TEST_PG_URL="${HPCC_TEST_PG_URL:-postgresql+psycopg://hpcc:hpcc@127.0.0.1:5432/hpcc_test}"
export HPCC_TEST_REQUIRE_SERVICES=1   # a test that needs Postgres, Slurm or sshd fails instead of skipping
run_pytest() {
  set +e
  timeout --signal=TERM "$1" python3 -m pytest -ra "${@:2}"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
  fi
  if [ "$rc" -ne 0 ]; then
    echo "pytest failed (exit $rc)" >&2
    exit "$rc"
  fi
}

step "tests (Slurm accounting on)"
HPCC_TEST_SLURM_ACCOUNTING=on run_pytest 60m --durations=20 "$@"

if [ "$#" -eq 0 ]; then
  step "benchmark smoke (N = 20): hpc-compute finishes every run with one squeue per cycle"
  timeout 15m python3 bench/run.py --quick --out "$(mktemp -d)/RESULTS.md"

  step "scale smoke (500 active / 5,000 finished, no Slurm): one squeue per steady cycle"
  timeout 10m python3 bench/scale.py --quick

  step "Slurm tests again with accounting off (as many sites run)"
  ansible-playbook -i ansible/inventory/localhost.yml ansible/playbooks/dev-cluster.yml \
    -e hpcc_slurm_accounting=false --skip-tags smoke
  HPCC_TEST_SLURM_ACCOUNTING=off run_pytest 20m -m "slurm and not faults" -k "not time_limit and not restart" tests/integration
  step "restore accounting on"
  ansible-playbook -i ansible/inventory/localhost.yml ansible/playbooks/dev-cluster.yml --skip-tags smoke >/dev/null
fi
echo "all tests passed"
