"""Raw baseline: N x ``sbatch --parsable --wrap true`` (or one ``--array``), then one
``squeue -h -j <ids>`` every 0.5 s until none is left.  Usage: raw.py loop|loop-export-none|loop-export-nil|loop-export-path|loop-export-all-clean|array N MEM_MB
(the export variants isolate the cost of ``--export``; loop-export-all-clean: ``--export=ALL``
from a scrubbed sbatch environment, as hpc-compute submits)"""

from __future__ import annotations

import subprocess
import sys
import time

from common import emit, rusage, wait_all_gone

MAX_ARRAY = 1000  # below Slurm's default MaxArraySize (1001)


CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def sbatch(extra: list[str], mem_mb: int, clean_env: bool = False) -> str:
    argv = ["sbatch", "--parsable", "-o", "/dev/null", "-e", "/dev/null", "-c", "1", f"--mem={mem_mb}M",
            "-t", "1", "-J", "bench-raw", *extra, "--wrap", "true"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, env=CLEAN_ENV if clean_env else None)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def main() -> None:
    mode, n, mem_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    t0 = time.monotonic()
    ids: list[str] = []
    variants = {"loop": [], "loop-export-none": ["--export=NONE"], "loop-export-nil": ["--export=NIL"],
                "loop-export-path": ["--export=PATH=/usr/bin:/bin"], "loop-export-all-clean": ["--export=ALL"]}
    if mode in variants:
        extra = variants[mode]
        for _ in range(n):
            ids.append(sbatch(extra, mem_mb, clean_env=mode == "loop-export-all-clean"))
    else:
        for start in range(0, n, MAX_ARRAY):
            ids.append(sbatch([f"--array=0-{min(n, start + MAX_ARRAY) - start - 1}"], mem_mb))
    t_submit = time.monotonic() - t0
    _, polls = wait_all_gone(ids)
    t_done = time.monotonic() - t0
    emit({"tool": f"raw-{mode}", "n": n, "submit_s": t_submit, "done_s": t_done, "polls": polls,
          "sbatch_calls": len(ids), "squeue_calls": polls, "job_ids": ids, **rusage()})


if __name__ == "__main__":
    main()
