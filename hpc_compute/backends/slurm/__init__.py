"""The Slurm backend: sbatch a constant script, poll in batches, trust Slurm's record."""

from __future__ import annotations

from hpc_compute.backends.slurm.backend import SlurmBackend
from hpc_compute.backends.slurm.config import SlurmSettings
from hpc_compute.config import Settings


def make_backend(settings: Settings) -> SlurmBackend:
    """The backend for the ``[slurm]`` config section (cheap: no command runs until it is used;
    the SSH transport connects on first use)."""
    return SlurmBackend(settings)


__all__ = ["SlurmBackend", "SlurmSettings", "make_backend"]
