"""The ledger on SQLite and on the real Postgres: runs, attempts, events, artifacts, schedulers."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import Session, col, select

from hpc_compute.api import Client
from hpc_compute.config import load_settings
from hpc_compute.errors import (
    FencedOut,
    IdempotencyConflict,
    IllegalTransition,
    LedgerUnavailable,
    RunNotFound,
    SchedulerLocked,
    SpecError,
)
from hpc_compute.harvest import HarvestedFile, HarvestReport, Refusal
from hpc_compute.ledger import db
from hpc_compute.ledger.models import Attempt, Event, Run, Scheduler
from hpc_compute.ledger.states import AttemptState, RunState
from hpc_compute.ledger.store import AttemptResult, ClaimedAttempt, Ledger, Observed, transition, utcnow
from hpc_compute.spec import FailureKind, JobSpec, parse_spec

SCHED = "sched-test-1"


def job(**fields: Any) -> JobSpec:
    return parse_spec({"command": ["true"], **fields})


def result(
    exit_code: int | None = 0,
    kind: FailureKind | None = None,
    *,
    signal: int | None = None,
    cancelled: bool = False,
    message: str | None = None,
) -> AttemptResult:
    now = datetime.now(UTC)
    return AttemptResult(
        exit_code=exit_code,
        signal=signal,
        failure_kind=kind,
        message=message,
        cancelled=cancelled,
        started_at=now - timedelta(seconds=1),
        ended_at=now,
        outcome={"exit_code": exit_code},
    )


def harvest(*paths: str) -> HarvestReport:
    return HarvestReport(files=[HarvestedFile(path=p, size=len(p), sha256="ab" * 32) for p in paths])


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    handle = Ledger(ledger_url)
    handle.upgrade()
    yield handle
    handle.close()


def claim(ledger: Ledger, limit: int = 10, scheduler: str = SCHED) -> list[ClaimedAttempt]:
    return ledger.claim_queued(scheduler, backends=["local"], limit=limit, work_root="/w/runs", lease_s=60)


def claim_one(ledger: Ledger) -> ClaimedAttempt:
    claimed = claim(ledger, limit=1)
    assert len(claimed) == 1
    return claimed[0]


def running(ledger: Ledger, spec: JobSpec | None = None) -> tuple[str, ClaimedAttempt]:
    """A run with an attempt that is submitted and running."""
    run = ledger.create_run(spec or job(), "alice")
    item = claim_one(ledger)
    assert item.run_id == run.id
    ledger.mark_submitted(item.attempt_id, item.fence, "job-1")
    ledger.record_observations([Observed(item.attempt_id, item.fence, AttemptState.RUNNING, None)])
    return run.id, item


def make_due(ledger: Ledger, run_id: str) -> None:
    """Move a retry's not_before into the past (instead of sleeping through the backoff)."""
    with Session(ledger.engine) as session:
        session.execute(
            update(Run).where(col(Run.id) == run_id).values(not_before=datetime.now(UTC) - timedelta(seconds=1))
        )
        session.commit()


def snapshot(ledger: Ledger, run_id: str) -> tuple[Any, ...]:
    run = ledger.get_run(run_id)
    return (
        run.model_dump(exclude={"spec"}),
        [a.model_dump() for a in ledger.attempts(run_id)],
        [e.model_dump() for e in ledger.events(run_id)],
        ledger.artifacts(run_id),
    )


# -- accepting and reading -------------------------------------------------------------------------


def test_create_get_list(ledger: Ledger) -> None:
    a1 = ledger.create_run(job(labels={"project": "p1", "tier": "gold"}, name="first"), "alice")
    a2 = ledger.create_run(job(labels={"project": "p2"}), "alice")
    b1 = ledger.create_run(job(labels={"project": "p1"}), "bob")

    got = ledger.get_run(a1.id)
    assert got.id == a1.id and got.owner == "alice" and got.name == "first"
    assert got.state == RunState.QUEUED and got.attempts == 0 and got.max_attempts == 3
    assert got.labels == {"project": "p1", "tier": "gold"}
    assert got.created_at.tzinfo is not None
    assert got.spec == job(labels={"project": "p1", "tier": "gold"}, name="first")
    assert ledger.get_run(a1.id[:8]).id == a1.id  # a unique prefix, as users copy from `list`

    assert {r.id for r in ledger.list_runs()} == {a1.id, a2.id, b1.id}
    assert {r.id for r in ledger.list_runs(owner="alice")} == {a1.id, a2.id}
    assert [r.id for r in ledger.list_runs(owner="bob")] == [b1.id]
    assert {r.id for r in ledger.list_runs(labels={"project": "p1"})} == {a1.id, b1.id}
    assert [r.id for r in ledger.list_runs(labels={"project": "p1", "tier": "gold"})] == [a1.id]
    assert [r.id for r in ledger.list_runs(owner="bob", labels={"project": "p2"})] == []
    assert len(ledger.list_runs(limit=2)) == 2
    assert ledger.list_runs()[0].id == b1.id  # newest first

    ledger.request_cancel(a2.id)
    assert [r.id for r in ledger.list_runs(states=[RunState.CANCELLED])] == [a2.id]
    assert {r.id for r in ledger.list_runs(states=[RunState.QUEUED])} == {a1.id, b1.id}
    assert {r.id for r in ledger.list_runs(states=[RunState.QUEUED, RunState.CANCELLED], owner="alice")} == {
        a1.id,
        a2.id,
    }
    assert ledger.count_runs() == {"queued": 2, "cancelled": 1}


def test_owner_scoping_in_the_store(ledger: Ledger) -> None:
    run = ledger.create_run(job(), "alice")
    for call in (ledger.get_run, ledger.events, ledger.attempts, ledger.artifacts, ledger.request_cancel):
        with pytest.raises(RunNotFound):
            call(run.id, "bob")
        with pytest.raises(RunNotFound):
            call(run.id[:8], "bob")
    assert ledger.get_run(run.id).state == RunState.QUEUED
    with pytest.raises(RunNotFound):
        ledger.get_run("00000000-0000-0000-0000-000000000000")


def test_idempotency_same_and_different_spec(ledger: Ledger) -> None:
    first = ledger.create_run(job(env={"A": "1", "B": "2"}), "alice", "key-1")
    again = ledger.create_run(job(env={"B": "2", "A": "1"}), "alice", "key-1")
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict):
        ledger.create_run(job(command=["false"]), "alice", "key-1")
    other_owner = ledger.create_run(job(env={"A": "1", "B": "2"}), "bob", "key-1")
    assert other_owner.id != first.id  # keys are per owner
    assert ledger.create_run(job(), "alice", "key-2").id != first.id
    assert ledger.create_run(job(), "alice").id != ledger.create_run(job(), "alice").id  # no key: new runs
    assert sum(ledger.count_runs().values()) == 5


def test_concurrent_same_idempotency_key_gives_one_run(ledger: Ledger) -> None:
    barrier = threading.Barrier(8)

    def submit(_: int) -> str:
        barrier.wait()
        return ledger.create_run(job(name="same"), "alice", "the-key").id

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(submit, range(8)))
    assert len(set(ids)) == 1
    assert sum(ledger.count_runs().values()) == 1


def test_submit_many_500_in_one_transaction(ledger: Ledger) -> None:
    specs = [job(name=f"n{i}", labels={"batch": "b1"}) for i in range(500)]
    t0 = time.monotonic()
    runs = ledger.create_runs(specs, "alice")
    elapsed = time.monotonic() - t0
    assert len({r.id for r in runs}) == 500
    assert ledger.count_runs() == {"queued": 500}
    assert len(ledger.list_runs(labels={"batch": "b1"}, limit=1000)) == 500
    assert [e.to_state for e in ledger.events(runs[0].id)] == ["queued"]
    # a single created_at stamp: one transaction, not 500
    assert len({r.created_at for r in runs}) == 1
    assert elapsed < 20


def test_submit_many_all_or_nothing_at_client_level(ledger_url: str, hpcc_home: Path, tmp_path: Path) -> None:
    settings = load_settings({"ledger_url": ledger_url}, system_file=tmp_path / "none.toml")
    db.upgrade(ledger_url)
    with Client(settings=settings, owner="alice") as client:
        specs: list[Any] = [{"command": ["true"], "name": f"n{i}"} for i in range(10)]
        specs[7] = {"command": ["true"], "resources": {"memory": "-1G"}}
        with pytest.raises(SpecError) as info:
            client.submit_many(specs)
        assert info.value.field == "specs[7].resources.memory"
        assert client.list() == []
        specs[7] = {"command": ["true"], "inputs": [{"source": str(tmp_path / "missing"), "name": "x"}]}
        with pytest.raises(SpecError) as info:
            client.submit_many(specs)
        assert info.value.field == "specs[7].inputs[0].source"
        assert client.list() == []
        specs[7] = {"command": ["true"]}
        assert len(client.submit_many(specs)) == 10
        assert len(client.list()) == 10


# -- claiming and submitting -----------------------------------------------------------------------


def test_claim_writes_the_attempt_ahead(ledger: Ledger, ledger_url: str) -> None:
    run = ledger.create_run(job(), "alice")
    claimed = claim(ledger)
    assert len(claimed) == 1
    item = claimed[0]
    assert item.run_id == run.id and item.number == 1 and item.fence == 1
    assert item.state == AttemptState.SUBMITTING and item.backend_job_id is None
    assert item.attempt_dir == f"/w/runs/{run.id}/{item.attempt_id}"
    assert item.spec == job()

    # committed: a different connection (another process, after a crash) sees it
    other = Ledger(ledger_url)
    try:
        attempts = other.attempts(run.id)
        assert [(a.id, a.state, a.number, a.fence) for a in attempts] == [(item.attempt_id, "submitting", 1, 1)]
        seen = other.get_run(run.id)
        assert seen.state == RunState.SUBMITTING and seen.attempts == 1
        assert [e.to_state for e in other.events(run.id)] == ["queued", "submitting"]
        assert other.events(run.id)[-1].attempt_id == item.attempt_id
    finally:
        other.close()
    assert claim(ledger) == []  # a second claim does not return the same run


def test_claim_respects_limit_order_backend_and_cancel(ledger: Ledger) -> None:
    ids = [ledger.create_run(job(name=f"n{i}"), "alice").id for i in range(5)]
    slurm = ledger.create_run(job(backend="slurm"), "alice")
    assert claim(ledger, limit=0) == []
    first = claim(ledger, limit=2)
    assert [c.run_id for c in first] == ids[:2]  # oldest first
    ledger.request_cancel(ids[2])
    rest = claim(ledger, limit=10)
    assert [c.run_id for c in rest] == ids[3:]
    assert ledger.get_run(slurm.id).state == RunState.QUEUED  # not a backend we serve


def test_concurrent_claims_never_share_a_run(ledger: Ledger) -> None:
    ledger.create_runs([job(name=f"n{i}") for i in range(40)], "alice")
    barrier = threading.Barrier(4)

    def worker(n: int) -> list[str]:
        barrier.wait()
        got: list[str] = []
        while True:
            batch = claim(ledger, limit=3, scheduler=f"s{n}")
            if not batch:
                return got
            got.extend(c.run_id for c in batch)

    with ThreadPoolExecutor(4) as pool:
        claimed = [rid for part in pool.map(worker, range(4)) for rid in part]
    assert len(claimed) == 40
    assert len(set(claimed)) == 40
    assert ledger.count_runs() == {"submitting": 40}


def test_mark_submitted(ledger: Ledger) -> None:
    run = ledger.create_run(job(), "alice")
    item = claim_one(ledger)
    ledger.mark_submitted(item.attempt_id, item.fence, "12345")
    got = ledger.get_run(run.id)
    assert got.state == RunState.PENDING and got.backend_job_id == "12345"
    attempt = ledger.attempts(run.id)[0]
    assert attempt.state == "pending" and attempt.backend_job_id == "12345" and attempt.submitted_at is not None
    last = ledger.events(run.id)[-1]
    assert (last.from_state, last.to_state, last.data) == ("submitting", "pending", {"backend_job_id": "12345"})
    ledger.mark_submitted(item.attempt_id, item.fence, "12345")  # repeated: no second event
    assert len(ledger.events(run.id)) == 3


def test_record_observations(ledger: Ledger) -> None:
    run = ledger.create_run(job(), "alice")
    item = claim_one(ledger)
    ledger.mark_submitted(item.attempt_id, item.fence, "77")
    pending = Observed(item.attempt_id, item.fence, AttemptState.PENDING, "Resources")
    assert ledger.record_observations([pending]) == []
    got = ledger.get_run(run.id)
    assert got.state == RunState.PENDING and got.pending_reason == "Resources" and got.started_at is None

    stale = Observed(item.attempt_id, item.fence + 5, AttemptState.RUNNING, None)
    assert ledger.record_observations([stale]) == [item.attempt_id]
    assert ledger.get_run(run.id).state == RunState.PENDING

    assert ledger.record_observations([Observed(item.attempt_id, item.fence, AttemptState.RUNNING, None)]) == []
    got = ledger.get_run(run.id)
    assert got.state == RunState.RUNNING
    assert got.started_at is not None and got.pending_reason is None
    assert ledger.attempts(run.id)[0].state == "running"
    assert [e.to_state for e in ledger.events(run.id)] == ["queued", "submitting", "pending", "running"]
    assert ledger.record_observations([]) == []


# -- finishing -------------------------------------------------------------------------------------


def test_finish_success_records_artifacts(ledger: Ledger) -> None:
    run_id, item = running(ledger)
    state = ledger.finish_attempt(item.attempt_id, item.fence, result(0), harvest("a.txt", "sub/b.bin"))
    assert state == RunState.SUCCEEDED
    run = ledger.get_run(run_id)
    assert run.state == RunState.SUCCEEDED and run.exit_code == 0 and run.failure_kind is None
    assert run.finished_at is not None and run.started_at is not None
    assert [(a.path, a.size, a.sha256) for a in ledger.artifacts(run_id)] == [
        ("a.txt", 5, "ab" * 32),
        ("sub/b.bin", 9, "ab" * 32),
    ]
    assert ledger.attempts(run_id)[0].state == "finished"
    # finishing twice is harmless
    events = len(ledger.events(run_id))
    assert ledger.finish_attempt(item.attempt_id, item.fence, result(0), harvest("a.txt")) == RunState.SUCCEEDED
    assert len(ledger.events(run_id)) == events and len(ledger.artifacts(run_id)) == 2


@pytest.mark.parametrize(
    ("kind", "exit_code", "signal"),
    [
        (FailureKind.EXIT_CODE, 7, None),
        (FailureKind.SIGNAL, None, 9),
        (FailureKind.TIMEOUT, None, None),
        (FailureKind.OOM, 137, None),
    ],
)
def test_job_failure_is_not_retried(
    ledger: Ledger, kind: FailureKind, exit_code: int | None, signal: int | None
) -> None:
    run_id, item = running(ledger)
    outcome = result(exit_code, kind, signal=signal, message="m")
    state = ledger.finish_attempt(item.attempt_id, item.fence, outcome, None)
    assert state == RunState.FAILED
    run = ledger.get_run(run_id)
    assert (run.state, run.failure_kind, run.exit_code, run.signal) == (RunState.FAILED, kind, exit_code, signal)
    assert run.failure_message == "m" and run.attempts == 1
    assert claim(ledger) == []


@pytest.mark.parametrize("kinds", [(FailureKind.NODE_FAIL, FailureKind.LOST, FailureKind.PREEMPTED)])
def test_infrastructure_failure_retried_with_backoff(ledger: Ledger, kinds: tuple[FailureKind, ...]) -> None:
    run_id, item = running(ledger, job(retry={"max_attempts": 3, "backoff": "10s"}))
    expected_delays = [10, 20]
    for number, kind in enumerate(kinds, start=1):
        before = datetime.now(UTC)
        state = ledger.finish_attempt(item.attempt_id, item.fence, result(None, kind), None)
        run = ledger.get_run(run_id)
        if number < 3:
            assert state == RunState.QUEUED
            assert run.state == RunState.QUEUED and run.attempts == number and run.finished_at is None
            with Session(ledger.engine) as session:
                not_before = session.get(Run, run_id).not_before  # type: ignore[union-attr]
            assert not_before is not None
            delay = (not_before - before).total_seconds()
            assert expected_delays[number - 1] - 1 <= delay <= expected_delays[number - 1] + 5
            assert claim(ledger) == []  # not before the backoff has passed
            make_due(ledger, run_id)
            item = claim_one(ledger)
            assert item.number == number + 1
        else:
            assert state == RunState.FAILED
            assert run.state == RunState.FAILED and run.failure_kind == kind and run.attempts == 3
    assert [a.number for a in ledger.attempts(run_id)] == [1, 2, 3]
    assert [a.failure_kind for a in ledger.attempts(run_id)] == list(kinds)
    retries = [e for e in ledger.events(run_id) if e.to_state == "queued" and e.from_state is not None]
    assert len(retries) == 2 and "retry in 10s" in (retries[0].message or "")


def test_retry_event_says_why_and_when(ledger: Ledger) -> None:
    run_id, item = running(ledger, job(retry={"max_attempts": 2, "backoff": "30s"}))
    ledger.finish_attempt(item.attempt_id, item.fence, result(None, FailureKind.NODE_FAIL, signal=9), None)
    (retry,) = [e for e in ledger.events(run_id) if e.to_state == "queued" and e.from_state is not None]
    assert retry.data is not None
    assert retry.data["failure_kind"] == "node_fail" and retry.data["signal"] == 9
    assert retry.data["attempt"] == 1 and retry.data["next_attempt"] == 2 and retry.data["max_attempts"] == 2
    assert retry.data["retry_in_s"] == 30
    not_before = datetime.fromisoformat(retry.data["not_before"])
    assert 25 <= (not_before - retry.at).total_seconds() <= 35
    with Session(ledger.engine) as session:
        stored = session.get(Run, run_id)
        assert stored is not None and stored.not_before == not_before
    # the notification of the retry carries the same facts
    (note,) = [r for r in ledger.outbox(run_id) if r.event_id == retry.id]
    assert note.payload["state"] == "queued" and note.payload["previous_state"] == "running"
    assert note.payload["failure_kind"] == "node_fail" and note.payload["not_before"] == retry.data["not_before"]


def test_max_attempts_one_means_no_retry(ledger: Ledger) -> None:
    _, item = running(ledger, job(retry={"max_attempts": 1}))
    assert ledger.finish_attempt(item.attempt_id, item.fence, result(None, FailureKind.NODE_FAIL), None) == (
        RunState.FAILED
    )


def test_also_retry_is_opt_in(ledger: Ledger) -> None:
    plain_id, plain = running(ledger)
    assert ledger.finish_attempt(plain.attempt_id, plain.fence, result(None, FailureKind.TIMEOUT), None) == (
        RunState.FAILED
    )
    opted_id, opted = running(ledger, job(retry={"also_retry": ["timeout"]}))
    assert ledger.finish_attempt(opted.attempt_id, opted.fence, result(None, FailureKind.TIMEOUT), None) == (
        RunState.QUEUED
    )
    assert ledger.get_run(opted_id).state == RunState.QUEUED
    assert ledger.get_run(plain_id).state == RunState.FAILED


def test_finish_cancelled(ledger: Ledger) -> None:
    run_id, item = running(ledger)
    ledger.request_cancel(run_id)
    outcome = result(None, FailureKind.SIGNAL, signal=15, cancelled=True)
    state = ledger.finish_attempt(item.attempt_id, item.fence, outcome, None)
    assert state == RunState.CANCELLED
    run = ledger.get_run(run_id)
    assert run.state == RunState.CANCELLED and run.failure_kind is None and run.finished_at is not None


def test_infra_failure_of_a_cancel_requested_run_is_not_retried(ledger: Ledger) -> None:
    run_id, item = running(ledger)
    ledger.request_cancel(run_id)
    assert ledger.finish_attempt(item.attempt_id, item.fence, result(None, FailureKind.NODE_FAIL), None) != (
        RunState.QUEUED
    )


def test_fail_submission(ledger: Ledger) -> None:
    run = ledger.create_run(job(), "alice")
    item = claim_one(ledger)
    assert ledger.fail_submission(item.attempt_id, item.fence, "bad partition", retryable=False) == RunState.FAILED
    got = ledger.get_run(run.id)
    assert got.failure_kind == FailureKind.SUBMIT_ERROR and got.failure_message == "bad partition"
    run2 = ledger.create_run(job(), "alice")
    item2 = claim_one(ledger)
    assert ledger.fail_submission(item2.attempt_id, item2.fence, "busy", retryable=True) == RunState.QUEUED
    assert ledger.get_run(run2.id).state == RunState.QUEUED


# -- fencing and reconciliation --------------------------------------------------------------------


def test_stale_fence_raises_and_changes_nothing(ledger: Ledger) -> None:
    run = ledger.create_run(job(), "alice")
    old = claim_one(ledger)
    adopted = ledger.adopt_active("sched-2", ["local"], 60)
    assert [(a.attempt_id, a.fence) for a in adopted] == [(old.attempt_id, old.fence + 1)]
    before = snapshot(ledger, run.id)
    writes = [
        lambda: ledger.mark_submitted(old.attempt_id, old.fence, "zombie-1"),
        lambda: ledger.finish_attempt(old.attempt_id, old.fence, result(0), harvest("x")),
        lambda: ledger.mark_not_submitted(old.attempt_id, old.fence, "gone"),
        lambda: ledger.fail_submission(old.attempt_id, old.fence, "no", retryable=False),
        lambda: ledger.mark_submitted("no-such-attempt", 1, "x"),
    ]
    for write in writes:
        with pytest.raises(FencedOut):
            write()
    after = snapshot(ledger, run.id)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert after[2] == before[2]
    # the new owner still writes
    ledger.mark_submitted(old.attempt_id, old.fence + 1, "real-1")
    assert ledger.get_run(run.id).backend_job_id == "real-1"


def test_mark_not_submitted_requeues_without_counting(ledger: Ledger) -> None:
    run = ledger.create_run(job(retry={"max_attempts": 1}), "alice")
    first = claim_one(ledger)
    assert ledger.get_run(run.id).attempts == 1
    ledger.mark_not_submitted(first.attempt_id, first.fence, "reconciled: absent")
    got = ledger.get_run(run.id)
    assert got.state == RunState.QUEUED and got.attempts == 0
    attempt = ledger.attempts(run.id)[0]
    assert attempt.state == "not_submitted" and attempt.message == "reconciled: absent"
    second = claim_one(ledger)  # claimable at once, and max_attempts=1 still allows it
    assert second.number == 2 and ledger.get_run(run.id).attempts == 1
    ledger.mark_submitted(second.attempt_id, second.fence, "j2")
    assert ledger.finish_attempt(second.attempt_id, second.fence, result(0), None) == RunState.SUCCEEDED


def test_mark_not_submitted_of_a_cancelled_run(ledger: Ledger) -> None:
    run = ledger.create_run(job(), "alice")
    item = claim_one(ledger)
    ledger.request_cancel(run.id)
    ledger.mark_not_submitted(item.attempt_id, item.fence, "absent")
    assert ledger.get_run(run.id).state == RunState.CANCELLED


def test_defer_attempt_requeues_later_without_burning_a_retry(ledger: Ledger) -> None:
    run = ledger.create_run(job(retry={"max_attempts": 1}), "alice")
    first = claim_one(ledger)
    ledger.defer_attempt(first.attempt_id, first.fence, "quota reached", base_s=30)
    got = ledger.get_run(run.id)
    assert got.state == RunState.QUEUED and got.attempts == 0
    assert claim(ledger) == [], "a deferred run waits for its not_before"
    event = [e for e in ledger.events(run.id) if e.kind == "state"][-1]
    assert event.data is not None and event.data["deferred_s"] == 30
    with ledger._session(write=True) as session:  # let the deferral expire
        row = session.get(Run, run.id)
        assert row is not None
        row.not_before = utcnow()
    second = claim_one(ledger)
    ledger.defer_attempt(second.attempt_id, second.fence, "quota reached", base_s=30)
    event = [e for e in ledger.events(run.id) if e.kind == "state"][-1]
    assert event.data is not None and event.data["deferred_s"] == 60, "the delay doubles"
    assert ledger.get_run(run.id).attempts == 0


def test_defer_attempt_of_a_cancelled_run(ledger: Ledger) -> None:
    run = ledger.create_run(job(), "alice")
    item = claim_one(ledger)
    ledger.request_cancel(run.id)
    ledger.defer_attempt(item.attempt_id, item.fence, "quota", base_s=1)
    assert ledger.get_run(run.id).state == RunState.CANCELLED


# -- cancellation ----------------------------------------------------------------------------------


def test_request_cancel_queued_is_immediate(ledger: Ledger) -> None:
    run = ledger.create_run(job(), "alice")
    got = ledger.request_cancel(run.id, "alice")
    assert got.state == RunState.CANCELLED and got.finished_at is not None
    last = ledger.events(run.id)[-1]
    assert (last.from_state, last.to_state) == ("queued", "cancelled")
    assert claim(ledger) == []
    assert ledger.request_cancel(run.id).state == RunState.CANCELLED  # again: no-op
    assert len(ledger.events(run.id)) == 2


def test_request_cancel_running_sets_flag(ledger: Ledger) -> None:
    run_id, item = running(ledger)
    got = ledger.request_cancel(run_id)
    assert got.state == RunState.RUNNING and got.cancel_requested
    assert ledger.events(run_id)[-1].kind == "cancel_requested"
    assert ledger.cancel_flags([run_id, "other"]) == {run_id}
    n = len(ledger.events(run_id))
    ledger.request_cancel(run_id)
    assert len(ledger.events(run_id)) == n  # one request is recorded once
    assert ledger.cancel_flags([]) == set()
    # the scheduler confirms: the attempt ends as cancelled
    assert ledger.finish_attempt(item.attempt_id, item.fence, result(None, cancelled=True), None) == (
        RunState.CANCELLED
    )


# -- events, artifacts, the transition function ----------------------------------------------------


def test_events_append_only_and_ordered(ledger: Ledger) -> None:
    run_id, item = running(ledger, job(retry={"max_attempts": 2}))
    early = ledger.events(run_id)
    ledger.record_event(run_id, "note", "a fact", {"k": 1})
    ledger.finish_attempt(item.attempt_id, item.fence, result(None, FailureKind.LOST), None)
    make_due(ledger, run_id)
    item2 = claim_one(ledger)
    ledger.mark_submitted(item2.attempt_id, item2.fence, "j2")
    ledger.finish_attempt(item2.attempt_id, item2.fence, result(3, FailureKind.EXIT_CODE), None)
    events = ledger.events(run_id)
    assert events[: len(early)] == early  # earlier history unchanged
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    ats = [e.at for e in events]
    assert ats == sorted(ats)
    assert [e.to_state for e in events if e.kind == "state"] == [
        "queued", "submitting", "pending", "running", "queued", "submitting", "pending", "failed",
    ]  # fmt: skip
    note = next(e for e in events if e.kind == "note")
    assert note.message == "a fact" and note.data == {"k": 1}
    # every state event chains: from_state is the previous to_state
    states = [e for e in events if e.kind == "state"]
    for prev, cur in itertools.pairwise(states):
        assert cur.from_state == prev.to_state


def test_artifacts_of_the_finishing_attempt_only(ledger: Ledger) -> None:
    run_id, first = running(ledger, job(retry={"max_attempts": 2}))
    report = harvest("old.txt")
    report.refused.append(Refusal(path="link", reason="symlink"))
    ledger.finish_attempt(first.attempt_id, first.fence, result(None, FailureKind.NODE_FAIL), report)
    assert [a.path for a in ledger.artifacts(run_id)] == ["old.txt"]
    refused = [e for e in ledger.events(run_id) if e.kind == "artifacts_refused"]
    assert len(refused) == 1 and refused[0].data == {"count": 1, "refused": [{"path": "link", "reason": "symlink"}]}
    make_due(ledger, run_id)
    second = claim_one(ledger)
    assert [a.path for a in ledger.artifacts(run_id)] == ["old.txt"]  # still the latest *finished* one
    ledger.mark_submitted(second.attempt_id, second.fence, "j2")
    ledger.finish_attempt(second.attempt_id, second.fence, result(0), harvest("new.txt"))
    arts = ledger.artifacts(run_id)
    assert [a.path for a in arts] == ["new.txt"] and arts[0].attempt_id == second.attempt_id


def test_transition_function_refuses_illegal(ledger: Ledger) -> None:
    run_id, item = running(ledger)
    ledger.finish_attempt(item.attempt_id, item.fence, result(0), None)
    n_events = len(ledger.events(run_id))
    with Session(ledger.engine) as session:
        row = session.get(Run, run_id)
        assert row is not None
        for target in (RunState.QUEUED, RunState.RUNNING, RunState.FAILED, RunState.SUCCEEDED):
            with pytest.raises(IllegalTransition):
                transition(session, row, target, at=datetime.now(UTC))
        session.rollback()
    queued = ledger.create_run(job(), "alice")
    with Session(ledger.engine) as session:
        row = session.get(Run, queued.id)
        assert row is not None
        with pytest.raises(IllegalTransition):
            transition(session, row, RunState.RUNNING, at=datetime.now(UTC))
    assert len(ledger.events(run_id)) == n_events
    assert ledger.get_run(queued.id).state == RunState.QUEUED


# -- schedulers ------------------------------------------------------------------------------------


def _insert_scheduler(ledger: Ledger, sid: str, host: str, heartbeat_age_s: float) -> None:
    now = datetime.now(UTC)
    beat = now - timedelta(seconds=heartbeat_age_s)
    with Session(ledger.engine) as session:
        session.add(Scheduler(id=sid, hostname=host, pid=4242, started_at=beat, heartbeat_at=beat))
        session.commit()


def _scheduler(ledger: Ledger, sid: str) -> Scheduler:
    with Session(ledger.engine) as session:
        row = session.exec(select(Scheduler).where(Scheduler.id == sid)).one()
        session.expunge(row)
        return row


def test_second_live_scheduler_from_another_host(ledger: Ledger) -> None:
    _insert_scheduler(ledger, "other-host-1", "elsewhere.example", heartbeat_age_s=1)
    if ledger.is_sqlite:
        with pytest.raises(SchedulerLocked, match=r"elsewhere\.example"):
            ledger.register_scheduler("me-1", 1, lease_s=60)
        with Session(ledger.engine) as session:
            assert session.get(Scheduler, "me-1") is None
        ledger.unregister_scheduler("other-host-1")
        ledger.register_scheduler("me-1", 1, lease_s=60)
    else:
        ledger.register_scheduler("me-1", 1, lease_s=60)  # Postgres serves many schedulers
        assert _scheduler(ledger, "other-host-1").stopped_at is None
    assert _scheduler(ledger, "me-1").hostname == socket.gethostname()


def test_stale_scheduler_does_not_block(ledger: Ledger) -> None:
    _insert_scheduler(ledger, "dead-1", "elsewhere.example", heartbeat_age_s=3600)
    _insert_scheduler(ledger, "same-host-1", socket.gethostname(), heartbeat_age_s=1)
    ledger.register_scheduler("me-1", 1, lease_s=60)
    if ledger.is_sqlite:
        assert _scheduler(ledger, "dead-1").stopped_at is not None
        assert _scheduler(ledger, "same-host-1").stopped_at is not None  # the flock decides on one host
    before = _scheduler(ledger, "me-1").heartbeat_at
    time.sleep(0.01)
    ledger.heartbeat("me-1", lease_s=60)
    assert _scheduler(ledger, "me-1").heartbeat_at > before
    ledger.unregister_scheduler("me-1")
    assert _scheduler(ledger, "me-1").stopped_at is not None


# -- availability ----------------------------------------------------------------------------------


def test_unmigrated_postgres_is_refused_and_sqlite_migrates_itself(ledger_url: str) -> None:
    handle = Ledger(ledger_url)
    try:
        if handle.is_sqlite:
            assert handle.create_run(job(), "alice").state == RunState.QUEUED
            assert "hpcc_run" in handle.table_names()
        else:
            with pytest.raises(LedgerUnavailable, match="db upgrade"):
                handle.create_run(job(), "alice")
    finally:
        handle.close()


def test_unreachable_ledger() -> None:
    handle = Ledger("postgresql://hpcc:hpcc@127.0.0.1:1/nothing")
    with pytest.raises(LedgerUnavailable) as info:
        handle.list_runs()
    assert "hpcc:hpcc@" not in str(info.value)  # no password in messages
    handle.close()


def test_first_use_from_many_threads(ledger_url: str) -> None:
    """A fresh ledger handle used by several threads at once (the embedded one migrates itself)."""
    if not db.is_sqlite(ledger_url):
        db.upgrade(ledger_url)
    handle = Ledger(ledger_url)
    barrier = threading.Barrier(6)

    def go(i: int) -> str:
        barrier.wait()
        return handle.create_run(job(name=f"n{i}"), "alice").id

    try:
        with ThreadPoolExecutor(6) as pool:
            ids = list(pool.map(go, range(6)))
        assert len(set(ids)) == 6
    finally:
        handle.close()


def test_attempt_and_event_rows_reference_the_run(ledger: Ledger) -> None:
    run_id, item = running(ledger)
    with Session(ledger.engine) as session:
        attempt = session.get(Attempt, item.attempt_id)
        assert attempt is not None and attempt.run_id == run_id and attempt.scheduler_id == SCHED
        assert attempt.lease_expires_at is not None
        assert session.exec(select(Event).where(Event.run_id == run_id)).all()


# -- batched writes and queries at scale (bench/scale.py) --------------------------------------------


class _Statements:
    """Counts the SQL statements a ledger's engine sends (to catch N+1 regressions)."""

    def __init__(self, ledger: Ledger) -> None:
        from sqlalchemy import event

        self.n = 0
        self.selects = 0
        self._engine = ledger.engine
        self._listen = event.listen
        self._remove = event.remove

    def _count(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.n += 1
        self.selects += statement.lstrip().upper().startswith("SELECT")

    def __enter__(self) -> _Statements:
        self._listen(self._engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._remove(self._engine, "before_cursor_execute", self._count)


def _outbox_by_event(ledger: Ledger, run_id: str) -> dict[int, dict[str, Any]]:
    return {row.event_id or 0: row.payload for row in ledger.outbox(run_id)}


def test_batched_writes_are_constant_statements_and_keep_every_notification(ledger: Ledger) -> None:
    """claim_queued, mark_submitted_many and record_observations write many runs with a number of
    statements that does not grow with them, and still one outbox row per state change."""
    runs = ledger.create_runs([job(name=f"b{i}") for i in range(40)], "alice")
    with _Statements(ledger) as claimed_sql:
        items = claim(ledger, limit=40)
    assert len(items) == 40 and sorted(i.number for i in items) == [1] * 40
    with _Statements(ledger) as submit_sql:
        stale = ledger.mark_submitted_many([(i.attempt_id, i.fence, f"j{n}") for n, i in enumerate(items)])
    assert stale == []
    observed = [Observed(i.attempt_id, i.fence, AttemptState.RUNNING, None) for i in items[:30]]
    observed += [Observed(i.attempt_id, i.fence, AttemptState.PENDING, "Priority") for i in items[30:]]
    observed.append(Observed(items[0].attempt_id, items[0].fence + 7, AttemptState.RUNNING, None))  # stale
    with _Statements(ledger) as observe_sql:
        assert ledger.record_observations(observed) == [items[0].attempt_id]
    # Postgres: a handful of statements whatever the number of runs (before: 4-6 per run); SQLite
    # inserts the events one by one (it cannot return ids of a multi-row INSERT in order), in-process
    for sql in (claimed_sql, submit_sql, observe_sql):
        assert sql.selects <= 4, sql.selects
        assert sql.n <= (12 if not ledger.is_sqlite else 40 + 12), sql.n
    for n, run in enumerate(runs):
        got = ledger.get_run(run.id)
        item = next(i for i in items if i.run_id == run.id)
        index = items.index(item)
        assert got.state == (RunState.RUNNING if index < 30 else RunState.PENDING)
        assert got.pending_reason == (None if index < 30 else "Priority")
        states = [e for e in ledger.events(run.id) if e.kind == "state"]
        expected = ["queued", "submitting", "pending"] + (["running"] if index < 30 else [])
        assert [e.to_state for e in states] == expected, n
        notes = _outbox_by_event(ledger, run.id)
        assert sorted(notes) == sorted(e.id for e in states)
        for e in states:
            assert notes[e.id]["state"] == e.to_state and notes[e.id]["previous_state"] == e.from_state
            assert notes[e.id]["event_id"] == e.id and notes[e.id]["attempt_id"] == e.attempt_id
        assert notes[states[2].id]["message"] == f"submitted as j{index}"


def test_claim_numbers_attempts_per_run_in_one_query(ledger: Ledger) -> None:
    run = ledger.create_run(job(retry={"max_attempts": 3}), "alice")
    other = ledger.create_run(job(name="other"), "alice")
    first = next(i for i in claim(ledger) if i.run_id == run.id)
    ledger.mark_not_submitted(first.attempt_id, first.fence, "absent")
    again = {i.run_id: i.number for i in claim(ledger)}
    assert again == {run.id: 2}
    assert [a.number for a in ledger.attempts(other.id)] == [1]


def test_adopt_active_in_chunks(ledger: Ledger) -> None:
    """More attempts than one chunk (500): every one adopted once, fence bumped, one event each."""
    n = 620
    ledger.create_runs([job(name=f"a{i}", resources={"cpus": 1 + i % 2}) for i in range(n)], "alice")
    items = claim(ledger, limit=n)
    assert len(items) == n
    ledger.mark_submitted_many([(i.attempt_id, i.fence, f"j{k}") for k, i in enumerate(items[:300])])
    with _Statements(ledger) as sql:
        adopted = ledger.adopt_active("sched-2", ["local"], 60)
    assert sql.n < 12, sql.n  # a few per chunk of 500 (before: about 3 per attempt)
    by_id = {a.attempt_id: a for a in adopted}
    assert len(by_id) == n
    for k, item in enumerate(items):
        got = by_id[item.attempt_id]
        assert got.fence == item.fence + 1 and got.run_id == item.run_id and got.number == 1
        assert got.spec == item.spec and got.attempt_dir == item.attempt_dir
        assert got.state == (AttemptState.PENDING if k < 300 else AttemptState.SUBMITTING)
        assert got.backend_job_id == (f"j{k}" if k < 300 else None)
    sample = items[5]
    events = [e for e in ledger.events(sample.run_id) if e.kind == "adopted"]
    assert len(events) == 1 and events[0].message == f"attempt 1 adopted by scheduler sched-2 from {SCHED}"
    with Session(ledger.engine) as session:
        owners = session.exec(select(Attempt.scheduler_id).where(col(Attempt.id).in_(list(by_id)[:400]))).all()
    assert set(owners) == {"sched-2"}
    assert ledger.adopt_active("sched-2", ["local"], 60) == []  # its own: nothing to take over
    with pytest.raises(FencedOut):
        ledger.mark_submitted(items[400].attempt_id, items[400].fence, "zombie")


def test_claimed_specs_share_equal_sections(ledger: Ledger) -> None:
    ledger.create_runs([job(name=f"s{i}", command=["run", str(i)]) for i in range(3)], "alice")
    items = claim(ledger)
    a, b = items[0].spec, items[1].spec
    assert a.resources is b.resources and a.retry is b.retry and a.placement is b.placement
    assert a.command != b.command
    for item in items:
        stored = JobSpec.model_validate_json(item.spec.canonical_json())
        assert item.spec == stored and item.spec.canonical_json() == stored.canonical_json()


def test_cancel_flags_many_runs(ledger: Ledger) -> None:
    """The scheduler asks about every active run: more ids than an IN list chunk, answered exactly."""
    n = 620
    ledger.create_runs([job(name=f"c{i}") for i in range(n)], "alice")
    items = claim(ledger, limit=n)
    ids = [i.run_id for i in items]
    for run_id in ids[10:13]:
        ledger.request_cancel(run_id)
    ended = items[12]
    ledger.finish_attempt(ended.attempt_id, ended.fence, result(None, cancelled=True), None)
    assert ledger.get_run(ended.run_id).state == RunState.CANCELLED
    assert ledger.cancel_flags(ids) == set(ids[10:12])  # the cancelled one has nothing left to cancel
    assert ledger.cancel_flags(ids[:11]) == {ids[10]}
    assert ledger.cancel_flags(["no-such-run"]) == set()


def test_list_runs_label_filter_is_exact_and_pages(ledger: Ledger) -> None:
    """The label filter narrows down in SQL (LIKE on the JSON text, case-insensitive on SQLite,
    with % and _ in values) and is exact; candidates that only look alike are paged past."""
    exact = ledger.create_runs([job(name=f"g{i}", labels={"tier": "gold", "k_1": "a%b"}) for i in range(3)], "alice")
    ledger.create_runs([job(name=f"G{i}", labels={"tier": "Gold", "k_1": "A%B"}) for i in range(70)], "alice")
    ledger.create_runs([job(name="x", labels={"tier": "gold", "kx1": "axb", "k_1": "zz"})], "alice")
    ledger.create_runs([job(name="y", labels={"tier": "gold", "k_1": "a%b"})], "bob")
    got = ledger.list_runs(owner="alice", labels={"tier": "gold", "k_1": "a%b"}, limit=2)
    assert len(got) == 2 and {r.id for r in got} <= {r.id for r in exact}
    got = ledger.list_runs(owner="alice", labels={"tier": "gold", "k_1": "a%b"})
    assert {r.id for r in got} == {r.id for r in exact}
    assert [r.created_at for r in got] == sorted((r.created_at for r in got), reverse=True)
    assert len(ledger.list_runs(labels={"k_1": "a%b"})) == 4
    assert len(ledger.list_runs(owner="alice", labels={"tier": "Gold"}, limit=1000)) == 70
    assert ledger.list_runs(owner="alice", labels={"k_1": "a_b"}) == []
    assert ledger.list_runs(owner="alice", labels={"tier": "gold", "nope": "x"}) == []


def test_list_runs_by_state_newest_first(ledger: Ledger) -> None:
    runs = ledger.create_runs([job(name=f"l{i}") for i in range(5)], "alice")
    for run in runs[:2]:
        ledger.request_cancel(run.id)
    got = ledger.list_runs(owner="alice", states=[RunState.CANCELLED])
    assert {r.id for r in got} == {r.id for r in runs[:2]}
    assert len(ledger.list_runs(owner="alice", states=[RunState.QUEUED, RunState.CANCELLED])) == 5
