"""The local backend: the job-side wrapper as a detached process on this host, sealed by bubblewrap.

The wrapper runs in its own session (``setsid``), so a scheduler crash or restart does not kill
the job; a restarted scheduler finds it again by the pid *and* process start time it recorded
(a reused pid never passes for the job). The backend job id is ``<pid>.<start time in ticks>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from hpc_compute.backends.base import (
    Backend,
    FindKind,
    FindResult,
    Observation,
    ObservationKind,
    Outcome,
    SubmitError,
    Ticket,
)
from hpc_compute.backends.outcome import outcome_from_result
from hpc_compute.config import Settings
from hpc_compute.errors import SpecError
from hpc_compute.harvest import HarvestLimits, harvest_directory
from hpc_compute.resources import wrapper_path
from hpc_compute.rundir import (
    CLAIM_FILE,
    OUTPUT_DIR,
    RESULT_FILE,
    SCRATCH_DIR,
    SPEC_FILE,
    STARTED_FILE,
    AttemptSpec,
    create_attempt_dir,
    read_json_file,
    write_atomic,
)
from hpc_compute.runtimes import SandboxPlan, build_launch
from hpc_compute.spec import JobSpec


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    state = fields[0]
    if state in (b"Z", b"X"):
        return None
    return int(fields[19])


def parse_job_id(job_id: str) -> tuple[int, int]:
    pid, _, ticks = job_id.partition(".")
    return int(pid), int(ticks)


class LocalBackend(Backend):
    name = "local"
    reconcile_grace_s = 10.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reconcile_grace_s = settings.local.reconcile_grace_s
        self.max_in_flight = settings.local.max_parallel
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def check(self, spec: JobSpec) -> None:
        if spec.resources.gpus > self.settings.local.gpus:
            raise SpecError(
                "resources.gpus",
                f"the local backend has {self.settings.local.gpus} GPU(s) to hand out; asked for {spec.resources.gpus}",
            )
        if spec.image.endswith(".sif"):
            raise SpecError("image", "the local backend runs bubblewrap: give 'host' or a rootfs directory, not a .sif")

    # -- submit -------------------------------------------------------------------------------

    def write_attempt(self, ticket: Ticket) -> None:
        """Build the attempt directory and spec.json (idempotent until the wrapper claims it)."""
        directory = ticket.attempt_dir
        create_attempt_dir(directory)
        spec = ticket.spec
        plan = SandboxPlan(
            run_id=ticket.run_id,
            attempt_id=ticket.attempt_id,
            image=spec.image,
            command=spec.command,
            env=dict(spec.env),
            inputs=tuple((str(Path(i.source).resolve()), i.name) for i in spec.inputs),
            output_dir=str(directory / OUTPUT_DIR),
            scratch_dir=str(directory / SCRATCH_DIR),
            gpus=spec.resources.gpus,
        )
        launch = build_launch(self.settings.local.runtime, plan, executable=self.settings.local.bwrap)
        attempt_spec = AttemptSpec(
            run_id=ticket.run_id,
            attempt_id=ticket.attempt_id,
            launch=launch,
            time_limit_s=spec.resources.time_limit,
        )
        write_atomic(directory / SPEC_FILE, attempt_spec.to_json())

    def submit(self, ticket: Ticket) -> str:
        try:
            self.write_attempt(ticket)
        except (OSError, SpecError) as exc:
            raise SubmitError(f"cannot prepare {ticket.attempt_dir}: {exc}", definite=True) from exc
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            log = open(ticket.attempt_dir / "wrapper.stderr", "ab")  # noqa: SIM115 - handed to the child
        except OSError as exc:
            raise SubmitError(f"cannot open the wrapper log: {exc}", definite=True) from exc
        try:
            child = subprocess.Popen(
                [self.settings.local.python, str(wrapper_path()), str(ticket.attempt_dir)],
                cwd=ticket.attempt_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise SubmitError(f"cannot start the wrapper: {exc}", definite=True) from exc
        finally:
            log.close()
        self._children[child.pid] = child
        ticks = process_start_ticks(child.pid)
        if ticks is None:
            # It already ended (a wrapper that refused to start ends at once): its claim file tells.
            claim = read_json_file(ticket.attempt_dir / CLAIM_FILE) or {}
            ticks = int(claim.get("start_time", 0) or 0)
        return f"{child.pid}.{ticks}"

    # -- poll ---------------------------------------------------------------------------------

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    def _alive(self, job_id: str | None) -> bool:
        if not job_id:
            return False
        try:
            pid, ticks = parse_job_id(job_id)
        except ValueError:
            return False
        return process_start_ticks(pid) == ticks

    def poll(self, tickets: list[Ticket]) -> dict[str, Observation]:
        self._reap()
        out: dict[str, Observation] = {}
        for ticket in tickets:
            directory = ticket.attempt_dir
            if (directory / RESULT_FILE).exists():
                out[ticket.attempt_id] = Observation(ObservationKind.FINISHED, backend_state="exited")
            elif self._alive(ticket.backend_job_id):
                if (directory / STARTED_FILE).exists():
                    out[ticket.attempt_id] = Observation(ObservationKind.RUNNING, backend_state="running")
                else:
                    out[ticket.attempt_id] = Observation(
                        ObservationKind.PENDING, reason="starting", backend_state="starting"
                    )
            else:
                # Gone without a result (killed, host restarted): collect() reports it as lost.
                out[ticket.attempt_id] = Observation(ObservationKind.FINISHED, backend_state="gone")
        return out

    # -- reconciliation -----------------------------------------------------------------------

    def find(self, tickets: list[Ticket]) -> dict[str, FindResult]:
        out: dict[str, FindResult] = {}
        now = time.time()
        for ticket in tickets:
            claim_path = ticket.attempt_dir / CLAIM_FILE
            claim = read_json_file(claim_path)
            if claim is not None and not claim.get("tombstone"):
                job_id = f"{int(claim['pid'])}.{int(claim['start_time'])}"
                out[ticket.attempt_id] = FindResult(FindKind.FOUND, backend_job_id=job_id)
                continue
            if claim is not None:
                out[ticket.attempt_id] = FindResult(FindKind.ABSENT, detail="tombstoned earlier")
                continue
            created = ticket.submitted_at or now
            if now - created < self.reconcile_grace_s:
                out[ticket.attempt_id] = FindResult(FindKind.UNKNOWN, detail="within the grace period")
                continue
            out[ticket.attempt_id] = self._tombstone(ticket)
        return out

    def _tombstone(self, ticket: Ticket) -> FindResult:
        """Claim the attempt for nobody: with O_EXCL, a late wrapper can then never start it."""
        claim_path = ticket.attempt_dir / CLAIM_FILE
        if not ticket.attempt_dir.exists():
            return FindResult(FindKind.ABSENT, detail="no attempt directory")
        try:
            fd = os.open(claim_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            claim = read_json_file(claim_path) or {}
            if claim.get("tombstone"):
                return FindResult(FindKind.ABSENT, detail="tombstoned earlier")
            job_id = f"{int(claim.get('pid', 0))}.{int(claim.get('start_time', 0))}"
            return FindResult(FindKind.FOUND, backend_job_id=job_id)
        except OSError as exc:
            return FindResult(FindKind.UNKNOWN, detail=f"cannot tombstone: {exc}")
        with os.fdopen(fd, "w") as handle:
            json.dump({"tombstone": True, "at": time.time()}, handle)
        return FindResult(FindKind.ABSENT, detail="the wrapper never claimed the attempt")

    # -- cancel / collect ---------------------------------------------------------------------

    def cancel(self, ticket: Ticket) -> None:
        if not self._alive(ticket.backend_job_id):
            return
        assert ticket.backend_job_id is not None
        pid, _ = parse_job_id(ticket.backend_job_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def collect(self, ticket: Ticket, artifact_dir: Path, limits: HarvestLimits) -> Outcome:
        result = read_json_file(ticket.attempt_dir / RESULT_FILE)
        report = harvest_directory(ticket.attempt_dir / OUTPUT_DIR, artifact_dir, limits)
        return outcome_from_result(result, ticket, harvest=report)
