"""Lease renewal on a thread of its own.

A scheduler owns its attempts under leases that it renews every third of a lease. Renewing from
the cycle itself ties the lease to the slowest backend call: with slurmctld down, every Slurm
command waits out its timeout (15 s by default), a cycle can take minutes, and the leases of a
live scheduler lapse, so other schedulers take its attempts (fencing keeps that safe, but it is
churn, and each takeover costs a reconciliation).

So the renewal runs here, independent of how long a cycle takes, with one guard: it renews only
while the cycle loop shows progress. A loop that has not reported progress for ``stall_seconds``
is taken to be wedged; its leases are allowed to lapse so that a live scheduler takes the work
over (and fences this one out if it ever wakes). A process that is stopped (SIGSTOP, a frozen
VM) stops this thread too, so its leases lapse as they should.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hpc_compute.ledger.store import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Renewal:
    """One renewal: the attempts the ledger says we own, as of a query begun at ``started``."""

    started: float  # monotonic clock, taken before the query
    owned: frozenset[str]


class LeaseKeeper:
    """Renews a scheduler's leases every ``lease_s / 3`` while its loop makes progress."""

    def __init__(
        self,
        ledger: Ledger,
        scheduler_id: str,
        *,
        lease_s: float,
        stall_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.scheduler_id = scheduler_id
        self.lease_s = lease_s
        self.stall_s = stall_s
        self.period_s = lease_s / 3
        self._clock = clock
        self._progress_at = clock()
        self._latest: Renewal | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stalled = False
        self._renewed_at: float | None = None
        self.renewals = 0
        self.failures = 0

    # -- called by the cycle loop ---------------------------------------------------------------

    def progress(self) -> None:
        """The loop is alive (called at the start and end of every cycle)."""
        self._progress_at = self._clock()

    def take(self) -> Renewal | None:
        """The newest renewal not yet taken (None if there was none since the last take)."""
        with self._mutex:
            latest, self._latest = self._latest, None
        return latest

    # -- the renewal ------------------------------------------------------------------------------

    def stalled(self) -> bool:
        return self._clock() - self._progress_at > self.stall_s

    def renew_once(self) -> Renewal | None:
        """Renew now unless the loop is stalled; a ledger error is logged and retried next period."""
        if self.stalled():
            if not self._stalled:
                log.error(
                    "scheduler loop has made no progress for %.0f s (limit %.0f s): no longer renewing "
                    "leases, so another scheduler can take its attempts over",
                    self._clock() - self._progress_at,
                    self.stall_s,
                )
            self._stalled = True
            return None
        if self._stalled:
            log.warning("scheduler loop progressing again: renewing leases")
            self._stalled = False
        started = self._clock()
        self._renewed_at = started
        try:
            owned = self.ledger.heartbeat(self.scheduler_id, lease_s=self.lease_s)
        except Exception as exc:  # a renewal failure must not kill the thread
            self.failures += 1
            log.warning("lease renewal failed, retrying in %.1f s: %s", self.period_s, exc)
            return None
        renewal = Renewal(started=started, owned=frozenset(owned))
        with self._mutex:
            self._latest = renewal
        self.renewals += 1
        return renewal

    def renew_inline_if_due(self) -> None:
        """Without the thread (an engine driven cycle by cycle, never started), renew in the cycle."""
        if self._thread is None and (self._renewed_at is None or self._clock() - self._renewed_at >= self.period_s):
            self.renew_once()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"leases-{self.scheduler_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.period_s + 30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.renew_once()
