"""Runtimes: *how* the payload is sealed inside an allocation (bubblewrap, apptainer)."""

from __future__ import annotations

from dataclasses import dataclass

from hpc_compute.errors import ConfigError
from hpc_compute.rundir import LaunchSpec


@dataclass(frozen=True)
class SandboxPlan:
    """What to seal, with every path as seen on the execution host.

    ``inputs`` maps a host path to its name under ``/input``; ``output_dir`` and ``scratch_dir``
    are bound writable at ``/output`` and ``/scratch``.
    """

    run_id: str
    attempt_id: str
    image: str
    command: tuple[str, ...]
    env: dict[str, str]
    inputs: tuple[tuple[str, str], ...]
    output_dir: str
    scratch_dir: str
    gpus: int = 0


RUNTIME_NAMES = ("bubblewrap", "apptainer")


def build_launch(runtime: str, plan: SandboxPlan, *, executable: str | None = None) -> LaunchSpec:
    """The LaunchSpec for ``plan`` under the named runtime."""
    if runtime == "bubblewrap":
        from hpc_compute.runtimes.bubblewrap import bubblewrap_launch

        return bubblewrap_launch(plan, bwrap=executable or "bwrap")
    if runtime == "apptainer":
        from hpc_compute.runtimes.apptainer import apptainer_launch

        return apptainer_launch(plan, apptainer=executable or "apptainer")
    raise ConfigError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIME_NAMES)}")
