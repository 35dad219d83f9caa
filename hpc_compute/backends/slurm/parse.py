"""Parsing what Slurm prints (squeue, sacct, scontrol) and mapping its states onto the ledger's.

Nothing here runs a command. The formats are plain text with an unusual separator (``\\x1f``) and
the job name last, so a foreign job whose name holds the separator cannot shift our fields; no
``--json`` (its schema moves between releases, and on 22.05 ``sacct --json`` reports
``return_code: 0`` for failed jobs). An unknown state or reason never raises: it becomes an
``UNKNOWN`` observation (state kept, no transition) until Slurm says something we know.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from hpc_compute.backends.base import Observation, ObservationKind, Outcome
from hpc_compute.spec import FailureKind

SEP = "\x1f"
#: squeue -o: job id, state (long), reason, start, end, time used, name (last)
SQUEUE_FORMAT = SEP.join(("%i", "%T", "%r", "%S", "%e", "%M", "%j"))
SQUEUE_FIELDS = ("job_id", "state", "reason", "start", "end", "elapsed", "name")
#: sacct --format (with -P and --delimiter=SEP); the name last
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "Elapsed", "Submit", "JobName")
SACCT_FORMAT = ",".join(SACCT_FIELDS)
ACCOUNTING_DISABLED = "Slurm accounting storage is disabled"
TAG_PREFIX = "hpcc-"

PENDING_STATES = frozenset(
    {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT", "POWER_UP_NODE"}
)
RUNNING_STATES = frozenset(
    {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
)
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "REVOKED",
    }
)
#: terminal states whose failure kind Slurm alone decides
SPECIAL_KINDS: dict[str, FailureKind] = {
    "TIMEOUT": FailureKind.TIMEOUT,
    "DEADLINE": FailureKind.TIMEOUT,
    "OUT_OF_MEMORY": FailureKind.OOM,
    "NODE_FAIL": FailureKind.NODE_FAIL,
    "PREEMPTED": FailureKind.PREEMPTED,
    "BOOT_FAIL": FailureKind.BOOT_FAILURE,
    "REVOKED": FailureKind.LOST,
}
_EXIT_RE = re.compile(r"^(\d+):(\d+)$")
_JOB_ID_RE = re.compile(r"^\d+(?:_\d+)?$")  # a job, or one task of an array (123_4)


@dataclass(frozen=True)
class SlurmRecord:
    """One job as one Slurm command reported it. ``state`` is verbatim (``CANCELLED by 0``)."""

    job_id: str
    name: str
    state: str
    source: str
    reason: str | None = None
    exit_code: str | None = None
    start: str | None = None
    end: str | None = None
    elapsed: str | None = None
    submit: str | None = None

    @property
    def base_state(self) -> str:
        return split_state(self.state)[0]

    @property
    def cancelled_by(self) -> str | None:
        return split_state(self.state)[1]

    @property
    def terminal(self) -> bool:
        return self.base_state in TERMINAL_STATES

    def as_dict(self) -> dict[str, str]:
        out = {"source": self.source, "job_id": self.job_id, "name": self.name, "state": self.state}
        for key in ("reason", "exit_code", "start", "end", "elapsed", "submit"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def _none(value: str) -> str | None:
    value = value.strip()
    return None if value in {"", "None", "N/A", "(null)", "Unknown"} else value


def split_state(state: str) -> tuple[str, str | None]:
    """``CANCELLED by 1000`` -> (``CANCELLED``, ``1000``); a trailing ``+`` (truncation) is dropped."""
    parts = state.strip().split()
    if not parts:
        return "", None
    base = parts[0].rstrip("+").upper()
    by = parts[2] if len(parts) >= 3 and parts[1] == "by" else None
    return base, by


def parse_exit_code(value: str | None) -> tuple[int, int] | None:
    """Slurm's ``code:signal`` -> (code, signal); None when absent or malformed."""
    if value is None:
        return None
    match = _EXIT_RE.match(value.strip())
    if not match:
        return None
    return int(match.group(1)), int(match.group(2))


def is_ours(name: str) -> bool:
    return name.startswith(TAG_PREFIX)


def parse_squeue(text: str) -> dict[str, SlurmRecord]:
    """``squeue -h -o SQUEUE_FORMAT`` output -> records by job id (malformed lines are skipped)."""
    out: dict[str, SlurmRecord] = {}
    for line in text.splitlines():
        fields = line.split(SEP, len(SQUEUE_FIELDS) - 1)
        if len(fields) != len(SQUEUE_FIELDS):
            continue
        job_id, state, reason, start, end, elapsed, name = fields
        job_id = job_id.strip()
        if not _JOB_ID_RE.match(job_id) or not state.strip():
            continue
        out[job_id] = SlurmRecord(
            job_id=job_id,
            name=name,
            state=state.strip(),
            source="squeue",
            reason=_none(reason),
            start=_none(start),
            end=_none(end),
            elapsed=_none(elapsed),
        )
    return out


def parse_sacct(text: str) -> list[SlurmRecord]:
    """``sacct -X -P -n --delimiter=SEP --format=SACCT_FORMAT`` output -> records in output order."""
    out: list[SlurmRecord] = []
    for line in text.splitlines():
        fields = line.split(SEP, len(SACCT_FIELDS) - 1)
        if len(fields) != len(SACCT_FIELDS):
            continue
        job_id, state, exit_code, start, end, elapsed, submit, name = fields
        job_id = job_id.strip()
        if not _JOB_ID_RE.match(job_id) or not state.strip():
            continue  # steps (123.batch) cannot appear with -X; 123_[0-9] (tasks not started) and het ids are not ours
        out.append(
            SlurmRecord(
                job_id=job_id,
                name=name,
                state=state.strip(),
                source="sacct",
                exit_code=_none(exit_code),
                start=_none(start),
                end=_none(end),
                elapsed=_none(elapsed),
                submit=_none(submit),
            )
        )
    return out


def latest_by_id(records: list[SlurmRecord]) -> dict[str, SlurmRecord]:
    """One record per job id (with ``-D`` a requeued job has several: keep the last)."""
    out: dict[str, SlurmRecord] = {}
    for record in records:
        out[record.job_id] = record
    return out


_SCONTROL_KEYS = (
    "JobId",
    "ArrayJobId",
    "ArrayTaskId",
    "JobName",
    "JobState",
    "Reason",
    "ExitCode",
    "StartTime",
    "EndTime",
    "RunTime",
    "SubmitTime",
)
_SCONTROL_RES = {key: re.compile(rf"(?:^|\s){key}=(\S*)") for key in _SCONTROL_KEYS}
_OUR_NAME = "JobName=" + TAG_PREFIX


def _scontrol_value(line: str, key: str) -> str | None:
    match = _SCONTROL_RES[key].search(line)
    return match.group(1) if match else None


def _lines(text: str) -> Iterator[str]:
    start, size = 0, len(text)
    while start < size:
        end = text.find("\n", start)
        if end == -1:
            end = size
        yield text[start:end]
        start = end + 1


def parse_scontrol(text: str, *, ours_only: bool = False, terminal_only: bool = False) -> dict[str, SlurmRecord]:
    """``scontrol show job -o`` output (one job per line) -> records by job id. ``ours_only``
    skips, with one substring test, the lines of jobs not named by us (slurmctld may hold
    thousands of other records); ``terminal_only`` skips, before any other field is parsed, the
    jobs that have not ended (the scheduler asks scontrol for exit codes only: with 10,000 active
    jobs, parsing every line cost ~1.4 s and ~25 MB per completion-heavy cycle)."""
    out: dict[str, SlurmRecord] = {}
    for line in _lines(text):  # one line at a time: no list (nor buffer) of a 10 MB answer
        if ours_only and _OUR_NAME not in line:
            continue
        state = _scontrol_value(line, "JobState")
        if not state or (terminal_only and split_state(state)[0] not in TERMINAL_STATES):
            continue
        job_id = _scontrol_value(line, "JobId")
        array_job, array_task = _scontrol_value(line, "ArrayJobId"), _scontrol_value(line, "ArrayTaskId")
        if array_job and array_task:
            if not array_task.isdigit():
                continue  # the not-yet-split rest of an array (ArrayTaskId=3-9%2): its tasks come later
            job_id = f"{array_job}_{array_task}"  # the id squeue, sacct and scancel use for the task
        if not job_id or not _JOB_ID_RE.match(job_id) or not state:
            continue
        out[job_id] = SlurmRecord(
            job_id=job_id,
            name=_scontrol_value(line, "JobName") or "",
            state=state,
            source="scontrol",
            reason=_none(_scontrol_value(line, "Reason") or ""),
            exit_code=_none(_scontrol_value(line, "ExitCode") or ""),
            start=_none(_scontrol_value(line, "StartTime") or ""),
            end=_none(_scontrol_value(line, "EndTime") or ""),
            elapsed=_none(_scontrol_value(line, "RunTime") or ""),
            submit=_none(_scontrol_value(line, "SubmitTime") or ""),
        )
    return out


def accounting_disabled(stdout: str, stderr: str) -> bool:
    return ACCOUNTING_DISABLED in stdout or ACCOUNTING_DISABLED in stderr


# ---------------------------------------------------------------------------------------------
# state mapping


def observe(record: SlurmRecord) -> Observation:
    """What one Slurm record means for the engine. Unknown states are UNKNOWN, never terminal."""
    state = record.base_state
    if state in PENDING_STATES:
        # squeue's "None" for a plain PENDING job means the scheduler has not looked at it yet:
        # no reason to show. REQUEUED, REQUEUE_HOLD, ... are reasons in themselves.
        reason = record.reason or (None if state == "PENDING" else state)
        return Observation(ObservationKind.PENDING, reason=reason, backend_state=record.state)
    if state in RUNNING_STATES:
        reason = None if state == "RUNNING" else state
        return Observation(ObservationKind.RUNNING, reason=reason, backend_state=record.state)
    if state in TERMINAL_STATES:
        return Observation(ObservationKind.FINISHED, reason=record.state, backend_state=record.state)
    reason = f"unknown Slurm state {record.state!r}"
    return Observation(ObservationKind.UNKNOWN, reason=reason, backend_state=record.state)


def expected_wrapper_exit(result: dict[str, Any] | None) -> int | None:
    """The status the wrapper exits with for this result (mirrors ``hpcc_wrapper.finish``)."""
    if result is None:
        return None
    if result.get("setup_error"):
        return 1
    sig = result.get("signal")
    if isinstance(sig, int) and not isinstance(sig, bool):
        return 128 + sig if sig < 128 else 1
    code = result.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    return None


def refine_outcome(
    base: Outcome,
    record: SlurmRecord,
    *,
    result: dict[str, Any] | None,
    cancel_requested: bool,
    who: str | None = None,
) -> Outcome:
    """Apply Slurm's record to the outcome built from the wrapper's result file. Slurm is
    authoritative: its special states decide the failure kind, and its ``ExitCode`` decides the
    exit code when the result file disagrees (the file could be forged, Slurm's record cannot).

    ``who`` names whoever cancelled the job, when that is known (a user name for the uid)."""
    rec = record.as_dict()
    state = record.base_state
    exit_pair = parse_exit_code(record.exit_code)
    label = f"{record.state} {record.exit_code}" if record.exit_code else record.state
    base = replace(base, backend_record=rec)

    if state == "CANCELLED":
        if cancel_requested:
            return replace(base, failure_kind=None, cancelled=True, message="cancelled")
        by = who or (f"uid {record.cancelled_by}" if record.cancelled_by else "someone outside hpc-compute")
        sig = base.signal if base.signal is not None else (exit_pair[1] if exit_pair and exit_pair[1] else 15)
        return replace(
            base,
            failure_kind=FailureKind.SIGNAL,
            cancelled=False,
            signal=sig,
            message=f"cancelled outside hpc-compute by {by} (Slurm: {label})",
        )
    special = SPECIAL_KINDS.get(state)
    if special is not None:
        detail = {
            FailureKind.TIMEOUT: "time limit reached",
            FailureKind.OOM: "out of memory",
            FailureKind.NODE_FAIL: "the node failed",
            FailureKind.PREEMPTED: "preempted",
            FailureKind.BOOT_FAILURE: "the node failed to boot",
            FailureKind.LOST: "revoked",
        }[special]
        if state == "DEADLINE":
            detail = "the deadline passed"
        return replace(base, failure_kind=special, cancelled=False, message=f"{detail} (Slurm: {label})")
    if exit_pair is None:
        return base  # no exit code to compare (e.g. a record without one): the result file stands
    code, sig = exit_pair
    expected = expected_wrapper_exit(result)
    if state == "COMPLETED" and code == 0 and sig == 0:
        if result is None:
            return replace(base, message=f"Slurm reports {label} but the wrapper left no result file")
        if expected == 0:
            return base
        return replace(
            base,
            exit_code=0,
            signal=None,
            failure_kind=None,
            message=f"the result file says {expected}, Slurm says {label}: Slurm wins",
        )
    if sig != 0:
        # the wrapper itself was killed by a signal: whatever the file says, the job died of it
        if result is not None and expected == 128 + sig and base.signal == sig:
            return base
        return replace(
            base,
            exit_code=None,
            signal=sig,
            failure_kind=FailureKind.SIGNAL,
            cancelled=False,
            message=f"killed by signal {sig} (Slurm: {label})",
        )
    if code == 0:
        # FAILED 0:0 and the like: Slurm says it failed without a status
        if base.failure_kind is not None:
            return base
        return replace(base, failure_kind=FailureKind.LOST, message=f"Slurm reports {label} without a status")
    if expected == code:
        return base  # the file agrees: keep its finer account (setup, signal, timeout)
    why = "no result file" if result is None else f"the result file says {expected}"
    return replace(
        base,
        exit_code=code,
        signal=None,
        failure_kind=FailureKind.EXIT_CODE,
        cancelled=False,
        message=f"exited with code {code} ({why}; Slurm: {label})",
    )
