"""hpc-compute: run untrusted research code sealed, on Slurm, OpenNebula VMs or this host."""

from __future__ import annotations

__version__ = "0.1.0"

from hpc_compute.api import Client
from hpc_compute.errors import (
    ArtifactNotFound,
    HpcComputeError,
    IdempotencyConflict,
    LedgerUnavailable,
    RunNotFound,
    SpecError,
    WaitTimeout,
)
from hpc_compute.ledger.states import RunState
from hpc_compute.records import ArtifactInfo, AttemptInfo, EventInfo, RunInfo
from hpc_compute.spec import FailureKind, JobSpec

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
