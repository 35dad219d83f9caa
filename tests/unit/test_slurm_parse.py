"""squeue / sacct / scontrol parsing and Slurm's state mapping, on text recorded from the real
single-node cluster of this project (tests/data/slurm/, recorded by tests/data/slurm/record.sh).

Recorded for real: PENDING (Reason=Resources and JobHeldUser), RUNNING, COMPLETED 0:0, FAILED 3:0,
FAILED 0:9 (``kill -9 $$``), TIMEOUT, OUT_OF_MEMORY 0:125 (cgroup v1 memory limit), CANCELLED by 0.
Synthesized (sacct_synthesized.txt, in the recorded format), because a single-node test cluster
without preemption, power saving or a node to lose cannot produce them: NODE_FAIL, PREEMPTED,
BOOT_FAIL, DEADLINE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpc_compute.backends.base import ObservationKind, Outcome, Ticket
from hpc_compute.backends.outcome import outcome_from_result
from hpc_compute.backends.slurm import parse
from hpc_compute.backends.slurm.parse import SlurmRecord
from hpc_compute.spec import FailureKind, parse_spec

DATA = Path(__file__).resolve().parents[1] / "data" / "slurm"
TAG = "hpcc-00000000-0000-4000-8000-0000000000"
OK, EXIT3, KILL9, OOM, TIMEOUT, GPU2, PENDING, CANCELLED, HELD, DEADLINE = (f"{TAG}{n:02x}" for n in range(1, 11))


def _text(name: str) -> str:
    return (DATA / name).read_text()


def _by_name(records: dict[str, SlurmRecord] | list[SlurmRecord]) -> dict[str, SlurmRecord]:
    values = records.values() if isinstance(records, dict) else records
    return {r.name: r for r in values}


@pytest.fixture(scope="module")
def squeue_mid() -> dict[str, SlurmRecord]:
    return _by_name(parse.parse_squeue(_text("squeue_mid.txt")))


@pytest.fixture(scope="module")
def sacct_done() -> dict[str, SlurmRecord]:
    return _by_name(parse.parse_sacct(_text("sacct_done.txt")))


@pytest.fixture(scope="module")
def synthesized() -> dict[str, SlurmRecord]:
    return {r.base_state: r for r in parse.parse_sacct(_text("sacct_synthesized.txt"))}


def _ticket(cancel_requested: bool = False) -> Ticket:
    spec = parse_spec({"command": ["true"], "backend": "slurm"})
    return Ticket("run", "att", 1, spec, Path("/nonexistent"), backend_job_id="1", cancel_requested=cancel_requested)


def _result(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "exit_code": 0,
        "signal": None,
        "started_at": 1.0,
        "ended_at": 2.0,
        "timed_out": False,
        "terminated_by": None,
        "setup_error": None,
    }
    base.update(fields)
    return base


def _refine(record: SlurmRecord, result: dict[str, Any] | None, cancel_requested: bool = False) -> Outcome:
    ticket = _ticket(cancel_requested)
    return parse.refine_outcome(
        outcome_from_result(result, ticket), record, result=result, cancel_requested=cancel_requested
    )


# -- squeue -----------------------------------------------------------------------------------


def test_squeue_states_and_reasons(squeue_mid: dict[str, SlurmRecord]) -> None:
    pending = parse.observe(squeue_mid[PENDING])
    assert pending.kind == ObservationKind.PENDING and pending.reason == "Resources"
    held = parse.observe(squeue_mid[HELD])
    assert held.kind == ObservationKind.PENDING and held.reason == "JobHeldUser"
    running = parse.observe(squeue_mid[TIMEOUT])  # the sleeping job, still running then
    assert running.kind == ObservationKind.RUNNING
    for name in (OK, EXIT3, KILL9, OOM, CANCELLED):
        assert parse.observe(squeue_mid[name]).kind == ObservationKind.FINISHED, name
    assert squeue_mid[OOM].reason == "OutOfMemory"
    assert squeue_mid[PENDING].start is None  # N/A


def test_squeue_lines_of_other_jobs_and_garbage_are_skipped() -> None:
    sep = parse.SEP
    text = (
        f"12{sep}RUNNING{sep}None{sep}N/A{sep}N/A{sep}0:01{sep}not ours\n"
        "garbage line\n"
        f"13{sep}PENDING{sep}Priority{sep}N/A{sep}N/A{sep}0:00{sep}hpcc-x{sep}with{sep}separators\n"
        f"x{sep}RUNNING{sep}None{sep}N/A{sep}N/A{sep}0:00{sep}hpcc-y\n"
    )
    records = parse.parse_squeue(text)
    assert set(records) == {"12", "13"}
    assert records["13"].name == f"hpcc-x{sep}with{sep}separators"  # the name is last: it cannot shift fields
    assert not parse.is_ours(records["12"].name) and parse.is_ours(records["13"].name)


def test_a_pending_job_not_yet_evaluated_has_no_reason() -> None:
    """Right after sbatch, squeue prints reason "None" until the scheduler has looked at the job:
    that is no reason, not "PENDING". A requeued or held state is a reason in itself."""
    sep = parse.SEP
    text = (
        f"20{sep}PENDING{sep}None{sep}N/A{sep}N/A{sep}0:00{sep}hpcc-a\n"
        f"21{sep}REQUEUE_HOLD{sep}None{sep}N/A{sep}N/A{sep}0:00{sep}hpcc-b\n"
    )
    records = parse.parse_squeue(text)
    fresh, requeued = parse.observe(records["20"]), parse.observe(records["21"])
    assert fresh.kind == ObservationKind.PENDING and fresh.reason is None
    assert requeued.kind == ObservationKind.PENDING and requeued.reason == "REQUEUE_HOLD"


def test_unknown_state_is_unknown_not_terminal() -> None:
    record = SlurmRecord(job_id="1", name="hpcc-a", state="SOMETHING_NEW", source="squeue")
    assert parse.observe(record).kind == ObservationKind.UNKNOWN
    weird_reason = SlurmRecord(job_id="1", name="hpcc-a", state="PENDING", source="squeue", reason="OutOfMemoryX")
    assert parse.observe(weird_reason).kind == ObservationKind.PENDING


# -- sacct ------------------------------------------------------------------------------------


def test_sacct_exit_codes(sacct_done: dict[str, SlurmRecord]) -> None:
    assert (sacct_done[OK].state, sacct_done[OK].exit_code) == ("COMPLETED", "0:0")
    assert (sacct_done[EXIT3].state, sacct_done[EXIT3].exit_code) == ("FAILED", "3:0")
    assert (sacct_done[KILL9].state, sacct_done[KILL9].exit_code) == ("FAILED", "0:9")
    assert (sacct_done[OOM].state, sacct_done[OOM].exit_code) == ("OUT_OF_MEMORY", "0:125")
    assert sacct_done[TIMEOUT].base_state == "TIMEOUT"
    assert sacct_done[CANCELLED].state == "CANCELLED by 0"
    assert sacct_done[CANCELLED].cancelled_by == "0"
    assert all(r.submit for r in sacct_done.values())


def test_sacct_probe_with_accounting_on_and_off() -> None:
    assert not parse.accounting_disabled(_text("sacct_probe_on.txt"), "")
    assert parse.accounting_disabled("", "Slurm accounting storage is disabled\n")


def test_scontrol_exit_codes() -> None:
    records = _by_name(parse.parse_scontrol(_text("scontrol_mid.txt")))
    assert (records[EXIT3].state, records[EXIT3].exit_code) == ("FAILED", "3:0")
    assert (records[KILL9].state, records[KILL9].exit_code, records[KILL9].reason) == (
        "FAILED",
        "0:9",
        "JobLaunchFailure",
    )
    assert (records[OOM].state, records[OOM].exit_code) == ("OUT_OF_MEMORY", "0:125")
    assert records[PENDING].reason == "Resources"


def test_exit_code_parsing() -> None:
    assert parse.parse_exit_code("3:0") == (3, 0)
    assert parse.parse_exit_code("0:125") == (0, 125)
    assert parse.parse_exit_code(None) is None
    assert parse.parse_exit_code("x") is None
    assert parse.split_state("CANCELLED by 1000") == ("CANCELLED", "1000")
    assert parse.split_state("OUT_OF_ME+") == ("OUT_OF_ME", None)


# -- the mapping ------------------------------------------------------------------------------


def test_completed(sacct_done: dict[str, SlurmRecord]) -> None:
    outcome = _refine(sacct_done[OK], _result())
    assert outcome.succeeded and outcome.backend_record["state"] == "COMPLETED"


def test_failed_exit_3(sacct_done: dict[str, SlurmRecord]) -> None:
    outcome = _refine(sacct_done[EXIT3], _result(exit_code=3))
    assert (outcome.failure_kind, outcome.exit_code) == (FailureKind.EXIT_CODE, 3)


def test_slurm_wins_when_the_result_file_disagrees(sacct_done: dict[str, SlurmRecord]) -> None:
    forged = _refine(sacct_done[EXIT3], _result(exit_code=0))
    assert (forged.failure_kind, forged.exit_code) == (FailureKind.EXIT_CODE, 3)
    assert "Slurm" in (forged.message or "")
    no_file = _refine(sacct_done[EXIT3], None)
    assert (no_file.failure_kind, no_file.exit_code) == (FailureKind.EXIT_CODE, 3)
    forged_ok = _refine(sacct_done[OK], _result(exit_code=5))
    assert forged_ok.succeeded


def test_failed_0_9_is_a_signal(sacct_done: dict[str, SlurmRecord]) -> None:
    outcome = _refine(sacct_done[KILL9], None)
    assert (outcome.failure_kind, outcome.signal, outcome.exit_code) == (FailureKind.SIGNAL, 9, None)


def test_wrapper_reported_signal_agrees_with_128_plus_n() -> None:
    record = SlurmRecord(job_id="1", name="hpcc-a", state="FAILED", source="sacct", exit_code="137:0")
    outcome = _refine(record, _result(exit_code=None, signal=9))
    assert (outcome.failure_kind, outcome.signal) == (FailureKind.SIGNAL, 9)


def test_setup_failure_is_kept() -> None:
    record = SlurmRecord(job_id="1", name="hpcc-a", state="FAILED", source="sacct", exit_code="1:0")
    outcome = _refine(record, _result(exit_code=None, setup_error="bwrap: cannot create namespace"))
    assert outcome.failure_kind == FailureKind.SETUP


def test_timeout(sacct_done: dict[str, SlurmRecord]) -> None:
    outcome = _refine(sacct_done[TIMEOUT], _result(exit_code=None, signal=15, terminated_by="SIGTERM"))
    assert outcome.failure_kind == FailureKind.TIMEOUT


def test_oom(sacct_done: dict[str, SlurmRecord]) -> None:
    outcome = _refine(sacct_done[OOM], _result(exit_code=137))
    assert outcome.failure_kind == FailureKind.OOM and "out of memory" in (outcome.message or "")


def test_cancelled_by_us_and_by_someone_else(sacct_done: dict[str, SlurmRecord]) -> None:
    ours = _refine(sacct_done[CANCELLED], None, cancel_requested=True)
    assert ours.cancelled and ours.failure_kind is None
    theirs = _refine(sacct_done[CANCELLED], None)
    assert not theirs.cancelled and theirs.failure_kind == FailureKind.SIGNAL
    assert "uid 0" in (theirs.message or "")
    named = parse.refine_outcome(
        outcome_from_result(None, _ticket()), sacct_done[CANCELLED], result=None, cancel_requested=False, who="root"
    )
    assert "by root" in (named.message or "")


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        ("NODE_FAIL", FailureKind.NODE_FAIL),
        ("PREEMPTED", FailureKind.PREEMPTED),
        ("BOOT_FAIL", FailureKind.BOOT_FAILURE),
        ("DEADLINE", FailureKind.TIMEOUT),
    ],
)
def test_infrastructure_states(synthesized: dict[str, SlurmRecord], state: str, kind: FailureKind) -> None:
    record = synthesized[state]
    assert parse.observe(record).kind == ObservationKind.FINISHED
    assert _refine(record, None).failure_kind == kind
    assert _refine(record, _result()).failure_kind == kind  # even if the file says success


def test_backend_record_is_kept(sacct_done: dict[str, SlurmRecord]) -> None:
    outcome = _refine(sacct_done[OOM], None)
    assert outcome.backend_record["exit_code"] == "0:125"
    assert outcome.backend_record["source"] == "sacct"


# -- job arrays: each task is its own record, keyed as squeue/sacct/scancel name it (123_4) ---------

ARRAY_NAME = "hpcc-arr-" + "0123456789abcdef" * 2


def test_array_tasks_in_squeue_and_sacct() -> None:
    sep = parse.SEP
    squeue = "\n".join(
        [
            sep.join(["123_0", "COMPLETED", "None", "t", "t", "0:01", ARRAY_NAME]),
            sep.join(["123_1", "PENDING", "JobHeldUser", "N/A", "N/A", "0:00", ARRAY_NAME]),
            sep.join(["123_[2-5%2]", "PENDING", "JobArrayTaskLimit", "N/A", "N/A", "0:00", ARRAY_NAME]),
        ]
    )
    records = parse.parse_squeue(squeue)
    assert set(records) == {"123_0", "123_1"}  # squeue -r splits pending tasks; the folded form is skipped
    assert records["123_1"].reason == "JobHeldUser"
    sacct = sep.join(["123_4", "FAILED", "3:0", "s", "e", "00:00:01", "x", ARRAY_NAME])
    sacct += "\n" + sep.join(["123_[5-9]", "PENDING", "0:0", "Unknown", "Unknown", "00:00:00", "x", ARRAY_NAME])
    (task,) = parse.parse_sacct(sacct)
    assert task.job_id == "123_4" and task.exit_code == "3:0" and task.name == ARRAY_NAME


def test_array_tasks_in_scontrol() -> None:
    lines = [
        f"JobId=125 ArrayJobId=123 ArrayTaskId=2 JobName={ARRAY_NAME} JobState=COMPLETED Reason=None ExitCode=7:0",
        f"JobId=123 ArrayJobId=123 ArrayTaskId=3-5%2 JobName={ARRAY_NAME} JobState=PENDING Reason=None ExitCode=0:0",
        "JobId=130 JobName=hpcc-plain JobState=FAILED Reason=None ExitCode=1:0",
    ]
    records = parse.parse_scontrol("\n".join(lines), ours_only=True)
    assert set(records) == {"123_2", "130"}
    assert records["123_2"].exit_code == "7:0" and records["123_2"].name == ARRAY_NAME


def test_scontrol_terminal_only_skips_jobs_that_have_not_ended() -> None:
    lines = [
        "JobId=1 JobName=hpcc-a JobState=RUNNING Reason=None ExitCode=0:0",
        "JobId=2 JobName=hpcc-b JobState=PENDING Reason=Priority ExitCode=0:0",
        "JobId=3 JobName=hpcc-c JobState=COMPLETING Reason=None ExitCode=0:0",
        "JobId=4 JobName=hpcc-d JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0",
        "JobId=5 JobName=hpcc-e JobState=OUT_OF_MEMORY Reason=OutOfMemory ExitCode=0:125",
        "JobId=6 JobName=other JobState=COMPLETED Reason=None ExitCode=0:0",
    ]
    text = "\n".join(lines) + "\n"
    assert set(parse.parse_scontrol(text, ours_only=True)) == {"1", "2", "3", "4", "5"}
    ended = parse.parse_scontrol(text, ours_only=True, terminal_only=True)
    assert set(ended) == {"4", "5"} and ended["4"].exit_code == "3:0"
