"""The exception hierarchy of hpc-compute.

Every error a caller can act on has its own class. The CLI maps them to documented exit codes:
``SpecError`` -> 2, ``LedgerUnavailable``/``BackendUnavailable`` -> 3, ``RunNotFound`` -> 4.
"""

from __future__ import annotations


class HpcComputeError(Exception):
    """Base class of every error hpc-compute raises on purpose."""


class SpecError(HpcComputeError, ValueError):
    """A job spec (or another user input) broke a rule. ``field`` names the offending field."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class ConfigError(HpcComputeError):
    """The site or user configuration is invalid."""


class LedgerUnavailable(HpcComputeError):
    """The ledger database cannot be reached or is not migrated."""


class BackendUnavailable(HpcComputeError):
    """A backend (Slurm, OpenNebula, ...) could not be reached; the state is unknown, not failed."""


class RunNotFound(HpcComputeError, LookupError):
    """No run with this id is visible to the caller."""


class IdempotencyConflict(HpcComputeError):
    """The idempotency key was already used with a different spec."""


class IllegalTransition(HpcComputeError):
    """A state change that the ledger's state machine forbids."""


class FencedOut(HpcComputeError):
    """This scheduler lost ownership of an attempt (its fencing number is stale)."""


class SchedulerLocked(HpcComputeError):
    """Another scheduler already serves this ledger and the ledger allows only one."""


class ArtifactNotFound(HpcComputeError, LookupError):
    """The run has no artifact at this path."""


class WaitTimeout(HpcComputeError, TimeoutError):
    """A wait ended before the run did."""
