"""The transport contract: how commands and files reach the cluster.

Commands are argv lists, never shell strings (the SSH transport joins them with
:func:`shlex.join` for the remote shell). Every call has a timeout; a timeout or a broken
connection raises :class:`~hpc_compute.errors.BackendUnavailable` (the state is unknown, not
failed). A command that ran and failed is a :class:`CommandResult` with its return code.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

from hpc_compute.harvest import HarvestLimits, HarvestReport


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Transport(abc.ABC):
    name: str = "abstract"
    #: True when the cluster sees other files than this process (logs must be copied back)
    remote: bool = False

    @abc.abstractmethod
    def run(self, argv: list[str], timeout: float, input: bytes | None = None) -> CommandResult:
        """Run ``argv`` (no shell) and wait at most ``timeout`` seconds."""

    @abc.abstractmethod
    def put_file(self, source: Path | bytes, remote_path: str, mode: int = 0o600, *, sync: bool = True) -> None:
        """Write a file atomically (temporary name, then rename) with ``mode``. ``sync=False``
        leaves making it durable to one :meth:`sync` after a batch of writes."""

    def sync(self, remote_path: str) -> None:  # noqa: B027 - optional hook
        """Make what ``put_file(sync=False)`` wrote on the file system of ``remote_path`` durable."""

    @abc.abstractmethod
    def read_file(self, remote_path: str, max_bytes: int) -> bytes | None:
        """A regular file's content (no symlink followed); None if missing, not regular or larger than max_bytes."""

    @abc.abstractmethod
    def create_exclusive(self, remote_path: str, data: bytes, mode: int = 0o600) -> bool:
        """Create a file that must not exist yet (``O_EXCL``): True if created, False if it existed.
        FileNotFoundError when the directory is missing."""

    @abc.abstractmethod
    def makedirs(self, remote_path: str, mode: int = 0o700) -> None:
        """Create a directory and its parents (existing ones are fine)."""

    @abc.abstractmethod
    def harvest(self, remote_dir: str, dest: Path, limits: HarvestLimits) -> HarvestReport:
        """Copy the regular files under ``remote_dir`` (untrusted) into the fresh local ``dest``."""

    def fetch_file(self, remote_path: str, local_path: Path, max_bytes: int) -> bool:
        """Copy one regular file here (logs); False if it is missing or not a regular file."""
        data = self.read_file(remote_path, max_bytes)
        if data is None:
            return False
        local_path.parent.mkdir(parents=True, exist_ok=True)
        local_path.write_bytes(data)
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
