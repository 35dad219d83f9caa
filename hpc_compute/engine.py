"""The scheduler engine: claim -> submit -> poll -> harvest -> finish, one cycle at a time.

Crash safety comes from the order of writes:

1. the attempt is committed as ``submitting`` before anything leaves the process;
2. the backend handle is committed right after the backend accepted the attempt;
3. an attempt found ``submitting`` without a handle (after a crash, or an ambiguous submit
   error) is *reconciled*: looked up by its tag; adopted if found; tombstoned and requeued only
   when the backend proved it absent after a grace period; left alone while the answer is unknown.

A failed status query never moves a run: the engine logs it, backs off and polls again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import IO, TypeVar

from hpc_compute.backends.base import Backend, FindKind, ObservationKind, Outcome, SubmitError, Ticket
from hpc_compute.config import Settings
from hpc_compute.errors import BackendUnavailable, FencedOut, LedgerUnavailable, SchedulerLocked
from hpc_compute.leases import LeaseKeeper
from hpc_compute.ledger.states import AttemptState
from hpc_compute.ledger.store import AttemptResult, ClaimedAttempt, Ledger, Observed
from hpc_compute.notify import Notifier
from hpc_compute.spec import FailureKind

log = logging.getLogger("hpc_compute.engine")
_T = TypeVar("_T")

CRASH_ENV = "HPCC_TEST_CRASH_AT"
PAUSE_ENV = "HPCC_TEST_PAUSE_AT"
PAUSE_POINTS = ("before_sbatch",)
TIMEOUT_CANCEL_RESEND_S = 30.0  # a time-limit cancel the backend has not acted on is sent again after this
CRASH_POINTS = ("after_claim", "after_submit", "before_mark_submitted", "after_collect", "before_finish")


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: ``HPCC_TEST_CRASH_AT=after_submit`` kills the process there."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s reached: exiting hard", name)
        os._exit(137)


def pause_point(name: str) -> None:
    """Fault injection for the lease tests: ``HPCC_TEST_PAUSE_AT=before_sbatch`` makes the process
    SIGSTOP itself there (once), as a long GC pause or a frozen VM would; SIGCONT resumes it."""
    if os.environ.get(PAUSE_ENV) == name:
        os.environ.pop(PAUSE_ENV, None)  # once: a resumed scheduler carries on normally
        log.warning("pause point %s reached: stopping (SIGSTOP) until SIGCONT", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        log.warning("pause point %s: resumed", name)


def default_backends(settings: Settings) -> dict[str, Backend]:
    """The backends this installation is configured for: ``local`` always; ``slurm`` and
    ``opennebula`` when their config section (``[slurm]``, ``[opennebula]``) is present."""
    from hpc_compute.backends.local import LocalBackend

    backends: dict[str, Backend] = {"local": LocalBackend(settings)}
    if settings.slurm:
        from hpc_compute.backends.slurm import make_backend as make_slurm

        backends["slurm"] = make_slurm(settings)
    if settings.opennebula:
        from hpc_compute.backends.opennebula import make_backend as make_opennebula

        backends["opennebula"] = make_opennebula(settings)
    return backends


def _ts(value: float | None) -> datetime | None:
    from datetime import UTC

    return datetime.fromtimestamp(value, UTC) if value is not None else None


@dataclass
class _Tracked:
    claimed: ClaimedAttempt
    backend_job_id: str | None
    submitted_at: float | None
    cancel_sent: bool = False
    needs_submit: bool = False  # claimed, never handed to the backend yet (held while it is unreachable)
    needs_reconcile: bool = False
    needs_confirm: bool = False  # the handle is committed; the backend still has to start it (strict submit)
    errors: int = 0
    last_state: AttemptState = AttemptState.SUBMITTING
    reason: str | None = None
    first_seen: float = field(default_factory=time.time)
    tracked_at: float = field(default_factory=time.monotonic)  # to read lease renewals begun before it
    pending_since: float | None = None  # the backend accepted it (wall clock)
    running_since: float | None = None
    timeout_reason: str | None = None  # set when the scheduler's time backstop fired
    timeout_at: float | None = None
    timeout_retryable: bool = True
    timeout_cancel_sent: bool = False
    timeout_cancel_at: float | None = None


class SchedulerLock:
    """One scheduler per SQLite ledger: an flock next to the database (released if we die)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise SchedulerLocked(
                f"a scheduler ({holder}) already serves this SQLite ledger; SQLite allows one at a time "
                "(stop it, or use a Postgres ledger for several)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._handle = handle

    def try_acquire(self) -> bool:
        try:
            self.acquire()
        except SchedulerLocked:
            return False
        return True

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class Engine:
    """One scheduler process's worth of work against one ledger."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        backends: dict[str, Backend] | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.backends = backends if backends is not None else default_backends(settings)
        for name, backend in self.backends.items():
            backend.ledger_active_attempts = lambda n=name: self.ledger.active_attempt_ids(n)
        self.scheduler_id = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tracked: dict[str, _Tracked] = {}
        self.notifier = Notifier(settings, ledger)
        self._lock: SchedulerLock | None = None
        self._last_adoption = 0.0
        self._submit_pool: ThreadPoolExecutor | None = None
        self.leases = LeaseKeeper(
            ledger,
            self.scheduler_id,
            lease_s=settings.scheduler.lease_seconds,
            stall_s=settings.scheduler.stall_seconds,
        )
        self._stop = threading.Event()
        self._started = False
        self.cycles = 0

    # -- life cycle ---------------------------------------------------------------------------

    def lock_path(self) -> Path:
        return self.settings.home / "scheduler.lock"

    def start(self) -> None:
        if self.ledger.is_sqlite:
            lock = SchedulerLock(self.lock_path())
            lock.acquire()
            self._lock = lock
        try:
            lease = self.settings.scheduler.lease_seconds
            self.ledger.register_scheduler(self.scheduler_id, os.getpid(), lease_s=lease)
            shared = not self.ledger.is_sqlite
            self._track_adopted(self.ledger.adopt_active(self.scheduler_id, self.backends, lease, only_expired=shared))
        except Exception:
            self._release_lock()
            raise
        self._started = True
        self._last_adoption = time.monotonic()
        self.leases.progress()
        self.leases.start()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.leases.stop()
        if self._submit_pool is not None:
            self._submit_pool.shutdown(wait=True)
            self._submit_pool = None
        if self._started:
            try:
                self.ledger.unregister_scheduler(self.scheduler_id)
            except Exception:  # pragma: no cover - best effort at exit
                log.exception("could not unregister scheduler")
        for backend in self.backends.values():
            backend.close()
        self._release_lock()
        self._started = False

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- the cycle ----------------------------------------------------------------------------

    def _ticket(self, tracked: _Tracked) -> Ticket:
        claimed = tracked.claimed
        return Ticket(
            run_id=claimed.run_id,
            attempt_id=claimed.attempt_id,
            number=claimed.number,
            spec=claimed.spec,
            attempt_dir=Path(claimed.attempt_dir),
            backend_job_id=tracked.backend_job_id,
            submitted_at=tracked.submitted_at,
            cancel_requested=claimed.cancel_requested,
        )

    def cycle(self) -> int:
        """One pass over everything; returns how many attempts changed (to pace the polling)."""
        self.cycles += 1
        self.leases.progress()
        self._heartbeat()
        changed = self._claim_and_submit()
        changed += self._reconcile()
        self._confirm_committed()
        changed += self._apply_cancellations()
        changed += self._poll()
        changed += self._enforce_time_limits()
        self._sweep()
        self._notify()
        self.leases.progress()
        return changed

    def _sweep(self) -> None:
        """Let each backend withdraw leftovers of attempts given up (tombstoned tags that appeared)."""
        for name, backend in self.backends.items():
            try:
                backend.sweep_abandoned()
            except BackendUnavailable as exc:
                log.warning("sweep of %s failed, will retry: %s", name, exc)

    def _notify(self) -> None:
        """Deliver a batch of the outbox. Never fails the cycle: undelivered rows stay due."""
        try:
            self.notifier.run_once()
        except LedgerUnavailable as exc:
            log.warning("notifications not delivered this cycle (ledger unavailable): %s", exc)
        except Exception:
            log.exception("notification delivery failed; retrying next cycle")

    def _safe_cycle(self) -> int:
        """A cycle that never kills the daemon: a ledger outage or a bug in one step is logged and
        the next cycle tries again (nothing is marked terminal for it)."""
        try:
            return self.cycle()
        except LedgerUnavailable as exc:
            log.warning("ledger unavailable, retrying next cycle: %s", exc)
        except Exception:
            log.exception("scheduler cycle failed; retrying next cycle")
        self._stop.wait(min(5.0, self.settings.effective_poll_interval))
        return 0

    def _heartbeat(self) -> None:
        """Apply the lease keeper's newest renewal (it renews on its own thread, so a cycle blocked
        on a slow backend keeps its leases): drop attempts another scheduler took over. On a
        shared ledger, every third of a lease, take over attempts whose owner's lease expired
        (they are then polled or, without a backend handle, reconciled: never blindly resubmitted)."""
        self.leases.renew_inline_if_due()
        renewal = self.leases.take()
        if renewal is not None:
            for attempt_id, tracked in list(self.tracked.items()):
                # an attempt claimed after the renewal's query began may not be in its answer yet
                if attempt_id not in renewal.owned and tracked.tracked_at < renewal.started:
                    log.warning("attempt %s is no longer ours (lease lost): dropping it", attempt_id)
                    self._forget(attempt_id)
        now = time.monotonic()
        lease = self.settings.scheduler.lease_seconds
        if self.ledger.is_sqlite or now - self._last_adoption < lease / 3:
            return
        self._last_adoption = now
        self._track_adopted(self.ledger.adopt_active(self.scheduler_id, self.backends, lease, only_expired=True))

    def _track_adopted(self, adopted: list[ClaimedAttempt]) -> None:
        for claimed in adopted:
            self.tracked[claimed.attempt_id] = _Tracked(
                claimed=claimed,
                backend_job_id=claimed.backend_job_id,
                submitted_at=(claimed.submitted_at or claimed.created_at).timestamp(),
                needs_reconcile=claimed.backend_job_id is None,
                # the previous owner may have died between committing the handle and confirming it
                needs_confirm=claimed.backend_job_id is not None and claimed.state == AttemptState.PENDING,
                last_state=claimed.state,
                pending_since=claimed.submitted_at.timestamp() if claimed.submitted_at else None,
                running_since=claimed.started_at.timestamp() if claimed.started_at else None,
            )
            log.info("adopted attempt %s of run %s (%s)", claimed.attempt_id, claimed.run_id, claimed.state)

    def _claim_and_submit(self) -> int:
        """Claim queued runs for each backend up to its in-flight cap, then submit them (with up
        to the backend's ``submit_concurrency`` submissions in flight at once)."""
        in_flight: dict[str, int] = {}
        for tracked in self.tracked.values():
            in_flight[tracked.claimed.backend] = in_flight.get(tracked.claimed.backend, 0) + 1
        held = [t for t in self.tracked.values() if t.needs_submit]
        holding = {t.claimed.backend for t in held}
        if held:  # a held run may have been cancelled meanwhile: then it is never submitted
            flagged = self.ledger.cancel_flags({t.claimed.run_id for t in held})
            for tracked in held:
                if tracked.claimed.run_id in flagged:
                    tracked.claimed = replace(tracked.claimed, cancel_requested=True)
        claimed: list[ClaimedAttempt] = []
        scheduler = self.settings.scheduler
        for name, backend in self.backends.items():
            # a backend that builds job arrays claims up to a whole array per cycle: a 500-run
            # sweep then goes as one sbatch instead of one array per submit_batch each cycle
            batch = max(scheduler.submit_batch, backend.array_max) if backend.array_min > 0 else scheduler.submit_batch
            limit = min(backend.max_in_flight - in_flight.get(name, 0), batch)
            if limit <= 0 or name in holding:
                continue  # a backend with held submissions gets those through first
            claimed += self.ledger.claim_queued(
                self.scheduler_id,
                backends=[name],
                limit=limit,
                work_root=str(self.settings.work_root),
                lease_s=scheduler.lease_seconds,
                kind_limits=scheduler.kind_limits,
                max_per_owner=scheduler.max_in_flight_per_owner,
            )
        if claimed:
            crash_point("after_claim")
        by_backend: dict[str, list[_Tracked]] = {}
        for tracked in held:
            by_backend.setdefault(tracked.claimed.backend, []).append(tracked)
        for item in claimed:
            tracked = _Tracked(claimed=item, backend_job_id=None, submitted_at=time.time())
            self.tracked[item.attempt_id] = tracked
            by_backend.setdefault(item.backend, []).append(tracked)
        for name, items in by_backend.items():
            self._submit_all(self.backends[name], items)
        return len(claimed) + sum(1 for t in held if not t.needs_submit)

    def _submit_all(self, backend: Backend, items: list[_Tracked]) -> None:
        """Submit in waves of ``backend.submit_concurrency``; commit each wave's handles in one
        transaction. A wave in which a submission ended without an answer (a timeout, the
        controller down) holds the rest, claimed and never handed over, for the next cycle,
        instead of spending one command timeout per attempt."""
        for tracked in [t for t in items if t.needs_submit and t.claimed.cancel_requested]:
            # held, never handed to the backend, and cancelled meanwhile: nothing to withdraw
            items.remove(tracked)
            claimed = tracked.claimed
            self._forget(claimed.attempt_id)
            self._guarded(
                lambda c=claimed: self.ledger.mark_not_submitted(  # type: ignore[misc]
                    c.attempt_id, c.fence, "cancelled before it was submitted"
                )
            )
        batches: list[tuple[bool, list[_Tracked]]] = [(True, group) for group in self._array_groups(backend, items)]
        in_arrays = {id(t) for _, group in batches for t in group}
        rest = [t for t in items if id(t) not in in_arrays]
        width = max(1, backend.submit_concurrency)
        batches += [(False, rest[start : start + width]) for start in range(0, len(rest), width)]
        for position, (as_array, batch) in enumerate(batches):
            for tracked in batch:
                tracked.needs_submit = False
            if as_array:
                pause_point("before_sbatch")
                results = backend.submit_array([self._ticket(t) for t in batch])
            else:
                results = self._submit_wave(backend, batch)
            if self._settle(backend, batch, results):
                for _, later in batches[position + 1 :]:
                    for tracked in later:
                        tracked.needs_submit = True
                return

    def _array_groups(self, backend: Backend, items: list[_Tracked]) -> list[list[_Tracked]]:
        """Alike attempts (same ``backend.array_key``), at least ``array_min`` of them, in arrays
        of at most ``array_max``; the rest is submitted one by one."""
        if backend.array_min <= 0:
            return []
        by_key: dict[Hashable, list[_Tracked]] = {}
        for tracked in items:
            key = backend.array_key(self._ticket(tracked))
            if key is not None:
                by_key.setdefault(key, []).append(tracked)
        groups: list[list[_Tracked]] = []
        for alike in by_key.values():
            if len(alike) < backend.array_min:
                continue
            size = max(1, backend.array_max)
            groups += [alike[start : start + size] for start in range(0, len(alike), size)]
        return groups

    def _settle(self, backend: Backend, batch: list[_Tracked], results: list[str | Exception]) -> bool:
        """Record what a batch of submissions gave: handles committed in one transaction, failures
        judged one by one. True when one of them ended without an answer (hold the rest)."""
        accepted: list[_Tracked] = []
        for tracked, result in zip(batch, results, strict=True):
            if isinstance(result, str):
                tracked.backend_job_id = result
                accepted.append(tracked)
            else:
                self._submission_failed(backend, tracked, result)
        if accepted:
            crash_point("after_submit")
            crash_point("before_mark_submitted")
            self._commit_handles(backend, accepted)
        return any(t.needs_reconcile for t in batch)

    def _submit_wave(self, backend: Backend, wave: list[_Tracked]) -> list[str | Exception]:
        tickets = [self._ticket(t) for t in wave]
        if len(tickets) == 1:
            return [self._submit_one(backend, tickets[0])]
        if self._submit_pool is None:
            width = max(b.submit_concurrency for b in self.backends.values())
            self._submit_pool = ThreadPoolExecutor(max_workers=max(1, width), thread_name_prefix="submit")
        return list(self._submit_pool.map(lambda t: self._submit_one(backend, t), tickets))

    @staticmethod
    def _submit_one(backend: Backend, ticket: Ticket) -> str | Exception:
        """The backend call alone (thread-safe: no ledger write); its error is returned, not raised."""
        pause_point("before_sbatch")
        try:
            return backend.submit(ticket)
        except Exception as exc:  # every failure is judged by _submission_failed
            return exc

    def _submission_failed(self, backend: Backend, tracked: _Tracked, exc: Exception) -> None:
        claimed = tracked.claimed
        if not isinstance(exc, SubmitError):
            log.error("attempt %s: submit crashed; reconciling", claimed.attempt_id, exc_info=exc)
            tracked.needs_reconcile = True
            tracked.reason = str(exc)
        elif exc.definite and exc.defer_s is not None:
            log.info("attempt %s deferred by %s: %s", claimed.attempt_id, backend.name, exc)
            self._forget(claimed.attempt_id)
            note, base = str(exc), exc.defer_s
            self._guarded(lambda: self.ledger.defer_attempt(claimed.attempt_id, claimed.fence, note, base_s=base))
        elif exc.definite:
            log.warning("attempt %s refused by %s: %s", claimed.attempt_id, backend.name, exc)
            self._forget(claimed.attempt_id)
            message, retryable = str(exc), exc.retryable
            self._guarded(
                lambda: self.ledger.fail_submission(claimed.attempt_id, claimed.fence, message, retryable=retryable)
            )
        else:
            log.warning("attempt %s: submission outcome unknown (%s); reconciling", claimed.attempt_id, exc)
            tracked.needs_reconcile = True

    def _commit_handles(self, backend: Backend, accepted: list[_Tracked]) -> None:
        """Commit the backend handles of one wave under their fences. A stale fence: the attempt is
        another scheduler's now, so withdraw our job unless it adopted it. The ledger unreachable:
        nobody knows whether the commit landed, so reconcile (the job is found by its tag; under
        strict submission it stays held until its handle is committed)."""
        handles = [(t.claimed.attempt_id, t.claimed.fence, t.backend_job_id or "") for t in accepted]
        try:
            stale = set(self.ledger.mark_submitted_many(handles))
        except LedgerUnavailable as exc:
            log.warning("could not commit %d job handles (%s); reconciling them", len(accepted), exc)
            for tracked in accepted:
                tracked.backend_job_id = None
                tracked.needs_reconcile = True
            return
        now = time.time()
        for tracked in accepted:
            if tracked.claimed.attempt_id in stale:
                log.warning("fenced out: attempt %s is no longer ours", tracked.claimed.attempt_id)
                self._forget(tracked.claimed.attempt_id)
                self._abandon_if_orphaned(backend, self._ticket(tracked))
                continue
            tracked.last_state = AttemptState.PENDING
            tracked.pending_since = now
            tracked.needs_confirm = True  # confirmed in one batch per cycle by _confirm_committed

    def _abandon_if_orphaned(self, backend: Backend, ticket: Ticket) -> None:
        """We created ``ticket.backend_job_id`` but lost the attempt before committing it. Another
        scheduler owns the attempt now: when it already adopted this very job, or its
        reconciliation is still undecided (it will find the job by its tag), leave the job alone;
        when it gave the attempt up (tombstoned or finished) or holds another job, withdraw ours
        (held under strict submission, so it never ran)."""
        job_id = ticket.backend_job_id
        try:
            current = next((a for a in self.ledger.attempts(ticket.run_id) if a.id == ticket.attempt_id), None)
        except LedgerUnavailable as exc:
            log.warning("attempt %s: cannot read its state (%s); withdrawing job %s", ticket.attempt_id, exc, job_id)
            current = None
        if current is not None and current.backend_job_id == job_id:
            log.info("attempt %s: job %s was adopted by its new owner; leaving it", ticket.attempt_id, job_id)
            return
        if current is not None and current.state == AttemptState.SUBMITTING and current.backend_job_id is None:
            log.info("attempt %s: its new owner is still reconciling; job %s is left to it", ticket.attempt_id, job_id)
            return
        log.warning("attempt %s: withdrawing job %s (the attempt is no longer ours)", ticket.attempt_id, job_id)
        try:
            backend.abandon(ticket)
        except BackendUnavailable as exc:
            log.warning("could not withdraw job %s of attempt %s: %s", job_id, ticket.attempt_id, exc)

    def _confirm(self, tracked: _Tracked) -> None:
        """Let the backend start a job whose handle is committed (strict submit: release the hold)."""
        try:
            self.backends[tracked.claimed.backend].confirm(self._ticket(tracked))
        except BackendUnavailable as exc:
            log.warning("confirm of %s failed, will retry: %s", tracked.claimed.attempt_id, exc)
            return
        tracked.needs_confirm = False

    def _confirm_committed(self) -> None:
        """Confirm every committed-but-unconfirmed job, one batched call per backend."""
        by_backend: dict[str, list[_Tracked]] = {}
        for tracked in self.tracked.values():
            if tracked.needs_confirm and tracked.backend_job_id is not None and not tracked.needs_reconcile:
                by_backend.setdefault(tracked.claimed.backend, []).append(tracked)
        for name, items in by_backend.items():
            try:
                done = self.backends[name].confirm_many([self._ticket(t) for t in items])
            except BackendUnavailable as exc:
                log.warning("confirm on %s failed, will retry: %s", name, exc)
                continue
            for tracked in items:
                if tracked.claimed.attempt_id in done:
                    tracked.needs_confirm = False

    def _reconcile(self) -> int:
        by_backend: dict[str, list[_Tracked]] = {}
        for tracked in self.tracked.values():
            if tracked.needs_reconcile:
                by_backend.setdefault(tracked.claimed.backend, []).append(tracked)
        changed = 0
        for name, items in by_backend.items():
            backend = self.backends[name]
            try:
                found = backend.find([self._ticket(t) for t in items])
            except BackendUnavailable as exc:
                log.warning("reconciliation on %s failed (state unknown, will retry): %s", name, exc)
                continue
            for tracked in items:
                result = found.get(tracked.claimed.attempt_id)
                if result is None or result.kind == FindKind.UNKNOWN:
                    continue
                claimed = tracked.claimed
                tracked.needs_reconcile = False
                changed += 1
                if result.kind == FindKind.FOUND and result.backend_job_id:
                    tracked.backend_job_id = result.backend_job_id
                    log.info("attempt %s found as %s: adopted", claimed.attempt_id, result.backend_job_id)
                    try:
                        self.ledger.mark_submitted(
                            claimed.attempt_id,
                            claimed.fence,
                            result.backend_job_id,
                            message=f"reconciled: adopted {result.backend_job_id}",
                        )
                    except FencedOut as exc:
                        # its new owner reconciles it (and finds the same job by its tag)
                        log.warning("fenced out: %s", exc)
                        self._forget(claimed.attempt_id)
                        continue
                    tracked.last_state = AttemptState.PENDING
                    tracked.pending_since = tracked.pending_since or time.time()
                    tracked.needs_confirm = True
                else:
                    log.info("attempt %s proved absent: requeueing the run", claimed.attempt_id)
                    self._forget(claimed.attempt_id)
                    self._guarded(
                        lambda c=claimed, d=result.detail: self.ledger.mark_not_submitted(  # type: ignore[misc]
                            c.attempt_id, c.fence, f"reconciled: not submitted ({d})"
                        )
                    )
        return changed

    def _apply_cancellations(self) -> int:
        active = [t for t in self.tracked.values() if not t.cancel_sent]
        if not active:
            return 0
        flagged = self.ledger.cancel_flags({t.claimed.run_id for t in active})
        changed = 0
        for tracked in active:
            if tracked.claimed.run_id not in flagged:
                continue
            tracked.claimed = replace(tracked.claimed, cancel_requested=True)
            if tracked.backend_job_id is None:
                continue  # cancelled once it is found or proved absent
            try:
                self.backends[tracked.claimed.backend].cancel(self._ticket(tracked))
            except BackendUnavailable as exc:
                log.warning("cancel of %s failed, will retry: %s", tracked.claimed.attempt_id, exc)
                continue
            tracked.cancel_sent = True
            changed += 1
        return changed

    def _poll(self) -> int:
        by_backend: dict[str, list[_Tracked]] = {}
        for tracked in self.tracked.values():
            if tracked.backend_job_id is not None and not tracked.needs_reconcile:
                by_backend.setdefault(tracked.claimed.backend, []).append(tracked)
        changed = 0
        for name, items in by_backend.items():
            backend = self.backends[name]
            try:
                observations = backend.poll([self._ticket(t) for t in items])
            except BackendUnavailable as exc:
                log.warning("poll of %s failed; no state changes this cycle: %s", name, exc)
                continue
            observed: list[Observed] = []
            for tracked in items:
                obs = observations.get(tracked.claimed.attempt_id)
                if obs is None or obs.kind == ObservationKind.UNKNOWN:
                    continue
                if obs.kind == ObservationKind.FINISHED:
                    changed += self._finish(backend, tracked)
                    continue
                state = AttemptState.RUNNING if obs.kind == ObservationKind.RUNNING else AttemptState.PENDING
                if state == AttemptState.RUNNING and tracked.running_since is None:
                    tracked.running_since = time.time()
                if state != tracked.last_state or obs.reason != tracked.reason:
                    observed.append(Observed(tracked.claimed.attempt_id, tracked.claimed.fence, state, obs.reason))
                    tracked.last_state, tracked.reason = state, obs.reason
                    changed += 1
            for attempt_id in self._guarded(lambda o=observed: self.ledger.record_observations(o)) or []:  # type: ignore[misc]
                log.warning("attempt %s: fenced out, dropping it", attempt_id)
                self._forget(attempt_id)
        return changed

    def _finish(self, backend: Backend, tracked: _Tracked) -> int:
        claimed = tracked.claimed
        ticket = self._ticket(tracked)
        artifact_dir = self.settings.artifact_root / claimed.run_id / claimed.attempt_id
        # A crash after an earlier collect leaves a partial copy: the store is ours, start afresh.
        shutil.rmtree(artifact_dir, ignore_errors=True)
        try:
            outcome = backend.collect(ticket, artifact_dir, self.settings.harvest.limits())
        except BackendUnavailable as exc:
            log.warning("collect of %s failed, will retry: %s", claimed.attempt_id, exc)
            return 0
        except Exception:
            tracked.errors += 1
            log.exception("collect of %s crashed (try %d); will retry", claimed.attempt_id, tracked.errors)
            return 0
        crash_point("after_collect")
        if tracked.timeout_reason is not None:
            outcome = self._timed_out(tracked, outcome)
        result = self._result(outcome, retryable=tracked.timeout_retryable)
        crash_point("before_finish")
        state = self._guarded(
            lambda: self.ledger.finish_attempt(claimed.attempt_id, claimed.fence, result, outcome.harvest)
        )
        if state is not None:  # fenced out: the attempt's new owner harvests it, leave its files alone
            try:
                backend.cleanup(ticket)
            except Exception:
                log.exception("cleanup of %s failed", claimed.attempt_id)
        self._forget(claimed.attempt_id)
        log.info("attempt %s of run %s finished: %s", claimed.attempt_id, claimed.run_id, state)
        return 1

    @staticmethod
    def _timed_out(tracked: _Tracked, outcome: Outcome) -> Outcome:
        """The outcome of an attempt the time backstop cancelled: ``timeout``, unless the backend
        shows it ended on its own before the backstop acted (or itself reports a timeout)."""
        if outcome.failure_kind == FailureKind.TIMEOUT and tracked.timeout_retryable:
            return outcome
        ended_first = (
            outcome.ended_at is not None and tracked.timeout_at is not None and outcome.ended_at < tracked.timeout_at
        )
        if ended_first and not outcome.cancelled:
            return outcome
        return replace(
            outcome,
            failure_kind=FailureKind.TIMEOUT,
            cancelled=False,
            message=tracked.timeout_reason,
            backend_record={**outcome.backend_record, "scheduler_timeout": tracked.timeout_reason or ""},
        )

    def _enforce_time_limits(self) -> int:
        """The scheduler-side backstop for time. An attempt running longer than its time limit
        plus ``time_limit_grace`` (the backend's own limit should have fired by then), or pending
        in its backend longer than ``max_queue_time``, is cancelled through the backend; when the
        backend reports it ended, it finishes as ``timeout``. It is never finished while the
        backend has not confirmed it ended (a failed query is no answer)."""
        scheduler = self.settings.scheduler
        now = time.time()
        changed = 0
        for tracked in list(self.tracked.values()):
            if tracked.backend_job_id is None or tracked.needs_reconcile or tracked.claimed.cancel_requested:
                continue
            if tracked.timeout_reason is None:
                limit = tracked.claimed.spec.resources.time_limit
                if tracked.last_state == AttemptState.RUNNING and tracked.running_since is not None:
                    if now - tracked.running_since > limit + scheduler.time_limit_grace:
                        tracked.timeout_reason = (
                            f"ran longer than its time limit ({limit}s) plus {scheduler.time_limit_grace:g}s grace; "
                            "cancelled by the scheduler"
                        )
                elif (
                    tracked.last_state == AttemptState.PENDING
                    and scheduler.max_queue_time is not None
                    and tracked.pending_since is not None
                    and now - tracked.pending_since > scheduler.max_queue_time
                ):
                    tracked.timeout_reason = (
                        f"queued longer than {scheduler.max_queue_time:g}s (max_queue_time); cancelled by the scheduler"
                    )
                    tracked.timeout_retryable = False
                if tracked.timeout_reason is None:
                    continue
                tracked.timeout_at = now
                log.warning("attempt %s: %s", tracked.claimed.attempt_id, tracked.timeout_reason)
                self.ledger.record_event(
                    tracked.claimed.run_id,
                    "time_limit",
                    tracked.timeout_reason,
                    {"attempt_id": tracked.claimed.attempt_id, "state": tracked.last_state.value},
                )
            resend_after = max(TIMEOUT_CANCEL_RESEND_S, scheduler.time_limit_grace)
            if tracked.timeout_cancel_sent and now - (tracked.timeout_cancel_at or now) < resend_after:
                continue  # sent; the backend confirms by reporting the attempt ended (else: send again)
            try:
                self.backends[tracked.claimed.backend].cancel(self._ticket(tracked))
            except BackendUnavailable as exc:
                log.warning("time-limit cancel of %s failed, will retry: %s", tracked.claimed.attempt_id, exc)
                continue
            tracked.timeout_cancel_sent = True
            tracked.timeout_cancel_at = now
            changed += 1
        return changed

    @staticmethod
    def _result(outcome: Outcome, *, retryable: bool = True) -> AttemptResult:
        record = {
            "exit_code": outcome.exit_code,
            "signal": outcome.signal,
            "failure_kind": outcome.failure_kind.value if outcome.failure_kind else None,
            "message": outcome.message,
            "peak_rss_kb": outcome.peak_rss_kb,
            "cancelled": outcome.cancelled,
            "backend_record": outcome.backend_record,
            "artifacts": len(outcome.harvest.files) if outcome.harvest else 0,
            "refused": len(outcome.harvest.refused) if outcome.harvest else 0,
        }
        return AttemptResult(
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            failure_kind=outcome.failure_kind,
            message=outcome.message,
            cancelled=outcome.cancelled,
            started_at=_ts(outcome.started_at),
            ended_at=_ts(outcome.ended_at),
            outcome=record,
            retryable=retryable,
        )

    def _forget(self, attempt_id: str) -> None:
        self.tracked.pop(attempt_id, None)

    def _guarded(self, write: Callable[[], _T]) -> _T | None:
        """Run a fenced ledger write; a stale fence means another scheduler owns the attempt now."""
        try:
            return write()
        except FencedOut as exc:
            log.warning("fenced out: %s", exc)
            return None

    # -- loops --------------------------------------------------------------------------------

    def run_forever(self, *, on_cycle: Callable[[Engine], None] | None = None) -> None:
        interval = self.settings.effective_poll_interval
        floor = self.settings.scheduler.min_poll_interval
        delay = floor
        while not self._stop.is_set():
            changed = self._safe_cycle()
            if on_cycle is not None:
                on_cycle(self)
            # Fast right after activity, ramping up to the configured interval when nothing moves.
            delay = floor if changed else min(interval, max(floor, delay * 1.5))
            self._stop.wait(delay)

    def drive_until(
        self,
        run_ids: Iterable[str],
        *,
        timeout: float | None = None,
        on_cycle: Callable[[Engine], None] | None = None,
    ) -> bool:
        """Run cycles until every run is terminal (True) or the timeout passes (False)."""
        pending = set(run_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        floor = self.settings.scheduler.min_poll_interval
        delay = floor
        while pending:
            changed = self._safe_cycle()
            if on_cycle is not None:
                on_cycle(self)
            pending = self.ledger.nonterminal(pending)
            if not pending:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            delay = floor if changed else min(self.settings.effective_poll_interval, delay * 1.5, 1.0)
            if self._stop.wait(delay):
                return False
        return True
