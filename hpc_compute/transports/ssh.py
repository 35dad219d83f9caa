"""The SSH transport (paramiko): one pooled connection with keepalive and reconnect.

* Host keys are verified against a pinned ``known_hosts`` file (:class:`paramiko.RejectPolicy`;
  never auto-added). The agent is not used; the key file is named in the settings.
* Every call has a timeout: connect (TCP, banner, auth), exec (channel timeout plus a deadline
  loop), SFTP (the SFTP channel's timeout). A timeout or a broken connection raises
  :class:`~hpc_compute.errors.BackendUnavailable` and drops the connection; the next call
  reconnects. A command is never re-sent after a failure (``sbatch`` is not idempotent).
* Commands are argv lists joined with :func:`shlex.join` for the remote POSIX shell.
* Harvesting walks ``output/`` over SFTP with the local harvester's rules: ``lstat`` semantics
  (OpenSSH's readdir reports ``lstat``), regular files only, link count 1 (from the listing's
  long name; unknown counts are refused), names checked, every cap of :class:`HarvestLimits`.
  SFTP has no ``O_NOFOLLOW`` open: the walk runs after the job's allocation ended, and every open
  file is re-checked with ``fstat`` (type, size, mtime) against the listing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shlex
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import paramiko

from hpc_compute.errors import BackendUnavailable
from hpc_compute.harvest import (
    R_CHANGED,
    R_DEPTH,
    R_HARD_LINK,
    R_MAX_FILE_BYTES,
    R_MAX_FILES,
    R_MAX_TOTAL_BYTES,
    R_NAME_NOT_UTF8,
    R_OPEN_FAILED,
    R_READ_FAILED,
    R_SOURCE_MISSING,
    R_SOURCE_NOT_DIR,
    R_SOURCE_SYMLINK,
    R_UNKNOWN_TYPE,
    R_VANISHED,
    HarvestedFile,
    HarvestLimits,
    HarvestReport,
    HarvestTally,
    Refusal,
    StopWalk,
    UnsafeDestination,
    name_problem,
    type_reason,
)
from hpc_compute.transports.base import CommandResult, Transport

MAX_OUTPUT_BYTES = 64 * 1024 * 1024
_CHUNK = 1024 * 1024
_NET_ERRORS: tuple[type[BaseException], ...] = (paramiko.SSHException, OSError, EOFError, socket.timeout)


class SshTransport(Transport):
    name = "ssh"
    remote = True

    def __init__(
        self,
        host: str,
        *,
        port: int = 22,
        user: str | None = None,
        key_file: str | None = None,
        known_hosts: str = "~/.ssh/known_hosts",
        connect_timeout: float = 15.0,
        keepalive: int = 30,
        io_timeout: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.key_file = os.path.expanduser(key_file) if key_file else None
        self.known_hosts = os.path.expanduser(known_hosts)
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.io_timeout = io_timeout
        self._lock = threading.RLock()
        self._client: paramiko.SSHClient | None = None
        self._sftp_client: paramiko.SFTPClient | None = None
        self.connects = 0

    # -- the connection -----------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    def _connection(self) -> paramiko.SSHClient:
        with self._lock:
            client = self._client
            if client is not None:
                transport = client.get_transport()
                if transport is not None and transport.is_active():
                    return client
                self._drop()
            if not os.path.isfile(self.known_hosts):
                raise BackendUnavailable(
                    f"ssh {self._where()}: known_hosts file {self.known_hosts} is missing (host keys must be pinned)"
                )
            client = paramiko.SSHClient()
            client.load_host_keys(self.known_hosts)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(
                    self.host,
                    port=self.port,
                    username=self.user,
                    key_filename=self.key_file,
                    timeout=self.connect_timeout,
                    banner_timeout=self.connect_timeout,
                    auth_timeout=self.connect_timeout,
                    channel_timeout=self.connect_timeout,
                    allow_agent=False,
                    look_for_keys=self.key_file is None,
                )
            except _NET_ERRORS as exc:
                client.close()
                raise BackendUnavailable(f"ssh {self._where()}: cannot connect: {exc}") from exc
            transport = client.get_transport()
            if transport is not None and self.keepalive:
                transport.set_keepalive(self.keepalive)
            self._client = client
            self.connects += 1
            return client

    def _drop(self) -> None:
        with self._lock:
            if self._sftp_client is not None:
                with contextlib.suppress(Exception):
                    self._sftp_client.close()
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
            self._sftp_client = None
            self._client = None

    def close(self) -> None:
        self._drop()

    def _sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            client = self._connection()
            if self._sftp_client is None:
                try:
                    sftp = client.open_sftp()
                except _NET_ERRORS as exc:
                    self._drop()
                    raise BackendUnavailable(f"ssh {self._where()}: cannot open SFTP: {exc}") from exc
                channel = sftp.get_channel()
                if channel is not None:
                    channel.settimeout(self.io_timeout)
                self._sftp_client = sftp
            return self._sftp_client

    def _net_failure(self, what: str, exc: BaseException) -> BackendUnavailable:
        self._drop()
        return BackendUnavailable(f"ssh {self._where()}: {what}: {exc or type(exc).__name__}")

    # -- commands -----------------------------------------------------------------------------

    def run(self, argv: list[str], timeout: float, input: bytes | None = None) -> CommandResult:
        if not argv:
            raise ValueError("empty argv")
        command = shlex.join(argv)
        deadline = time.monotonic() + timeout
        with self._lock:
            client = self._connection()
            transport = client.get_transport()
            if transport is None:
                raise self._net_failure("no transport", EOFError())
            try:
                channel = transport.open_session(timeout=min(timeout, self.connect_timeout))
            except _NET_ERRORS as exc:
                raise self._net_failure("cannot open a channel", exc) from exc
        try:
            channel.settimeout(max(0.1, min(timeout, self.io_timeout)))
            channel.exec_command(command)
            if input:
                channel.sendall(input)
            channel.shutdown_write()
            out = bytearray()
            err = bytearray()
            while True:
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                if len(out) + len(err) > MAX_OUTPUT_BYTES:
                    raise BackendUnavailable(f"ssh {self._where()}: {argv[0]} printed over {MAX_OUTPUT_BYTES} bytes")
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                if time.monotonic() >= deadline:
                    raise BackendUnavailable(f"ssh {self._where()}: {argv[0]} timed out after {timeout:g}s")
                channel.status_event.wait(0.01)
            code = channel.recv_exit_status()
        except BackendUnavailable:
            with contextlib.suppress(Exception):
                channel.close()
            raise
        except _NET_ERRORS as exc:
            with contextlib.suppress(Exception):
                channel.close()
            raise self._net_failure(f"{argv[0]} failed", exc) from exc
        channel.close()
        return CommandResult(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    # -- files --------------------------------------------------------------------------------

    def put_file(self, source: Path | bytes, remote_path: str, mode: int = 0o600, *, sync: bool = True) -> None:
        # SFTP close() flushes to the server; OpenSSH's fsync extension is not used (as before)
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        directory, name = posixpath.split(remote_path)
        tmp = posixpath.join(directory, f".{name}.tmp.{os.getpid()}")
        with self._lock:
            sftp = self._sftp()
            try:
                with sftp.open(tmp, "wb") as handle:
                    handle.chmod(mode)
                    handle.write(data)
                sftp.posix_rename(tmp, remote_path)
            except (TimeoutError, paramiko.SSHException, EOFError) as exc:
                raise self._net_failure(f"cannot write {remote_path}", exc) from exc

    def read_file(self, remote_path: str, max_bytes: int) -> bytes | None:
        with self._lock:
            sftp = self._sftp()
            try:
                st = sftp.lstat(remote_path)
                if st.st_mode is None or not stat.S_ISREG(st.st_mode) or (st.st_size or 0) > max_bytes:
                    return None
                with sftp.open(remote_path, "rb") as handle:
                    fst = handle.stat()
                    if not _same_file(st, fst):
                        return None
                    data = handle.read(max_bytes + 1)
            except (FileNotFoundError, PermissionError):
                return None
            except (TimeoutError, paramiko.SSHException, EOFError) as exc:
                raise self._net_failure(f"cannot read {remote_path}", exc) from exc
            except OSError:
                return None
        return None if len(data) > max_bytes else bytes(data)

    def create_exclusive(self, remote_path: str, data: bytes, mode: int = 0o600) -> bool:
        with self._lock:
            sftp = self._sftp()
            try:
                with sftp.open(remote_path, "wx") as handle:
                    handle.chmod(mode)
                    handle.write(data)
                return True
            except FileNotFoundError:
                raise
            except (TimeoutError, paramiko.SSHException, EOFError) as exc:
                raise self._net_failure(f"cannot create {remote_path}", exc) from exc
            except OSError:
                # SFTP v3 reports an existing file as a generic failure: look
                try:
                    sftp.lstat(remote_path)
                except FileNotFoundError:
                    raise
                return False

    def makedirs(self, remote_path: str, mode: int = 0o700) -> None:
        with self._lock:
            sftp = self._sftp()
            parts = [p for p in remote_path.split("/") if p]
            current = "/" if remote_path.startswith("/") else ""
            try:
                for part in parts:
                    current = posixpath.join(current, part) if current else part
                    try:
                        st = sftp.stat(current)
                    except FileNotFoundError:
                        sftp.mkdir(current, mode)
                        continue
                    if st.st_mode is None or not stat.S_ISDIR(st.st_mode):
                        raise NotADirectoryError(f"{current} exists and is not a directory")
            except (TimeoutError, paramiko.SSHException, EOFError) as exc:
                raise self._net_failure(f"cannot create {remote_path}", exc) from exc

    def fetch_file(self, remote_path: str, local_path: Path, max_bytes: int) -> bool:
        """Stream one regular file here (at most ``max_bytes``; the rest is cut)."""
        with self._lock:
            sftp = self._sftp()
            try:
                st = sftp.lstat(remote_path)
                if st.st_mode is None or not stat.S_ISREG(st.st_mode):
                    return False
                local_path.parent.mkdir(parents=True, exist_ok=True)
                with sftp.open(remote_path, "rb") as handle, open(local_path, "wb") as out:
                    if not _same_file(st, handle.stat()):
                        return False
                    left = min(st.st_size or 0, max_bytes)
                    while left > 0:
                        chunk = handle.read(min(_CHUNK, left))
                        if not chunk:
                            break
                        out.write(chunk)
                        left -= len(chunk)
                return True
            except (FileNotFoundError, PermissionError):
                return False
            except (TimeoutError, paramiko.SSHException, EOFError) as exc:
                raise self._net_failure(f"cannot fetch {remote_path}", exc) from exc

    def harvest(self, remote_dir: str, dest: Path, limits: HarvestLimits) -> HarvestReport:
        with self._lock:
            sftp = self._sftp()
            try:
                return SftpHarvester(sftp, limits).harvest(remote_dir, dest)
            except (TimeoutError, paramiko.SSHException, EOFError) as exc:
                raise self._net_failure(f"cannot harvest {remote_dir}", exc) from exc


def _same_file(a: paramiko.SFTPAttributes, b: paramiko.SFTPAttributes) -> bool:
    if b.st_mode is None or not stat.S_ISREG(b.st_mode):
        return False
    return (a.st_size, a.st_mtime, a.st_uid) == (b.st_size, b.st_mtime, b.st_uid)


def _link_count(attr: paramiko.SFTPAttributes) -> int | None:
    """The link count from the ``ls -l`` style long name of a readdir entry (OpenSSH, most servers)."""
    longname: Any = getattr(attr, "longname", None)
    if not isinstance(longname, str):
        return None
    fields = longname.split()
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1])


def _sort_key(attr: paramiko.SFTPAttributes) -> bytes:
    name: Any = attr.filename
    return os.fsencode(name) if isinstance(name, str) else bytes(name)


def _prepare_dest(dest: Path) -> None:
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.mkdir(dest, 0o755)
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDestination(f"harvest destination {dest} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDestination(f"harvest destination {dest} is not a directory")
    if any(dest.iterdir()):
        raise UnsafeDestination(f"harvest destination {dest} is not empty")


class SftpHarvester(HarvestTally):
    """The rules of :func:`hpc_compute.harvest.harvest_directory`, over SFTP."""

    def __init__(self, sftp: paramiko.SFTPClient, limits: HarvestLimits) -> None:
        super().__init__(limits)
        self.sftp = sftp

    def harvest(self, remote_dir: str, dest: Path) -> HarvestReport:
        _prepare_dest(dest)
        try:
            st = self.sftp.lstat(remote_dir)
        except FileNotFoundError:
            self.report.refused.append(Refusal(".", R_SOURCE_MISSING))
            return self.report
        if st.st_mode is not None and stat.S_ISLNK(st.st_mode):
            self.report.refused.append(Refusal(".", R_SOURCE_SYMLINK))
            return self.report
        if st.st_mode is None or not stat.S_ISDIR(st.st_mode):
            self.report.refused.append(Refusal(".", R_SOURCE_NOT_DIR))
            return self.report
        with contextlib.suppress(StopWalk):
            self.walk(remote_dir, dest, "", 0)
        self.report.files.sort(key=lambda f: f.path)
        self.report.refused.sort(key=lambda r: r.path)
        return self.report

    def walk(self, remote: str, local: Path, prefix: str, depth: int) -> None:
        try:
            entries = self.sftp.listdir_attr(remote)
        except FileNotFoundError:
            self.refuse(prefix.rstrip("/") or ".", R_VANISHED)
            return
        except PermissionError as exc:
            self.refuse(prefix.rstrip("/") or ".", f"{R_OPEN_FAILED}: {exc.strerror or exc}")
            return
        for attr in sorted(entries, key=_sort_key):
            name: Any = attr.filename
            if not isinstance(name, str):
                self.refuse(prefix + os.fsdecode(name).encode("utf-8", "backslashreplace").decode(), R_NAME_NOT_UTF8)
                continue
            rel = prefix + name.encode("unicode_escape").decode("ascii") if name_problem(name) else prefix + name
            if depth + 1 > self.limits.max_depth:
                self.refuse(rel, R_DEPTH, truncated=True)
                continue
            problem = name_problem(name)
            if problem is not None:
                self.refuse(rel, problem)
                continue
            mode = attr.st_mode
            if mode is None:
                self.refuse(rel, R_UNKNOWN_TYPE)
                continue
            path = posixpath.join(remote, name)
            if stat.S_ISDIR(mode):
                if depth + 1 >= self.limits.max_depth:
                    self.refuse(rel, R_DEPTH, truncated=True)
                    continue
                sub = local / name
                os.mkdir(sub, 0o755)
                self.walk(path, sub, rel + "/", depth + 1)
            elif stat.S_ISREG(mode):
                self.file(path, local / name, rel, attr)
            else:
                self.refuse(rel, type_reason(mode) or R_UNKNOWN_TYPE)

    def file(self, path: str, target: Path, rel: str, attr: paramiko.SFTPAttributes) -> None:
        limits = self.limits
        links = _link_count(attr)
        if links is None:
            self.refuse(rel, f"{R_HARD_LINK} (link count unknown)")
            return
        if links > 1:
            self.refuse(rel, f"{R_HARD_LINK} (st_nlink={links})")
            return
        size = attr.st_size or 0
        if len(self.report.files) >= limits.max_files:
            self.refuse(rel, R_MAX_FILES, truncated=True)
            return
        if size > limits.max_file_bytes:
            self.refuse(rel, R_MAX_FILE_BYTES, truncated=True)
            return
        if self.report.total_bytes + size > limits.max_total_bytes:
            self.refuse(rel, R_MAX_TOTAL_BYTES, truncated=True)
            return
        try:
            handle = self.sftp.open(path, "rb")
        except FileNotFoundError:
            self.refuse(rel, R_VANISHED)
            return
        except PermissionError as exc:
            self.refuse(rel, f"{R_OPEN_FAILED}: {exc.strerror or exc}")
            return
        digest = hashlib.sha256()
        copied = 0
        with handle:
            if not _same_file(attr, handle.stat()):
                self.refuse(rel, f"{R_CHANGED}: replaced by another file")
                return
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                with os.fdopen(fd, "wb") as out:
                    while copied < size:
                        try:
                            chunk = handle.read(min(_CHUNK, size - copied))
                        except OSError as exc:
                            raise _ReadError(str(exc)) from exc
                        if not chunk:
                            break
                        digest.update(chunk)
                        out.write(chunk)
                        copied += len(chunk)
            except _ReadError as exc:
                target.unlink()
                self.refuse(rel, f"{R_READ_FAILED}: {exc}")
                return
            except BaseException:
                with contextlib.suppress(OSError):
                    target.unlink()
                raise
        self.report.files.append(HarvestedFile(rel, copied, digest.hexdigest()))
        self.report.total_bytes += copied


class _ReadError(Exception):
    pass


__all__ = ["SftpHarvester", "SshTransport"]
