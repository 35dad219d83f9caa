"""The OpenNebula backend: a one-shot VM per attempt (pyone over XML-RPC, paramiko over SSH)."""

from __future__ import annotations

from hpc_compute.backends.opennebula.backend import OpenNebulaBackend
from hpc_compute.backends.opennebula.config import OpenNebulaSettings, load_opennebula_settings
from hpc_compute.config import Settings


def make_backend(settings: Settings) -> OpenNebulaBackend:
    """The backend for the ``[opennebula]`` config section (cheap: no call is made until it is used)."""
    return OpenNebulaBackend(load_opennebula_settings(settings.opennebula), settings.home)


__all__ = ["OpenNebulaBackend", "OpenNebulaSettings", "make_backend"]
