"""The local transport: commands as subprocesses of this host, files on its filesystem."""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from hpc_compute.errors import BackendUnavailable
from hpc_compute.harvest import HarvestLimits, HarvestReport, harvest_directory
from hpc_compute.transports.base import CommandResult, Transport


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


_syncfs = _load_syncfs()


class LocalTransport(Transport):
    name = "local"
    remote = False

    def __init__(self, env: dict[str, str] | None = None) -> None:
        #: the environment of every command (None: this process's)
        self.env = env

    def run(self, argv: list[str], timeout: float, input: bytes | None = None) -> CommandResult:
        if not argv:
            raise ValueError("empty argv")
        try:
            proc = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BackendUnavailable(f"{argv[0]} timed out after {timeout:g}s") from exc
        except OSError as exc:
            raise BackendUnavailable(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        return CommandResult(
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )

    def put_file(self, source: Path | bytes, remote_path: str, mode: int = 0o600, *, sync: bool = True) -> None:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        target = Path(remote_path)
        tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if sync:
                    os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read_file(self, remote_path: str, max_bytes: int) -> bytes | None:
        try:
            fd = os.open(remote_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            data = handle.read(max_bytes + 1)
        return None if len(data) > max_bytes else data

    def fetch_file(self, remote_path: str, local_path: Path, max_bytes: int) -> bool:
        if os.path.abspath(remote_path) == os.path.abspath(local_path):
            return os.path.isfile(local_path)
        return super().fetch_file(remote_path, local_path, max_bytes)

    def create_exclusive(self, remote_path: str, data: bytes, mode: int = 0o600) -> bool:
        try:
            fd = os.open(remote_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def sync(self, remote_path: str) -> None:
        """One ``syncfs(2)`` of the file system holding ``remote_path``: a batch of staged files
        made durable at the cost of one call instead of one fsync each (0.05 s vs 0.3 s for
        1000 files here). Falls back to ``sync(2)`` where syncfs is not available."""
        fd = os.open(remote_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs is None or _syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def makedirs(self, remote_path: str, mode: int = 0o700) -> None:
        os.makedirs(remote_path, mode=mode, exist_ok=True)

    def harvest(self, remote_dir: str, dest: Path, limits: HarvestLimits) -> HarvestReport:
        return harvest_directory(Path(remote_dir), dest, limits)
