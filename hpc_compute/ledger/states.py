"""Run and attempt states, and the one table of legal run transitions.

::

    queued -> submitting -> pending -> running -> succeeded | failed | cancelled
                  \\__________\\__________\\__ back to queued for a retry on a new attempt

Every change of a run's state goes through :func:`hpc_compute.ledger.store.transition`, which
checks this table and appends an event.
"""

from __future__ import annotations

from enum import StrEnum

from hpc_compute.errors import IllegalTransition


class RunState(StrEnum):
    QUEUED = "queued"
    SUBMITTING = "submitting"
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


class AttemptState(StrEnum):
    SUBMITTING = "submitting"  # written before anything leaves the process
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"  # ended (outcome recorded)
    NOT_SUBMITTED = "not_submitted"  # reconciliation proved nothing was created (tombstone)


TERMINAL_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})
ACTIVE_ATTEMPT_STATES = frozenset({AttemptState.SUBMITTING, AttemptState.PENDING, AttemptState.RUNNING})

_TERMINAL = {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED}
LEGAL: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.SUBMITTING, RunState.CANCELLED}),
    RunState.SUBMITTING: frozenset({RunState.PENDING, RunState.RUNNING, RunState.QUEUED, *_TERMINAL}),
    RunState.PENDING: frozenset({RunState.RUNNING, RunState.QUEUED, *_TERMINAL}),
    RunState.RUNNING: frozenset({RunState.QUEUED, *_TERMINAL}),
    RunState.SUCCEEDED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
}


def check_transition(current: RunState, target: RunState) -> None:
    """Raise IllegalTransition unless ``current -> target`` is in the table (a no-op is legal)."""
    if current == target and not current.terminal:
        return
    if target not in LEGAL[current]:
        raise IllegalTransition(f"run state {current} cannot become {target}")
