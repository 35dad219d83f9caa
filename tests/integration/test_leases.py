"""Leases renewed from their own thread (hpc_compute.leases), on SQLite and Postgres.

A cycle blocked on a slow backend (every Slurm command waiting out its timeout while slurmctld
is down) must keep its leases, so a second scheduler does not take a live scheduler's attempts;
a loop that stopped making progress must let them lapse; submissions to a backend that did not
answer are held for the next cycle instead of costing one timeout each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

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
from hpc_compute.config import Settings, load_settings
from hpc_compute.engine import Engine
from hpc_compute.harvest import HarvestLimits
from hpc_compute.leases import LeaseKeeper
from hpc_compute.ledger.models import Attempt
from hpc_compute.ledger.store import Ledger
from hpc_compute.spec import parse_spec

LEASE_S = 1.5


def _job() -> Any:
    return parse_spec({"image": "host", "command": ["true"]})


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    handle = Ledger(ledger_url)
    handle.upgrade()
    yield handle
    handle.close()


def _settings(tmp_path: Path, ledger_url: str, name: str, **scheduler: Any) -> Settings:
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    overrides: dict[str, Any] = {
        "home": str(home),
        "ledger_url": ledger_url,
        "scheduler": {"poll_interval": 0.2, "min_poll_interval": 0.05, "lease_seconds": LEASE_S, **scheduler},
        "notify": {"hooks": False},
    }
    return load_settings(overrides, env={"HOME": str(home)}, system_file=home / "no-system.toml")


def _attempts(ledger: Ledger) -> list[Attempt]:
    with Session(ledger.engine) as session:
        return list(session.exec(select(Attempt)).all())


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class SlowPollBackend(Backend):
    """Accepts every submission; its poll blocks while ``slow`` is set, like a Slurm command
    waiting out its timeout with the controller down."""

    name = "local"
    max_in_flight = 10

    def __init__(self, block_s: float) -> None:
        self.block_s = block_s
        self.slow = threading.Event()
        self.blocked = threading.Event()

    def submit(self, ticket: Ticket) -> str:
        return f"job-{ticket.attempt_id}"

    def poll(self, tickets: list[Ticket]) -> dict[str, Observation]:
        if self.slow.is_set():
            self.slow.clear()
            self.blocked.set()
            time.sleep(self.block_s)
        return {t.attempt_id: Observation(ObservationKind.PENDING, reason="slow") for t in tickets}

    def find(self, tickets: list[Ticket]) -> dict[str, FindResult]:
        return {t.attempt_id: FindResult(FindKind.FOUND, backend_job_id=f"job-{t.attempt_id}") for t in tickets}

    def cancel(self, ticket: Ticket) -> None:
        pass

    def collect(self, ticket: Ticket, artifact_dir: Path, limits: HarvestLimits) -> Outcome:
        return Outcome(exit_code=0, signal=None, failure_kind=None)


def test_a_blocked_cycle_keeps_its_leases(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    run = ledger.create_run(_job(), "alice")
    block_s = 4 * LEASE_S
    backend = SlowPollBackend(block_s)
    owner = Engine(_settings(tmp_path, ledger_url, "a"), Ledger(ledger_url), backends={"local": backend})
    owner.start()
    rival: Engine | None = None
    try:
        owner.cycle()
        (tracked,) = owner.tracked.values()
        fence = tracked.claimed.fence
        backend.slow.set()
        blocked = threading.Thread(target=owner.cycle)
        blocked.start()
        assert backend.blocked.wait(5)
        if not ledger.is_sqlite:  # a second scheduler on the same ledger, cycling meanwhile
            rival = Engine(
                _settings(tmp_path, ledger_url, "b"), Ledger(ledger_url), backends={"local": SlowPollBackend(0)}
            )
            rival.start()
        deadline = time.monotonic() + block_s - 0.5
        while time.monotonic() < deadline:
            (attempt,) = _attempts(ledger)
            assert attempt.lease_expires_at is not None
            assert _aware(attempt.lease_expires_at) > datetime.now(UTC), "the lease lapsed during a blocked cycle"
            if rival is not None:
                rival.cycle()
                assert not rival.tracked, "a live scheduler's attempt was taken over"
            time.sleep(0.2)
        blocked.join()
        (attempt,) = _attempts(ledger)
        assert attempt.fence == fence and attempt.scheduler_id == owner.scheduler_id
        owner.cycle()
        assert run.id in {t.claimed.run_id for t in owner.tracked.values()}
        assert owner.leases.renewals >= 3
    finally:
        if rival is not None:
            rival.close()
        owner.close()


def test_a_stalled_loop_stops_renewing(ledger: Ledger) -> None:
    now = [1000.0]
    (claimed,) = ledger.claim_queued("me", backends=["local"], limit=1, work_root="/w", lease_s=30) or [None]
    assert claimed is None  # nothing queued yet
    ledger.create_run(_job(), "alice")
    (claimed,) = ledger.claim_queued("me", backends=["local"], limit=1, work_root="/w", lease_s=30)
    ledger.register_scheduler("me", 1, lease_s=30)
    keeper = LeaseKeeper(ledger, "me", lease_s=30, stall_s=100, clock=lambda: now[0])
    first = keeper.renew_once()
    assert first is not None and first.owned == {claimed.attempt_id}
    (attempt,) = _attempts(ledger)
    renewed = attempt.lease_expires_at

    now[0] += 101  # the loop has reported no progress for longer than stall_s
    assert keeper.stalled()
    assert keeper.renew_once() is None
    (attempt,) = _attempts(ledger)
    assert attempt.lease_expires_at == renewed, "a stalled loop renewed its lease"

    keeper.progress()
    time.sleep(0.01)
    again = keeper.renew_once()
    assert again is not None and again.owned == {claimed.attempt_id}
    (attempt,) = _attempts(ledger)
    assert attempt.lease_expires_at is not None and renewed is not None
    assert attempt.lease_expires_at > renewed
    assert keeper.take() == again and keeper.take() is None


def test_a_failed_renewal_is_survived() -> None:
    broken = Ledger("postgresql+psycopg://nobody:none@127.0.0.1:9/none")  # nothing listens on port 9
    keeper = LeaseKeeper(broken, "me", lease_s=0.3, stall_s=100)
    keeper.start()
    try:
        time.sleep(0.8)
        assert keeper.failures >= 2, "the thread stopped after a failed renewal"
        assert keeper.running
    finally:
        keeper.stop()
    assert not keeper.running


def test_a_claimed_attempt_newer_than_the_renewal_is_kept(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    engine = Engine(_settings(tmp_path, ledger_url, "a"), Ledger(ledger_url), backends={"local": SlowPollBackend(0)})
    engine.ledger.register_scheduler(engine.scheduler_id, 1, lease_s=LEASE_S)
    stale = engine.leases.renew_once()  # begun before the claim: its answer cannot hold the attempt
    assert stale is not None and stale.owned == frozenset()
    ledger.create_run(_job(), "alice")
    engine.cycle()
    assert len(engine.tracked) == 1
    with engine.leases._mutex:
        engine.leases._latest = stale
    engine.cycle()
    assert len(engine.tracked) == 1, "an attempt claimed after the renewal began was dropped"
    engine.close()


class UnreachableBackend(Backend):
    """Every submission times out without an answer until ``reachable`` is set."""

    name = "local"
    max_in_flight = 10
    reconcile_grace_s = 0.0

    def __init__(self) -> None:
        self.reachable = False
        self.submits = 0

    def submit(self, ticket: Ticket) -> str:
        self.submits += 1
        if not self.reachable:
            raise SubmitError("sbatch timed out after 15s", definite=False)
        return f"job-{ticket.attempt_id}"

    def poll(self, tickets: list[Ticket]) -> dict[str, Observation]:
        return {t.attempt_id: Observation(ObservationKind.PENDING, reason="held") for t in tickets}

    def find(self, tickets: list[Ticket]) -> dict[str, FindResult]:
        if not self.reachable:
            return {t.attempt_id: FindResult(FindKind.UNKNOWN) for t in tickets}
        return {t.attempt_id: FindResult(FindKind.ABSENT, detail="not in squeue") for t in tickets}

    def cancel(self, ticket: Ticket) -> None:
        pass

    def collect(self, ticket: Ticket, artifact_dir: Path, limits: HarvestLimits) -> Outcome:
        return Outcome(exit_code=0, signal=None, failure_kind=None)


def test_an_unanswered_submission_holds_the_rest_of_the_batch(
    ledger: Ledger, ledger_url: str, tmp_path: Path
) -> None:
    ledger.create_runs([_job() for _ in range(5)], "alice")
    backend = UnreachableBackend()
    engine = Engine(_settings(tmp_path, ledger_url, "a"), Ledger(ledger_url), backends={"local": backend})
    try:
        engine.cycle()
        assert backend.submits == 1, "every claimed attempt cost a submission timeout"
        held = [t for t in engine.tracked.values() if t.needs_submit]
        assert len(held) == 4 and len(engine.tracked) == 5
        engine.cycle()  # still unreachable: one more try, nothing new claimed
        assert backend.submits == 2 and len(engine.tracked) == 5
        held = [t for t in engine.tracked.values() if t.needs_submit]
        assert len(held) == 3
        cancelled = held[0].claimed.run_id
        ledger.request_cancel(cancelled)  # a held run cancelled: never submitted, nothing to withdraw
        backend.reachable = True
        engine.cycle()
        assert backend.submits == 2 + 2  # the two still held and not cancelled, each submitted once
        assert ledger.get_run(cancelled).state.value == "cancelled"
        assert not any(t.needs_submit for t in engine.tracked.values())
        handles = {t.backend_job_id for t in engine.tracked.values() if t.backend_job_id}
        assert len(handles) == 2
    finally:
        engine.close()


# -- concurrent submission, handles committed per wave -------------------------------------------


class ConcurrentBackend(UnreachableBackend):
    """Reachable; each submission takes a while; records how many ran at once."""

    submit_concurrency = 4

    def __init__(self) -> None:
        super().__init__()
        self.reachable = True
        self._mutex = threading.Lock()
        self._now = 0
        self.peak = 0

    def submit(self, ticket: Ticket) -> str:
        with self._mutex:
            self._now += 1
            self.peak = max(self.peak, self._now)
        time.sleep(0.2)
        with self._mutex:
            self._now -= 1
        return super().submit(ticket)


def test_submissions_run_concurrently_up_to_the_backend_width(
    ledger: Ledger, ledger_url: str, tmp_path: Path
) -> None:
    runs = ledger.create_runs([_job() for _ in range(10)], "alice")
    backend = ConcurrentBackend()
    engine = Engine(_settings(tmp_path, ledger_url, "a"), Ledger(ledger_url), backends={"local": backend})
    try:
        started = time.monotonic()
        engine.cycle()
        elapsed = time.monotonic() - started
        assert backend.submits == 10 and backend.peak == 4
        assert elapsed < 10 * 0.2, "the submissions ran one after another"
        states = {ledger.get_run(r.id).state.value for r in runs}
        assert states == {"pending"}
        assert {ledger.get_run(r.id).backend_job_id for r in runs} == {
            t.backend_job_id for t in engine.tracked.values()
        }
    finally:
        engine.close()


def test_mark_submitted_many_skips_stale_fences(ledger: Ledger) -> None:
    ledger.create_runs([_job() for _ in range(3)], "alice")
    claimed = ledger.claim_queued("me", backends=["local"], limit=3, work_root="/w", lease_s=30)
    first, second, third = claimed
    stale = ledger.mark_submitted_many(
        [
            (first.attempt_id, first.fence, "j1"),
            (second.attempt_id, second.fence + 7, "j2"),
            (third.attempt_id, third.fence, "j3"),
        ]
    )
    assert stale == [second.attempt_id]
    assert ledger.get_run(first.run_id).backend_job_id == "j1"
    assert ledger.get_run(second.run_id).state.value == "submitting"
    assert ledger.get_run(second.run_id).backend_job_id is None
    assert ledger.get_run(third.run_id).state.value == "pending"
