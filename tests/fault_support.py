"""Support for the fault-injection tests (tests/integration/test_faults.py).

* :class:`Cluster` - the real single-node Slurm and Postgres services: stop, start, wait healthy.
* :class:`ShimBin` - a ``slurm.bin_dir`` with the real Slurm commands and an ``sbatch`` that
  misbehaves once (fails without creating a job, or creates the job and then hangs).
* :class:`Serve` - one ``python -m hpc_compute serve`` scheduler process configured by env.
* :class:`FenceMonitor` - samples every attempt's fence while a scenario runs (I5: never decreases).
* :func:`check_invariants` - the shared checker of I1-I5 after a scenario, against the ledger,
  the attempt directories and Slurm's own record (squeue, sacct).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from hpc_compute.errors import FencedOut
from hpc_compute.ledger.store import AttemptResult, Ledger
from hpc_compute.rundir import STARTED_FILE, STDOUT_FILE
from hpc_compute.spec import parse_spec

LEASE_S = 6.0
SERVE_ENV_BASE = {
    "HPC_COMPUTE_SCHEDULER__LEASE_SECONDS": str(LEASE_S),
    "HPC_COMPUTE_SCHEDULER__POLL_INTERVAL": "0.5",
    "HPC_COMPUTE_SCHEDULER__MIN_POLL_INTERVAL": "0.2",
    "HPC_COMPUTE_SLURM__RUNTIME": "bubblewrap",
    "HPC_COMPUTE_SLURM__BWRAP": "/usr/bin/bwrap",
    "HPC_COMPUTE_SLURM__PYTHON": "/usr/bin/python3",
    "HPC_COMPUTE_SLURM__RECONCILE_GRACE_S": "8",  # > sbatch_timeout: a slow sbatch may still create the job
    "HPC_COMPUTE_SLURM__SBATCH_TIMEOUT": "4",
    "HPC_COMPUTE_SLURM__COMMAND_TIMEOUT": "15",
    "HPC_COMPUTE_SLURM__MIN_POLL_INTERVAL": "0.3",
    "HPC_COMPUTE_SLURM__ACCOUNTING": "auto",
}
LIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING")


# ---------------------------------------------------------------------------------------------
# services


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def others_using_services() -> list[str]:
    """Other test runs or benchmarks on this machine (colleagues share Slurm and Postgres)."""
    mine = {os.getpid(), os.getppid()}
    proc = _run(["pgrep", "-af", "pytest|bench/run.py"])
    out = []
    for line in proc.stdout.splitlines():
        pid = int(line.split()[0])
        if pid in mine or _is_ancestor(pid) or _is_descendant_of_me(pid):
            continue
        out.append(line)
    return out


def _is_ancestor(pid: int) -> bool:
    current = os.getpid()
    while current > 1:
        if current == pid:
            return True
        try:
            current = int(Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _is_descendant_of_me(pid: int) -> bool:
    me = os.getpid()
    current = pid
    while current > 1:
        if current == me:
            return True
        try:
            current = int(Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # a probe that fails is "not yet"
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class Cluster:
    """Start/stop the daemons the way ansible/roles/hpcc_slurm/tasks/daemons.yml starts them."""

    CTLD_PID = Path("/run/slurmctld.pid")
    DBD_PID = Path("/run/slurmdbd.pid")

    @staticmethod
    def ctld_up() -> bool:
        try:
            return "is UP" in _run(["scontrol", "ping"], timeout=10).stdout
        except subprocess.TimeoutExpired:
            return False

    @staticmethod
    def node_idle() -> bool:
        out = _run(["sinfo", "-h", "-o", "%T"], timeout=10).stdout.strip()
        return out in ("idle", "mixed", "allocated")

    @staticmethod
    def dbd_up() -> bool:
        return _run(["sacct", "-n", "-X", "-j", "1", "-o", "JobIDRaw"], timeout=15).returncode == 0

    @staticmethod
    def pg_up() -> bool:
        return _run(["pg_isready", "-h", "127.0.0.1", "-q"], timeout=10).returncode == 0

    @staticmethod
    def _stop_pidfile(pidfile: Path, what: str) -> None:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, f"{what} to stop")

    def stop_ctld(self) -> None:
        self._stop_pidfile(self.CTLD_PID, "slurmctld")

    def start_ctld(self) -> None:
        if not self.ctld_up():
            _run(["/usr/sbin/slurmctld"], timeout=30)
        wait_for(self.ctld_up, 90, "slurmctld to answer")

    def stop_dbd(self) -> None:
        self._stop_pidfile(self.DBD_PID, "slurmdbd")

    def start_dbd(self) -> None:
        if not self.dbd_up():
            _run(["/usr/sbin/slurmdbd"], timeout=30)
        wait_for(self.dbd_up, 90, "slurmdbd to answer")

    def restart_pg(self) -> None:
        proc = _run(["pg_ctlcluster", "15", "main", "restart"], timeout=120)
        assert proc.returncode == 0, proc.stderr

    def ensure_pg(self) -> None:
        if not self.pg_up():
            _run(["pg_ctlcluster", "15", "main", "start"], timeout=120)
        wait_for(self.pg_up, 90, "postgres to accept connections")

    def healthy(self) -> None:
        """Leave the cluster as found: every daemon answering, the node idle."""
        self.ensure_pg()
        self.start_ctld()
        self.start_dbd()
        wait_for(self.node_idle, 120, "the node to be idle")


# ---------------------------------------------------------------------------------------------
# the sbatch shim


class ShimBin:
    """A directory for ``slurm.bin_dir``: the real squeue/sacct/scancel/scontrol, and an sbatch
    that behaves as ``mode`` says on its first call only (later calls are the real sbatch):

    * ``ok``: always the real sbatch;
    * ``fail``: exits 1 with an unrecognised error and creates no job (an ambiguous failure: the
      engine must reconcile and prove the job absent);
    * ``timeout``: runs the real sbatch (the job exists), then hangs past ``sbatch_timeout``.
    """

    def __init__(self, root: Path, mode: str) -> None:
        self.dir = root / "slurm-bin"
        self.dir.mkdir(parents=True)
        for program in ("squeue", "sacct", "scancel", "scontrol", "sinfo"):
            real = shutil.which(program)
            assert real, f"{program} not on PATH"
            (self.dir / program).symlink_to(real)
        real_sbatch = shutil.which("sbatch")
        assert real_sbatch
        self.counter = self.dir / "sbatch.calls"
        once = {
            "ok": "",
            "fail": 'echo "sbatch: error: simulated: submission broke off (no job created)" >&2; exit 1',
            "timeout": f'"{real_sbatch}" "$@"; exec sleep 30',
        }[mode]
        script = f"""#!/bin/sh
case "$1" in --test-only) exec "{real_sbatch}" "$@";; esac
echo "$$ $*" >> "{self.counter}"
if [ "$(wc -l < "{self.counter}")" -eq 1 ]; then
    {once or ":"}
fi
exec "{real_sbatch}" "$@"
"""
        path = self.dir / "sbatch"
        path.write_text(script)
        path.chmod(0o755)

    def calls(self) -> int:
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0


# ---------------------------------------------------------------------------------------------
# schedulers


class Serve:
    """One ``hpc-compute serve`` process. Every scheduler of a scenario shares ``home`` (the work
    root) and the Postgres ledger, so any can harvest any attempt."""

    _counter = 0

    def __init__(self, home: Path, ledger_url: str, *, env: dict[str, str] | None = None) -> None:
        Serve._counter += 1
        self.home = home
        self.log_path = home / f"serve-{Serve._counter:04d}.log"
        full = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "xdg"),
            "HPC_COMPUTE_HOME": str(home),
            "HPC_COMPUTE_LEDGER_URL": ledger_url,
            **SERVE_ENV_BASE,
            **(env or {}),
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpc_compute", "serve"], env=full, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.started = time.time()
        self.killed_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def scheduler_id(self, timeout: float = 30) -> str:
        found: list[str] = []

        def seen() -> bool:
            match = re.search(r"scheduler (\S+) serving", self.log())
            if match:
                found.append(match.group(1))
            return bool(found)

        wait_for(seen, timeout, f"scheduler {self.pid} to start")
        return found[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stopped(self) -> bool:
        """SIGSTOPped (state T in /proc)."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
        except OSError:
            return False

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.killed_at = time.time()
        self.proc.wait(30)
        self._log.close()

    def terminate(self, timeout: float = 30) -> int | None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
        return self.proc.returncode

    def fenced_warnings(self) -> int:
        return self.log().count("fenced out:")


# ---------------------------------------------------------------------------------------------
# ledger helpers


_MIGRATE_LOCK = threading.Lock()


def new_ledger(url: str) -> Ledger:
    """A migrated ledger on ``url`` (Alembic's command API is not thread-safe: one at a time)."""
    ledger = Ledger(url)
    with _MIGRATE_LOCK:
        ledger.upgrade()
    return ledger


def submit(ledger: Ledger, command: list[str], **fields: Any) -> str:
    data: dict[str, Any] = {"image": "host", "command": command, "backend": "slurm"}
    data["resources"] = {"memory": "128M", "time_limit": "5m", **fields.pop("resources", {})}
    data.update(fields)
    return ledger.create_run(parse_spec(data), "tester").id


ECHO_ATTEMPT = ["/bin/sh", "-c", 'echo "$HPCC_ATTEMPT_ID"']


def all_terminal(ledger: Ledger, run_ids: Iterable[str]) -> bool:
    return all(ledger.get_run(r).terminal for r in run_ids)


def wait_terminal(ledger: Ledger, run_ids: list[str], timeout: float, what: str = "the runs") -> None:
    def done() -> bool:
        return all_terminal(ledger, run_ids)

    try:
        wait_for(done, timeout, f"{what} to be terminal", every=1.0)
    except AssertionError:
        states = {r: ledger.get_run(r).state.value for r in run_ids if not ledger.get_run(r).terminal}
        raise AssertionError(f"{len(states)} run(s) not terminal after {timeout:g}s: {dict(list(states.items())[:10])}")


class FenceMonitor:
    """I5, continuously: sample every attempt's fence; a fence that ever decreases is a violation."""

    def __init__(self, url: str, every: float = 0.5) -> None:
        self.engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 3})
        self.every = every
        self.max_seen: dict[str, int] = {}
        self.violations: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> FenceMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()
        self.engine.dispose()

    def sample(self) -> None:
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(text("SELECT id, fence FROM hpcc_attempt")).all()
        except Exception:  # Postgres restarting: sample again later
            return
        self.samples += 1
        for attempt_id, fence in rows:
            previous = self.max_seen.get(attempt_id, 0)
            if fence < previous:
                self.violations.append(f"attempt {attempt_id}: fence went {previous} -> {fence}")
            self.max_seen[attempt_id] = max(previous, fence)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()


# ---------------------------------------------------------------------------------------------
# Slurm's own record


@dataclass
class SacctJob:
    job_id: str
    name: str
    state: str
    exit_code: str
    node_list: str

    @property
    def started(self) -> bool:
        """The batch script started on a node (a job cancelled while pending/held has no node)."""
        return self.node_list not in ("", "None assigned") and not self.state.startswith("PENDING")


def slurm_key(attempt: Any) -> tuple[str, int | None]:
    """The Slurm job name an attempt was submitted under, and its array task index: from the
    attempt's array.json (written before sbatch) when it went as an array task, else its own
    per-attempt tag and None."""
    path = Path(attempt.attempt_dir) / "array.json"
    try:
        data = json.loads(path.read_text())
        name, index = data["array"], data["index"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"hpcc-{attempt.id}", None
    assert isinstance(name, str) and name.startswith("hpcc-arr-") and isinstance(index, int), data
    return name, index


def jobs_of(attempt: Any, sacct: dict[str, list[SacctJob]]) -> list[SacctJob]:
    """Slurm's records of the jobs an attempt was submitted as (its array task's, for a member)."""
    name, index = slurm_key(attempt)
    jobs = sacct.get(name, [])
    if index is None:
        return jobs
    return [j for j in jobs if j.job_id.partition("_")[2] == str(index)]


def sacct_by_name(tags: list[str], since: str = "now-3hours") -> dict[str, list[SacctJob]]:
    """name -> records; JobID is ``<array job>_<task>`` for an array task (as in the ledger)."""
    out: dict[str, list[SacctJob]] = {t: [] for t in tags}
    for start in range(0, len(tags), 100):
        part = tags[start : start + 100]
        fmt = "JobID,State,ExitCode,NodeList,JobName"
        proc = _run(["sacct", "-X", "-P", "-n", "-D", f"--name={','.join(part)}", "-S", since, "-E", "now", "-o", fmt])
        assert proc.returncode == 0, f"sacct failed: {proc.stderr}"
        for line in proc.stdout.splitlines():
            fields = line.split("|", 4)
            if len(fields) == 5 and fields[4] in out:
                job = SacctJob(fields[0], fields[4], fields[1], fields[2], fields[3])
                jobs = out[job.name]
                jobs[:] = [j for j in jobs if j.job_id != job.job_id] + [job]  # -D: the latest record wins
    return out


def live_jobs(tags: list[str]) -> list[str]:
    """Jobs carrying one of ``tags`` that are still pending or running in slurmctld."""
    out = []
    for start in range(0, len(tags), 100):
        part = tags[start : start + 100]
        names = f"--name={','.join(part)}"
        proc = _run(["squeue", "-h", "-r", "-t", ",".join(LIVE_STATES), names, "-o", "%i|%j|%T|%r"])
        assert proc.returncode == 0, f"squeue failed: {proc.stderr}"
        out += [line for line in proc.stdout.splitlines() if line.strip()]
    return out


# ---------------------------------------------------------------------------------------------
# the invariant checker


@dataclass
class Report:
    runs: int = 0
    terminal: int = 0
    lost: list[str] = field(default_factory=list)  # I1
    duplicated: list[str] = field(default_factory=list)  # I2
    orphans: list[str] = field(default_factory=list)  # I3
    mismatches: list[str] = field(default_factory=list)  # I4
    fence_violations: list[str] = field(default_factory=list)  # I5
    executions: int = 0
    attempts: int = 0
    states: dict[str, int] = field(default_factory=dict)

    def problems(self) -> dict[str, list[str]]:
        return {
            k: v[:10]
            for k, v in {
                "I1 lost": self.lost,
                "I2 duplicated": self.duplicated,
                "I3 orphans": self.orphans,
                "I4 ledger!=slurm": self.mismatches,
                "I5 fencing": self.fence_violations,
            }.items()
            if v
        }

    def assert_ok(self) -> None:
        assert not self.problems(), self.problems()


def _agrees(job: SacctJob, attempt: Any) -> str | None:
    """I4 for one finished attempt: None when the ledger and Slurm's record agree."""
    state = job.state.split()[0].rstrip("+")
    code = job.exit_code.partition(":")[0]
    kind = attempt.failure_kind.value if attempt.failure_kind else None
    if state == "COMPLETED":
        ok = attempt.exit_code == 0 and kind is None
    elif state == "FAILED":
        ok = (attempt.exit_code == int(code) and int(code) != 0) or (attempt.signal is not None and attempt.signal > 0)
        # FAILED with ExitCode 0:0 contradicts itself: Slurm 22.05 records that in accounting for
        # jobs that ended while slurmdbd was down (seen in test_slurmdbd_down_while_jobs_finish).
        # Slurm's record then says "failed, code unknown": the ledger agrees if it failed with a code.
        ok = ok or (job.exit_code == "0:0" and kind == "exit_code" and attempt.exit_code not in (None, 0))
    elif state == "OUT_OF_MEMORY":
        ok = kind == "oom"
    elif state in ("TIMEOUT", "DEADLINE"):
        ok = kind == "timeout"
    elif state == "CANCELLED":
        ok = not (attempt.exit_code == 0 and kind is None)
    else:
        ok = kind is not None
    if ok:
        return None
    return (
        f"attempt {attempt.id} job {job.job_id}: slurm {job.state} {job.exit_code}, "
        f"ledger exit={attempt.exit_code} signal={attempt.signal} kind={kind}"
    )


def _stale_fence_changes_nothing(ledger: Ledger, run_id: str, attempt: Any) -> str | None:
    """I5, directly: a finish with a stale fence raises FencedOut and changes nothing."""
    before = (ledger.get_run(run_id).model_dump(), [a.model_dump() for a in ledger.attempts(run_id)])
    stale = AttemptResult(
        exit_code=99,
        signal=None,
        failure_kind=None,
        message="stale writer",
        cancelled=False,
        started_at=None,
        ended_at=datetime.now(UTC),
        outcome={},
    )
    try:
        ledger.finish_attempt(attempt.id, attempt.fence - 1, stale, None)
    except FencedOut:
        pass
    else:
        return f"attempt {attempt.id}: a finish with stale fence {attempt.fence - 1} succeeded"
    try:
        ledger.mark_submitted(attempt.id, attempt.fence - 1, "424242")
    except FencedOut:
        pass
    else:
        return f"attempt {attempt.id}: mark_submitted with a stale fence succeeded"
    after = (ledger.get_run(run_id).model_dump(), [a.model_dump() for a in ledger.attempts(run_id)])
    return None if before == after else f"run {run_id}: a stale-fence write changed the ledger"


def check_invariants(
    ledger: Ledger,
    run_ids: list[str],
    *,
    monitor: FenceMonitor | None = None,
    schedulers: Iterable[Serve] = (),
    max_fenced_warnings: int = 0,
    expect_terminal: bool = True,
    stale_fence_samples: int = 5,
    orphan_wait: float = 20.0,
    sacct_wait: float = 60.0,
) -> Report:
    """Check I1-I5 for ``run_ids`` (the scenario's schedulers should be stopped first)."""
    report = Report(runs=len(run_ids))
    runs = {r: ledger.get_run(r) for r in run_ids}
    attempts = {r: ledger.attempts(r) for r in run_ids}
    all_attempts = [a for items in attempts.values() for a in items]
    report.attempts = len(all_attempts)
    for run in runs.values():
        report.states[run.state.value] = report.states.get(run.state.value, 0) + 1

    # I1: every accepted run is terminal, or visibly non-terminal with a reason; never silently lost
    for run_id, run in runs.items():
        if run.terminal:
            report.terminal += 1
            if run.failure_kind is not None and run.failure_kind.value == "lost":
                report.lost.append(f"run {run_id}: failed as lost ({run.failure_message})")
        elif expect_terminal:
            report.lost.append(f"run {run_id}: still {run.state.value}")
        elif not (run.pending_reason or attempts[run_id]):
            report.lost.append(f"run {run_id}: {run.state.value} without a reason")

    tags = sorted({slurm_key(a)[0] for a in all_attempts})  # per-attempt tags and array names
    # I3: no live Slurm job carries a tag of this scenario (allow in-flight scancels to land)
    live: list[str] = []
    deadline = time.monotonic() + orphan_wait
    while True:
        live = live_jobs(tags) if tags else []
        if not live or time.monotonic() > deadline:
            break
        time.sleep(1)
    report.orphans = live

    # Slurm's record, once slurmdbd has every finished job we know of
    known = {a.backend_job_id for a in all_attempts if a.backend_job_id and a.state == "finished"}
    sacct: dict[str, list[SacctJob]] = {}
    deadline = time.monotonic() + sacct_wait
    while True:
        sacct = sacct_by_name(tags) if tags else {}
        recorded = {j.job_id for jobs in sacct.values() for j in jobs}
        if known <= recorded or time.monotonic() > deadline:
            break
        time.sleep(2)

    for run_id, items in attempts.items():
        # I2: at most one attempt ran user code: the wrapper's start marker, the payload's own
        # line on stdout, and Slurm's record of which attempts got a job that started
        ran_code = []
        for attempt in items:
            base = Path(attempt.attempt_dir)
            marker = (base / STARTED_FILE).exists()
            stdout = base / STDOUT_FILE
            echoed = stdout.exists() and attempt.id in stdout.read_text(errors="replace")
            if marker or echoed:
                ran_code.append(attempt.id)
        report.executions += len(ran_code)
        slurm_started = [a.id for a in items for j in jobs_of(a, sacct) if j.started]
        if len(ran_code) > 1 or len(slurm_started) > 1:
            report.duplicated.append(f"run {run_id}: user code in {ran_code}, Slurm started {slurm_started}")
        # I4: each finished attempt's job agrees with Slurm's record
        for attempt in items:
            if attempt.state != "finished" or not attempt.backend_job_id:
                continue
            jobs = [j for j in jobs_of(attempt, sacct) if j.job_id == attempt.backend_job_id]
            if not jobs:
                report.mismatches.append(f"attempt {attempt.id}: job {attempt.backend_job_id} not in sacct")
                continue
            problem = _agrees(jobs[0], attempt)
            if problem:
                report.mismatches.append(problem)
        if runs[run_id].terminal and runs[run_id].state.value == "succeeded" and not ran_code:
            report.mismatches.append(f"run {run_id}: succeeded, yet no attempt ran user code")

    # I5: fences only increased; FencedOut only where expected; a stale write changes nothing
    if monitor is not None:
        report.fence_violations += monitor.violations
    fenced = sum(s.fenced_warnings() for s in schedulers)
    if fenced > max_fenced_warnings:
        report.fence_violations.append(
            f"{fenced} FencedOut warnings in scheduler logs (expected <= {max_fenced_warnings})"
        )
    sample = [(r, a) for r, items in attempts.items() for a in items]
    random.Random(7).shuffle(sample)
    for run_id, attempt in sample[:stale_fence_samples]:
        problem = _stale_fence_changes_nothing(ledger, run_id, attempt)
        if problem:
            report.fence_violations.append(problem)
    return report


# ---------------------------------------------------------------------------------------------
# figures


def takeover_latencies(url: str, kills: list[tuple[float, str]]) -> list[float]:
    """Seconds from each kill to the first ``adopted`` event of an attempt taken from the killed
    scheduler (kills of a scheduler that owned nothing have no sample)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT at, message FROM hpcc_event WHERE kind = 'adopted' ORDER BY at")).all()
    finally:
        engine.dispose()
    out = []
    for killed_at, scheduler_id in kills:
        for at, message in rows:
            when = at.replace(tzinfo=UTC).timestamp() if at.tzinfo is None else at.timestamp()
            if when >= killed_at - 1 and message and message.endswith(f"from {scheduler_id}"):
                out.append(max(0.0, when - killed_at))
                break
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@contextlib.contextmanager
def schedulers_stopped(serves: list[Serve]) -> Iterator[None]:
    try:
        yield
    finally:
        for serve in serves:
            serve.terminate()
