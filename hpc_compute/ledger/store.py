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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import delete, func, insert, inspect, text, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session, col, select

from hpc_compute.errors import FencedOut, IdempotencyConflict, LedgerUnavailable, RunNotFound, SchedulerLocked
from hpc_compute.harvest import HarvestReport
from hpc_compute.ledger import db
from hpc_compute.ledger.models import Artifact, Attempt, Event, Outbox, Run, Scheduler
from hpc_compute.ledger.states import ACTIVE_ATTEMPT_STATES, AttemptState, RunState, check_transition
from hpc_compute.records import ArtifactInfo, AttemptInfo, EventInfo, RunInfo
from hpc_compute.spec import INFRA_FAILURES, FailureKind, JobSpec

MAX_REFUSALS_IN_EVENT = 200
OUTBOX_RUN_STATE = "run.state"
CLAIM_LOCK_KEY = 0x68706363_636C6D  # pg_advisory_xact_lock key serialising capped claims ("hpcc" "clm")
CLAIM_ROUNDS = 3
_T = TypeVar("_T")


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
    started_at: datetime | None = None


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


@dataclass(frozen=True)
class OutboxItem:
    """A notification a notifier took for delivery."""

    id: int
    run_id: str
    kind: str
    payload: dict[str, Any]
    attempts: int  # tries before this one
    delivered_targets: frozenset[int]
    created_at: datetime


@dataclass(frozen=True)
class DeliveryResult:
    """How one try of one notification went, over all targets."""

    outbox_id: int
    delivered_targets: frozenset[int]
    delivered: bool  # every target has it
    error: str | None = None
    retry_in_s: float = 0.0
    gave_up: bool = False


@dataclass(frozen=True)
class OutboxInfo:
    id: int
    run_id: str
    event_id: int | None
    kind: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int
    next_attempt_at: datetime
    delivered_at: datetime | None
    delivered_targets: frozenset[int]
    last_error: str | None


IN_CHUNK = 500  # ids per IN list: well below SQLite's (32766) and psycopg's (65535) parameter limits


def _chunks(items: list[_T], size: int = IN_CHUNK) -> Iterator[list[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_SPEC_PARTS: dict[tuple[type[BaseModel], str], BaseModel] = {}
_SPEC_PARTS_MAX = 4096


def claimed_spec(spec_json: str) -> JobSpec:
    """The spec of an attempt a scheduler takes on. A scheduler keeps one per active attempt (ten
    thousand of them at scale), and the nested sections of a sweep's specs (resources, retry,
    placement) are nearly always equal: equal sections are shared between specs (they are
    frozen), which more than halves the memory a spec takes (3.7 KB -> 1.6 KB)."""
    spec = JobSpec.model_validate_json(spec_json)
    if len(_SPEC_PARTS) > _SPEC_PARTS_MAX:
        _SPEC_PARTS.clear()
    shared: dict[str, Any] = {}
    for name in ("resources", "retry", "placement"):
        part = getattr(spec, name)
        known = _SPEC_PARTS.setdefault((type(part), part.model_dump_json()), part)
        if known is not part:
            shared[name] = known
    return spec.model_copy(update=shared) if shared else spec


def _label_text(key: str, value: str) -> str:
    """How the pair ``key: value`` appears in ``hpcc_run.labels_json`` (``json.dumps`` defaults)."""
    return f"{json.dumps(key)}: {json.dumps(value)}"


def _parse_targets(text: str | None) -> list[int]:
    return [int(part) for part in (text or "").split(",") if part.strip().isdigit()]


def transition(
    session: Session,
    run: Run,
    target: RunState,
    *,
    at: datetime,
    attempt_id: str | None = None,
    message: str | None = None,
    data: dict[str, Any] | None = None,
    notices: Notices | None = None,
) -> None:
    """The one place a run changes state: checks the state machine, appends the event and, in
    the same transaction, the outbox row that notifies about it (so no state change can commit
    without its notification, and no notification exists for a change that rolled back).
    With ``notices`` the outbox row is written by ``notices.write`` (batched writes)."""
    current = RunState(run.state)
    check_transition(current, target)
    if current == target:
        return
    event = Event(
        run_id=run.id,
        attempt_id=attempt_id,
        at=at,
        kind="state",
        from_state=current.value,
        to_state=target.value,
        message=message,
        data_json=json.dumps(data, sort_keys=True) if data else None,
    )
    session.add(event)
    run.state = target.value
    run.updated_at = at
    if target == RunState.RUNNING and run.started_at is None:
        run.started_at = at
    if target.terminal:
        run.finished_at = at
        run.pending_reason = None
    if notices is None:
        _outbox(session, run, event, previous=current.value, data=data)
    else:
        notices.add(run, event, previous=current.value, data=data)


class Notices:
    """The outbox rows of many state changes in one transaction. :func:`transition` needs each
    event's id for its outbox row; one flush per change costs a round trip per run (and, on
    Postgres, one INSERT per event). Handed a ``Notices``, it only remembers the payload (taken
    at once, so later changes of the run cannot alter it); :meth:`write` then flushes once (every
    event in one batched INSERT) and adds the outbox rows. Call it before the transaction ends."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Event, dict[str, Any]]] = []

    def add(self, run: Run, event: Event, *, previous: str | None, data: dict[str, Any] | None) -> None:
        self._items.append((run.id, event, _payload(run, event, previous=previous, data=data)))

    def write(self, session: Session) -> None:
        if not self._items:
            return
        session.flush()  # assigns every event's id (one batched INSERT on Postgres)
        rows = []
        for run_id, event, payload in self._items:
            payload["event_id"] = event.id
            rows.append(_outbox_values(run_id, event, payload))
        session.execute(insert(Outbox), rows)  # one executemany: nothing needs their ids back
        self._items.clear()


def _payload(run: Run, event: Event, *, previous: str | None, data: dict[str, Any] | None) -> dict[str, Any]:
    """The notification of ``event`` (a state change of ``run``), without its ``event_id``.

    The payload's failure fields come from the event data when it carries them (a retry: the run
    itself is not failed, its attempt is), else from the run."""
    facts = data or {}
    payload = {
        "run_id": run.id,
        "owner": run.owner,
        "state": event.to_state,
        "previous_state": previous,
        "failure_kind": facts.get("failure_kind", run.failure_kind),
        "exit_code": facts.get("exit_code", run.exit_code),
        "signal": facts.get("signal", run.signal),
        "attempt_id": event.attempt_id,
        "message": event.message,
        "at": event.at.astimezone(UTC).isoformat(),
    }
    if "not_before" in facts:
        payload["not_before"] = facts["not_before"]
    return payload


def _outbox_values(run_id: str, event: Event, payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "event_id": event.id,
        "kind": OUTBOX_RUN_STATE,
        "payload_json": json.dumps(payload, sort_keys=True),
        "created_at": event.at,
        "attempts": 0,
        "next_attempt_at": event.at,
    }


def _outbox_row(session: Session, run_id: str, event: Event, payload: dict[str, Any]) -> None:
    payload["event_id"] = event.id
    session.add(Outbox(**_outbox_values(run_id, event, payload)))


def _outbox(session: Session, run: Run, event: Event, *, previous: str | None, data: dict[str, Any] | None) -> None:
    """Queue the notification of ``event`` (a state change of ``run``) in the current transaction."""
    payload = _payload(run, event, previous=previous, data=data)
    if event.id is None:
        session.flush()  # assigns event.id
    _outbox_row(session, run.id, event, payload)


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
            events = [self._accepted_event(row, now) for row in rows]
            session.add_all(events)
            session.flush()
            for row, accepted in zip(rows, events, strict=True):
                _outbox(session, row, accepted, previous=None, data=None)
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
        accepted = self._accepted_event(run, now)
        session.add(accepted)
        _outbox(session, run, accepted, previous=None, data=None)
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

    def nonterminal(self, run_ids: Iterable[str]) -> set[str]:
        """The subset of ``run_ids`` not yet terminal, in one query per 500 ids."""
        ids = list(run_ids)
        out: set[str] = set()
        terminal = [s.value for s in RunState if s.terminal]
        with self._session(write=False) as session:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = session.exec(select(Run.id).where(col(Run.id).in_(chunk), col(Run.state).not_in(terminal)))
                out.update(rows)
        return out

    def active_attempt_ids(self, backend: str) -> set[str]:
        """Every active attempt of ``backend``, whichever scheduler owns it."""
        with self._session(write=False) as session:
            rows = session.exec(
                select(Attempt.id).where(
                    Attempt.backend == backend, col(Attempt.state).in_([s.value for s in ACTIVE_ATTEMPT_STATES])
                )
            )
            return set(rows)

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
            stmt = stmt.order_by(col(Run.created_at).desc(), col(Run.id).desc())
            if not labels:
                return [RunInfo.from_row(r) for r in session.exec(stmt.limit(limit))]
            # Labels live in a JSON text column: narrow down in SQL by the exact text each pair has
            # there (json.dumps with sort_keys, as written), then check the pairs on the decoded
            # labels; page on until ``limit`` matched, so no more rows than needed are ever read.
            for key, value in labels.items():
                stmt = stmt.where(col(Run.labels_json).contains(_label_text(key, value), autoescape=True))
            rows: list[RunInfo] = []
            page = max(limit, 50)
            offset = 0
            while len(rows) < limit:
                batch = session.exec(stmt.offset(offset).limit(page)).all()
                for row in batch:
                    found = json.loads(row.labels_json)
                    if all(found.get(k) == v for k, v in labels.items()):
                        rows.append(RunInfo.from_row(row))
                        if len(rows) == limit:
                            break
                if len(batch) < page:
                    break
                offset += page
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
        attempts whose lease ran out in database time; a single-scheduler ledger takes all at start-up.

        Done in chunks, reading columns rather than ORM objects, with one UPDATE and one INSERT of
        the ``adopted`` events per chunk: a scheduler adopting 10,000 attempts at start-up would
        otherwise hold 20,000 ORM objects at once (its peak memory) and flush them row by row."""
        out: list[ClaimedAttempt] = []
        with self._session(write=True) as session:
            now = self.db_now(session)
            lease_until = now + timedelta(seconds=lease_s)
            stmt = select(Attempt.id).where(
                col(Attempt.state).in_([s.value for s in ACTIVE_ATTEMPT_STATES]),
                col(Attempt.backend).in_(list(backends)),
                col(Attempt.scheduler_id).is_distinct_from(scheduler_id),
            )
            if only_expired:
                stmt = stmt.where(col(Attempt.lease_expires_at).is_(None) | (col(Attempt.lease_expires_at) < now))
            # Postgres: lock them first (skipping any another scheduler is adopting right now)
            ids = list(session.exec(self._lock_rows(stmt)).all())
            for chunk in _chunks(ids):
                rows = session.execute(
                    sa_select(
                        col(Attempt.id),
                        col(Attempt.run_id),
                        col(Attempt.number),
                        col(Attempt.fence),
                        col(Attempt.state),
                        col(Attempt.backend),
                        col(Attempt.backend_job_id),
                        col(Attempt.attempt_dir),
                        col(Attempt.scheduler_id),
                        col(Attempt.submitted_at),
                        col(Attempt.created_at),
                        col(Attempt.started_at),
                        col(Run.spec_json),
                        col(Run.cancel_requested),
                    )
                    .join(Run, col(Run.id) == col(Attempt.run_id))
                    .where(col(Attempt.id).in_(chunk))
                ).all()
                session.execute(
                    update(Attempt)
                    .where(col(Attempt.id).in_(chunk))
                    .values(fence=col(Attempt.fence) + 1, scheduler_id=scheduler_id, lease_expires_at=lease_until)
                    .execution_options(synchronize_session=False)
                )
                session.execute(
                    insert(Event),
                    [
                        {
                            "run_id": row.run_id,
                            "attempt_id": row.id,
                            "at": now,
                            "kind": "adopted",
                            "message": f"attempt {row.number} adopted by scheduler {scheduler_id} "
                            f"from {row.scheduler_id}",
                        }
                        for row in rows
                    ],
                )
                out += [
                    ClaimedAttempt(
                        run_id=row.run_id,
                        attempt_id=row.id,
                        number=row.number,
                        fence=row.fence + 1,
                        state=AttemptState(row.state),
                        backend=row.backend,
                        backend_job_id=row.backend_job_id,
                        attempt_dir=row.attempt_dir,
                        spec=claimed_spec(row.spec_json),
                        submitted_at=row.submitted_at,
                        created_at=row.created_at,
                        cancel_requested=row.cancel_requested,
                        started_at=row.started_at,
                    )
                    for row in rows
                ]
        return out

    def claim_queued(
        self,
        scheduler_id: str,
        *,
        backends: Iterable[str],
        limit: int,
        work_root: str,
        lease_s: float,
        kind_limits: Mapping[str, int] | None = None,
        max_per_owner: int | None = None,
    ) -> list[ClaimedAttempt]:
        """Claim up to ``limit`` queued runs and write their new attempts as ``submitting`` (write-ahead).

        Owners are served round-robin, each by its oldest queued runs, so one owner's thousand
        runs do not starve another's two. ``kind_limits`` (``{"training": 2}``) and
        ``max_per_owner`` cap the active attempts of a run kind / of one owner across *every*
        scheduler of the ledger; with a cap, Postgres claims serialise on a transaction-scoped
        advisory lock so two schedulers cannot both take the last slot (SQLite serialises writers
        anyway)."""
        if limit <= 0:
            return []
        now = utcnow()
        out: list[ClaimedAttempt] = []
        backend_names = list(backends)
        caps = dict(kind_limits or {})
        with self._session(write=True) as session:
            if (caps or max_per_owner is not None) and not self.is_sqlite:
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK_KEY})
            kind_active = self._active_counts(session, col(Run.kind), list(caps)) if caps else {}
            owner_active = self._active_counts(session, col(Run.owner), None) if max_per_owner is not None else {}
            runs: list[Run] = []
            tried: set[str] = set()
            for _round in range(CLAIM_ROUNDS):
                want = limit - len(runs)
                if want <= 0:
                    break
                full_kinds = [k for k, cap in caps.items() if kind_active.get(k, 0) >= cap]
                full_owners = (
                    [o for o, n in owner_active.items() if n >= max_per_owner] if max_per_owner is not None else []
                )
                fetch = max(want * 4, 32)
                candidates = self._fair_candidates(
                    session,
                    backend_names,
                    now,
                    want,
                    fetch,
                    tried=tried,
                    full_kinds=full_kinds,
                    full_owners=full_owners,
                )
                if not candidates:
                    break
                tried.update(run_id for run_id, _, _ in candidates)
                kinds, owners = dict(kind_active), dict(owner_active)
                chosen: list[str] = []
                for run_id, owner, kind in candidates:
                    if len(chosen) >= want:
                        break
                    if kind is not None and kind in caps and kinds.get(kind, 0) >= caps[kind]:
                        continue
                    if max_per_owner is not None and owners.get(owner, 0) >= max_per_owner:
                        continue
                    chosen.append(run_id)
                    if kind is not None and kind in caps:
                        kinds[kind] = kinds.get(kind, 0) + 1
                    owners[owner] = owners.get(owner, 0) + 1
                locked = self._lock_queued(session, chosen)
                for run in locked:
                    if run.kind is not None and run.kind in caps:
                        kind_active[run.kind] = kind_active.get(run.kind, 0) + 1
                    owner_active[run.owner] = owner_active.get(run.owner, 0) + 1
                runs += locked
                if len(candidates) < fetch and len(locked) == len(chosen):
                    break  # every eligible run was considered
            previous = self._attempt_counts(session, [run.id for run in runs])
            notices = Notices()
            for run in runs:
                number = previous.get(run.id, 0) + 1
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
                    session,
                    run,
                    RunState.SUBMITTING,
                    at=now,
                    attempt_id=attempt_id,
                    message=f"attempt {number}",
                    notices=notices,
                )
                out.append(self._claimed(attempt, run))
            notices.write(session)
        return out

    @staticmethod
    def _attempt_counts(session: Session, run_ids: list[str]) -> dict[str, int]:
        """How many attempts each run has had (one grouped query per chunk, not one per run)."""
        out: dict[str, int] = {}
        for chunk in _chunks(run_ids):
            rows = session.exec(
                select(Attempt.run_id, func.count()).where(col(Attempt.run_id).in_(chunk)).group_by(col(Attempt.run_id))
            ).all()
            out.update({run_id: int(n) for run_id, n in rows})
        return out

    @staticmethod
    def _load_fenced(session: Session, attempt_ids: Sequence[str]) -> list[Any]:
        """Load these attempts and their runs into the session, in one query per chunk, so that
        the :meth:`_fenced` look-ups of a batch find them without a query each. The caller keeps
        the returned rows while it works: the session's identity map holds objects weakly."""
        loaded: list[Any] = []
        for chunk in _chunks(list(dict.fromkeys(attempt_ids))):
            loaded += session.exec(
                select(Attempt, Run).join(Run, col(Run.id) == col(Attempt.run_id)).where(col(Attempt.id).in_(chunk))
            ).all()
        return loaded

    @staticmethod
    def _active_counts(session: Session, key: Any, values: list[str] | None) -> dict[str, int]:
        """Active attempts (every scheduler, every backend) grouped by a column of their run."""
        stmt = (
            select(key, func.count())
            .select_from(Attempt)
            .join(Run, col(Run.id) == col(Attempt.run_id))
            .where(col(Attempt.state).in_([s.value for s in ACTIVE_ATTEMPT_STATES]))
        )
        if values is not None:
            stmt = stmt.where(key.in_(values))
        rows = session.exec(stmt.group_by(key)).all()
        return {str(value): int(n) for value, n in rows if value is not None}

    @staticmethod
    def _fair_candidates(
        session: Session,
        backends: list[str],
        now: datetime,
        per_owner: int,
        fetch: int,
        *,
        tried: set[str],
        full_kinds: list[str],
        full_owners: list[str],
    ) -> list[tuple[str, str, str | None]]:
        """Due queued runs as (id, owner, kind), interleaved round-robin over owners: every
        owner's oldest run first, then every owner's second oldest, and so on. Unlocked: the
        window function runs in a subquery, because Postgres refuses FOR UPDATE with window
        functions; the chosen ids are locked afterwards by :meth:`_lock_queued`."""
        rank = (
            func.row_number()
            .over(partition_by=col(Run.owner), order_by=(col(Run.created_at), col(Run.id)))
            .label("rank")
        )
        inner = sa_select(col(Run.id), col(Run.owner), col(Run.kind), col(Run.created_at), rank).where(
            col(Run.state) == RunState.QUEUED.value,
            col(Run.cancel_requested).is_(False),
            col(Run.backend).in_(backends),
            (col(Run.not_before).is_(None)) | (col(Run.not_before) <= now),
        )
        if tried:
            inner = inner.where(col(Run.id).not_in(list(tried)))
        if full_kinds:
            inner = inner.where(col(Run.kind).is_(None) | col(Run.kind).not_in(full_kinds))
        if full_owners:
            inner = inner.where(col(Run.owner).not_in(full_owners))
        sub = inner.subquery("queued")
        stmt = (
            sa_select(sub.c.id, sub.c.owner, sub.c.kind)
            .where(sub.c.rank <= per_owner)
            .order_by(sub.c.rank, sub.c.created_at, sub.c.id)
            .limit(fetch)
        )
        return [(str(i), str(o), k) for i, o, k in session.execute(stmt).all()]

    def _lock_queued(self, session: Session, run_ids: list[str]) -> list[Run]:
        """Lock the chosen runs (skipping any another scheduler holds) and return those still
        queued, in the chosen order."""
        if not run_ids:
            return []
        stmt = select(Run).where(
            col(Run.id).in_(run_ids), Run.state == RunState.QUEUED.value, col(Run.cancel_requested).is_(False)
        )
        rows = {run.id: run for run in session.exec(self._lock_rows(stmt)).all()}
        return [rows[i] for i in run_ids if i in rows]

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
            spec=claimed_spec(run.spec_json),
            submitted_at=attempt.submitted_at,
            created_at=attempt.created_at,
            cancel_requested=run.cancel_requested,
            started_at=attempt.started_at,
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
        """The subset of ``run_ids`` whose owners asked for cancellation (runs that already ended
        are left out: there is nothing left to cancel).

        The scheduler asks this every cycle about every active run. Rather than an IN list of
        that many ids (10,000 parameters at scale, over SQLite's limit past 32,766), it reads the
        unfinished runs that carry the flag, a handful, through ``ix_hpcc_run_cancel_requested_state``."""
        ids = set(run_ids)
        if not ids:
            return set()
        unfinished = [s.value for s in RunState if not s.terminal]
        with self._session(write=False) as session:
            rows = session.exec(
                select(Run.id).where(col(Run.cancel_requested).is_(True), col(Run.state).in_(unfinished))
            )
            return {run_id for run_id in rows if run_id in ids}

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

    def mark_submitted_many(self, handles: Sequence[tuple[str, int, str]]) -> list[str]:
        """Many ``mark_submitted`` in one transaction: (attempt id, fence, backend job id) each.
        Returns the attempt ids whose fence was stale (nothing was written for those)."""
        if not handles:
            return []
        now = utcnow()
        stale: list[str] = []
        with self._session(write=True) as session:
            loaded = self._load_fenced(session, [attempt_id for attempt_id, _, _ in handles])
            notices = Notices()
            for attempt_id, fence, backend_job_id in handles:
                try:
                    attempt, run = self._fenced(session, attempt_id, fence)
                except FencedOut:
                    stale.append(attempt_id)
                    continue
                if attempt.state != AttemptState.SUBMITTING.value:
                    continue
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
                    message=f"submitted as {backend_job_id}",
                    data={"backend_job_id": backend_job_id},
                    notices=notices,
                )
            notices.write(session)
            del loaded
        return stale

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

    def defer_attempt(self, attempt_id: str, fence: int, reason: str, *, base_s: float) -> None:
        """The backend is full for now (a quota): tombstone the attempt, requeue the run after a
        delay that doubles with each deferral (at most 10 minutes), without burning a retry."""
        now = utcnow()
        with self._session(write=True) as session:
            attempt, run = self._fenced(session, attempt_id, fence)
            deferred = session.exec(
                select(func.count())
                .select_from(Attempt)
                .where(Attempt.run_id == run.id, Attempt.state == AttemptState.NOT_SUBMITTED.value)
            ).one()
            delay = min(600.0, base_s * (2 ** min(int(deferred), 10)))
            attempt.state = AttemptState.NOT_SUBMITTED.value
            attempt.finished_at = now
            attempt.message = f"deferred: {reason}"
            run.attempts = max(0, run.attempts - 1)
            if run.cancel_requested:
                transition(session, run, RunState.CANCELLED, at=now, attempt_id=attempt_id, message="cancelled")
                return
            run.not_before = now + timedelta(seconds=delay)
            transition(
                session,
                run,
                RunState.QUEUED,
                at=now,
                attempt_id=attempt_id,
                message=f"deferred for {delay:.0f}s: {reason}"[:2000],
                data={"deferred_s": delay, "not_before": run.not_before.isoformat()},
            )

    def record_observations(self, observed: Sequence[Observed]) -> list[str]:
        """Apply many poll results in one transaction; return the attempt ids whose fence was stale."""
        if not observed:
            return []
        now = utcnow()
        stale: list[str] = []
        with self._session(write=True) as session:
            loaded = self._load_fenced(session, [item.attempt_id for item in observed])
            notices = Notices()
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
                    transition(session, run, RunState.RUNNING, at=now, attempt_id=attempt.id, notices=notices)
                    run.pending_reason = None
                elif item.state == AttemptState.PENDING and item.reason != run.pending_reason:
                    run.pending_reason = (item.reason or "")[:256] or None
                    run.updated_at = now
            notices.write(session)
            del loaded
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
            data: dict[str, Any] = {"exit_code": result.exit_code, "signal": result.signal}
            if target == RunState.QUEUED:
                delay = spec.retry.backoff * (2 ** max(0, run.attempts - 1))
                run.not_before = now + timedelta(seconds=delay)
                kind = result.failure_kind.value if result.failure_kind else "unknown"
                data.update(
                    failure_kind=kind,
                    not_before=run.not_before.isoformat(),
                    retry_in_s=delay,
                    attempt=attempt.number,
                    next_attempt=attempt.number + 1,
                    max_attempts=run.max_attempts,
                )
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

    # -- the outbox (notifications) -----------------------------------------------------------

    def claim_outbox(self, *, limit: int, lease_s: float, max_attempts: int) -> list[OutboxItem]:
        """Take up to ``limit`` due, undelivered notifications (oldest first) that have not used up
        ``max_attempts``, and push their ``next_attempt_at`` ``lease_s`` ahead so that no other
        notifier takes them while this one delivers (if it dies, they are due again after the
        lease). Postgres: ``FOR UPDATE SKIP LOCKED``; the transaction is short, delivery happens
        outside it."""
        if limit <= 0:
            return []
        with self._session(write=True) as session:
            now = self.db_now(session)
            stmt = (
                select(Outbox)
                .where(
                    col(Outbox.delivered_at).is_(None),
                    col(Outbox.next_attempt_at) <= now,
                    col(Outbox.attempts) < max_attempts,
                )
                .order_by(col(Outbox.id))
                .limit(limit)
            )
            rows = session.exec(self._lock_rows(stmt)).all()
            out = [
                OutboxItem(
                    id=row.id or 0,
                    run_id=row.run_id,
                    kind=row.kind,
                    payload=json.loads(row.payload_json),
                    attempts=row.attempts,
                    delivered_targets=frozenset(_parse_targets(row.delivered_targets)),
                    created_at=row.created_at,
                )
                for row in rows
            ]
            if out:  # the lease: one UPDATE for the batch, not one per row
                session.execute(
                    update(Outbox)
                    .where(col(Outbox.id).in_([item.id for item in out]))
                    .values(next_attempt_at=now + timedelta(seconds=lease_s))
                    .execution_options(synchronize_session=False)
                )
            return out

    def record_deliveries(self, results: Sequence[DeliveryResult]) -> None:
        """Record a batch of delivery tries in one transaction. A row that failed is due again after
        its ``retry_in_s``; one that ``gave_up`` keeps its ``last_error`` and gets a
        ``notify_failed`` event on its run, so the loss is visible."""
        if not results:
            return
        with self._session(write=True) as session:
            now = self.db_now(session)
            loaded: list[Outbox] = []  # held while we work: the identity map holds rows weakly
            for chunk in _chunks(list({item.outbox_id for item in results})):
                loaded += session.exec(select(Outbox).where(col(Outbox.id).in_(chunk))).all()  # one query, not per row
            delivered: dict[str | None, list[int]] = {}  # the common case, by delivered_targets: one UPDATE each
            for item in results:
                row = session.get(Outbox, item.outbox_id)
                if row is None or row.delivered_at is not None:
                    continue
                if item.delivered and not item.error:
                    targets = ",".join(str(i) for i in sorted(item.delivered_targets)) or None
                    delivered.setdefault(targets, []).append(item.outbox_id)
                    continue
                row.attempts += 1
                row.delivered_targets = ",".join(str(i) for i in sorted(item.delivered_targets)) or None
                row.last_error = item.error[:4000] if item.error else None
                if item.delivered:
                    row.delivered_at = now
                    continue
                row.next_attempt_at = now + timedelta(seconds=max(0.0, item.retry_in_s))
                if item.gave_up:
                    _event(
                        session,
                        row.run_id,
                        "notify_failed",
                        now,
                        message=f"notification {row.id} given up after {row.attempts} attempts: {row.last_error}",
                        data={"outbox_id": row.id, "attempts": row.attempts, "event_id": row.event_id},
                    )
            for targets, ids in delivered.items():
                for chunk in _chunks(ids):
                    session.execute(
                        update(Outbox)
                        .where(col(Outbox.id).in_(chunk), col(Outbox.delivered_at).is_(None))
                        .values(
                            attempts=col(Outbox.attempts) + 1,
                            delivered_targets=targets,
                            last_error=None,
                            delivered_at=now,
                        )
                        .execution_options(synchronize_session=False)
                    )
            del loaded

    def prune_outbox(self, *, older_than_s: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` rows delivered more than ``older_than_s`` ago (undelivered rows,
        including given-up ones, are kept)."""
        with self._session(write=True) as session:
            cutoff = self.db_now(session) - timedelta(seconds=older_than_s)
            ids = session.exec(
                select(Outbox.id)
                .where(col(Outbox.delivered_at).is_not(None), col(Outbox.delivered_at) < cutoff)
                .limit(limit)
            ).all()
            if ids:
                session.execute(delete(Outbox).where(col(Outbox.id).in_(list(ids))))
            return len(ids)

    def outbox(self, run_id: str | None = None, *, undelivered: bool = False) -> list[OutboxInfo]:
        """Notification rows (oldest first), for ``doctor``, admins and tests."""
        with self._session(write=False) as session:
            stmt = select(Outbox)
            if run_id is not None:
                stmt = stmt.where(Outbox.run_id == run_id)
            if undelivered:
                stmt = stmt.where(col(Outbox.delivered_at).is_(None))
            rows = session.exec(stmt.order_by(col(Outbox.id))).all()
            return [
                OutboxInfo(
                    id=row.id or 0,
                    run_id=row.run_id,
                    event_id=row.event_id,
                    kind=row.kind,
                    payload=json.loads(row.payload_json),
                    created_at=row.created_at,
                    attempts=row.attempts,
                    next_attempt_at=row.next_attempt_at,
                    delivered_at=row.delivered_at,
                    delivered_targets=frozenset(_parse_targets(row.delivered_targets)),
                    last_error=row.last_error,
                )
                for row in rows
            ]

    # -- introspection (doctor, tests) --------------------------------------------------------

    def table_names(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    def count_runs(self) -> dict[str, int]:
        with self._session(write=False) as session:
            rows = session.exec(select(Run.state, func.count()).group_by(Run.state)).all()
            return {state: n for state, n in rows}
