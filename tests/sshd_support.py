"""A real sshd on 127.0.0.1 (random port) for the SSH transport tests.

Generated host key pinned in a temporary known_hosts, a generated client key in a temporary
authorized_keys, password and agent authentication off. The daemon runs in the foreground
(``-D -e``) as a child of the test process and is stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
)


@dataclass(frozen=True)
class SshServer:
    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    host_public_key: str
    pid: int

    def settings(self) -> dict[str, object]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "key_file": str(self.key_file),
            "known_hosts": str(self.known_hosts),
            "connect_timeout": 10.0,
            "keepalive": 15,
        }


def sshd_available() -> str | None:
    """None if an sshd can be started here, else why not."""
    if not os.path.exists(SSHD):
        return f"{SSHD} is not installed"
    if not os.path.exists(SSH_KEYGEN):
        return "ssh-keygen is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip() if path.suffix else Path(f"{path}.pub").read_text().strip()


@contextmanager
def running_sshd(directory: Path, user: str = "root") -> Iterator[SshServer]:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    host_key = directory / "host_ed25519"
    client_key = directory / "client_ed25519"
    host_pub = _keygen(host_key)
    client_pub = _keygen(client_key)
    authorized = directory / "authorized_keys"
    authorized.write_text(client_pub + "\n")
    os.chmod(authorized, 0o600)
    sftp = next((p for p in SFTP_SERVER_CANDIDATES if os.path.exists(p)), "internal-sftp")
    port = _free_port()
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {directory / 'sshd.pid'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "AllowAgentForwarding no",
                "AllowTcpForwarding no",
                "X11Forwarding no",
                "PrintMotd no",
                "MaxSessions 50",
                "MaxStartups 50",
                "LogLevel ERROR",
                f"Subsystem sftp {sftp}",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    known_hosts = directory / "known_hosts"
    key_type, key_data = host_pub.split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_data}\n")
    log = open(directory / "sshd.log", "wb")  # noqa: SIM115 - handed to the daemon
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({proc.returncode}): {(directory / 'sshd.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start listening") from None
                time.sleep(0.05)
        yield SshServer(
            host="127.0.0.1",
            port=port,
            user=user,
            key_file=client_key,
            known_hosts=known_hosts,
            host_public_key=host_pub,
            pid=proc.pid,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
