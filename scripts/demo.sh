#!/usr/bin/env bash
# Install hpc-compute and run one sealed sample job on the embedded default
# (local backend, bubblewrap sandbox, SQLite ledger under $HPC_COMPUTE_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bwrap >/dev/null 2>&1; then
  echo "== installing bubblewrap (the sandbox)"
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends bubblewrap
  else sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends bubblewrap; fi
fi
echo "== installing hpc-compute"
python3 -m pip install -q --disable-pip-version-check .

export HPC_COMPUTE_HOME="${HPC_COMPUTE_HOME:-$HOME/.local/share/hpc-compute-demo}"
echo "== ledger and runs under $HPC_COMPUTE_HOME"
hpc-compute db upgrade

echo "== a sealed job: it counts words in its read-only input, tries the network, writes /output"
workdir="$(mktemp -d)"
printf 'the quick brown fox\njumps over the lazy dog\n' > "$workdir/words.txt"
set +e
run_id=$(hpc-compute submit --parsable --name demo --image host --input "$workdir/words.txt:words.txt" \
  --mem 256M --time 2m -- /usr/bin/python3 -c '
import socket
words = open("/input/words.txt").read().split()
try:
    socket.create_connection(("1.1.1.1", 443), timeout=3); net = "REACHED (not sealed!)"
except OSError as exc:
    net = f"blocked ({exc.strerror})"
open("/output/count.txt", "w").write(f"{len(words)} words\n")
print(f"counted {len(words)} words; network: {net}")
')
hpc-compute wait "$run_id"
rc=$?
set -e
echo "== exit code of the job: $rc"
hpc-compute status "$run_id"
echo "== stdout"
hpc-compute logs "$run_id"
echo "== artifacts (sha256, size, path)"
hpc-compute artifacts "$run_id"
exit "$rc"
