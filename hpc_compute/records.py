"""Typed, read-only views of the ledger returned by the Python API and printed by the CLI."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from hpc_compute.ledger.models import Artifact, Attempt, Event, Run
from hpc_compute.ledger.states import RunState
from hpc_compute.spec import FailureKind, JobSpec


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class RunInfo(_View):
    id: str
    name: str | None
    owner: str
    kind: str | None
    state: RunState
    failure_kind: FailureKind | None
    failure_message: str | None
    exit_code: int | None
    signal: int | None
    backend: str
    backend_job_id: str | None
    pending_reason: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: JobSpec

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @classmethod
    def from_row(cls, row: Run) -> RunInfo:
        return cls(
            id=row.id,
            name=row.name,
            owner=row.owner,
            kind=row.kind,
            state=RunState(row.state),
            failure_kind=FailureKind(row.failure_kind) if row.failure_kind else None,
            failure_message=row.failure_message,
            exit_code=row.exit_code,
            signal=row.signal,
            backend=row.backend,
            backend_job_id=row.backend_job_id,
            pending_reason=row.pending_reason,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            cancel_requested=row.cancel_requested,
            labels=json.loads(row.labels_json),
            created_at=row.created_at,
            updated_at=row.updated_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            spec=JobSpec.model_validate_json(row.spec_json),
        )

    def summary(self) -> dict[str, Any]:
        """The fields ``status --json`` prints."""
        data = self.model_dump(mode="json", exclude={"spec"})
        data["command"] = list(self.spec.command)
        data["image"] = self.spec.image
        return data


class AttemptInfo(_View):
    id: str
    run_id: str
    number: int
    backend: str
    state: str
    backend_job_id: str | None
    attempt_dir: str
    fence: int
    created_at: datetime
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    signal: int | None
    failure_kind: FailureKind | None
    message: str | None

    @classmethod
    def from_row(cls, row: Attempt) -> AttemptInfo:
        return cls(
            id=row.id,
            run_id=row.run_id,
            number=row.number,
            backend=row.backend,
            state=row.state,
            backend_job_id=row.backend_job_id,
            attempt_dir=row.attempt_dir,
            fence=row.fence,
            created_at=row.created_at,
            submitted_at=row.submitted_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            exit_code=row.exit_code,
            signal=row.signal,
            failure_kind=FailureKind(row.failure_kind) if row.failure_kind else None,
            message=row.message,
        )


class EventInfo(_View):
    id: int
    run_id: str
    attempt_id: str | None
    at: datetime
    kind: str
    from_state: str | None
    to_state: str | None
    message: str | None
    data: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: Event) -> EventInfo:
        return cls(
            id=row.id or 0,
            run_id=row.run_id,
            attempt_id=row.attempt_id,
            at=row.at,
            kind=row.kind,
            from_state=row.from_state,
            to_state=row.to_state,
            message=row.message,
            data=json.loads(row.data_json) if row.data_json else None,
        )


class ArtifactInfo(_View):
    path: str
    size: int
    sha256: str
    attempt_id: str

    @classmethod
    def from_row(cls, row: Artifact) -> ArtifactInfo:
        return cls(path=row.path, size=row.size, sha256=row.sha256, attempt_id=row.attempt_id)
