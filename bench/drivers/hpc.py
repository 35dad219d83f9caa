"""hpc-compute: Client.submit_many(N trivial specs) into a fresh SQLite ledger, then an
in-process Engine drives them with ``drive_until``.  Usage: hpc.py N MEM_MB [--profile FILE]

Runs in its own process, so CPU and peak RSS are the scheduler's own.  Slurm calls are counted
by wrapping the backend's ``_run`` (every squeue/sbatch/sacct/scontrol/scancel goes through it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, rusage

SLURM_PROGRAMS = ("squeue", "sacct", "sbatch", "scontrol", "scancel")
PHASES = ("_claim_and_submit", "_reconcile", "_apply_cancellations", "_poll", "_heartbeat")


def settings_for(home: Path, poll: float, array_min: int = 0, submit_batch: int = 64):
    from hpc_compute.config import load_settings

    return load_settings(
        {
            "home": str(home),
            "scheduler": {"poll_interval": poll, "min_poll_interval": poll, "submit_batch": submit_batch},
            "slurm": {
                "runtime": "bubblewrap",
                "python": "/usr/bin/python3",
                "accounting": "auto",
                "min_poll_interval": poll,
                "array_min": array_min,
            },
        },
        env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        system_file=Path("/nonexistent/hpc-compute.toml"),
    )


def spec(mem_mb: int, i: int) -> dict:
    return {
        "backend": "slurm",
        "image": "host",
        "command": ["/bin/true"],
        "resources": {"cpus": 1, "memory": f"{mem_mb}M", "time_limit": 60},
        "retry": {"max_attempts": 1},
        "name": f"bench-{i}",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int)
    parser.add_argument("mem_mb", type=int)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--profile", default=None, help="write a cProfile of the drive to this file")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--array-min", type=int, default=0, help="[slurm] array_min (0: no job arrays)")
    parser.add_argument("--submit-batch", type=int, default=64, help="[scheduler] submit_batch")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="hpcc-bench-"))
    os.environ["HPC_COMPUTE_HOME"] = str(home)
    t_import = time.monotonic()
    from hpc_compute import Client
    from hpc_compute.engine import Engine

    settings = settings_for(home, args.poll, args.array_min, args.submit_batch)
    client = Client(settings=settings)
    specs = [spec(args.mem_mb, i) for i in range(args.n)]
    import_s = time.monotonic() - t_import

    t0 = time.monotonic()
    runs = client.submit_many(specs)
    accept_s = time.monotonic() - t0
    ids = [r.id for r in runs]

    engine = Engine(settings, client.ledger)
    backend = engine.backends["slurm"]
    calls: Counter[str] = Counter()
    original_run = backend._run

    def counted_run(program, argv, **kw):  # type: ignore[no-untyped-def]
        calls[program] += 1
        return original_run(program, argv, **kw)

    backend._run = counted_run  # type: ignore[method-assign]

    submitted = {"count": 0, "all_at": None}
    job_ids: list[str] = []
    original_mark = engine.ledger.mark_submitted

    def counted_mark(attempt_id, fence, backend_job_id, **kw):  # type: ignore[no-untyped-def]
        result = original_mark(attempt_id, fence, backend_job_id, **kw)
        job_ids.append(str(backend_job_id))
        submitted["count"] += 1
        if submitted["count"] == args.n and submitted["all_at"] is None:
            submitted["all_at"] = time.monotonic() - t0
        return result

    engine.ledger.mark_submitted = counted_mark  # type: ignore[method-assign]
    original_many = engine.ledger.mark_submitted_many

    def counted_many(handles):  # type: ignore[no-untyped-def]
        stale = original_many(handles)
        for attempt_id, _fence, backend_job_id in handles:
            if attempt_id in stale:
                continue
            job_ids.append(str(backend_job_id))
            submitted["count"] += 1
        if submitted["count"] >= args.n and submitted["all_at"] is None:
            submitted["all_at"] = time.monotonic() - t0
        return stale

    engine.ledger.mark_submitted_many = counted_many  # type: ignore[method-assign]

    phase_s: Counter[str] = Counter()
    for name in PHASES:
        original = getattr(engine, name)

        def timed(*a, _orig=original, _name=name, **kw):  # type: ignore[no-untyped-def]
            s = time.monotonic()
            try:
                return _orig(*a, **kw)
            finally:
                phase_s[_name] += time.monotonic() - s

        setattr(engine, name, timed)

    cycles: list[dict] = []
    last = {"calls": Counter(), "t": time.monotonic()}

    def on_cycle(_engine) -> None:  # type: ignore[no-untyped-def]
        now = time.monotonic()
        delta = calls - last["calls"]
        cycles.append({"t": now - t0, "dt": now - last["t"], **{p: delta.get(p, 0) for p in SLURM_PROGRAMS}})
        last["calls"] = Counter(calls)
        last["t"] = now

    engine.start()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t_drive = time.monotonic()
    last["t"] = t_drive
    try:
        ok = engine.drive_until(ids, timeout=args.timeout, on_cycle=on_cycle)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        engine.close()
    done_s = time.monotonic() - t0
    drive_s = time.monotonic() - t_drive

    import hashlib

    import hpc_compute

    pkg = Path(hpc_compute.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(path.relative_to(pkg).as_posix().encode() + b"\0" + path.read_bytes())
    code_hash = digest.hexdigest()[:12]
    strict = getattr(backend.conf, "strict_submit", None)
    states = Counter(client.get(r).state for r in ids)
    exit_codes = Counter(client.get(r).exit_code for r in ids)
    db = home / "ledger.db"
    ledger_bytes = sum(p.stat().st_size for p in home.glob("ledger.db*"))
    poll_cycles = [c for c in cycles if c["squeue"] or c["sacct"] or c["scontrol"]]
    emit(
        {
            "tool": "hpc",
            "n": args.n,
            "ok": bool(ok) and states.get("succeeded", 0) == args.n,
            "states": dict(states),
            "exit_codes": {str(k): v for k, v in exit_codes.items()},
            "import_s": import_s,
            "accept_s": accept_s,
            "submit_s": submitted["all_at"],
            "done_s": done_s,
            "drive_s": drive_s,
            "cycles": len(cycles),
            "calls": dict(calls),
            "max_squeue_per_cycle": max((c["squeue"] for c in cycles), default=0),
            "max_sacct_per_cycle": max((c["sacct"] for c in cycles), default=0),
            "max_scontrol_per_cycle": max((c["scontrol"] for c in cycles), default=0),
            "max_sbatch_per_cycle": max((c["sbatch"] for c in cycles), default=0),
            "poll_cycles": len(poll_cycles),
            "median_cycle_s": sorted(c["dt"] for c in cycles)[len(cycles) // 2] if cycles else None,
            "phase_s": {k: round(v, 3) for k, v in phase_s.items()},
            "cycle_log": cycles,
            "ledger_bytes": ledger_bytes,
            "ledger_file_bytes": db.stat().st_size if db.exists() else None,
            "home": str(home),
            "code_hash": code_hash,
            "strict_submit": strict,
            "job_ids": job_ids,
            **rusage(),
        }
    )


if __name__ == "__main__":
    main()
