"""The backend contract: *where* a run executes, and how it is submitted, polled, cancelled, harvested.

A backend never writes the ledger. The engine calls it with :class:`Ticket` objects and turns its
answers into fenced ledger transitions. Two rules every backend keeps:

* ``poll`` answers for all tickets in one batched call; an answer it could not get is
  ``ObservationKind.UNKNOWN``, never a terminal state.
* ``find`` (reconciliation) says ``ABSENT`` only when every query it needed succeeded.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from hpc_compute.errors import BackendUnavailable
from hpc_compute.harvest import HarvestLimits, HarvestReport
from hpc_compute.spec import FailureKind, JobSpec

log = logging.getLogger("hpc_compute.backends")


@dataclass(frozen=True)
class Ticket:
    """One attempt as a backend sees it."""

    run_id: str
    attempt_id: str
    number: int
    spec: JobSpec
    attempt_dir: Path
    backend_job_id: str | None = None
    submitted_at: float | None = None
    cancel_requested: bool = False

    @property
    def tag(self) -> str:
        """The name every backend resource of this attempt carries (``hpcc-<attempt uuid>``)."""
        return f"hpcc-{self.attempt_id}"


class ObservationKind(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Observation:
    """What a poll saw for one attempt. ``reason`` is the pending reason or the backend's state text."""

    kind: ObservationKind
    reason: str | None = None
    backend_state: str | None = None


class FindKind(StrEnum):
    FOUND = "found"
    ABSENT = "absent"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class FindResult:
    kind: FindKind
    backend_job_id: str | None = None
    extras_cancelled: tuple[str, ...] = ()
    detail: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How a finished attempt ended, as established from the wrapper's result and the backend's record."""

    exit_code: int | None
    signal: int | None
    failure_kind: FailureKind | None
    message: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    peak_rss_kb: int | None = None
    cancelled: bool = False
    harvest: HarvestReport | None = None
    backend_record: dict[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.failure_kind is None and not self.cancelled and self.exit_code == 0


class SubmitError(Exception):
    """A failed submission. ``definite``: the backend surely created nothing (otherwise the
    engine reconciles by tag). ``retryable``: a new attempt could succeed (False for a request
    the site can never satisfy, such as more GPUs than any node has). ``defer_s``: the backend
    is temporarily full (a quota): requeue the run after about this long without counting the
    attempt against its retry limit."""

    def __init__(self, message: str, *, definite: bool, retryable: bool = True, defer_s: float | None = None) -> None:
        super().__init__(message)
        self.definite = definite
        self.retryable = retryable
        self.defer_s = defer_s


class Backend(abc.ABC):
    name: str = "abstract"
    #: attempts this scheduler keeps in flight on this backend at most (the engine claims no more)
    max_in_flight: int = 100
    #: set by the engine: the ids of every active attempt of this backend in the ledger, whichever
    #: scheduler owns them (a sweeper must not take another scheduler's live resources for orphans)
    ledger_active_attempts: Callable[[], set[str]] | None = None
    #: submissions the engine may have in flight at once (submit() must be thread-safe when > 1)
    submit_concurrency: int = 1
    #: seconds a submitting attempt must be absent from every query before it counts as not submitted
    reconcile_grace_s: float = 30.0

    #: batches of at least this many alike attempts go as one array submission (0: never)
    array_min: int = 0
    #: the largest array one submission makes
    array_max: int = 1000

    def check(self, spec: JobSpec) -> None:  # noqa: B027 - optional hook
        """Raise SpecError if this backend cannot run ``spec`` (e.g. more GPUs than the site has)."""

    def array_key(self, ticket: Ticket) -> Hashable | None:
        """Attempts with the same key may share one array submission (None: this one may not)."""
        return None

    def submit_array(self, tickets: list[Ticket]) -> list[str | Exception]:
        """Submit alike attempts together; one job id or error per ticket, in order. Each attempt
        keeps its own directory, spec, exit code and artifacts."""
        out: list[str | Exception] = []
        for ticket in tickets:
            try:
                out.append(self.submit(ticket))
            except Exception as exc:  # judged per attempt by the engine
                out.append(exc)
        return out

    @abc.abstractmethod
    def submit(self, ticket: Ticket) -> str:
        """Stage and start the attempt; return the backend job id. Raise SubmitError on failure."""

    @abc.abstractmethod
    def poll(self, tickets: list[Ticket]) -> dict[str, Observation]:
        """One batched status query for every ticket, keyed by attempt id."""

    @abc.abstractmethod
    def find(self, tickets: list[Ticket]) -> dict[str, FindResult]:
        """Look attempts up by their tag after a crash between submit and the ledger commit."""

    @abc.abstractmethod
    def cancel(self, ticket: Ticket) -> None:
        """Ask the backend to stop the attempt; the next poll confirms it."""

    @abc.abstractmethod
    def collect(self, ticket: Ticket, artifact_dir: Path, limits: HarvestLimits) -> Outcome:
        """Read the wrapper's result and the backend's record, harvest outputs into ``artifact_dir``."""

    def confirm(self, ticket: Ticket) -> None:  # noqa: B027 - optional hook
        """Let the job start, now that its handle (``ticket.backend_job_id``) is committed under
        the attempt's fence. Called after every successful ``mark_submitted`` (and again for an
        adopted pending attempt, whose previous owner may have died before confirming). Must be
        idempotent; raise BackendUnavailable when the backend cannot be reached (the engine calls
        again next cycle). Backends that start jobs at submit time do nothing (the default).

        The Slurm backend in strict mode submits with ``sbatch --hold`` and releases the hold here,
        so a job created by a scheduler that lost its lease never runs."""

    def confirm_many(self, tickets: list[Ticket]) -> set[str]:
        """Confirm many at once (one call per cycle); return the attempt ids confirmed. The
        default confirms one by one; a backend with a batched call (``scontrol release a,b,c``)
        overrides it. A ticket left out is retried next cycle."""
        done: set[str] = set()
        for ticket in tickets:
            try:
                self.confirm(ticket)
            except BackendUnavailable as exc:  # the engine retries next cycle
                log.warning("confirm of %s failed, will retry: %s", ticket.attempt_id, exc)
                continue
            done.add(ticket.attempt_id)
        return done

    def abandon(self, ticket: Ticket) -> None:  # noqa: B027 - optional hook
        """Withdraw a job this scheduler created but could not commit (its fenced ``mark_submitted``
        raised FencedOut, and the attempt's new owner gave the attempt up or holds another job):
        cancel it and keep watching its tag. Raise BackendUnavailable if that failed. The default
        does nothing (backends without a hold-then-start step cannot withdraw safely)."""

    def sweep_abandoned(self) -> None:  # noqa: B027 - optional hook
        """Periodic, cheap housekeeping called once per engine cycle: e.g. cancel jobs that carry
        the tag of an attempt proved absent (tombstoned) and appeared after all. Rate-limit the
        backend queries inside; raise BackendUnavailable when a query failed."""

    def cleanup(self, ticket: Ticket) -> None:  # noqa: B027 - optional hook
        """Release what the attempt held (VMs, remote dirs). Called once after collect."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
