"""The simulator's "VMs": a network namespace with a veth pair, a private mount namespace, a
real sshd, and the project's own context script talking to a fake OneGate endpoint.

Each VM owns a unique /30 from 10.213.0.0/16 (index n: 10.213.0.0 + 4n; host side .1, guest .2),
claimed under a file lock with an owner-PID file, so two simulators never share a subnet and a
crashed one's leftovers can be reaped safely (only namespaces whose owner is dead are touched).

Inside the VM's mount namespace the guest sees its own ``/root`` (login home), ``/etc/ssh``
(host keys the context script generates) and ``/var/tmp/hpcc-vm`` (its "disk", where the remote
work directory lives); all three are bind mounts of directories under
``/var/tmp/hpcc-sim/<namespace>/``. Everything else is the host's filesystem, read-write: this is
a test rig, not a sandbox (jobs are sealed by bubblewrap on top).
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.opennebula_sim import templates

STATE_DIR = Path("/run/hpcc-sim")
VM_ROOT = Path("/var/tmp/hpcc-sim")
GUEST_DISK = "/var/tmp/hpcc-vm"  # the path the guest sees its disk at (the remote work dir lives here)
NS_PREFIX = "hpcc-sim-"
NET = ipaddress.ip_network("10.213.0.0/16")
MAX_INDEX = NET.num_addresses // 4 - 1
CONTEXT_SCRIPT = Path(__file__).resolve().parents[2] / "vm_images" / "context" / "hpcc-context.sh"
SSHD = "/usr/sbin/sshd"


def _run(*argv: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _alloc_lock() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "alloc.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def names(index: int) -> tuple[str, str, str, str, str]:
    """(namespace, host veth, guest veth, host ip, guest ip) of subnet ``index``."""
    base = int(NET.network_address) + 4 * index
    host_ip = str(ipaddress.ip_address(base + 1))
    guest_ip = str(ipaddress.ip_address(base + 2))
    return f"{NS_PREFIX}{index}", f"hsh{index}", f"hsg{index}", host_ip, guest_ip


def _host_addresses() -> set[str]:
    out = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    found: set[str] = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            found.add(parts[parts.index("inet") + 1].split("/")[0])
    return found


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sim_namespaces() -> list[str]:
    return [ns for ns in _namespaces() if ns.startswith(NS_PREFIX)]


def allocate_index(start: int = 1) -> int:
    """Claim a free /30 (file lock + owner-PID file + a check of the host's addresses)."""
    with _alloc_lock():
        used = _host_addresses()
        existing = set(_namespaces())
        for index in range(start, MAX_INDEX):
            owner = STATE_DIR / f"idx-{index}"
            ns, _h, _g, host_ip, guest_ip = names(index)
            if owner.exists() or ns in existing or host_ip in used or guest_ip in used:
                continue
            owner.write_text(str(os.getpid()))
            return index
    raise RuntimeError("no free /30 left in 10.213.0.0/16")


def release_index(index: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"idx-{index}").unlink()


def kill_namespace_pids(ns: str) -> None:
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    pids = [int(p) for p in out.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p) and not _zombie(p)]
        if pids:
            time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return True
    return data[data.rfind(b")") + 2 :][:1] in (b"Z", b"X")


def destroy_network(index: int) -> None:
    ns, host_if, _g, _h, _ip = names(index)
    if ns in _namespaces():
        kill_namespace_pids(ns)
    _run("ip", "link", "del", host_if, check=False)
    _run("ip", "netns", "del", ns, check=False)


def reap_stale() -> list[str]:
    """Remove namespaces ``hpcc-sim-*`` (and their processes, veths, dirs) whose owner is dead."""
    reaped: list[str] = []
    with _alloc_lock():
        owners: dict[int, int] = {}
        if STATE_DIR.exists():
            for path in STATE_DIR.glob("idx-*"):
                try:
                    owners[int(path.name[4:])] = int(path.read_text().strip() or "0")
                except ValueError:
                    owners[int(path.name[4:])] = 0
        indexes = set(owners)
        for ns in sim_namespaces():
            suffix = ns[len(NS_PREFIX) :]
            if suffix.isdigit():
                indexes.add(int(suffix))
        for index in sorted(indexes):
            owner = owners.get(index, 0)
            if owner and owner != os.getpid() and _pid_alive(owner):
                continue
            if owner == os.getpid():
                continue
            ns = names(index)[0]
            destroy_network(index)
            shutil.rmtree(VM_ROOT / ns, ignore_errors=True)
            release_index(index)
            reaped.append(ns)
    return reaped


class OneGateServer:
    """The OneGate endpoint a VM reaches (bound to the VM's host-side veth address only)."""

    def __init__(self, host_ip: str, vm_id: int, token: str, on_update: Callable[[templates.Template], None]) -> None:
        self.vm_id = vm_id
        self.token = token
        self.on_update = on_update
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def _auth(self) -> bool:
                ok = self.headers.get("X-ONEGATE-TOKEN") == outer.token and self.headers.get("X-ONEGATE-VMID") == str(
                    outer.vm_id
                )
                if not ok:
                    self.send_response(401)
                    self.end_headers()
                return ok

            def do_PUT(self) -> None:
                if self.path.rstrip("/") != "/vm" or not self._auth():
                    if self.path.rstrip("/") != "/vm":
                        self.send_response(404)
                        self.end_headers()
                    return
                length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
                body = self.rfile.read(length).decode("utf-8", "replace")
                try:
                    update = templates.parse(body)
                except templates.TemplateSyntaxError:
                    self.send_response(400)
                    self.end_headers()
                    return
                outer.on_update(update)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer((host_ip, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile {d}/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
ClientAliveInterval 5
ClientAliveCountMax 3
LogLevel VERBOSE
"""

HOLDER = """\
set -e
mount --make-rprivate / 2>/dev/null || true
mount --bind "$D/root" /root
mount --bind "$D/etc-ssh" /etc/ssh
mount --bind "$D/disk" {guest_disk}
echo up > "$D/holder.up"
exec sleep 100000
"""


class Guest:
    """One running VM: network, mount namespace holder, OneGate endpoint, context script, sshd."""

    def __init__(
        self, index: int, vm_id: int, context: dict[str, str], on_update: Callable[[templates.Template], None]
    ) -> None:
        self.index = index
        self.vm_id = vm_id
        self.ns, self.host_if, self.guest_if, self.host_ip, self.guest_ip = names(index)
        self.dir = VM_ROOT / self.ns
        self.context = context
        self.on_update = on_update
        self.holder: subprocess.Popen[bytes] | None = None
        self.sshd: subprocess.Popen[bytes] | None = None
        self.context_proc: subprocess.Popen[bytes] | None = None
        self.onegate: OneGateServer | None = None
        self.token = secrets.token_hex(16)
        self.blackholed = False

    # -- bring up -----------------------------------------------------------------------------

    def network_up(self) -> None:
        ns, host_if, guest_if = self.ns, self.host_if, self.guest_if
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", guest_if)
        _run("ip", "link", "set", guest_if, "netns", ns)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.guest_ip}/30", "dev", guest_if)
        _run("ip", "-n", ns, "link", "set", guest_if, "up")

    def disk_up(self) -> None:
        for sub in ("root", "etc-ssh", "disk"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir / "etc-ssh", 0o755)
        Path(GUEST_DISK).mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        os.chmod("/run/sshd", 0o755)
        (self.dir / "sshd_config").write_text(SSHD_CONFIG.format(d=self.dir))
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "D": str(self.dir)}
        with open(self.dir / "holder.log", "wb") as log:
            self.holder = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", HOLDER.format(guest_disk=GUEST_DISK)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 5.0
        while not (self.dir / "holder.up").exists():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"VM {self.ns}: mount namespace did not come up: {self._tail('holder.log')}")
            time.sleep(0.01)

    def _tail(self, name: str) -> str:
        try:
            return (self.dir / name).read_text(errors="replace")[-500:]
        except OSError:
            return ""

    def _nsenter(self, argv: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert self.holder is not None
        with open(self.dir / log_name, "ab") as log:
            return subprocess.Popen(
                ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *argv],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip

    def onegate_up(self) -> None:
        self.onegate = OneGateServer(self.host_ip, self.vm_id, self.token, self.on_update)

    def run_context(self, sshd_wait_s: float) -> None:
        """Start the image's context script with the VM's CONTEXT as environment (like one-context)."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        for key, value in self.context.items():
            if key.replace("_", "").isalnum():
                env[key] = value
        if self.context.get("TOKEN", "").upper() == "YES" and self.onegate is not None:
            env["ONEGATE_ENDPOINT"] = self.onegate.endpoint
            env["ONEGATE_TOKEN"] = self.token
        env["VMID"] = str(self.vm_id)
        env["HPCC_SSHD_WAIT_S"] = str(int(max(1, sshd_wait_s)))
        self.context_proc = self._nsenter(["/bin/bash", str(CONTEXT_SCRIPT)], "context.log", env)

    def wait_host_key(self, timeout: float = 10.0) -> None:
        key = self.dir / "etc-ssh" / "ssh_host_ed25519_key.pub"
        deadline = time.monotonic() + timeout
        while not key.exists() or key.stat().st_size == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"VM {self.ns}: the context script made no host key: {self._tail('context.log')}")
            time.sleep(0.01)
        time.sleep(0.02)  # the script chmods right after writing

    def start_sshd(self) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        config = str(self.dir / "sshd_config")
        check = _run("ip", "netns", "exec", self.ns, SSHD, "-t", "-f", config, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"VM {self.ns}: sshd -t failed: {check.stderr.strip()}")
        self.sshd = self._nsenter([SSHD, "-D", "-e", "-f", config], "sshd.log", env)

    def host_key_line(self) -> str | None:
        try:
            return (self.dir / "etc-ssh" / "ssh_host_ed25519_key.pub").read_text().strip()
        except OSError:
            return None

    # -- faults -------------------------------------------------------------------------------

    def kill_sshd(self) -> None:
        """Kill sshd's master and every session process; the job (not sshd) survives."""
        out = _run("ip", "netns", "pids", self.ns, check=False).stdout
        for pid in (int(p) for p in out.split() if p.isdigit()):
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("sshd"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.sshd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sshd.wait(timeout=2)
            self.sshd = None

    def blackhole(self, on: bool) -> None:
        if on == self.blackholed:
            return
        verb = "add" if on else "del"
        _run("ip", "-n", self.ns, "route", verb, "blackhole", f"{self.host_ip}/32", check=False)
        self.blackholed = on

    # -- tear down ----------------------------------------------------------------------------

    def destroy(self) -> None:
        if self.onegate is not None:
            self.onegate.close()
            self.onegate = None
        destroy_network(self.index)
        for proc in (self.sshd, self.context_proc, self.holder):
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
        self.sshd = self.context_proc = self.holder = None

    def remove_disk(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
