"""The Slurm backend: sbatch a constant script, poll in batches, trust Slurm's record."""

from __future__ import annotations

from hpc_compute.backends.slurm.backend import SlurmBackend
from hpc_compute.backends.slurm.config import SlurmSettings

__all__ = ["SlurmBackend", "SlurmSettings"]
