"""Peer tools, run with bench/.venv/bin/python (psij-python and submitit live only there).
Usage: peers.py psij|submitit-loop|submitit-array N MEM_MB [POLL_S]"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, rusage


def run_psij(n: int, mem_mb: int, poll: int) -> dict:
    from psij import Job, JobAttributes, JobExecutor, JobSpec, ResourceSpecV1
    from psij.executors.batch.slurm import SlurmExecutorConfig, SlurmJobExecutor

    class _LenientReasons(dict):
        """PSI/J asserts that every squeue reason is in its table; 22.05's ``OutOfMemory`` is not,
        so one OOM job of the same user (e.g. a colleague's test) blinds every poll until the
        record ages out of slurmctld (MinJobAge).  Tolerate unknown reasons so it can be measured."""

        def __contains__(self, key: object) -> bool:
            return True

        def __missing__(self, key: str) -> str:
            return key

    SlurmJobExecutor._REASONS_MAP = _LenientReasons(SlurmJobExecutor._REASONS_MAP)
    work = Path(tempfile.mkdtemp(prefix="psij-bench-"))
    config = SlurmExecutorConfig(work_directory=work, queue_polling_interval=poll, initial_queue_polling_delay=poll)
    executor = JobExecutor.get_instance("slurm", config=config)
    # psij's plugin loader may import its own copy of the class: patch the one in use too
    type(executor)._REASONS_MAP = _LenientReasons(type(executor)._REASONS_MAP)
    t0 = time.monotonic()
    jobs = []
    for _ in range(n):
        job = Job(
            JobSpec(
                executable="/bin/true",
                resources=ResourceSpecV1(process_count=1),
                attributes=JobAttributes(duration=timedelta(minutes=1), queue_name="debug"),
            )
        )
        executor.submit(job)
        jobs.append(job)
    submit_s = time.monotonic() - t0
    states = {}
    for job in jobs:
        status = job.wait()
        key = str(status.state) if status is not None else "None"
        states[key] = states.get(key, 0) + 1
    done_s = time.monotonic() - t0
    return {"submit_s": submit_s, "done_s": done_s, "states": states, "poll_s": poll,
            "ok": states.get("COMPLETED", 0) == n, "job_ids": [str(j.native_id) for j in jobs]}


def run_submitit(n: int, mem_mb: int, array: bool) -> dict:
    import submitit

    folder = tempfile.mkdtemp(prefix="submitit-bench-")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # timeout 5 min: with 1 min, submitit's --signal=USR2@90 hits jobs at their start
    executor.update_parameters(
        timeout_min=5, slurm_partition="debug", cpus_per_task=1, tasks_per_node=1, nodes=1,
        slurm_mem=f"{mem_mb}M", name="bench-submitit",
    )
    t0 = time.monotonic()
    if array:
        jobs = executor.map_array(int, range(n))
    else:
        jobs = [executor.submit(int, i) for i in range(n)]
    submit_s = time.monotonic() - t0
    results = [job.result() for job in jobs]
    done_s = time.monotonic() - t0
    bad = sum(1 for i, r in enumerate(results) if r != i)
    return {"submit_s": submit_s, "done_s": done_s, "wrong_results": bad, "ok": bad == 0,
            "job_ids": sorted({str(j.job_id).split("_")[0] for j in jobs})}


def main() -> None:
    tool, n, mem_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    poll = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if tool == "psij":
        data = run_psij(n, mem_mb, poll)
    elif tool in ("submitit-loop", "submitit-array"):
        data = run_submitit(n, mem_mb, tool == "submitit-array")
    else:
        raise SystemExit(f"unknown tool {tool}")
    emit({"tool": tool, "n": n, **data, **rusage()})


if __name__ == "__main__":
    main()
