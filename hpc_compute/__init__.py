"""hpc-compute: run untrusted research code sealed, on Slurm, OpenNebula VMs or this host."""

from __future__ import annotations

__version__ = "0.1.0"

from hpc_compute.api import Client  # noqa: E402
from hpc_compute.errors import (  # noqa: E402
    ArtifactNotFound,
    HpcComputeError,
    IdempotencyConflict,
    LedgerUnavailable,
    RunNotFound,
    SpecError,
    WaitTimeout,
)
from hpc_compute.ledger.states import RunState  # noqa: E402
from hpc_compute.records import ArtifactInfo, AttemptInfo, EventInfo, RunInfo  # noqa: E402
from hpc_compute.spec import FailureKind, JobSpec  # noqa: E402

__all__ = [
    "ArtifactInfo",
    "ArtifactNotFound",
    "AttemptInfo",
    "Client",
    "EventInfo",
    "FailureKind",
    "HpcComputeError",
    "IdempotencyConflict",
    "JobSpec",
    "LedgerUnavailable",
    "RunInfo",
    "RunNotFound",
    "RunState",
    "SpecError",
    "WaitTimeout",
    "__version__",
]
