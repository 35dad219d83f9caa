#!/usr/bin/env python3
"""Scale figures: the scheduler's per-cycle time and memory, and the ledger's throughput, with
thousands of active and hundreds of thousands of finished runs in the ledger. No Slurm is
touched: the real :class:`~hpc_compute.engine.Engine` drives the real
:class:`~hpc_compute.backends.slurm.SlurmBackend`, whose transport answers ``squeue``,
``scontrol``, ``sacct``, ``sbatch`` and ``scancel`` from a synthetic recording in the exact
format the backend asks for (``squeue -h -t all --me -o '%i<US>%T<US>%r<US>%S<US>%e<US>%M<US>%j'``,
``scontrol show job -o`` lines as in ``tests/data/slurm/``). Files (attempt directories, the
artifact store) and other commands (the backend's ``rm -rf`` cleanup) are real.

    python bench/scale.py                        # (1k active, 10k finished) and (10k, 100k), SQLite and Postgres
    python bench/scale.py --quick                # (500, 5k), 5+5 cycles: CI smoke, < 1 min
    python bench/scale.py --active 10000 --finished 100000 --ledgers sqlite
    python bench/scale.py --baseline before.json # adds a before/after table against an earlier SCALE.json

Per (ledger, scale), each in fresh processes so that peak RSS is the scheduler's alone:

1. *populate* (its own process): a fresh ledger (SQLite in a temp dir; Postgres in a schema
   ``hpcc_scale_<hex>`` of ``HPCC_TEST_PG_URL``, dropped afterwards). The finished history is
   bulk-inserted with Core ``INSERT`` executemany (run, attempt, five events, five delivered
   outbox rows and one artifact per run: the API would take hours); the active part goes through
   the real Ledger API and is timed (the *ledger throughput* figures): ``create_runs`` (1000 per
   call, like ``submit_many``), ``claim_queued`` (64 per call: the default ``submit_batch``),
   ``mark_submitted`` (one per call, as the engine does), ``record_observations`` (500 per call),
   ``finish_attempt`` (one per call, as the engine does) on a sample that ends up in the history.
   It writes the squeue recording of the active jobs.
2. *cycles* (a fresh process): ``Engine.start()`` adopts every active attempt, then one start-up
   cycle, ``--cycles`` steady cycles (the recording does not change: pure polling cost) and
   ``--cycles`` churn cycles (between cycles, outside the timing, 1 % of the active jobs start
   and 1 % finish with a result file and one output file; the engine harvests them, finishes
   them and claims and submits as many queued runs). Measured: wall time per cycle (and without
   the time spent inside the fake Slurm), Slurm calls per cycle, ledger statements per cycle
   (SQLAlchemy ``before_cursor_execute``, scheduler thread only), time per engine phase and
   per ledger call, RSS (``/proc/self/status`` VmRSS/VmHWM, ``ru_maxrss``). Then the client
   queries at that history size: ``list_runs`` variants, ``count_runs``, a prefix ``get_run``.

Exit status: non-zero when a steady cycle made anything but exactly one ``squeue`` call, or the
churn did not finish and resubmit the runs it should have (``--quick`` is meant for CI).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

PG_DEFAULT_URL = "postgresql+psycopg://hpcc:hpcc@127.0.0.1:5432/hpcc_test"
PG_URL_ENV = "HPCC_TEST_PG_URL"
OWNER = "scale"
SEP = "\x1f"
RESULT_MARK = "SCALE-RESULT "
SLURM_PROGRAMS = ("squeue", "sacct", "sbatch", "scontrol", "scancel", "sinfo")
PHASES = (
    "_heartbeat",
    "_claim_and_submit",
    "_reconcile",
    "_confirm_committed",
    "_apply_cancellations",
    "_poll",
    "_enforce_time_limits",
    "_sweep",
    "_notify",
)
LEDGER_CALLS = (
    "claim_queued",
    "mark_submitted",
    "mark_submitted_many",
    "record_observations",
    "finish_attempt",
    "cancel_flags",
    "claim_outbox",
    "record_deliveries",
    "prune_outbox",
    "heartbeat",
    "adopt_active",
    "active_attempt_ids",
)
RUNNING_SHARE = 0.7  # of the active jobs; the rest pend (2/3 Priority, 1/3 Resources)
CLAIM_BATCH = 64  # SchedulerSettings.submit_batch default
SUBMIT_WAVE = 4  # SlurmSettings.submit_parallel default: the engine commits one wave's handles at once
SINGLE_SUBMIT_SAMPLE = 300  # mark_submitted one at a time (reconciliation still does), for comparison
HISTORY_SPAN_S = 6 * 86400.0  # history within keep_delivered (7 days): no outbox row is prunable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MB."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0
    return out


def rss_mb() -> float:
    return proc_status()["VmRSS"]


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(data: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_MARK + json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "p95": None, "max": None, "min": None, "mean": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, -(-95 * len(ordered) // 100) - 1))]  # nearest rank
    return {
        "n": len(values),
        "median": statistics.median(ordered),
        "p95": p95,
        "max": ordered[-1],
        "min": ordered[0],
        "mean": statistics.fmean(ordered),
    }


def slurm_time(t: float | None) -> str:
    return "N/A" if t is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def slurm_elapsed(seconds: float) -> str:
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{s:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{s:02d}"
    return f"{minutes}:{s:02d}"


def spec_dict(i: int) -> dict[str, Any]:
    """One run of a parameter sweep (the specs differ, as a real sweep's do)."""
    return {
        "backend": "slurm",
        "image": "host",
        "command": ["python3", "train.py", "--seed", str(i), "--lr", "0.001"],
        "resources": {"cpus": 1, "memory": "1G", "time_limit": 3600},
        "retry": {"max_attempts": 1},
        "name": f"scale-{i}",
        "labels": {"sweep": f"s{i // 1000}", "seed": str(i)},
    }


# =============================================================================================
# the fake Slurm: a recording, plus the few state changes the churn cycles make


class FakeSlurm:
    """Slurm's view of our jobs, answered in the formats the backend parses. The squeue and
    scontrol texts are rendered once and reused until a job changes (a recording); the time
    spent in here is measured so that it can be taken off the cycle time."""

    def __init__(self, recording: str, dirs_file: Path) -> None:
        # Until something changes, the recording is all there is (so the steady cycles' RSS holds
        # no more of the fake than its text); the job table is built on the first change.
        self._recording: str | None = recording
        self._dirs_file = dirs_file
        self._jobs: dict[str, list[str]] | None = None  # job id -> [state, reason, start, end, elapsed, name]
        self.submit: dict[str, str] = {}
        self.exit: dict[str, str] = {}
        self.dirs: dict[str, str] = {}  # job id -> attempt dir
        self.next_id = 0
        self._squeue: str | None = recording
        self._scontrol: str | None = None
        self.seconds = 0.0
        self.calls: Counter[str] = Counter()
        self._name_re = re.compile(r"^#SBATCH --job-name=(\S+)$", re.M)
        self._lock = threading.Lock()

    @property
    def jobs(self) -> dict[str, list[str]]:
        if self._jobs is None:
            t0 = time.perf_counter()
            self._jobs = {}
            assert self._recording is not None
            for line in self._recording.splitlines():
                fields = line.split(SEP)
                if len(fields) == 7:
                    self._jobs[fields[0]] = fields[1:]
                    self.submit[fields[0]] = fields[2] if fields[2] != "N/A" else slurm_time(time.time() - 600)
                    if fields[1] in ("COMPLETED", "FAILED"):
                        self.exit[fields[0]] = "0:0" if fields[1] == "COMPLETED" else "1:0"
            self.dirs.update(json.loads(self._dirs_file.read_text()))
            self.next_id = max((int(j) for j in self._jobs), default=1_000_000) + 1
            self._recording = None
            self.seconds += time.perf_counter() - t0
        return self._jobs

    def _dirty(self) -> None:
        self._squeue = None
        self._scontrol = None

    # -- rendering ----------------------------------------------------------------------------

    def squeue_text(self, names: set[str] | None = None) -> str:
        if names is not None:
            if self._jobs is None and self._recording is not None:
                return "".join(line + "\n" for line in self._recording.splitlines() if line.rsplit(SEP, 1)[-1] in names)
            return "".join(
                SEP.join((job_id, *fields)) + "\n" for job_id, fields in self.jobs.items() if fields[5] in names
            )
        if self._squeue is None:
            self._squeue = "".join(SEP.join((job_id, *fields)) + "\n" for job_id, fields in self.jobs.items())
        return self._squeue

    def scontrol_text(self) -> str:
        if self._scontrol is None:
            lines = []
            for job_id, (state, reason, start, end, elapsed, name) in self.jobs.items():
                work = self.dirs.get(job_id, "/nonexistent")
                aid = name[len("hpcc-") :]
                start_s = "Unknown" if start == "N/A" else start
                end_s = "Unknown" if end == "N/A" else end
                node = "" if state == "PENDING" else "vm BatchHost=vm"
                lines.append(
                    f"JobId={job_id} JobName={name} UserId=hpcc(1000) GroupId=hpcc(1000) MCS_label=N/A "
                    f"Priority=4294901661 Nice=0 Account=root QOS=normal JobState={state} "
                    f"Reason={reason} Dependency=(null) Requeue=0 Restarts=0 "
                    f"BatchFlag=1 Reboot=0 ExitCode={self.exit.get(job_id, '0:0')} RunTime={elapsed} "
                    f"TimeLimit=01:00:00 TimeMin=N/A SubmitTime={self.submit.get(job_id)} "
                    f"EligibleTime={self.submit.get(job_id)} AccrueTime={self.submit.get(job_id)} "
                    f"StartTime={start_s} EndTime={end_s} Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
                    f"LastSchedEval={self.submit.get(job_id)} Scheduler=Main Partition=debug "
                    f"AllocNode:Sid=localhost:18151 ReqNodeList=(null) ExcNodeList=(null) NodeList={node} "
                    "NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* "
                    "TRES=cpu=1,mem=1G,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* "
                    "MinCPUsNode=1 MinMemoryNode=1G MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
                    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) "
                    f"Command={work}/sbatch.sh WorkDir={work} Comment=hpcc:{aid}  StdErr={work}/slurm.err "
                    f"StdIn=/dev/null StdOut={work}/slurm.out Power= \n"
                )
            self._scontrol = "".join(lines)
        return self._scontrol

    # -- commands -----------------------------------------------------------------------------

    def run(self, argv: list[str]) -> tuple[int, str, str]:
        with self._lock:  # the engine submits in parallel waves (a thread pool)
            t0 = time.perf_counter()
            try:
                return self._run(os.path.basename(argv[0]), argv[1:])
            finally:
                self.seconds += time.perf_counter() - t0

    def _run(self, program: str, args: list[str]) -> tuple[int, str, str]:
        self.calls[program] += 1
        if program == "squeue":
            names = set(args[args.index("--name") + 1].split(",")) if "--name" in args else None
            return 0, self.squeue_text(names), ""
        if program == "scontrol":
            if args[:2] == ["show", "job"]:
                return 0, self.scontrol_text(), ""
            if args and args[0] == "release":
                if self._jobs is None and "JobHeldUser" not in (self._recording or ""):
                    return 0, "", ""  # nothing in the recording is held: nothing changes
                for job_id in args[1].split(","):
                    fields = self.jobs.get(job_id)
                    if fields is not None and fields[1] == "JobHeldUser":
                        fields[1] = "Priority"
                self._dirty()
                return 0, "", ""
            return 1, "", f"scontrol: unexpected {args!r}"
        if program == "sbatch":
            if any(a.startswith("--array") for a in args):
                return 1, "", "sbatch: bench/scale.py does not simulate job arrays (slurm.array_min is 0 here)"
            if "--test-only" in args:
                return 0, "", f"sbatch: Job {self.next_id} to start at {slurm_time(time.time())} using 1 processors"
            script = args[-1]
            with open(script) as handle:
                match = self._name_re.search(handle.read())
            if match is None:
                return 1, "", "sbatch: error: no job name"
            jobs = self.jobs  # built on the first change (sets next_id)
            job_id = str(self.next_id)
            self.next_id += 1
            held = "--hold" in args
            jobs[job_id] = ["PENDING", "JobHeldUser" if held else "Priority", "N/A", "N/A", "0:00", match.group(1)]
            self.submit[job_id] = slurm_time(time.time())
            self.dirs[job_id] = os.path.dirname(script)
            self._dirty()
            return 0, f"{job_id}\n", ""
        if program == "scancel":
            for job_id in args:
                fields = self.jobs.get(job_id)
                if fields is not None and fields[0] in ("PENDING", "RUNNING"):
                    fields[0], fields[3] = "CANCELLED", slurm_time(time.time())
            self._dirty()
            return 0, "", ""
        if program == "sacct":
            if "-j" in args and args[args.index("-j") + 1] == "1" and "--format" not in " ".join(args):
                return 0, "", ""  # the accounting probe: accounting works
            wanted = set(args[args.index("-j") + 1].split(",")) if "-j" in args else None
            names = set(args[args.index("--name") + 1].split(",")) if "--name" in args else None
            lines = []
            for job_id, (state, _reason, start, end, elapsed, name) in self.jobs.items():
                if (wanted is not None and job_id not in wanted) or (names is not None and name not in names):
                    continue
                fields = (job_id, state, self.exit.get(job_id, "0:0"), start, end, elapsed, self.submit[job_id], name)
                lines.append(SEP.join(fields) + "\n")
            return 0, "".join(lines), ""
        if program == "sinfo":
            return 0, "idle\n", ""
        return 1, "", f"{program}: not simulated"

    # -- the churn (between cycles, not timed) ------------------------------------------------

    def churn(self, n: int, rng: random.Random) -> tuple[int, int]:
        """Start ``n`` released pending jobs and finish ``n`` running ones (exit 0, with a result
        file and one output file in the attempt directory); return (started, finished)."""
        now = time.time()
        running = [j for j, f in self.jobs.items() if f[0] == "RUNNING"]
        pending = [j for j, f in self.jobs.items() if f[0] == "PENDING" and f[1] != "JobHeldUser"]
        finished = 0
        for job_id in rng.sample(running, min(n, len(running))):
            fields = self.jobs[job_id]
            work = self.dirs[job_id]
            os.makedirs(os.path.join(work, "output"), exist_ok=True)
            with open(os.path.join(work, "output", "metrics.json"), "w") as handle:
                json.dump({"loss": rng.random(), "job": job_id}, handle)
            result = {"exit_code": 0, "signal": None, "started_at": now - 60, "ended_at": now, "peak_rss_kb": 120_000}
            with open(os.path.join(work, "result.json"), "w") as handle:
                json.dump(result, handle)
            fields[0], fields[1], fields[3] = "COMPLETED", "None", slurm_time(now)
            self.exit[job_id] = "0:0"
            finished += 1
        started = 0
        for job_id in rng.sample(pending, min(n, len(pending))):
            fields = self.jobs[job_id]
            fields[0], fields[1], fields[2], fields[3] = "RUNNING", "None", slurm_time(now), slurm_time(now + 3600)
            started += 1
        self._dirty()
        return started, finished


ALLOWED_RM_ROOT = tempfile.gettempdir().rstrip("/") + "/hpcc-scale-"


def fake_transport(fake: FakeSlurm) -> Any:
    from hpc_compute.transports.base import CommandResult
    from hpc_compute.transports.local import LocalTransport

    class FakeSlurmTransport(LocalTransport):
        """Slurm commands go to the fake, also when wrapped (``env -i PATH=... /usr/bin/sbatch``);
        files are real, and so is the one other command the backend runs here, its ``rm -rf``
        cleanup of an attempt's output. Nothing else is ever executed: this must never reach
        the real cluster."""

        name = "fake-slurm"

        def __init__(self) -> None:
            super().__init__()
            self.other: Counter[str] = Counter()

        @staticmethod
        def _program(argv: list[str]) -> tuple[str, list[str]]:
            rest = list(argv)
            while rest and os.path.basename(rest[0]) == "env":
                rest = rest[1:]
                while rest and (rest[0].startswith("-") or "=" in rest[0]):
                    rest = rest[1:]
            return (os.path.basename(rest[0]) if rest else ""), rest

        def run(self, argv: list[str], timeout: float, input: bytes | None = None) -> CommandResult:
            program, rest = self._program(argv)
            if program in SLURM_PROGRAMS:
                code, out, err = fake.run(rest)
                return CommandResult(code, out, err)
            self.other[program] += 1
            if program == "id":
                return CommandResult(0, "hpcc\n", "")
            if program == "rm" and all(not a.startswith("/") or a.startswith(ALLOWED_RM_ROOT) for a in rest[1:]):
                return super().run(argv, timeout, input)
            return CommandResult(127, "", f"bench/scale.py: {program!r} is not simulated and not run: {argv!r}")

    return FakeSlurmTransport()


# =============================================================================================
# phase 1: populate


def bulk_history(ledger: Any, n: int, work_root: str, log_every: int = 20_000) -> dict[str, Any]:
    """``n`` finished runs with their attempt, five events, five delivered outbox rows and one
    artifact each, by Core INSERT executemany in chunks (not the API: see the module doc)."""
    from sqlalchemy import func, select

    from hpc_compute.ledger.models import Artifact, Attempt, Event, Outbox, Run
    from hpc_compute.spec import JobSpec

    t0 = time.perf_counter()
    rng = random.Random(1)
    template = JobSpec.model_validate(spec_dict(0)).canonical_json()
    template = template.replace('"--seed","0"', '"--seed","SEED"').replace('"scale-0"', '"hist-SEED"')
    template = template.replace('"seed":"0"', '"seed":"SEED"').replace('"sweep":"s0"', '"sweep":"hSWEEP"')
    assert template.count("SEED") == 3, template
    now = time.time()
    begin = now - HISTORY_SPAN_S - 3600
    step = HISTORY_SPAN_S / max(1, n)
    utc = dt.UTC
    rows = Counter[str]()
    chunk = 5000
    with ledger.engine.connect() as conn:
        event_id = int(conn.execute(select(func.coalesce(func.max(Event.id), 0))).scalar_one())
    for start in range(0, n, chunk):
        runs, attempts, events, outbox, artifacts = [], [], [], [], []
        for i in range(start, min(n, start + chunk)):
            created = begin + i * step
            ts = [created, created + 5, created + 8, created + 40, created + 40 + rng.uniform(60, 3000)]
            at = [dt.datetime.fromtimestamp(t, utc) for t in ts]
            run_id, attempt_id = str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(uuid.uuid4())
            roll = rng.random()
            state, exit_code, kind = ("succeeded", 0, None)
            if roll > 0.98:
                state, exit_code, kind = ("cancelled", None, None)
            elif roll > 0.90:
                state, exit_code, kind = ("failed", 1, "exit_code")
            spec_json = template.replace("SWEEP", str(i // 1000)).replace("SEED", str(i))
            job_id = str(100_000 + i)
            runs.append(
                {
                    "id": run_id,
                    "owner": OWNER,
                    "name": f"hist-{i}",
                    "kind": None,
                    "backend": "slurm",
                    "state": state,
                    "failure_kind": kind,
                    "failure_message": "exited with code 1" if kind else None,
                    "exit_code": exit_code,
                    "signal": None,
                    "spec_json": spec_json,
                    "spec_digest": hashlib.sha256(spec_json.encode()).hexdigest(),
                    "labels_json": json.dumps({"seed": str(i), "sweep": f"h{i // 1000}"}, sort_keys=True),
                    "idempotency_key": None,
                    "attempts": 1,
                    "max_attempts": 1,
                    "cancel_requested": state == "cancelled",
                    "pending_reason": None,
                    "backend_job_id": job_id,
                    "not_before": None,
                    "created_at": at[0],
                    "updated_at": at[4],
                    "started_at": at[3],
                    "finished_at": at[4],
                }
            )
            outcome = {
                "exit_code": exit_code,
                "signal": None,
                "failure_kind": kind,
                "message": None,
                "peak_rss_kb": 120_000,
                "cancelled": state == "cancelled",
                "backend_record": {"source": "scontrol", "job_id": job_id, "state": "COMPLETED", "exit_code": "0:0"},
                "artifacts": 1,
                "refused": 0,
            }
            attempts.append(
                {
                    "id": attempt_id,
                    "run_id": run_id,
                    "number": 1,
                    "backend": "slurm",
                    "state": "finished",
                    "backend_job_id": job_id,
                    "attempt_dir": f"{work_root}/{run_id}/{attempt_id}",
                    "fence": 1,
                    "scheduler_id": "old-scheduler",
                    "lease_expires_at": at[4],
                    "created_at": at[1],
                    "submitted_at": at[2],
                    "started_at": at[3],
                    "finished_at": at[4],
                    "exit_code": exit_code,
                    "signal": None,
                    "failure_kind": kind,
                    "message": None,
                    "outcome_json": json.dumps(outcome, sort_keys=True),
                }
            )
            steps = [
                (None, "queued", "accepted", None, at[0]),
                ("queued", "submitting", "attempt 1", None, at[1]),
                ("submitting", "pending", f"submitted as {job_id}", {"backend_job_id": job_id}, at[2]),
                ("pending", "running", None, None, at[3]),
                ("running", state, None, {"exit_code": exit_code, "signal": None}, at[4]),
            ]
            for prev, to, message, data, when in steps:
                event_id += 1
                events.append(
                    {
                        "id": event_id,
                        "run_id": run_id,
                        "attempt_id": None if prev is None else attempt_id,
                        "at": when,
                        "kind": "state",
                        "from_state": prev,
                        "to_state": to,
                        "message": message,
                        "data_json": json.dumps(data, sort_keys=True) if data else None,
                    }
                )
                payload = {
                    "run_id": run_id,
                    "owner": OWNER,
                    "state": to,
                    "previous_state": prev,
                    "failure_kind": kind if to == state else None,
                    "exit_code": exit_code if to == state else None,
                    "signal": None,
                    "attempt_id": None if prev is None else attempt_id,
                    "message": message,
                    "at": when.isoformat(),
                    "event_id": event_id,
                }
                outbox.append(
                    {
                        "run_id": run_id,
                        "event_id": event_id,
                        "kind": "run.state",
                        "payload_json": json.dumps(payload, sort_keys=True),
                        "created_at": when,
                        "attempts": 1,
                        "next_attempt_at": when,
                        "delivered_at": when + dt.timedelta(seconds=0.2),
                        "delivered_targets": None,
                        "last_error": None,
                    }
                )
            artifacts.append(
                {
                    "run_id": run_id,
                    "attempt_id": attempt_id,
                    "path": "metrics.json",
                    "size": 120,
                    "sha256": hashlib.sha256(run_id.encode()).hexdigest(),
                    "created_at": at[4],
                }
            )
        with ledger.engine.execution_options(hpcc_write=True).begin() as conn:
            for model, batch in (
                (Run, runs),
                (Attempt, attempts),
                (Event, events),
                (Outbox, outbox),
                (Artifact, artifacts),
            ):
                conn.execute(model.__table__.insert(), batch)  # type: ignore[attr-defined]
                rows[model.__tablename__] += len(batch)
        if (start + chunk) % log_every < chunk:
            log(f"  history: {min(n, start + chunk)}/{n} runs")
    if not ledger.is_sqlite:
        from sqlalchemy import text

        with ledger.engine.begin() as conn:
            for table in ("hpcc_event", "hpcc_outbox", "hpcc_artifact"):
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT COALESCE(MAX(id), 1) FROM {table}))"
                    )
                )
    seconds = time.perf_counter() - t0
    total = sum(rows.values())
    return {"runs": n, "rows": dict(rows), "seconds": seconds, "rows_per_s": total / seconds if seconds else None}


def phase_populate(args: argparse.Namespace) -> None:
    from hpc_compute.harvest import HarvestedFile, HarvestReport
    from hpc_compute.ledger.states import AttemptState
    from hpc_compute.ledger.store import AttemptResult, Ledger, Observed
    from hpc_compute.spec import FailureKind, JobSpec

    workdir = Path(args.workdir)
    home = workdir / "home"
    work_root = str(home / "runs")
    active, finished, reserve = args.active, args.finished, args.reserve
    sample = min(finished, args.finish_sample)
    ledger = Ledger(args.url, auto_upgrade=True)
    t0 = time.perf_counter()
    ledger.ensure_ready()
    migrate_s = time.perf_counter() - t0
    out: dict[str, Any] = {"migrate_s": migrate_s}

    log(f"  bulk history: {finished - sample} finished runs")
    out["history"] = bulk_history(ledger, finished - sample, work_root)
    if not ledger.is_sqlite:
        from sqlalchemy import text

        t0 = time.perf_counter()
        with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))  # what autovacuum does soon after a bulk load
        out["analyze_s"] = time.perf_counter() - t0

    # -- the API path, timed ------------------------------------------------------------------
    total = sample + active + reserve
    specs = [JobSpec.model_validate(spec_dict(i)) for i in range(total)]
    api: dict[str, Any] = {}

    def timed(name: str, n: int, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t
        api[name] = {"n": n, "seconds": seconds, "per_s": n / seconds if seconds else None}
        log(f"  {name}: {n} in {seconds:.2f} s ({n / seconds:.0f}/s)")
        return value

    def accept() -> None:
        for start in range(0, total, 1000):
            ledger.create_runs(specs[start : start + 1000], OWNER)

    timed("accepted", total, accept)

    def claim() -> list[Any]:
        claimed: list[Any] = []
        want = sample + active
        while len(claimed) < want:
            got = ledger.claim_queued(
                "scale-populate",
                backends=["slurm"],
                limit=min(CLAIM_BATCH, want - len(claimed)),
                work_root=work_root,
                lease_s=1.0,  # expired by the time the engine starts, so a Postgres engine adopts them
            )
            if not got:
                raise RuntimeError(f"claim_queued returned nothing after {len(claimed)} runs")
            claimed += got
        return claimed

    claimed = timed("claimed", sample + active, claim)
    job_ids = {c.attempt_id: str(1_000_000 + i) for i, c in enumerate(claimed)}

    single = claimed[:SINGLE_SUBMIT_SAMPLE]
    waves = claimed[SINGLE_SUBMIT_SAMPLE:]

    def submit_single() -> None:
        for c in single:
            ledger.mark_submitted(c.attempt_id, c.fence, job_ids[c.attempt_id])

    def submit_waves() -> None:
        for start in range(0, len(waves), SUBMIT_WAVE):
            wave = waves[start : start + SUBMIT_WAVE]
            stale = ledger.mark_submitted_many([(c.attempt_id, c.fence, job_ids[c.attempt_id]) for c in wave])
            if stale:
                raise RuntimeError(f"stale fences: {stale}")

    timed("submitted_single", len(single), submit_single)
    timed("submitted", len(waves), submit_waves)

    rng = random.Random(2)
    finishing, live = claimed[:sample], claimed[sample:]
    n_running = int(len(live) * RUNNING_SHARE)
    running, pending = live[:n_running], live[n_running:]
    reasons = {c.attempt_id: ("Resources" if rng.random() < 1 / 3 else "Priority") for c in pending}
    observations = [Observed(c.attempt_id, c.fence, AttemptState.RUNNING, None) for c in finishing + running]
    observations += [Observed(c.attempt_id, c.fence, AttemptState.PENDING, reasons[c.attempt_id]) for c in pending]

    def observe() -> None:
        for start in range(0, len(observations), 500):
            ledger.record_observations(observations[start : start + 500])

    timed("observed", len(observations), observe)

    now = time.time()
    harvest = HarvestReport(files=[HarvestedFile("metrics.json", 120, "0" * 64)], total_bytes=120)

    def finish() -> None:
        for i, c in enumerate(finishing):
            result = AttemptResult(
                exit_code=0 if i % 10 else 1,
                signal=None,
                failure_kind=None if i % 10 else FailureKind.EXIT_CODE,
                message=None,
                cancelled=False,
                started_at=dt.datetime.fromtimestamp(now - 600, dt.UTC),
                ended_at=dt.datetime.fromtimestamp(now - 5, dt.UTC),
                outcome={"exit_code": 0, "backend_record": {"source": "scontrol", "job_id": job_ids[c.attempt_id]}},
            )
            ledger.finish_attempt(c.attempt_id, c.fence, result, harvest)

    timed("finished", len(finishing), finish)
    out["api"] = api

    # the scheduler that made these changes would have delivered their notifications by now
    from sqlalchemy import update

    from hpc_compute.ledger.models import Outbox

    with ledger.engine.execution_options(hpcc_write=True).begin() as conn:
        delivered = conn.execute(
            update(Outbox)
            .where(Outbox.delivered_at.is_(None))  # type: ignore[union-attr]
            .values(delivered_at=dt.datetime.now(dt.UTC), attempts=1)
        ).rowcount
    out["outbox_marked_delivered"] = delivered

    # -- the recording ------------------------------------------------------------------------
    lines: list[str] = []
    dirs: dict[str, str] = {}
    start_t = now - 1800
    for c in finishing:
        job = job_ids[c.attempt_id]
        dirs[job] = c.attempt_dir
        lines.append(
            SEP.join(
                (job, "COMPLETED", "None", slurm_time(now - 600), slurm_time(now - 5), "9:55", f"hpcc-{c.attempt_id}")
            )
        )
    for c in running:
        job = job_ids[c.attempt_id]
        dirs[job] = c.attempt_dir
        lines.append(
            SEP.join(
                (
                    job,
                    "RUNNING",
                    "None",
                    slurm_time(start_t),
                    slurm_time(start_t + 3600),
                    slurm_elapsed(now - start_t),
                    f"hpcc-{c.attempt_id}",
                )
            )
        )
    for c in pending:
        job = job_ids[c.attempt_id]
        dirs[job] = c.attempt_dir
        lines.append(SEP.join((job, "PENDING", reasons[c.attempt_id], "N/A", "N/A", "0:00", f"hpcc-{c.attempt_id}")))
    lines.sort(key=lambda line: int(line.split(SEP, 1)[0]))
    (workdir / "squeue.txt").write_text("\n".join(lines) + "\n")
    (workdir / "dirs.json").write_text(json.dumps(dirs))
    out["counts"] = ledger.count_runs()
    out["squeue_lines"] = len(lines)
    out["squeue_bytes"] = (workdir / "squeue.txt").stat().st_size
    if ledger.is_sqlite:
        out["ledger_bytes"] = sum(p.stat().st_size for p in home.glob("ledger.db*"))
    else:
        from sqlalchemy import text

        with ledger.engine.connect() as conn:
            out["ledger_bytes"] = int(
                conn.execute(
                    text(
                        "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                    )
                ).scalar_one()
            )
    ledger.close()
    emit(out)


# =============================================================================================
# phase 2: cycles


class QueryCounter:
    """Counts the statements the ledger's engine sends, per thread kind, and the repeated ones."""

    _IN_LIST = re.compile(r"\((?:\s*(?:\?|%\(\w+\)s)(?:::\w+)?\s*,?)+\)")
    _SPACES = re.compile(r"\s+")

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.main = threading.main_thread().ident
        self.main_count = 0
        self.other_count = 0
        self.by_statement: Counter[str] = Counter()
        self.recording = False
        event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, _conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, many: bool) -> None:
        if threading.get_ident() != self.main:
            self.other_count += 1
            return
        self.main_count += 1
        if self.recording:
            text = self._SPACES.sub(" ", self._IN_LIST.sub("(…)", statement)).strip()
            self.by_statement[("many: " if many else "") + text[:110]] += 1


def settings_for(workdir: Path, url: str, active: int, churn: int) -> Any:
    from hpc_compute.config import load_settings

    home = workdir / "home"
    return load_settings(
        {
            "home": str(home),
            "ledger_url": url,
            "scheduler": {"poll_interval": 0.5, "min_poll_interval": 0.5, "submit_batch": max(CLAIM_BATCH, churn)},
            "notify": {"hooks": False},
            "slurm": {
                "runtime": "bubblewrap",
                "python": "/usr/bin/python3",
                "accounting": "auto",
                "min_poll_interval": 0,  # every cycle polls: the figure is one squeue per cycle
                "max_in_flight": active,
                "array_min": 0,  # one sbatch per run (the default; the fake has no job arrays)
            },
        },
        env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        system_file=Path("/nonexistent/hpc-compute.toml"),
    )


def phase_cycles(args: argparse.Namespace) -> None:
    rss_start = rss_mb()
    t_import = time.perf_counter()
    from hpc_compute.backends.slurm import SlurmBackend
    from hpc_compute.engine import Engine
    from hpc_compute.ledger.states import RunState
    from hpc_compute.ledger.store import Ledger

    import_s = time.perf_counter() - t_import
    rss_imports = rss_mb()
    from hpc_compute.backends.slurm import parse

    squeue_format = SEP.join(("%i", "%T", "%r", "%S", "%e", "%M", "%j"))
    if squeue_format != parse.SQUEUE_FORMAT:
        raise SystemExit(f"the backend's squeue format changed ({parse.SQUEUE_FORMAT!r}): update FakeSlurm")
    workdir = Path(args.workdir)
    fake = FakeSlurm((workdir / "squeue.txt").read_text(), workdir / "dirs.json")
    rss_fake = rss_mb()
    churn_n = args.churn

    settings = settings_for(workdir, args.url, args.active, churn_n)
    ledger = Ledger(args.url, auto_upgrade=False)
    ledger.ensure_ready()
    counter = QueryCounter(ledger.engine)
    transport = fake_transport(fake)
    backend = SlurmBackend(settings, transport=transport)
    engine = Engine(settings, ledger, backends={"slurm": backend})

    phase_s: dict[str, float] = defaultdict(float)
    for name in PHASES:
        original = getattr(engine, name)

        def timed_phase(*a: Any, _orig: Any = original, _name: str = name, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return _orig(*a, **kw)
            finally:
                phase_s[_name] += time.perf_counter() - t

        setattr(engine, name, timed_phase)
    call_s: dict[str, float] = defaultdict(float)
    call_n: Counter[str] = Counter()
    background: dict[str, list[float]] = defaultdict(list)
    for name in LEDGER_CALLS:
        original = getattr(ledger, name)

        def timed_call(*a: Any, _orig: Any = original, _name: str = name, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return _orig(*a, **kw)
            finally:
                seconds = time.perf_counter() - t
                if threading.get_ident() == counter.main:
                    call_s[_name] += seconds
                    call_n[_name] += 1
                else:
                    background[_name].append(seconds)

        setattr(ledger, name, timed_call)

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()

    t0 = time.perf_counter()
    engine.start()
    start_s = time.perf_counter() - t0
    rss_after_start = rss_mb()
    adopted = len(engine.tracked)
    log(f"  engine.start(): {adopted} attempts adopted in {start_s:.2f} s; RSS {rss_after_start:.0f} MB")

    records: list[dict[str, Any]] = []

    def one_cycle(kind: str) -> dict[str, Any]:
        phase_s.clear()
        call_s.clear()
        call_n.clear()
        calls_before = Counter(backend.calls)
        other_before = Counter(transport.other)
        q_before, q_other_before = counter.main_count, counter.other_count
        fake_before = fake.seconds
        if profiler is not None and kind != "start":
            profiler.enable()
        t = time.perf_counter()
        changed = engine.cycle()
        wall = time.perf_counter() - t
        if profiler is not None:
            profiler.disable()
        slurm = dict(Counter(backend.calls) - calls_before)
        record = {
            "kind": kind,
            "wall_s": wall,
            "fake_s": fake.seconds - fake_before,
            "own_s": wall - (fake.seconds - fake_before),
            "changed": changed,
            "tracked": len(engine.tracked),
            "slurm": slurm,
            "slurm_calls": sum(slurm.values()),
            "other_commands": sum((Counter(transport.other) - other_before).values()),
            "queries": counter.main_count - q_before,
            "queries_background": counter.other_count - q_other_before,
            "phases": dict(phase_s),
            "ledger_calls": {k: {"n": call_n[k], "s": call_s[k]} for k in call_n},
            "rss_mb": rss_mb(),
        }
        records.append(record)
        return record

    first = one_cycle("start")
    log(f"  start-up cycle: {first['wall_s']:.2f} s, slurm {first['slurm']}, {first['queries']} statements")
    for i in range(args.cycles):
        r = one_cycle("steady")
        if i == 0 or i == args.cycles - 1:
            log(f"  steady cycle {i + 1}: {r['wall_s']:.3f} s, slurm {r['slurm']}, {r['queries']} statements")
    rss_after_steady = rss_mb()
    # the churn needs the fake's job table (and renders its scontrol text): build both now, so
    # that the harness's share of the churn cycles' RSS is known
    _ = fake.jobs
    fake.scontrol_text()
    fake_table_mb = rss_mb() - rss_after_steady
    rng = random.Random(3)
    counts_before = ledger.count_runs()
    churn_totals = Counter[str]()
    counter.recording = True
    for i in range(args.cycles):
        started, finished = fake.churn(churn_n, rng)
        churn_totals["started"] += started
        churn_totals["finished"] += finished
        r = one_cycle("churn")
        r["churn"] = {"started": started, "finished": finished}
        if i == 0 or i == args.cycles - 1:
            log(f"  churn cycle {i + 1}: {r['wall_s']:.3f} s, slurm {r['slurm']}, {r['queries']} statements")
    counter.recording = False
    # one more cycle without churn: the last finishes are harvested and their replacements submitted
    one_cycle("settle")
    rss_end = rss_mb()
    status = proc_status()
    peak = maxrss_mb()
    counts_after = ledger.count_runs()
    outbox_backlog = len(ledger.outbox(undelivered=True))
    heartbeats = dict(background)
    engine.close()
    if profiler is not None:
        profiler.dump_stats(args.profile)

    # -- the client side at this history size ----------------------------------------------
    def best_of(fn: Callable[[], Any], reps: int = 5) -> dict[str, Any]:
        times = []
        value = None
        for _ in range(reps):
            t = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - t)
        size = len(value) if isinstance(value, list | dict | set) else None
        return {"median_s": statistics.median(times), "min_s": min(times), "rows": size}

    some_run = ledger.list_runs(owner=OWNER, states=[RunState.RUNNING], limit=1)
    prefix = some_run[0].id[:8] if some_run else "00000000"
    recent_ids = [r.id for r in ledger.list_runs(owner=OWNER, limit=1000)]
    rss_before_queries = rss_mb()
    queries = {
        "list_runs(owner, limit=100)": best_of(lambda: ledger.list_runs(owner=OWNER)),
        "list_runs(owner, limit=50)  [CLI list]": best_of(lambda: ledger.list_runs(owner=OWNER, limit=50)),
        "list_runs(owner, state=running)": best_of(lambda: ledger.list_runs(owner=OWNER, states=[RunState.RUNNING])),
        "list_runs(owner, state=failed)": best_of(lambda: ledger.list_runs(owner=OWNER, states=[RunState.FAILED])),
        "list_runs(owner, state=queued)": best_of(lambda: ledger.list_runs(owner=OWNER, states=[RunState.QUEUED])),
        "list_runs(owner, labels={sweep: h3})": best_of(
            lambda: ledger.list_runs(owner=OWNER, labels={"sweep": "h3"}), reps=3
        ),
        "count_runs()": best_of(ledger.count_runs),
        "get_run(8-char prefix)": best_of(lambda: [ledger.get_run(prefix, OWNER)]),
        "nonterminal(1000 ids)": best_of(lambda: ledger.nonterminal(recent_ids)),
    }
    rss_after_queries = rss_mb()
    ledger.close()

    emit(
        {
            "import_s": import_s,
            "start_s": start_s,
            "adopted": adopted,
            "cycles": records,
            "churn_per_cycle": churn_n,
            "churn_totals": dict(churn_totals),
            "counts_before_churn": counts_before,
            "counts_after": counts_after,
            "outbox_backlog": outbox_backlog,
            "background": {
                k: {"n": len(v), "median_s": statistics.median(v), "max_s": max(v)} for k, v in heartbeats.items()
            },
            "hot_statements": counter.by_statement.most_common(15),
            "hot_statements_cycles": args.cycles,
            "rss": {
                "process_start": rss_start,
                "after_imports": rss_imports,
                "after_fake_slurm": rss_fake,
                "after_engine_start": rss_after_start,
                "after_steady": rss_after_steady,
                "fake_table": fake_table_mb,
                "end": rss_end,
                "vm_hwm": status.get("VmHWM"),
                "ru_maxrss": peak,
                "before_queries": rss_before_queries,
                "after_queries": rss_after_queries,
            },
            "queries": queries,
            "fake_calls": dict(fake.calls),
            "package": str(Path(sys.modules["hpc_compute"].__file__ or "").parent),
        }
    )


# =============================================================================================
# the runner


@contextlib.contextmanager
def fresh_ledger(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'home' / 'ledger.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from hpc_compute.ledger import db

    base = make_url(db.normalise_url(os.environ.get(PG_URL_ENV) or PG_DEFAULT_URL))
    admin = create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"hpcc_scale_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        url = base.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
        yield url
    finally:
        # colleagues' fault tests restart Postgres now and then: retry the drop for a while
        deadline = time.monotonic() + 180
        while True:
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    log(f"could not drop schema {name} ({exc.__class__.__name__}): drop it by hand")
                    break
                admin.dispose()
                time.sleep(5)
        admin.dispose()


def postgres_started() -> str | None:
    """When the Postgres server started (a restart during a measurement disturbs it)."""
    try:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        from hpc_compute.ledger import db

        base = make_url(db.normalise_url(os.environ.get(PG_URL_ENV) or PG_DEFAULT_URL))
        engine = create_engine(base, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                return str(conn.execute(text("SELECT pg_postmaster_start_time()")).scalar())
        finally:
            engine.dispose()
    except Exception:
        return None


def wait_postgres(max_wait: float = 600.0) -> None:
    deadline = time.monotonic() + max_wait
    while postgres_reachable() is not None and time.monotonic() < deadline:
        time.sleep(5)


def postgres_reachable() -> str | None:
    """None when the Postgres of HPCC_TEST_PG_URL answers, else why not."""
    try:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        from hpc_compute.ledger import db

        base = make_url(db.normalise_url(os.environ.get(PG_URL_ENV) or PG_DEFAULT_URL))
        engine = create_engine(base, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def run_phase(phase: str, argv: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, *argv]
    # stderr is passed on as it comes (progress) and its tail kept, to name the error of a failed phase
    with (
        tempfile.TemporaryFile("w+") as out,
        subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True) as proc,
    ):
        assert proc.stderr is not None
        tail: list[str] = []
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stderr:
                sys.stderr.write(line)
                if line.strip() and not line.startswith((" ", "[")):
                    tail = [*tail[-20:], line.strip()]
            code = proc.wait()
        finally:
            timer.cancel()
        out.seek(0)
        for line in out:
            if line.startswith(RESULT_MARK):
                result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
                return result
    raise RuntimeError(f"phase {phase} failed (exit {code}): {tail[-1][:300] if tail else '?'}")


def measure(kind: str, active: int, finished: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement; on the shared machine Postgres may be restarted under it (colleagues'
    fault tests): a failed or disturbed measurement is retried once, and marked."""
    notes: list[str] = []
    for attempt in (1, 2):
        started = postgres_started() if kind == "postgres" else None
        try:
            result = measure_once(kind, active, finished, args)
        except Exception as exc:
            notes.append(f"attempt {attempt} failed: {exc.__class__.__name__}: {str(exc)[:300]}")
            log(notes[-1])
            if kind == "postgres":
                wait_postgres()
            continue
        if kind == "postgres" and started != postgres_started():
            notes.append(f"attempt {attempt}: Postgres restarted during the measurement")
            log(notes[-1])
            if attempt == 1:
                continue
            result["disturbed"] = True
        result["notes"] = notes
        return result
    raise RuntimeError(f"{kind} {active}/{finished}: " + "; ".join(notes))


def measure_once(kind: str, active: int, finished: int, args: argparse.Namespace) -> dict[str, Any]:
    churn = max(5, active // 100)
    reserve = churn * (args.cycles + 2) + CLAIM_BATCH
    sample = min(finished, max(100, active // 5))
    workdir = Path(tempfile.mkdtemp(prefix=f"hpcc-scale-{kind}-"))
    t0 = time.monotonic()
    try:
        with fresh_ledger(kind, workdir) as url:
            common = ["--url", url, "--workdir", str(workdir), "--active", str(active)]
            log(f"{kind} active={active} finished={finished}: populate")
            pop = run_phase(
                "populate",
                [*common, "--finished", str(finished), "--reserve", str(reserve), "--finish-sample", str(sample)],
                timeout=3600,
            )
            log(f"{kind} active={active} finished={finished}: cycles")
            extra = ["--profile", f"{args.profile}.{kind}.{active}"] if args.profile else []
            cyc = run_phase(
                "cycles", [*common, "--cycles", str(args.cycles), "--churn", str(churn), *extra], timeout=3600
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "ledger": kind,
        "active": active,
        "finished": finished,
        "reserve": reserve,
        "finish_sample": sample,
        "churn_per_cycle": churn,
        "cycles_per_kind": args.cycles,
        "elapsed_s": time.monotonic() - t0,
        "populate": pop,
        "run": cyc,
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    import sqlite3

    import sqlalchemy

    info["sqlite"] = sqlite3.sqlite_version
    info["sqlalchemy"] = sqlalchemy.__version__
    try:
        import psycopg

        info["psycopg"] = psycopg.__version__
    except ImportError:
        pass
    if postgres_reachable() is None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        from hpc_compute.ledger import db

        engine = create_engine(make_url(db.normalise_url(os.environ.get(PG_URL_ENV) or PG_DEFAULT_URL)))
        try:
            with engine.connect() as conn:
                info["postgres"] = str(conn.execute(text("SHOW server_version")).scalar())
        finally:
            engine.dispose()
    return info


def code_version() -> dict[str, Any]:
    pkg = ROOT / "hpc_compute"
    digest = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(path.relative_to(pkg).as_posix().encode() + b"\0" + path.read_bytes())
    for path in sorted((ROOT / "alembic" / "versions").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    out: dict[str, Any] = {"code_hash": digest.hexdigest()[:12]}
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "hpc_compute", "alembic"],
            capture_output=True,
            text=True,
        )
        out["git_head"] = head.stdout.strip()
        out["uncommitted"] = sorted({line[3:] for line in dirty.stdout.splitlines() if line.strip()})
    return out


# -- gates and the report ----------------------------------------------------------------------


def gate(results: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    for r in results:
        where = f"{r['ledger']} {r['active']}/{r['finished']}"
        cycles = r["run"]["cycles"]
        for c in cycles:
            if c["kind"] == "steady" and c["slurm"] != {"squeue": 1}:
                problems.append(f"{where}: a steady cycle made {c['slurm']} (want exactly one squeue)")
                break
        for c in cycles:
            if c["kind"] in ("churn", "settle") and c["slurm"].get("squeue", 0) > 1:
                problems.append(f"{where}: a churn cycle made {c['slurm']['squeue']} squeue calls")
                break
        totals = r["run"]["churn_totals"]
        before = r["run"]["counts_before_churn"]
        after = r["run"]["counts_after"]
        gained = after.get("succeeded", 0) - before.get("succeeded", 0)
        if gained != totals.get("finished", 0):
            problems.append(f"{where}: {totals.get('finished')} jobs finished in Slurm, {gained} runs succeeded")
        if after.get("queued", 0) != before.get("queued", 0) - totals.get("finished", 0):
            problems.append(
                f"{where}: queued runs {before.get('queued')} -> {after.get('queued')}, expected "
                f"{totals.get('finished', 0)} fewer (claimed as replacements)"
            )
    return problems


def _single(api: dict[str, Any]) -> str:
    one = api.get("submitted_single")
    return f" ({one['per_s']:,.0f})" if one else ""


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value * 1000:.0f}" if value >= 0.01 else f"{value * 1000:.1f}")


def _cycles(r: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [c for c in r["run"]["cycles"] if c["kind"] == kind]


def _calls(cycles: list[dict[str, Any]]) -> str:
    total: Counter[str] = Counter()
    for c in cycles:
        total.update(c["slurm"])
    n = max(1, len(cycles))
    return ", ".join(f"{k} {v / n:g}" for k, v in sorted(total.items())) or "none"


def render(data: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    results = data["results"]
    m = data["machine"]
    out: list[str] = []
    w = out.append
    w("# Scale figures: the scheduler with many active and finished runs")
    w("")
    w(f"Generated by `{data['command']}` on {data['started']} ({data['elapsed_s']:.0f} s in all).")
    if data.get("partial"):
        w("")
        w("**Partial**: the run was interrupted or is still going; the tables hold what was measured.")
    w("")
    w(
        f"Machine: {m.get('cpus')} cores ({m.get('cpu', '?')}), {m.get('mem_gb', '?')} GB, shared with colleagues' "
        "test runs and therefore noisy (the figures move by 10-30 % between runs); "
        f"Python {m.get('python')}, SQLite {m.get('sqlite')}, SQLAlchemy {m.get('sqlalchemy')}, "
        f"psycopg {m.get('psycopg', '-')}, Postgres {m.get('postgres', 'not reachable')} on the same host "
        "(TCP to 127.0.0.1, default configuration). "
        f"Code: {data['code'].get('git_head', '?')} + uncommitted {', '.join(data['code'].get('uncommitted', [])) or 'nothing'} "
        f"(hash {data['code']['code_hash']})."
    )
    w("")
    w(
        "What runs: the real `Engine` and `SlurmBackend`; Slurm's answers come from a synthetic recording in the exact "
        "`squeue`/`scontrol show job -o` formats the backend parses (see the docstring of `bench/scale.py`). "
        f"{int(RUNNING_SHARE * 100)} % of the active jobs run, the rest pend. The finished history is "
        "bulk-inserted (run, attempt, 5 events, 5 delivered outbox rows, 1 artifact per run) and spread over the last "
        "6 days; the active runs went through the Ledger API. One owner holds every run (the worst case for `list`). "
        "Each (ledger, scale) is measured in fresh processes, so the RSS is the scheduler's alone "
        "(it includes the imports, and about 1-5 MB for the fake Slurm's recording)."
    )
    w("")
    if data.get("skipped"):
        for note in data["skipped"]:
            w(f"*Skipped*: {note}")
        w("")
    for r in results:
        if r.get("notes"):
            mark = " (kept, marked disturbed)" if r.get("disturbed") else " (the retry is what is shown)"
            w(f"*Retried*: {r['ledger']} {r['active']:,}/{r['finished']:,}: {'; '.join(r['notes'])}{mark}.")
            w("")

    w("## Per-cycle time")
    w("")
    w(
        "*Steady*: nothing changes in Slurm (the pure cost of polling every active job). *Churn*: before each cycle "
        "1 % of the active jobs start and 1 % finish; the cycle records the starts, harvests and finishes the ended "
        "ones and claims, stages, submits (held) and releases as many queued runs. *Own* is the wall time minus the time "
        "spent inside the fake Slurm (rendering its text), i.e. what the scheduler itself costs; parsing the text is "
        "the scheduler's and is included. Statements: SQL statements the cycle sent (scheduler thread; the lease "
        "renewal thread is counted apart)."
    )
    w("")
    w(
        "| ledger | active | finished | cycle | n | wall median ms | wall p95 ms | own median ms | own p95 ms | Slurm calls / cycle | other commands / cycle | SQL statements / cycle (median) |"
    )
    w("|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in results:
        for kind in ("start", "steady", "churn"):
            cycles = _cycles(r, kind)
            if not cycles:
                continue
            wall = stats([c["wall_s"] for c in cycles])
            own = stats([c["own_s"] for c in cycles])
            other = statistics.fmean(c["other_commands"] for c in cycles)
            queries = statistics.median(c["queries"] for c in cycles)
            label = {
                "start": "start-up (1st)",
                "steady": "steady",
                "churn": f"churn ({r['churn_per_cycle']}+{r['churn_per_cycle']})",
            }[kind]
            w(
                f"| {r['ledger']} | {r['active']:,} | {r['finished']:,} | {label} | {wall['n']} | {_ms(wall['median'])} | "
                f"{_ms(wall['p95'])} | {_ms(own['median'])} | {_ms(own['p95'])} | {_calls(cycles)} | {other:g} | {queries:g} |"
            )
    w("")
    w("Start-up (`Engine.start()`: register, adopt every active attempt, parse its spec):")
    w("")
    w("| ledger | active | finished | adopted | start s |")
    w("|---|---:|---:|---:|---:|")
    for r in results:
        w(
            f"| {r['ledger']} | {r['active']:,} | {r['finished']:,} | {r['run']['adopted']:,} | {_f(r['run']['start_s'], 2)} |"
        )
    w("")

    w("## Memory")
    w("")
    w(
        "RSS in MB (`/proc/self/status`; peak = `ru_maxrss`, equal to VmHWM). Target: under 150 MB with 10,000 active "
        "runs. *After steady*: after the 20 steady cycles (it plateaus there: a 60-cycle check on SQLite showed no further "
        "growth). Before the churn the harness builds the fake Slurm's job table and scontrol text (the real "
        "scheduler has neither); that column is its share, included in *end* and *peak*."
    )
    w("")
    w(
        "| ledger | active | finished | after imports | + recording | after start | after steady | + fake's job table (harness) | end | peak | peak without the fake's table | per active run KB (start) |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rss = r["run"]["rss"]
        per = (rss["after_engine_start"] - rss["after_fake_slurm"]) * 1024 / max(1, r["active"])
        table = rss.get("fake_table")
        w(
            f"| {r['ledger']} | {r['active']:,} | {r['finished']:,} | {rss['after_imports']:.0f} | {rss['after_fake_slurm']:.0f} | "
            f"{rss['after_engine_start']:.0f} | {rss['after_steady']:.0f} | {_f(table, 0)} | {rss['end']:.0f} | "
            f"{rss['ru_maxrss']:.0f} | {_f(None if table is None else rss['ru_maxrss'] - table, 0)} | {per:.1f} |"
        )
    w("")

    w("## Ledger throughput (the API path, active part)")
    w("")
    w(
        "Runs per second through the real Ledger calls, with the finished history already in the ledger: `create_runs` "
        "(1000 specs per call, as `submit_many`), `claim_queued` (64 per call, the default `submit_batch`), "
        "`mark_submitted_many` (waves of 4 handles, as the engine commits them with the default `submit_parallel`; "
        "in parentheses `mark_submitted`, one per call, on a sample of 300), `record_observations` (500 per call), "
        "`finish_attempt` (one per call with one artifact, as the engine calls it). History: Core bulk insert, rows/s."
    )
    w("")
    w(
        "| ledger | active | finished | accepted/s | claimed/s | marked submitted/s (one by one) | observed/s | finished/s | history rows/s (bulk) | ledger size MB |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        api = r["populate"]["api"]
        hist = r["populate"]["history"]
        w(
            f"| {r['ledger']} | {r['active']:,} | {r['finished']:,} | {api['accepted']['per_s']:,.0f} | {api['claimed']['per_s']:,.0f} | "
            f"{api['submitted']['per_s']:,.0f}{_single(api)} | {api['observed']['per_s']:,.0f} | {api['finished']['per_s']:,.0f} | "
            f"{(hist['rows_per_s'] or 0):,.0f} | {r['populate']['ledger_bytes'] / 1e6:.0f} |"
        )
    w("")

    w("## Client queries at this history size")
    w("")
    w("Median of 5 calls (3 for the label filter), ms; `rows` = what the call returned.")
    w("")
    names = list(results[0]["run"]["queries"]) if results else []
    w("| query | " + " | ".join(f"{r['ledger']} {r['active']:,}/{r['finished']:,}" for r in results) + " |")
    w("|---|" + "---:|" * len(results))
    for name in names:
        cells = []
        for r in results:
            q = r["run"]["queries"].get(name)
            cells.append(
                "-" if q is None else f"{_ms(q['median_s'])}" + (f" ({q['rows']})" if q.get("rows") is not None else "")
            )
        w(f"| `{name}` | " + " | ".join(cells) + " |")
    w("")

    big = max(results, key=lambda r: (r["active"], r["ledger"] == "sqlite")) if results else None
    if results:
        w("## Where a cycle's time goes")
        w("")
        w(
            "Median ms per engine phase, steady / churn cycles (the fake Slurm's own time is inside `_poll`, "
            "`_claim_and_submit` and `_confirm_committed`; see *own* above for the total without it)."
        )
        w("")
        header = [f"{r['ledger']} {r['active']:,}" for r in results]
        phases = sorted({p for r in results for c in r["run"]["cycles"] for p in c["phases"]}, key=PHASES.index)

        def med(r: dict[str, Any], kind: str, fn: Callable[[dict[str, Any]], float]) -> float:
            cs = _cycles(r, kind)
            return statistics.median(fn(c) for c in cs) if cs else 0.0

        w("| phase | " + " | ".join(header) + " |")
        w("|---|" + "---:|" * len(results))
        for p in phases:
            cells = [
                f"{_ms(med(r, 'steady', lambda c, p=p: c['phases'].get(p, 0.0)))} / {_ms(med(r, 'churn', lambda c, p=p: c['phases'].get(p, 0.0)))}"
                for r in results
            ]
            w(f"| `{p}` | " + " | ".join(cells) + " |")
        calls = sorted(
            {
                k
                for r in results
                for c in r["run"]["cycles"]
                for k in c["ledger_calls"]
                if c["kind"] in ("steady", "churn")
            }
        )
        w("")
        w("Ledger calls per cycle: calls × total ms, steady / churn (medians).")
        w("")
        w("| ledger call | " + " | ".join(header) + " |")
        w("|---|" + "---:|" * len(results))
        for k in calls:
            cells = []
            for r in results:
                parts = []
                for kind in ("steady", "churn"):
                    n = med(r, kind, lambda c, k=k: c["ledger_calls"].get(k, {}).get("n", 0))
                    t = med(r, kind, lambda c, k=k: c["ledger_calls"].get(k, {}).get("s", 0.0))
                    parts.append(f"{n:g} × {_ms(t)}" if n else "-")
                cells.append(" / ".join(parts))
            w(f"| `{k}` | " + " | ".join(cells) + " |")
        w("")
        w("Lease renewal (its own thread; `heartbeat` renews every active attempt's lease every 20 s):")
        w("")
        w("| ledger | active | renewals | median ms | max ms |")
        w("|---|---:|---:|---:|---:|")
        for r in results:
            hb = r["run"]["background"].get("heartbeat")
            if hb:
                w(f"| {r['ledger']} | {r['active']:,} | {hb['n']} | {_ms(hb['median_s'])} | {_ms(hb['max_s'])} |")
        w("")
        if big is not None:
            w(
                f"Most frequent statements over the {big['cycles_per_kind']} churn cycles ({big['ledger']}, {big['active']:,} active):"
            )
            w("")
            w("| count | statement (IN lists shortened) |")
            w("|---:|---|")
            for text_, n in big["run"]["hot_statements"][:12]:
                escaped = text_.replace("|", "\\|")
                w(f"| {n} | `{escaped}` |")
            w("")
        w(
            "Outbox: undelivered notifications left after the churn cycles (the notifier delivers at most "
            "`notify.batch` = 100 per cycle):"
        )
        w("")
        w("| ledger | active | state changes made (≈ 4 × churn × cycles) | undelivered at the end |")
        w("|---|---:|---:|---:|")
        for r in results:
            w(
                f"| {r['ledger']} | {r['active']:,} | {4 * r['churn_per_cycle'] * r['cycles_per_kind']:,} | {r['run']['outbox_backlog']:,} |"
            )
        w("")

    if baseline is not None:
        w("## Before / after the ledger changes")
        w("")
        w(
            f"Baseline: `{baseline.get('command')}` at code {baseline.get('code', {}).get('code_hash')} "
            f"({baseline.get('started')}): the same tree and harness with `hpc_compute/ledger/store.py` and "
            "`models.py` as they were before (plus the engine's `mark_submitted_many`, unbatched) and without "
            "migration 0003. Cells: before → after (medians; the machine is shared, so timings move 10-30 % between "
            "runs: statement counts and the larger ratios are the robust part)."
        )
        w("")
        index = {(b["ledger"], b["active"], b["finished"]): b for b in baseline.get("results", [])}
        pairs = [
            (index[(r["ledger"], r["active"], r["finished"])], r)
            for r in results
            if (r["ledger"], r["active"], r["finished"]) in index
        ]
        if pairs:
            w("| figure | " + " | ".join(f"{a['ledger']} {a['active']:,}/{a['finished']:,}" for _, a in pairs) + " |")
            w("|---|" + "---:|" * len(pairs))

            def cyc(r: dict[str, Any], kind: str, field: str) -> float | None:
                return stats([c[field] for c in _cycles(r, kind)])["median"]

            def call(r: dict[str, Any], name: str) -> float | None:
                cs = _cycles(r, "churn")
                return statistics.median(c["ledger_calls"].get(name, {}).get("s", 0.0) for c in cs) if cs else None

            rows: list[tuple[str, Callable[[dict[str, Any]], float | None], Callable[[float | None], str]]] = [
                ("steady cycle, wall ms", lambda r: cyc(r, "steady", "wall_s"), _ms),
                ("churn cycle, wall ms", lambda r: cyc(r, "churn", "wall_s"), _ms),
                ("start-up cycle, wall ms", lambda r: cyc(r, "start", "wall_s"), _ms),
                ("`Engine.start()` (adoption) s", lambda r: r["run"]["start_s"], lambda v: _f(v, 2)),
                ("SQL statements, churn cycle", lambda r: cyc(r, "churn", "queries"), lambda v: _f(v, 0)),
                ("SQL statements, start-up cycle", lambda r: cyc(r, "start", "queries"), lambda v: _f(v, 0)),
                (
                    "`cancel_flags` per cycle ms (steady)",
                    lambda r: statistics.median(
                        c["ledger_calls"].get("cancel_flags", {}).get("s", 0.0) for c in _cycles(r, "steady")
                    ),
                    _ms,
                ),
                ("`record_observations` per churn cycle ms", lambda r: call(r, "record_observations"), _ms),
                ("`claim_queued` per churn cycle ms", lambda r: call(r, "claim_queued"), _ms),
                ("`mark_submitted_many` per churn cycle ms", lambda r: call(r, "mark_submitted_many"), _ms),
                (
                    "`record_deliveries` + `claim_outbox` per churn cycle ms",
                    lambda r: (call(r, "record_deliveries") or 0) + (call(r, "claim_outbox") or 0),
                    _ms,
                ),
                ("`finish_attempt` per churn cycle ms", lambda r: call(r, "finish_attempt"), _ms),
                ("RSS after start MB", lambda r: r["run"]["rss"]["after_engine_start"], lambda v: _f(v, 0)),
                ("RSS after steady MB", lambda r: r["run"]["rss"]["after_steady"], lambda v: _f(v, 0)),
                ("peak RSS MB", lambda r: r["run"]["rss"]["ru_maxrss"], lambda v: _f(v, 0)),
                ("claimed/s", lambda r: r["populate"]["api"]["claimed"]["per_s"], lambda v: _f(v, 0)),
                (
                    "marked submitted/s (waves of 4)",
                    lambda r: r["populate"]["api"]["submitted"]["per_s"],
                    lambda v: _f(v, 0),
                ),
                ("observed/s", lambda r: r["populate"]["api"]["observed"]["per_s"], lambda v: _f(v, 0)),
                ("finished/s", lambda r: r["populate"]["api"]["finished"]["per_s"], lambda v: _f(v, 0)),
            ]
            for qname in results[0]["run"]["queries"]:
                rows.append((f"`{qname}` ms", lambda r, q=qname: r["run"]["queries"].get(q, {}).get("median_s"), _ms))
            for label, get, fmt in rows:
                cells = []
                for b, a in pairs:
                    try:
                        cells.append(f"{fmt(get(b))} → {fmt(get(a))}")
                    except (KeyError, TypeError):
                        cells.append("-")
                w(f"| {label} | " + " | ".join(cells) + " |")
            w("")

    if data.get("analysis"):
        w("## Analysis")
        w("")
        w(data["analysis"].strip())
        w("")
    if data.get("problems"):
        w("## Gate failures")
        w("")
        for p in data["problems"]:
            w(f"- {p}")
        w("")
    return "\n".join(out) + "\n"


def parse_list(text: str) -> list[int]:
    return [int(x.replace("_", "").replace("k", "000")) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--active", default=None, help="active runs per scale, comma-separated (default 1000,10000)")
    parser.add_argument(
        "--finished", default=None, help="finished runs per scale, paired with --active (default 10000,100000)"
    )
    parser.add_argument("--ledgers", default="sqlite,postgres")
    parser.add_argument(
        "--cycles", type=int, default=None, help="steady cycles, and as many churn cycles (default 20; --quick 5)"
    )
    parser.add_argument("--quick", action="store_true", help="500 active, 5000 finished, 5+5 cycles (CI smoke)")
    parser.add_argument("--out", default=None, help="report (default bench/SCALE.md; --quick: a temp file)")
    parser.add_argument("--json", default=None, help="raw data (default: the report's name with .json)")
    parser.add_argument("--baseline", default=None, help="an earlier SCALE.json: adds a before/after table")
    parser.add_argument("--analysis", default=None, help="a Markdown file whose text becomes the Analysis section")
    parser.add_argument("--render", default=None, help="only re-render this SCALE.json (with --baseline/--analysis)")
    parser.add_argument("--profile", default=None, help="cProfile the measured cycles into PREFIX.<ledger>.<active>")
    # internal: the phases run in their own processes
    parser.add_argument("--phase", choices=("populate", "cycles"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--reserve", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--finish-sample", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--churn", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        args.active = int(args.active)
        if args.phase == "populate":
            args.finished = int(args.finished)
            phase_populate(args)
        else:
            phase_cycles(args)
        return 0

    if args.render:
        data = json.loads(Path(args.render).read_text())
        baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
        if args.analysis:
            data["analysis"] = Path(args.analysis).read_text()
        out = Path(args.out or BENCH / "SCALE.md")
        out.write_text(render(data, baseline))
        log(f"rendered {out}")
        return 0

    if args.quick:
        actives, finisheds = parse_list(args.active or "500"), parse_list(args.finished or "5000")
        cycles = args.cycles or 5
        out = Path(args.out or Path(tempfile.gettempdir()) / "hpcc-scale-quick" / "SCALE.md")
    else:
        actives, finisheds = parse_list(args.active or "1000,10000"), parse_list(args.finished or "10000,100000")
        cycles = args.cycles or 20
        out = Path(args.out or BENCH / "SCALE.md")
    if len(actives) != len(finisheds):
        parser.error("--active and --finished need as many values")
    args.cycles = cycles
    json_out = Path(args.json or out.with_suffix(".json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None

    ledgers = [x.strip() for x in args.ledgers.split(",") if x.strip()]
    skipped: list[str] = []
    if "postgres" in ledgers:
        why = postgres_reachable()
        if why is not None:
            if os.environ.get("CI"):
                log(f"Postgres unreachable in CI: {why}")
                return 2
            skipped.append(f"Postgres ({PG_URL_ENV} or {PG_DEFAULT_URL}) is unreachable: {why}")
            ledgers.remove("postgres")
    data: dict[str, Any] = {
        "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "results": [],
        "skipped": skipped,
        "partial": True,
        "elapsed_s": 0.0,
    }
    if args.analysis:
        data["analysis"] = Path(args.analysis).read_text()
    t0 = time.monotonic()
    failed: list[str] = []
    for active, finished in zip(actives, finisheds):
        for kind in ledgers:
            try:
                data["results"].append(measure(kind, active, finished, args))
            except RuntimeError as exc:
                failed.append(str(exc))
                data["skipped"].append(f"measurement failed twice: {exc}")
            data["elapsed_s"] = time.monotonic() - t0
            json_out.write_text(json.dumps(data, indent=1, default=str))
            out.write_text(render(data, baseline))
    data["partial"] = False
    data["problems"] = gate(data["results"]) + failed
    data["elapsed_s"] = time.monotonic() - t0
    json_out.write_text(json.dumps(data, indent=1, default=str))
    out.write_text(render(data, baseline))
    log(f"wrote {out} and {json_out} ({data['elapsed_s']:.0f} s)")
    for problem in data["problems"]:
        log(f"GATE: {problem}")
    return 1 if data["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
