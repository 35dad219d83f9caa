"""The ledger's tables (SQLModel). Migrations in ``alembic/`` must match these exactly; a test
autogenerates against a migrated database and expects no difference.

Times are aware UTC ``datetime`` values (sqlmodel's UTCDateTime; SQLite stores them as UTC text).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, MetaData, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(SQLModel, table=True):
    __tablename__ = "hpcc_run"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_hpcc_run_owner_idempotency_key"),
        Index("ix_hpcc_run_state_not_before", "state", "not_before"),
        Index("ix_hpcc_run_owner_created_at", "owner", "created_at"),
        # `list --state X`: an owner's runs in one state, newest first, without walking the history
        Index("ix_hpcc_run_owner_state_created_at", "owner", "state", "created_at"),
        # the scheduler's cancellation check every cycle: the few unfinished runs with the flag set
        Index("ix_hpcc_run_cancel_requested_state", "cancel_requested", "state"),
    )

    id: str = Field(primary_key=True, max_length=36)
    owner: str = Field(max_length=128)
    name: str | None = Field(default=None, max_length=128)
    kind: str | None = Field(default=None, max_length=128)
    backend: str = Field(max_length=32)
    state: str = Field(max_length=16)
    failure_kind: str | None = Field(default=None, max_length=32)
    failure_message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    exit_code: int | None = None
    signal: int | None = None
    spec_json: str = Field(sa_column=Column(Text, nullable=False))
    spec_digest: str = Field(max_length=64)
    labels_json: str = Field(sa_column=Column(Text, nullable=False))
    idempotency_key: str | None = Field(default=None, max_length=256)
    attempts: int = 0
    max_attempts: int = 1
    cancel_requested: bool = False
    pending_reason: str | None = Field(default=None, max_length=256)
    backend_job_id: str | None = Field(default=None, max_length=128)
    not_before: datetime | None = None
    created_at: datetime
    updated_at: datetime = Field(index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Attempt(SQLModel, table=True):
    __tablename__ = "hpcc_attempt"
    __table_args__ = (
        UniqueConstraint("run_id", "number", name="uq_hpcc_attempt_run_id_number"),
        Index("ix_hpcc_attempt_state_backend", "state", "backend"),
    )

    id: str = Field(primary_key=True, max_length=36)
    run_id: str = Field(foreign_key="hpcc_run.id", index=True, max_length=36)
    number: int
    backend: str = Field(max_length=32)
    state: str = Field(max_length=16)
    backend_job_id: str | None = Field(default=None, max_length=128)
    attempt_dir: str = Field(sa_column=Column(Text, nullable=False))
    fence: int = 1
    scheduler_id: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = None
    created_at: datetime
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    signal: int | None = None
    failure_kind: str | None = Field(default=None, max_length=32)
    message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    outcome_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class Event(SQLModel, table=True):
    """Append-only history: every transition and every notable fact (refused artifacts, poll errors)."""

    __tablename__ = "hpcc_event"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="hpcc_run.id", index=True, max_length=36)
    attempt_id: str | None = Field(default=None, max_length=36)
    at: datetime
    kind: str = Field(max_length=32)
    from_state: str | None = Field(default=None, max_length=16)
    to_state: str | None = Field(default=None, max_length=16)
    message: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    data_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class Artifact(SQLModel, table=True):
    __tablename__ = "hpcc_artifact"
    __table_args__ = (UniqueConstraint("attempt_id", "path", name="uq_hpcc_artifact_attempt_id_path"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="hpcc_run.id", index=True, max_length=36)
    attempt_id: str = Field(foreign_key="hpcc_attempt.id", max_length=36)
    path: str = Field(sa_column=Column(Text, nullable=False))
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    sha256: str = Field(max_length=64)
    created_at: datetime


class Scheduler(SQLModel, table=True):
    """A scheduler process serving the ledger, with its heartbeat."""

    __tablename__ = "hpcc_scheduler"

    id: str = Field(primary_key=True, max_length=64)
    hostname: str = Field(max_length=255)
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None = None


class Outbox(SQLModel, table=True):
    """Transactional outbox: one row per run state change, written in the transaction that made
    the change (:func:`hpc_compute.ledger.store.transition`); :mod:`hpc_compute.notify` delivers it.

    ``delivered_targets`` lists the target indexes already served (a retry only repeats the others);
    ``delivered_at`` is set once every target took it. A row whose ``attempts`` reached the
    configured maximum stays with ``delivered_at`` NULL and its ``last_error``: given up, not dropped.
    """

    __tablename__ = "hpcc_outbox"
    __table_args__ = (
        Index("ix_hpcc_outbox_delivered_at_next_attempt_at", "delivered_at", "next_attempt_at"),
        # the notifier's claim (undelivered, oldest first) every cycle: only the undelivered rows,
        # in id order; without it Postgres may walk the primary key through every delivered row
        Index(
            "ix_hpcc_outbox_undelivered_id",
            "id",
            sqlite_where=text("delivered_at IS NULL"),
            postgresql_where=text("delivered_at IS NULL"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="hpcc_run.id", index=True, max_length=36)
    event_id: int | None = Field(default=None, foreign_key="hpcc_event.id")
    kind: str = Field(max_length=32)
    payload_json: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime
    attempts: int = 0
    next_attempt_at: datetime
    delivered_at: datetime | None = None
    delivered_targets: str | None = Field(default=None, max_length=256)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
