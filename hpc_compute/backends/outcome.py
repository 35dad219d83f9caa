"""From the wrapper's ``result.json`` to an :class:`Outcome`: one mapping for every backend.

Backends with an authoritative record of their own (Slurm's state and ``ExitCode``) refine the
outcome afterwards; the wrapper's file is written by code the job could in principle reach, so
the backend wins where they disagree.
"""

from __future__ import annotations

from typing import Any

from hpc_compute.backends.base import Outcome, Ticket
from hpc_compute.harvest import HarvestReport
from hpc_compute.spec import FailureKind


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def outcome_from_result(
    result: dict[str, Any] | None,
    ticket: Ticket,
    *,
    harvest: HarvestReport | None = None,
    lost_message: str = "the job ended without a result file (killed, or its host went away)",
) -> Outcome:
    if result is None:
        return Outcome(
            exit_code=None,
            signal=None,
            failure_kind=FailureKind.LOST,
            message=lost_message,
            harvest=harvest,
            cancelled=ticket.cancel_requested,
        )
    exit_code = _int_or_none(result.get("exit_code"))
    signal = _int_or_none(result.get("signal"))
    started = _float_or_none(result.get("started_at"))
    ended = _float_or_none(result.get("ended_at"))
    common: dict[str, Any] = {
        "exit_code": exit_code,
        "signal": signal,
        "started_at": started,
        "ended_at": ended,
        "peak_rss_kb": _int_or_none(result.get("peak_rss_kb")),
        "harvest": harvest,
    }
    setup_error = result.get("setup_error")
    if setup_error:
        return Outcome(
            failure_kind=FailureKind.SETUP,
            message=f"sandbox setup failed: {str(setup_error)[:2000]}",
            cancelled=ticket.cancel_requested and bool(result.get("terminated_by")),
            **common,
        )
    if ticket.cancel_requested and result.get("terminated_by"):
        return Outcome(failure_kind=None, message="cancelled", cancelled=True, **common)
    if result.get("timed_out"):
        return Outcome(failure_kind=FailureKind.TIMEOUT, message="time limit reached", **common)
    if signal is not None:
        return Outcome(failure_kind=FailureKind.SIGNAL, message=f"killed by signal {signal}", **common)
    if exit_code is None:
        return Outcome(failure_kind=FailureKind.LOST, message="the result file holds no exit code", **common)
    if exit_code != 0:
        return Outcome(failure_kind=FailureKind.EXIT_CODE, message=f"exited with code {exit_code}", **common)
    return Outcome(failure_kind=None, message=None, **common)
