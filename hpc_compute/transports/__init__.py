"""Transports: *through what* commands and files travel (a local subprocess, or SSH)."""

from __future__ import annotations

from hpc_compute.transports.base import CommandResult, Transport
from hpc_compute.transports.local import LocalTransport

__all__ = ["CommandResult", "LocalTransport", "Transport"]
