"""Limits and fairness in claiming (per-kind and per-owner caps across schedulers, round-robin over
owners) and the scheduler's time backstops (run time, queue time), on SQLite and Postgres."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import Session, col

from hpc_compute.backends.base import (
    Backend,
    FindKind,
    FindResult,
    Observation,
    ObservationKind,
    Outcome,
    Ticket,
)
from hpc_compute.backends.local import LocalBackend
from hpc_compute.config import Settings, load_settings
from hpc_compute.engine import Engine
from hpc_compute.harvest import HarvestLimits
from hpc_compute.ledger.models import Run
from hpc_compute.ledger.states import TERMINAL_STATES as TERMINAL
from hpc_compute.ledger.states import RunState
from hpc_compute.ledger.store import AttemptResult, ClaimedAttempt, Ledger
from hpc_compute.spec import FailureKind, JobSpec, Resources, parse_spec


def _job(**fields: Any) -> JobSpec:
    return parse_spec({"image": "host", "command": ["true"], **fields})


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    handle = Ledger(ledger_url)
    handle.upgrade()
    yield handle
    handle.close()


def _claim(ledger: Ledger, limit: int, scheduler: str = "s1", **caps: Any) -> list[ClaimedAttempt]:
    return ledger.claim_queued(scheduler, backends=["local"], limit=limit, work_root="/w", lease_s=60, **caps)


def _owners(ledger: Ledger, claimed: list[ClaimedAttempt]) -> list[str]:
    return [ledger.get_run(c.run_id).owner for c in claimed]


def _age(ledger: Ledger, run_ids: list[str], seconds: float) -> None:
    with Session(ledger.engine) as session:
        session.execute(
            update(Run)
            .where(col(Run.id).in_(run_ids))
            .values(created_at=datetime.now(UTC) - timedelta(seconds=seconds))
        )
        session.commit()


def _done(ledger: Ledger, item: ClaimedAttempt) -> None:
    now = datetime.now(UTC)
    ledger.finish_attempt(item.attempt_id, item.fence, AttemptResult(0, None, None, None, False, now, now, {}), None)


# -- fairness ----------------------------------------------------------------------------------------


def test_owners_are_interleaved_round_robin(ledger: Ledger) -> None:
    heavy = ledger.create_runs([_job(name=f"a{i}") for i in range(50)], "alice")
    _age(ledger, [r.id for r in heavy], 60)  # alice's runs are all older than bob's
    light = [ledger.create_run(_job(name=f"b{i}"), "bob") for i in range(2)]

    first = _claim(ledger, 4)
    assert Counter(_owners(ledger, first)) == {"alice": 2, "bob": 2}
    assert _owners(ledger, first) == ["alice", "bob", "alice", "bob"]  # the owner with the oldest run first
    assert {c.run_id for c in first} >= {r.id for r in light}
    second = _claim(ledger, 4)
    assert _owners(ledger, second) == ["alice"] * 4  # bob has nothing left queued
    assert len({c.run_id for c in first + second}) == 8


def test_within_an_owner_oldest_first(ledger: Ledger) -> None:
    ids = [ledger.create_run(_job(name=f"n{i}"), "alice").id for i in range(4)]
    other = ledger.create_run(_job(), "carol").id
    claimed = [c.run_id for c in _claim(ledger, 5)]
    assert [i for i in claimed if i != other] == ids


def test_per_owner_cap_counts_every_scheduler(ledger: Ledger) -> None:
    ledger.create_runs([_job() for _ in range(10)], "alice")
    ledger.create_runs([_job() for _ in range(10)], "bob")
    one = _claim(ledger, 10, "s1", max_per_owner=3)
    assert Counter(_owners(ledger, one)) == {"alice": 3, "bob": 3}
    assert _claim(ledger, 10, "s2", max_per_owner=3) == []  # another scheduler sees the same cap
    _done(ledger, one[0])
    again = _claim(ledger, 10, "s2", max_per_owner=3)
    assert _owners(ledger, again) == [_owners(ledger, one[:1])[0]]


def test_kind_caps_skip_to_runs_they_allow(ledger: Ledger) -> None:
    training = [ledger.create_run(_job(kind="training"), "alice").id for _ in range(5)]
    _age(ledger, training, 60)
    prediction = [ledger.create_run(_job(kind="prediction"), "alice").id for _ in range(3)]
    plain = ledger.create_run(_job(), "alice").id
    caps = {"kind_limits": {"training": 2, "prediction": 50}}
    claimed = _claim(ledger, 20, **caps)
    kinds = Counter(ledger.get_run(c.run_id).kind for c in claimed)
    assert kinds == {"training": 2, "prediction": 3, None: 1}
    assert {c.run_id for c in claimed} >= set(prediction) | {plain}
    assert _claim(ledger, 20, "s2", **caps) == []
    _done(ledger, claimed[0])
    assert [ledger.get_run(c.run_id).kind for c in _claim(ledger, 20, "s2", **caps)] == ["training"]


def test_concurrent_capped_claims_never_exceed_the_cap(ledger: Ledger) -> None:
    ledger.create_runs([_job(kind="training") for _ in range(20)], "alice")
    barrier = threading.Barrier(4)

    def worker(n: int) -> int:
        barrier.wait()
        return sum(len(_claim(ledger, 2, f"s{n}", kind_limits={"training": 3})) for _ in range(3))

    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(worker, range(4)))
    assert total == 3
    assert ledger.count_runs() == {"submitting": 3, "queued": 17}


# -- caps through the engine, two scheduler instances ------------------------------------------------


class StubBackend(Backend):
    """Accepts everything and keeps it pending: enough to exercise claiming through the engine."""

    name = "local"
    max_in_flight = 100

    def submit(self, ticket: Ticket) -> str:
        return f"stub-{ticket.attempt_id}"

    def poll(self, tickets: list[Ticket]) -> dict[str, Observation]:
        return {t.attempt_id: Observation(ObservationKind.PENDING, reason="stub") for t in tickets}

    def find(self, tickets: list[Ticket]) -> dict[str, FindResult]:
        return {t.attempt_id: FindResult(FindKind.FOUND, backend_job_id=f"stub-{t.attempt_id}") for t in tickets}

    def cancel(self, ticket: Ticket) -> None:
        pass

    def collect(self, ticket: Ticket, artifact_dir: Path, limits: HarvestLimits) -> Outcome:
        return Outcome(exit_code=0, signal=None, failure_kind=None)


def _settings(tmp_path: Path, ledger_url: str, name: str, **scheduler: Any) -> Settings:
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    overrides: dict[str, Any] = {
        "home": str(home),
        "ledger_url": ledger_url,
        "scheduler": {"poll_interval": 0.2, "min_poll_interval": 0.05, "lease_seconds": 30, **scheduler},
        "local": {"reconcile_grace_s": 1.0},
        "notify": {"hooks": False},
    }
    return load_settings(overrides, env={"HOME": str(home)}, system_file=home / "no-system.toml")


def _active_kinds(ledger: Ledger) -> Counter[str | None]:
    return Counter(r.kind for r in ledger.list_runs(limit=1000) if r.state not in (RunState.QUEUED, *TERMINAL))


def test_kind_cap_is_honoured_across_two_engines(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    ledger.create_runs([_job(kind="training") for _ in range(6)], "alice")
    ledger.create_runs([_job(kind="prediction") for _ in range(4)], "bob")
    caps = {"kind_limits": {"training": 2, "prediction": 50}}
    # SQLite allows one scheduler at a time (its lock file is in the shared home): the second
    # starts after the first stopped, and adopts its attempts; Postgres runs both at once.
    name_b = "a" if ledger.is_sqlite else "b"
    one = Engine(_settings(tmp_path, ledger_url, "a", **caps), Ledger(ledger_url), backends={"local": StubBackend()})
    two = Engine(_settings(tmp_path, ledger_url, name_b, **caps), Ledger(ledger_url), backends={"local": StubBackend()})
    one.start()
    try:
        one.cycle()
        assert Counter(t.claimed.spec.kind for t in one.tracked.values()) == {"training": 2, "prediction": 4}
        if ledger.is_sqlite:
            one.close()
        two.start()
        try:
            two.cycle()
            two.cycle()
            assert _active_kinds(ledger) == {"training": 2, "prediction": 4}
            if not ledger.is_sqlite:
                assert two.tracked == {}, "the second scheduler counts the first one's training attempts"
            # one training attempt ends: exactly one more may start, whichever scheduler takes it
            run_id = next(t.claimed.run_id for t in one.tracked.values() if t.claimed.spec.kind == "training")
            latest = ledger.latest_attempt(run_id)
            assert latest is not None
            now = datetime.now(UTC)
            ledger.finish_attempt(
                latest.id, latest.fence, AttemptResult(0, None, None, None, False, now, now, {}), None
            )
            two.cycle()
            if not ledger.is_sqlite:
                one.cycle()
            two.cycle()
            assert _active_kinds(ledger) == {"training": 2, "prediction": 4}
            assert ledger.count_runs() == {"queued": 3, "pending": 6, "succeeded": 1}
        finally:
            two.close()
    finally:
        one.close()


# -- time ----------------------------------------------------------------------------------------------


class LongWrapperLimit(LocalBackend):
    """The local backend, but the wrapper is given a long limit: only the scheduler's backstop can stop it."""

    def submit(self, ticket: Ticket) -> str:
        spec = ticket.spec
        long = spec.model_copy(update={"resources": Resources(**{**spec.resources.model_dump(), "time_limit": 3600})})
        return super().submit(replace(ticket, spec=long))


class HeldInQueue(LocalBackend):
    """The local backend as a busy cluster: a started job still reports as pending."""

    def poll(self, tickets: list[Ticket]) -> dict[str, Observation]:
        out = super().poll(tickets)
        return {
            k: Observation(ObservationKind.PENDING, reason="Resources") if v.kind == ObservationKind.RUNNING else v
            for k, v in out.items()
        }


def _drive(engine: Engine, run_id: str, timeout: float) -> None:
    engine.start()
    try:
        assert engine.drive_until([run_id], timeout=timeout), "run did not finish in time"
    finally:
        engine.close()


@pytest.mark.bwrap
def test_running_past_time_limit_plus_grace_is_cancelled_as_timeout(
    ledger: Ledger, ledger_url: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, ledger_url, "a", time_limit_grace="1")
    run = ledger.create_run(_job(command=["/bin/sleep", "60"], resources={"time_limit": "1s"}), "alice")
    engine = Engine(settings, Ledger(ledger_url), backends={"local": LongWrapperLimit(settings)})
    started = time.monotonic()
    _drive(engine, run.id, timeout=30)
    assert time.monotonic() - started < 20
    final = ledger.get_run(run.id)
    assert final.state == RunState.FAILED and final.failure_kind == FailureKind.TIMEOUT
    assert final.failure_message and "time limit (1s) plus 1s grace" in final.failure_message
    assert final.attempts == 1
    assert any(e.kind == "time_limit" for e in ledger.events(run.id))


@pytest.mark.bwrap
def test_pending_longer_than_max_queue_time_fails_as_timeout(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, ledger_url, "a", max_queue_time=1.5)
    spec = _job(command=["/bin/sleep", "60"], retry={"max_attempts": 3, "also_retry": ["timeout"]})
    run = ledger.create_run(spec, "alice")
    engine = Engine(settings, Ledger(ledger_url), backends={"local": HeldInQueue(settings)})
    started = time.monotonic()
    _drive(engine, run.id, timeout=30)
    assert time.monotonic() - started < 20
    final = ledger.get_run(run.id)
    assert final.state == RunState.FAILED and final.failure_kind == FailureKind.TIMEOUT
    assert final.failure_message and final.failure_message.startswith("queued longer than 1.5s")
    assert final.attempts == 1, "a queue timeout is not retried, even when the spec retries timeouts"


@pytest.mark.bwrap
def test_no_backstop_within_the_limit(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, ledger_url, "a", time_limit_grace=0, max_queue_time=30)
    run = ledger.create_run(_job(command=["/bin/sh", "-c", "sleep 1"], resources={"time_limit": "20s"}), "alice")
    _drive(Engine(settings, Ledger(ledger_url)), run.id, timeout=30)
    final = ledger.get_run(run.id)
    assert final.state == RunState.SUCCEEDED
    assert not any(e.kind == "time_limit" for e in ledger.events(run.id))
