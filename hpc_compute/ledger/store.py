"""The ledger: every durable read and write of runs, attempts, events and artifacts.

Two kinds of caller use it: clients (the API and CLI: accept, read, cancel) and schedulers
(claim, record submissions and observations, finish). Each public method is one short
transaction. Scheduler writes name the attempt *and* its fencing number; a write whose fence is
stale raises :class:`FencedOut` and changes nothing.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, inspect, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session, col, select

from hpc_compute.errors import FencedOut, IdempotencyConflict, LedgerUnavailable, RunNotFound, SchedulerLocked
from hpc_compute.harvest import HarvestReport
from hpc_compute.ledger import db
from hpc_compute.ledger.models import Artifact, Attempt, Event, Run, Scheduler
from hpc_compute.ledger.states import ACTIVE_ATTEMPT_STATES, AttemptState, RunState, check_transition
from hpc_compute.records import ArtifactInfo, AttemptInfo, EventInfo, RunInfo
from hpc_compute.spec import INFRA_FAILURES, FailureKind, JobSpec

MAX_REFUSALS_IN_EVENT = 200


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class ClaimedAttempt:
    """An attempt a scheduler owns, with what it needs to act on it."""

    run_id: str
    attempt_id: str
    number: int
    fence: int
    state: AttemptState
    backend: str
    backend_job_id: str | None
    attempt_dir: str
    spec: JobSpec
    submitted_at: datetime | None
    created_at: datetime
    cancel_requested: bool


@dataclass(frozen=True)
class AttemptResult:
    """What the engine records when an attempt ends."""

    exit_code: int | None
    signal: int | None
    failure_kind: FailureKind | None
    message: str | None
    cancelled: bool
    started_at: datetime | None
    ended_at: datetime | None
    outcome: dict[str, Any]
    retryable: bool = True  # False when a retry cannot help (e.g. a request the site can never satisfy)


@dataclass(frozen=True)
class Observed:
    attempt_id: str
    fence: int
    state: AttemptState  # PENDING or RUNNING
    reason: str | None


def transition(
    session: Session,
    run: Run,
    target: RunState,
    *,
    at: datetime,
    attempt_id: str | None = None,
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """The one place a run changes state: checks the state machine and appends the event."""
    current = RunState(run.state)
    check_transition(current, target)
    if current == target:
        return
    session.add(
        Event(
            run_id=run.id,
            attempt_id=attempt_id,
            at=at,
            kind="state",
            from_state=current.value,
            to_state=target.value,
            message=message,
            data_json=json.dumps(data, sort_keys=True) if data else None,
        )
    )
    run.state = target.value
    run.updated_at = at
    if target == RunState.RUNNING and run.started_at is None:
        run.started_at = at
    if target.terminal:
        run.finished_at = at
        run.pending_reason = None


def _event(session: Session, run_id: str, kind: str, at: datetime, **fields: Any) -> None:
    data = fields.pop("data", None)
    session.add(
        Event(
            run_id=run_id,
            at=at,
            kind=kind,
            data_json=json.dumps(data, sort_keys=True) if data is not None else None,
            **fields,
        )
    )


class Ledger:
    """A handle on one ledger database. Thread-safe: every call opens its own session."""

    def __init__(self, url: str, *, auto_upgrade: bool | None = None) -> None:
        self.url = db.normalise_url(url)
        self.is_sqlite = db.is_sqlite(self.url)
        self.engine = db.make_engine(self.url)
        self._checked = False
        self._ready_lock = threading.Lock()
        self._auto_upgrade = self.is_sqlite if auto_upgrade is None else auto_upgrade

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        self.engine.dispose()

    def upgrade(self) -> None:
        db.upgrade(self.url)
        self._checked = True

    def ensure_ready(self) -> None:
        """Check that the ledger is reachable and migrated (the embedded SQLite one migrates itself)."""
        if self._checked:
            return
        with self._ready_lock:  # one thread checks (and, embedded, migrates); the others wait
            if not self._checked:
                self._check_revision()

    def _check_revision(self) -> None:
        try:
            current = db.current_revision(self.engine)
        except (OperationalError, DBAPIError) as exc:
            raise LedgerUnavailable(f"cannot reach the ledger at {db.safe_url(self.url)}: {exc.orig}") from exc
        head = db.head_revision()
        if current != head:
            if self._auto_upgrade:
                self.upgrade()
            else:
                raise LedgerUnavailable(
                    f"the ledger at {db.safe_url(self.url)} is at revision {current or 'none'}, not {head}: "
                    "run `hpc-compute db upgrade`"
                )
        self._checked = True

    @contextmanager
    def _session(self, *, write: bool) -> Iterator[Session]:
        self.ensure_ready()
        bind = self.engine.execution_options(hpcc_write=True) if write else self.engine
        try:
            with Session(bind, expire_on_commit=False) as session:
                yield session
                if write:
                    session.commit()
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise LedgerUnavailable(f"ledger error at {db.safe_url(self.url)}: {exc.orig}") from exc

    def _lock_rows(self, stmt: Any) -> Any:
        """Row locks for claims on Postgres; SQLite serialises writers with BEGIN IMMEDIATE."""
        return stmt if self.is_sqlite else stmt.with_for_update(skip_locked=True)

    @staticmethod
    def _get_run(session: Session, run_id: str, owner: str | None) -> Run:
        run = session.get(Run, run_id)
        if run is None or (owner is not None and run.owner != owner):
            raise RunNotFound(f"no run {run_id}")
        return run

    # -- client side --------------------------------------------------------------------------

    def create_run(self, spec: JobSpec, owner: str, idempotency_key: str | None = None) -> RunInfo:
        """Accept one run (state ``queued``). The same key with the same spec returns the same run."""
        digest = spec.digest()
        if idempotency_key is not None:
            existing = self._find_idempotent(owner, idempotency_key, digest)
            if existing is not None:
                return existing
        try:
            with self._session(write=True) as session:
                run = self._new_run(session, spec, owner, idempotency_key, digest, utcnow())
                return RunInfo.from_row(run)
        except IntegrityError:
            if idempotency_key is None:
                raise
            existing = self._find_idempotent(owner, idempotency_key, digest)
            if existing is None:
                raise
            return existing

    def create_runs(self, specs: Sequence[JobSpec], owner: str) -> list[RunInfo]:
        """Accept many runs in one transaction: all or none."""
        now = utcnow()
        with self._session(write=True) as session:
            rows = [self._run_row(spec, owner, None, spec.digest(), now) for spec in specs]
            session.add_all(rows)
            session.flush()
            session.add_all([self._accepted_event(row, now) for row in rows])
            return [RunInfo.from_row(row) for row in rows]

    def _find_idempotent(self, owner: str, key: str, digest: str) -> RunInfo | None:
        with self._session(write=False) as session:
            row = session.exec(select(Run).where(Run.owner == owner, Run.idempotency_key == key)).first()
            if row is None:
                return None
            if row.spec_digest != digest:
                raise IdempotencyConflict(
                    f"idempotency key {key!r} was already used for run {row.id} with a different spec"
                )
            return RunInfo.from_row(row)

    def _new_run(self, session: Session, spec: JobSpec, owner: str, key: str | None, digest: str, now: datetime) -> Run:
        run = self._run_row(spec, owner, key, digest, now)
        session.add(run)
        session.flush()
        session.add(self._accepted_event(run, now))
        session.flush()
        return run

    @staticmethod
    def _run_row(spec: JobSpec, owner: str, key: str | None, digest: str, now: datetime) -> Run:
        return Run(
            id=new_id(),
            owner=owner,
            name=spec.name,
            kind=spec.kind,
            backend=spec.backend,
            state=RunState.QUEUED.value,
            spec_json=spec.canonical_json(),
            spec_digest=digest,
            labels_json=json.dumps(spec.labels, sort_keys=True),
            idempotency_key=key,
            attempts=0,
            max_attempts=spec.retry.max_attempts,
            created_at=now,
            updated_at=now,
        )

    @staticmethod
    def _accepted_event(run: Run, now: datetime) -> Event:
        return Event(run_id=run.id, at=now, kind="state", to_state=RunState.QUEUED.value, message="accepted")

    def get_run(self, run_id: str, owner: str | None = None) -> RunInfo:
        with self._session(write=False) as session:
            return RunInfo.from_row(self._get_run(session, self.resolve_id(session, run_id, owner), owner))

    @staticmethod
    def resolve_id(session: Session, run_id: str, owner: str | None) -> str:
        """Accept a full id or a unique prefix of at least 8 characters (what users copy from ``list``)."""
        if len(run_id) >= 36 or len(run_id) < 8:
            return run_id
        stmt = select(Run.id).where(col(Run.id).startswith(run_id))
        if owner is not None:
            stmt = stmt.where(Run.owner == owner)
        matches = session.exec(stmt.limit(2)).all()
        return matches[0] if len(matches) == 1 else run_id

    def list_runs(
        self,
        *,
        owner: str | None = None,
        states: Iterable[RunState] | None = None,
        labels: dict[str, str] | None = None,
        updated_since: datetime | None = None,
        limit: int = 100,
    ) -> list[RunInfo]:
        with self._session(write=False) as session:
            stmt = select(Run)
            if owner is not None:
                stmt = stmt.where(Run.owner == owner)
            state_values = [s.value for s in states] if states else None
            if state_values:
                stmt = stmt.where(col(Run.state).in_(state_values))
            if updated_since is not None:
                stmt = stmt.where(Run.updated_at >= updated_since)
            stmt = stmt.order_by(col(Run.created_at).desc(), col(Run.id).desc()).limit(limit if not labels else None)
            rows = [RunInfo.from_row(r) for r in session.exec(stmt)]
        if labels:
            rows = [r for r in rows if all(r.labels.get(k) == v for k, v in labels.items())][:limit]
        return rows

    def request_cancel(self, run_id: str, owner: str | None = None) -> RunInfo:
        """Cancel a queued run at once; mark an active one for the scheduler to cancel."""
        now = utcnow()
        with self._session(write=True) as session:
            run = self._get_run(session, self.resolve_id(session, run_id, owner), owner)
            state = RunState(run.state)
            if state.terminal:
                return RunInfo.from_row(run)
            if state == RunState.QUEUED:
                run.cancel_requested = True
                transition(session, run, RunState.CANCELLED, at=now, message="cancelled before submission")
            elif not run.cancel_requested:
                run.cancel_requested = True
                run.updated_at = now
                _event(session, run.id, "cancel_requested", now, message="cancel requested")
            session.flush()
            return RunInfo.from_row(run)

    def events(self, run_id: str, owner: str | None = None) -> list[EventInfo]:
        with self._session(write=False) as session:
            run = self._get_run(session, self.resolve_id(session, run_id, owner), owner)
            rows = session.exec(select(Event).where(Event.run_id == run.id).order_by(col(Event.id)))
            return [EventInfo.from_row(r) for r in rows]

    def attempts(self, run_id: str, owner: str | None = None) -> list[AttemptInfo]:
        with self._session(write=False) as session:
            run = self._get_run(session, self.resolve_id(session, run_id, owner), owner)
            rows = session.exec(select(Attempt).where(Attempt.run_id == run.id).order_by(col(Attempt.number)))
            return [AttemptInfo.from_row(r) for r in rows]

    def artifacts(self, run_id: str, owner: str | None = None) -> list[ArtifactInfo]:
        """The artifacts of the run's latest finished attempt."""
        with self._session(write=False) as session:
            run = self._get_run(session, self.resolve_id(session, run_id, owner), owner)
            last = session.exec(
                select(Attempt.id)
                .where(Attempt.run_id == run.id, Attempt.state == AttemptState.FINISHED.value)
                .order_by(col(Attempt.number).desc())
                .limit(1)
            ).first()
            if last is None:
                return []
            rows = session.exec(select(Artifact).where(Artifact.attempt_id == last).order_by(col(Artifact.path)))
            return [ArtifactInfo.from_row(r) for r in rows]

    def latest_attempt(self, run_id: str, owner: str | None = None) -> AttemptInfo | None:
        attempts = self.attempts(run_id, owner)
        return attempts[-1] if attempts else None

    # -- scheduler registration ---------------------------------------------------------------

    def register_scheduler(self, scheduler_id: str, pid: int, *, lease_s: float) -> None:
        """Record this scheduler. On SQLite refuse when another live scheduler holds the ledger."""
        now = utcnow()
        host = socket.gethostname()
        with self._session(write=True) as session:
            if self.is_sqlite:
                others = session.exec(
                    select(Scheduler).where(col(Scheduler.stopped_at).is_(None), Scheduler.id != scheduler_id)
                ).all()
                for other in others:
                    fresh = other.heartbeat_at > now - timedelta(seconds=lease_s)
                    if fresh and other.hostname != host:
                        raise SchedulerLocked(
                            f"scheduler {other.id} on {other.hostname} (pid {other.pid}) serves this SQLite "
                            "ledger; SQLite allows one scheduler at a time (use Postgres to run several)"
                        )
                    other.stopped_at = now
            session.add(Scheduler(id=scheduler_id, hostname=host, pid=pid, started_at=now, heartbeat_at=now))

    def db_now(self, session: Session) -> datetime:
        """The database's clock (leases are compared in database time, never local clocks)."""
        if self.is_sqlite:
            return utcnow()
        value = session.execute(select(func.now())).scalar_one()
        assert isinstance(value, datetime)
        return value.astimezone(UTC)

    def heartbeat(self, scheduler_id: str, *, lease_s: float) -> set[str]:
        """Renew this scheduler's heartbeat and the leases of its active attempts; return the
        attempt ids it still owns (one that is missing was taken over: stop touching it)."""
        with self._session(write=True) as session:
            now = self.db_now(session)
            session.execute(update(Scheduler).where(col(Scheduler.id) == scheduler_id).values(heartbeat_at=now))
            active = [s.value for s in ACTIVE_ATTEMPT_STATES]
            session.execute(
                update(Attempt)
                .where(col(Attempt.scheduler_id) == scheduler_id, col(Attempt.state).in_(active))
                .values(lease_expires_at=now + timedelta(seconds=lease_s))
            )
            owned = session.exec(
                select(Attempt.id).where(Attempt.scheduler_id == scheduler_id, col(Attempt.state).in_(active))
            ).all()
            return set(owned)

    def unregister_scheduler(self, scheduler_id: str) -> None:
        with self._session(write=True) as session:
            session.execute(update(Scheduler).where(col(Scheduler.id) == scheduler_id).values(stopped_at=utcnow()))

    # -- scheduler side -----------------------------------------------------------------------

    def adopt_active(
        self, scheduler_id: str, backends: Iterable[str], lease_s: float, *, only_expired: bool = False
    ) -> list[ClaimedAttempt]:
        """Take over active attempts of these backends, bumping each fence so a previous owner that
        is somehow still alive can no longer write. ``only_expired`` (shared ledgers) limits this to
        attempts whose lease ran out in database time; a single-scheduler ledger takes all at start-up."""
        out: list[ClaimedAttempt] = []
        with self._session(write=True) as session:
            now = self.db_now(session)
            stmt = (
                select(Attempt, Run)
                .join(Run, col(Run.id) == col(Attempt.run_id))
                .where(
                    col(Attempt.state).in_([s.value for s in ACTIVE_ATTEMPT_STATES]),
                    col(Attempt.backend).in_(list(backends)),
                    col(Attempt.scheduler_id).is_distinct_from(scheduler_id),
                )
            )
            if only_expired:
                stmt = stmt.where(col(Attempt.lease_expires_at).is_(None) | (col(Attempt.lease_expires_at) < now))
            rows = session.exec(stmt if self.is_sqlite else stmt.with_for_update(of=Attempt, skip_locked=True)).all()
            for attempt, run in rows:
                previous = attempt.scheduler_id
                attempt.fence += 1
                attempt.scheduler_id = scheduler_id
                attempt.lease_expires_at = now + timedelta(seconds=lease_s)
                _event(
                    session,
                    run.id,
                    "adopted",
                    now,
                    attempt_id=attempt.id,
                    message=f"attempt {attempt.number} adopted by scheduler {scheduler_id} from {previous}",
                )
                out.append(self._claimed(attempt, run))
        return out

    def claim_queued(
        self,
        scheduler_id: str,
        *,
        backends: Iterable[str],
        limit: int,
        work_root: str,
        lease_s: float,
    ) -> list[ClaimedAttempt]:
        """Claim up to ``limit`` queued runs and write their new attempts as ``submitting`` (write-ahead)."""
        if limit <= 0:
            return []
        now = utcnow()
        out: list[ClaimedAttempt] = []
        with self._session(write=True) as session:
            stmt = (
                select(Run)
                .where(
                    Run.state == RunState.QUEUED.value,
                    col(Run.cancel_requested).is_(False),
                    col(Run.backend).in_(list(backends)),
                    (col(Run.not_before).is_(None)) | (col(Run.not_before) <= now),
                )
                .order_by(col(Run.created_at), col(Run.id))
                .limit(limit)
            )
            runs = session.exec(self._lock_rows(stmt)).all()
            for run in runs:
                number = (
                    session.exec(select(func.count()).select_from(Attempt).where(Attempt.run_id == run.id)).one() + 1
                )
                attempt_id = new_id()
                attempt = Attempt(
                    id=attempt_id,
                    run_id=run.id,
                    number=number,
                    backend=run.backend,
                    state=AttemptState.SUBMITTING.value,
                    attempt_dir=f"{work_root.rstrip('/')}/{run.id}/{attempt_id}",
                    fence=1,
                    scheduler_id=scheduler_id,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    created_at=now,
                )
                session.add(attempt)
                run.attempts += 1
                run.backend_job_id = None
                run.pending_reason = None
                run.not_before = None
                transition(
                    session, run, RunState.SUBMITTING, at=now, attempt_id=attempt_id, message=f"attempt {number}"
                )
                out.append(self._claimed(attempt, run))
        return out

    @staticmethod
    def _claimed(attempt: Attempt, run: Run) -> ClaimedAttempt:
        return ClaimedAttempt(
            run_id=run.id,
            attempt_id=attempt.id,
            number=attempt.number,
            fence=attempt.fence,
            state=AttemptState(attempt.state),
            backend=attempt.backend,
            backend_job_id=attempt.backend_job_id,
            attempt_dir=attempt.attempt_dir,
            spec=JobSpec.model_validate_json(run.spec_json),
            submitted_at=attempt.submitted_at,
            created_at=attempt.created_at,
            cancel_requested=run.cancel_requested,
        )

    @staticmethod
    def _fenced(session: Session, attempt_id: str, fence: int) -> tuple[Attempt, Run]:
        attempt = session.get(Attempt, attempt_id)
        if attempt is None or attempt.fence != fence:
            raise FencedOut(f"attempt {attempt_id}: fence {fence} is stale")
        run = session.get(Run, attempt.run_id)
        if run is None:
            raise FencedOut(f"attempt {attempt_id}: run vanished")
        return attempt, run

    def cancel_flags(self, run_ids: Iterable[str]) -> set[str]:
        """The subset of ``run_ids`` whose owners asked for cancellation."""
        ids = list(run_ids)
        if not ids:
            return set()
        with self._session(write=False) as session:
            rows = session.exec(select(Run.id).where(col(Run.id).in_(ids), col(Run.cancel_requested).is_(True)))
            return set(rows)

    def mark_submitted(self, attempt_id: str, fence: int, backend_job_id: str, *, message: str | None = None) -> None:
        """The backend accepted the attempt: record its handle (``submitting -> pending``)."""
        now = utcnow()
        with self._session(write=True) as session:
            attempt, run = self._fenced(session, attempt_id, fence)
            if attempt.state != AttemptState.SUBMITTING.value:
                return
            attempt.state = AttemptState.PENDING.value
            attempt.backend_job_id = backend_job_id
            attempt.submitted_at = now
            run.backend_job_id = backend_job_id
            transition(
                session,
                run,
                RunState.PENDING,
                at=now,
                attempt_id=attempt_id,
                message=message or f"submitted as {backend_job_id}",
                data={"backend_job_id": backend_job_id},
            )

    def mark_not_submitted(self, attempt_id: str, fence: int, reason: str) -> None:
        """Reconciliation proved the backend never created the attempt: tombstone it, requeue the run
        without counting the attempt against the run's limit."""
        now = utcnow()
        with self._session(write=True) as session:
            attempt, run = self._fenced(session, attempt_id, fence)
            attempt.state = AttemptState.NOT_SUBMITTED.value
            attempt.finished_at = now
            attempt.message = reason
            run.attempts = max(0, run.attempts - 1)
            if run.cancel_requested:
                transition(session, run, RunState.CANCELLED, at=now, attempt_id=attempt_id, message=reason)
            else:
                transition(session, run, RunState.QUEUED, at=now, attempt_id=attempt_id, message=reason)

    def record_observations(self, observed: Sequence[Observed]) -> list[str]:
        """Apply many poll results in one transaction; return the attempt ids whose fence was stale."""
        if not observed:
            return []
        now = utcnow()
        stale: list[str] = []
        with self._session(write=True) as session:
            for item in observed:
                try:
                    attempt, run = self._fenced(session, item.attempt_id, item.fence)
                except FencedOut:
                    stale.append(item.attempt_id)
                    continue
                if attempt.state == AttemptState.FINISHED.value:
                    continue
                if item.state == AttemptState.RUNNING and attempt.state != AttemptState.RUNNING.value:
                    attempt.state = AttemptState.RUNNING.value
                    attempt.started_at = attempt.started_at or now
                    if attempt.submitted_at is None:
                        attempt.submitted_at = now
                    transition(session, run, RunState.RUNNING, at=now, attempt_id=attempt.id)
                    run.pending_reason = None
                elif item.state == AttemptState.PENDING and item.reason != run.pending_reason:
                    run.pending_reason = (item.reason or "")[:256] or None
                    run.updated_at = now
        return stale

    def record_event(self, run_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        with self._session(write=True) as session:
            _event(session, run_id, kind, utcnow(), message=message, data=data)

    def finish_attempt(
        self,
        attempt_id: str,
        fence: int,
        result: AttemptResult,
        harvest: HarvestReport | None,
    ) -> RunState:
        """Record how an attempt ended, its artifacts and refusals, and decide the run's next state:
        terminal, or back to ``queued`` for a retry (infrastructure failures, or kinds the spec opts into)."""
        now = utcnow()
        with self._session(write=True) as session:
            attempt, run = self._fenced(session, attempt_id, fence)
            if attempt.state == AttemptState.FINISHED.value:
                return RunState(run.state)
            spec = JobSpec.model_validate_json(run.spec_json)
            attempt.state = AttemptState.FINISHED.value
            attempt.finished_at = result.ended_at or now
            attempt.started_at = attempt.started_at or result.started_at
            attempt.exit_code = result.exit_code
            attempt.signal = result.signal
            attempt.failure_kind = result.failure_kind.value if result.failure_kind else None
            attempt.message = result.message
            attempt.outcome_json = json.dumps(result.outcome, sort_keys=True, default=str)
            if harvest is not None:
                for item in harvest.files:
                    session.add(
                        Artifact(
                            run_id=run.id,
                            attempt_id=attempt.id,
                            path=item.path,
                            size=item.size,
                            sha256=item.sha256,
                            created_at=now,
                        )
                    )
                if harvest.refused:
                    refusals = [{"path": r.path, "reason": r.reason} for r in harvest.refused]
                    _event(
                        session,
                        run.id,
                        "artifacts_refused",
                        now,
                        attempt_id=attempt.id,
                        message=f"{len(refusals)} output entries refused",
                        data={"count": len(refusals), "refused": refusals[:MAX_REFUSALS_IN_EVENT]},
                    )
            if result.started_at is not None and run.started_at is None:
                run.started_at = result.started_at
            target = self._next_state(run, spec, result)
            data = {"exit_code": result.exit_code, "signal": result.signal}
            if target == RunState.QUEUED:
                delay = spec.retry.backoff * (2 ** max(0, run.attempts - 1))
                run.not_before = now + timedelta(seconds=delay)
                kind = result.failure_kind.value if result.failure_kind else "unknown"
                transition(
                    session,
                    run,
                    RunState.QUEUED,
                    at=now,
                    attempt_id=attempt.id,
                    message=f"attempt {attempt.number} failed ({kind}); retry in {delay}s",
                    data=data,
                )
                return RunState.QUEUED
            run.exit_code = result.exit_code
            run.signal = result.signal
            run.failure_kind = result.failure_kind.value if target == RunState.FAILED and result.failure_kind else None
            run.failure_message = result.message if target != RunState.SUCCEEDED else None
            transition(session, run, target, at=now, attempt_id=attempt.id, message=result.message, data=data)
            return target

    @staticmethod
    def _next_state(run: Run, spec: JobSpec, result: AttemptResult) -> RunState:
        if result.cancelled:
            return RunState.CANCELLED
        if result.failure_kind is None and result.exit_code == 0:
            return RunState.SUCCEEDED
        kind = result.failure_kind
        retryable = result.retryable and kind is not None and (kind in INFRA_FAILURES or kind in spec.retry.also_retry)
        if retryable and not run.cancel_requested and run.attempts < run.max_attempts:
            return RunState.QUEUED
        return RunState.FAILED

    def fail_submission(self, attempt_id: str, fence: int, message: str, *, retryable: bool) -> RunState:
        """The backend refused the attempt for certain (nothing was created)."""
        result = AttemptResult(
            exit_code=None,
            signal=None,
            failure_kind=FailureKind.SUBMIT_ERROR,
            message=message,
            cancelled=False,
            started_at=None,
            ended_at=None,
            outcome={"submit_error": message, "retryable": retryable},
            retryable=retryable,
        )
        return self.finish_attempt(attempt_id, fence, result, None)

    # -- introspection (doctor, tests) --------------------------------------------------------

    def table_names(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    def count_runs(self) -> dict[str, int]:
        with self._session(write=False) as session:
            rows = session.exec(select(Run.state, func.count()).group_by(Run.state)).all()
            return {state: n for state, n in rows}
