"""SSH to one worker VM (paramiko): a per-attempt key, a pinned host key, a timeout on everything.

The login-node transport (:mod:`hpc_compute.transports.ssh`) reads ``known_hosts`` and key
files and keeps one pooled connection; a VM needs a key pair made for the attempt, a host key
taken from the VM's USER_TEMPLATE (or, if the site chose TOFU, the first key seen, recorded),
resumable byte-offset reads of the logs and short-lived connections that a partition cannot
hang. Harvesting reuses the transport's :class:`~hpc_compute.transports.ssh.SftpHarvester`, so
the rules are the same as for local harvesting.

Every failure (refused, timed out, reset, auth, host key) raises :class:`SshError`;
``host_key_mismatch`` and ``auth_failed`` tell the errors that waiting will not fix.
"""

from __future__ import annotations

import base64
import contextlib
import os
import posixpath
import shlex
import socket
import stat
import threading
import time
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hpc_compute.harvest import HarvestLimits, HarvestReport
from hpc_compute.transports.ssh import SftpHarvester

_NET_ERRORS: tuple[type[BaseException], ...] = (paramiko.SSHException, OSError, EOFError, socket.timeout)
MAX_OUTPUT = 4 * 1024 * 1024


class SshError(Exception):
    def __init__(self, message: str, *, host_key_mismatch: bool = False, auth_failed: bool = False) -> None:
        super().__init__(message)
        self.host_key_mismatch = host_key_mismatch
        self.auth_failed = auth_failed


def generate_keypair(private_path: Path, comment: str) -> str:
    """A fresh ed25519 key pair: the private key (OpenSSH format, 0600) at ``private_path``; returns
    the public key line for CONTEXT/SSH_PUBLIC_KEY. Idempotent: an existing key is kept."""
    pub_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and pub_path.exists():
        return pub_path.read_text(encoding="ascii").strip()
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode('ascii')} {comment}"
    tmp = private_path.with_name(f".{private_path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    os.replace(tmp, private_path)
    pub_path.write_text(line + "\n", encoding="ascii")
    return line


def parse_host_key(line: str) -> paramiko.PKey:
    """A public key from ``"<type> <base64> [comment]"`` (USER_TEMPLATE/SSH_HOST_KEY)."""
    parts = line.strip().split()
    if len(parts) < 2:
        raise ValueError("a host key line is '<type> <base64> [comment]'")
    try:
        blob = base64.b64decode(parts[1], validate=True)
        key = paramiko.PKey.from_type_string(parts[0], blob)
    except Exception as exc:
        raise ValueError(f"not a usable {parts[0]} host key: {exc}") from None
    return key


class _Capture(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    """TOFU: accept the first key and record it (the caller stores it); used only when configured."""

    def __init__(self) -> None:
        self.seen: paramiko.PKey | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.seen = key


class VmSsh:
    """One connection to one VM; every operation has a deadline; a failure drops the connection."""

    def __init__(
        self,
        host: str,
        *,
        port: int,
        user: str,
        key_file: Path,
        host_key: paramiko.PKey | None,
        tofu: bool = False,
        connect_timeout: float = 10.0,
        io_timeout: float = 30.0,
    ) -> None:
        if host_key is None and not tofu:
            raise ValueError("a pinned host key is required unless the host key policy is tofu")
        self.host = host
        self.port = port
        self.user = user
        self.key_file = key_file
        self.host_key = host_key
        self.tofu = tofu
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self._client: paramiko.SSHClient | None = None
        self._sftp_client: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()
        self.learned_host_key: paramiko.PKey | None = None

    # -- connection ---------------------------------------------------------------------------

    def _connect(self) -> paramiko.SSHClient:
        if self._client is not None:
            transport = self._client.get_transport()
            if transport is not None and transport.is_active():
                return self._client
            self.close()
        client = paramiko.SSHClient()
        capture: _Capture | None = None
        if self.host_key is not None:
            client.get_host_keys().add(self._known_name(), self.host_key.get_name(), self.host_key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            capture = _Capture()
            client.set_missing_host_key_policy(capture)
        try:
            pkey = paramiko.Ed25519Key.from_private_key_file(str(self.key_file))
        except (OSError, paramiko.SSHException) as exc:
            raise SshError(f"cannot read the attempt's SSH key {self.key_file}: {exc}", auth_failed=True) from exc
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                pkey=pkey,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise SshError(f"ssh {self._where()}: host key mismatch: {exc}", host_key_mismatch=True) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise SshError(f"ssh {self._where()}: authentication failed: {exc}", auth_failed=True) from exc
        except _NET_ERRORS as exc:
            client.close()
            raise SshError(f"ssh {self._where()}: cannot connect: {exc or type(exc).__name__}") from exc
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(max(1, int(self.io_timeout / 3)))
        if capture is not None and capture.seen is not None:
            self.learned_host_key = capture.seen
            self.host_key = capture.seen
        self._client = client
        return client

    def _known_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def connect(self) -> None:
        with self._lock:
            self._connect()

    def close(self) -> None:
        with self._lock:
            if self._sftp_client is not None:
                with contextlib.suppress(Exception):
                    self._sftp_client.close()
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
            self._sftp_client = None
            self._client = None

    def _sftp(self) -> paramiko.SFTPClient:
        client = self._connect()
        if self._sftp_client is None:
            try:
                sftp = client.open_sftp()
            except _NET_ERRORS as exc:
                self.close()
                raise SshError(f"ssh {self._where()}: cannot open SFTP: {exc or type(exc).__name__}") from exc
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(self.io_timeout)
            self._sftp_client = sftp
        return self._sftp_client

    def _fail(self, what: str, exc: BaseException) -> SshError:
        self.close()
        return SshError(f"ssh {self._where()}: {what}: {exc or type(exc).__name__}")

    # -- commands -----------------------------------------------------------------------------

    def run(self, script: str, timeout: float) -> tuple[int, str, str]:
        """Run shell text (built by the caller with :func:`shlex.quote`); no pty, bounded output."""
        deadline = time.monotonic() + timeout
        with self._lock:
            client = self._connect()
            transport = client.get_transport()
            if transport is None:
                raise self._fail("no transport", EOFError())
            try:
                channel = transport.open_session(timeout=min(timeout, self.connect_timeout))
            except _NET_ERRORS as exc:
                raise self._fail("cannot open a channel", exc) from exc
            try:
                channel.settimeout(max(0.1, min(timeout, self.io_timeout)))
                channel.exec_command(script)
                channel.shutdown_write()
                out, err = bytearray(), bytearray()
                while True:
                    while channel.recv_ready():
                        out += channel.recv(65536)
                    while channel.recv_stderr_ready():
                        err += channel.recv_stderr(65536)
                    if len(out) + len(err) > MAX_OUTPUT:
                        raise SshError(f"ssh {self._where()}: command printed more than {MAX_OUTPUT} bytes")
                    if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                        break
                    if time.monotonic() >= deadline:
                        raise SshError(f"ssh {self._where()}: command timed out after {timeout:g}s")
                    channel.status_event.wait(0.02)
                code = channel.recv_exit_status()
            except SshError:
                with contextlib.suppress(Exception):
                    channel.close()
                self.close()
                raise
            except _NET_ERRORS as exc:
                with contextlib.suppress(Exception):
                    channel.close()
                raise self._fail("command failed", exc) from exc
            channel.close()
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    # -- files --------------------------------------------------------------------------------

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        code, _out, err = self.run(f"mkdir -p -m {mode:o} {shlex.quote(path)}", timeout=self.io_timeout)
        if code != 0:
            raise SshError(f"ssh {self._where()}: mkdir {path} failed: {err.strip()}")

    def put_bytes(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write a file atomically (temporary name, then rename)."""
        directory, name = posixpath.split(path)
        tmp = posixpath.join(directory, f".{name}.hpcc-tmp")
        with self._lock:
            sftp = self._sftp()
            try:
                with sftp.open(tmp, "wb") as handle:
                    handle.chmod(mode)
                    handle.set_pipelined(True)
                    handle.write(data)
                sftp.posix_rename(tmp, path)
            except _NET_ERRORS as exc:
                raise self._fail(f"cannot write {path}", exc) from exc

    def put_file(self, source: Path, path: str, mode: int = 0o600) -> None:
        with self._lock:
            sftp = self._sftp()
            directory, name = posixpath.split(path)
            tmp = posixpath.join(directory, f".{name}.hpcc-tmp")
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                with os.fdopen(fd, "rb") as local, sftp.open(tmp, "wb") as handle:
                    handle.chmod(mode)
                    handle.set_pipelined(True)
                    while chunk := local.read(1024 * 1024):
                        handle.write(chunk)
                sftp.posix_rename(tmp, path)
            except _NET_ERRORS as exc:
                raise self._fail(f"cannot write {path}", exc) from exc

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        with self._lock:
            sftp = self._sftp()
            try:
                sftp.mkdir(path, mode)
            except _NET_ERRORS as exc:
                raise self._fail(f"cannot mkdir {path}", exc) from exc

    def exists(self, path: str) -> bool:
        with self._lock:
            sftp = self._sftp()
            try:
                sftp.lstat(path)
            except FileNotFoundError:
                return False
            except _NET_ERRORS as exc:
                raise self._fail(f"cannot stat {path}", exc) from exc
            return True

    def read_from(self, path: str, offset: int, max_bytes: int) -> bytes | None:
        """Bytes of a regular file from ``offset`` (at most ``max_bytes``); None if missing/not regular."""
        with self._lock:
            sftp = self._sftp()
            try:
                st = sftp.lstat(path)
                if st.st_mode is None or not stat.S_ISREG(st.st_mode):
                    return None
                size = st.st_size or 0
                if size <= offset:
                    return b""
                with sftp.open(path, "rb") as handle:
                    handle.seek(offset)
                    want = min(size - offset, max_bytes)
                    data = bytearray()
                    while len(data) < want:
                        chunk = handle.read(min(1024 * 1024, want - len(data)))
                        if not chunk:
                            break
                        data += chunk
            except FileNotFoundError:
                return None
            except PermissionError:
                return None
            except _NET_ERRORS as exc:
                raise self._fail(f"cannot read {path}", exc) from exc
        return bytes(data)

    def harvest(self, remote_dir: str, dest: Path, limits: HarvestLimits) -> HarvestReport:
        with self._lock:
            sftp = self._sftp()
            try:
                return SftpHarvester(sftp, limits).harvest(remote_dir, dest)
            except _NET_ERRORS as exc:
                raise self._fail(f"cannot harvest {remote_dir}", exc) from exc
