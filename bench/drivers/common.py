"""Helpers shared by the benchmark drivers (standard library only: also imported by the peer
drivers, which run under bench/.venv without hpc_compute)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

#: squeue states after which a job no longer holds resources
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
          "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "STOPPED"}


def rusage() -> dict[str, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": me.ru_utime + me.ru_stime,
        "children_cpu_s": kids.ru_utime + kids.ru_stime,
        "peak_rss_mb": me.ru_maxrss / 1024.0,
    }


def emit(data: dict) -> None:
    """The driver's result: one JSON line on stdout, last."""
    sys.stdout.write("BENCH-RESULT " + json.dumps(data) + "\n")
    sys.stdout.flush()


def active_ids(ids: list[str]) -> set[str]:
    """Which of these job ids (or array job ids) squeue still shows as not finished: one call."""
    if not ids:
        return set()
    out = subprocess.run(
        ["squeue", "-h", "-j", ",".join(ids), "-o", "%i %A %F %T"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed: {out.stderr.strip()}")
    wanted = set(ids)
    left: set[str] = set()
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[3] not in ACTIVE:
            continue
        # %i: 123 or 123_4 / 123_[5-9]; %F: the array's job id
        for key in (parts[0], parts[1], parts[2]):
            if key in wanted:
                left.add(key)
    return left


def wait_all_gone(ids: list[str], interval: float = 0.5, timeout: float = 3600.0) -> tuple[float, int]:
    """Poll one squeue every ``interval`` until none of ``ids`` is active; (seconds, polls)."""
    t0 = time.monotonic()
    polls = 0
    while True:
        polls += 1
        if not active_ids(ids):
            return time.monotonic() - t0, polls
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{len(active_ids(ids))} jobs still active after {timeout}s")
        time.sleep(interval)
