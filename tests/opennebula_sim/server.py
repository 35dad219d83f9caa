"""A faithful ``oned`` stand-in: a threaded XML-RPC server the real pyone client talks to.

Message formats, error codes, the TEMPLATE/USER_TEMPLATE split, short vs extended pool bodies,
the VM state machine and the terminate rules follow OpenNebula (see the research notes, §2-§6).
With ``namespaces=True`` every VM that reaches BOOT becomes a network namespace running a real
sshd and the project's context script (:mod:`tests.opennebula_sim.netns`).

Control API (in process): :meth:`Simulator.inject` (faults for the next VMs or names matching a
regex), :meth:`Simulator.rpc_fault` (HTTP 500s, dropped connections, delays, lost instantiate
replies), :meth:`Simulator.vms`, :meth:`Simulator.wait_for`. The same controls exist as
``sim.*`` XML-RPC methods for a simulator started by hand (``python -m tests.opennebula_sim``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import socketserver
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

from tests.opennebula_sim import netns, templates
from tests.opennebula_sim.templates import Template

log = logging.getLogger("opennebula_sim")

# error codes (RequestManager)
AUTHENTICATION = 0x0100
AUTHORIZATION = 0x0200
NO_EXISTS = 0x0400
ACTION = 0x0800
RPC_API = 0x1000
INTERNAL = 0x2000
ALLOCATE = 0x4000

# VM STATE / LCM_STATE values used here
INIT, PENDING, HOLD, ACTIVE, STOPPED, SUSPENDED, DONE = 0, 1, 2, 3, 4, 5, 6
POWEROFF, UNDEPLOYED, CLONING, CLONING_FAILURE = 8, 9, 10, 11
LCM_INIT, PROLOG, BOOT, RUNNING, EPILOG, SHUTDOWN, UNKNOWN = 0, 1, 2, 3, 11, 12, 16
BOOT_FAILURE, PROLOG_FAILURE = 36, 39
FAILURE_LCM = frozenset({36, 37, 38, 39, 40, 41, 42, 44, 46, 47, 48, 49, 50, 61})


@dataclass
class Delays:
    """Seconds spent in each step of the VM life cycle."""

    pending: float = 0.3
    prolog: float = 0.3
    boot: float = 0.2
    shutdown: float = 0.2
    epilog: float = 0.2


@dataclass
class Faults:
    """Faults for one VM (all off by default). Times are seconds after the VM reached RUNNING."""

    stuck_pending: bool = False
    prolog_failure: bool = False
    boot_failure: bool = False
    no_ssh: bool = False
    ssh_blackhole: bool = False
    ssh_late: float | None = None
    kill_sshd_after: float | None = None
    restart_sshd_after: float | None = None  # seconds after the kill
    partition_after: float | None = None
    partition_for: float = 0.0
    vanish_after: float | None = None
    poweroff_after: float | None = None
    unknown_after: float | None = None
    terminate_reject: int = 0
    delays: Delays | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Faults:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and k != "delays"}
        faults = cls(**values)
        if isinstance(data.get("delays"), dict):
            faults.delays = Delays(**data["delays"])
        return faults


@dataclass
class User:
    name: str
    password: str
    uid: int
    gid: int
    vm_quota: int | None = None  # VMS quota (None: unlimited)


class _RpcFailure(Exception):
    def __init__(self, code: int, message: str, resp_id: int = -1) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.resp_id = resp_id


@dataclass
class VM:
    id: int
    name: str
    user: User
    template: Template
    user_template: Template
    faults: Faults
    delays: Delays
    index: int
    state: int = PENDING
    lcm: int = LCM_INIT
    prev_state: int = PENDING
    prev_lcm: int = LCM_INIT
    stime: int = field(default_factory=lambda: int(time.time()))
    etime: int = 0
    terminate_requested: bool = False
    vanished: bool = False
    guest: netns.Guest | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    running_since: float | None = None
    log: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return netns.names(self.index)[4]


def _state_names(state: int, lcm: int) -> str:
    return f"{state}/{lcm}"


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_POST(self) -> None:
        sim: Simulator = self.server.sim  # type: ignore[attr-defined]
        if not self.is_rpc_path_valid():
            self.report_404()
            return
        length = int(self.headers.get("content-length") or 0)
        data = self.rfile.read(length)
        fault = sim._take_http_fault()
        if sim.rpc_delay_s > 0:
            time.sleep(sim.rpc_delay_s)
        if fault == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        if fault == "500":
            self.send_response(500, "Internal Server Error")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        sim._local.lost_reply = False
        response = self.server._marshaled_dispatch(data, None, self.path)  # type: ignore[attr-defined]
        if sim._local.lost_reply:
            self.send_response(502, "Bad Gateway")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-type", "text/xml")
        self.send_header("Content-length", str(len(response)))
        self.end_headers()
        self.wfile.write(response)


class _Server(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    allow_reuse_address = True


DEFAULT_TEMPLATE: Template = {
    "NAME": "hpcc-worker",
    "CPU": "1",
    "VCPU": "1",
    "MEMORY": "512",
    "DISK": {"IMAGE": "hpcc-worker-debian12", "IMAGE_ID": "0"},
    "NIC": {"NETWORK": "hpcc-net", "NETWORK_ID": "0"},
    "CONTEXT": {"NETWORK": "YES", "SSH_PUBLIC_KEY": "$USER[SSH_PUBLIC_KEY]", "TOKEN": "YES"},
}


class Simulator:
    def __init__(
        self,
        *,
        delays: Delays | None = None,
        namespaces: bool = True,
        users: list[User] | None = None,
        admins: frozenset[str] = frozenset({"oneadmin"}),
        version: str = "6.10.0",
        json_query_supported: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.delays = delays or Delays()
        self.namespaces = namespaces
        default_users = [User("oneadmin", "opennebula", 0, 0), User("hpcc", "hpcc-pw", 5, 1)]
        self.users = {u.name: u for u in (users or default_users)}
        self.admins = admins
        self.version = version
        self.json_query_supported = json_query_supported
        self.templates: dict[int, Template] = {0: copy.deepcopy(DEFAULT_TEMPLATE)}
        self.vms_by_id: dict[int, VM] = {}
        self.lock = threading.RLock()
        self._next_id = 0
        self._next_fake_index = 1
        self._pending_faults: list[Faults] = []
        self._matching_faults: list[tuple[re.Pattern[str], Faults]] = []
        self._http_faults: list[str] = []
        self.lost_instantiate_replies = 0
        self.rpc_delay_s = 0.0
        self.calls: list[str] = []
        self._local = threading.local()
        self._server = _Server((host, port), requestHandler=_Handler, logRequests=False, allow_none=False)
        self._server.sim = self  # type: ignore[attr-defined]
        self._server.register_instance(self)
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/RPC2"

    def start(self) -> Simulator:
        if self.namespaces:
            netns.reap_stale()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut the server down and destroy every VM (as if oned's host went away)."""
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            vms = list(self.vms_by_id.values())
        for vm in vms:
            vm.vanished = True
            vm.wake.set()
        for vm in vms:
            if vm.thread is not None:
                vm.thread.join(timeout=5)
            self._destroy_guest(vm, remove_disk=True)
            if self.namespaces and vm.index:
                netns.release_index(vm.index)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control API --------------------------------------------------------------------------

    def inject(self, faults: Faults, count: int = 1) -> None:
        """Faults for the next ``count`` instantiated VMs."""
        with self.lock:
            self._pending_faults.extend(copy.deepcopy(faults) for _ in range(count))

    def inject_matching(self, name_regex: str, faults: Faults) -> None:
        with self.lock:
            self._matching_faults.append((re.compile(name_regex), faults))

    def rpc_fault(self, kind: str, count: int = 1) -> None:
        """``"500"`` or ``"drop"`` for the next ``count`` HTTP requests; ``"lost_instantiate_reply"``
        creates the next ``count`` VMs and answers HTTP 502."""
        with self.lock:
            if kind == "lost_instantiate_reply":
                self.lost_instantiate_replies += count
            elif kind in ("500", "drop"):
                self._http_faults.extend([kind] * count)
            else:
                raise ValueError(f"unknown rpc fault {kind!r}")

    def _take_http_fault(self) -> str | None:
        with self.lock:
            return self._http_faults.pop(0) if self._http_faults else None

    def vms(self) -> list[VM]:
        with self.lock:
            return list(self.vms_by_id.values())

    def live_vms(self) -> list[VM]:
        return [vm for vm in self.vms() if vm.state != DONE]

    def vm(self, vm_id: int) -> VM:
        with self.lock:
            return self.vms_by_id[vm_id]

    def wait_for(self, predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return bool(predicate())

    def purge(self) -> None:
        """Forget DONE VMs (real oned keeps them; tests may want a clean pool)."""
        with self.lock:
            for vm_id in [i for i, vm in self.vms_by_id.items() if vm.state == DONE]:
                del self.vms_by_id[vm_id]

    def create_orphan(self, name: str, user: str = "hpcc", extra: Template | None = None) -> int:
        """A VM created behind the scheduler's back (e.g. by a crashed scheduler whose ledger is gone)."""
        owner = self.users[user]
        return self._create(owner, "one.template.instantiate", 0, name, False, extra or {"LABELS": "hpc-compute"})

    # -- XML-RPC dispatch ---------------------------------------------------------------------

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        self.calls.append(method)
        if method.startswith("sim."):
            return self._control(method, params)
        handler = _METHODS.get(method)
        if handler is None:
            raise Exception(f'method "{method}" is not supported')
        try:
            if not params or not isinstance(params[0], str):
                raise _RpcFailure(AUTHENTICATION, f"[{method}] User couldn't be authenticated, aborting call.")
            user = self._auth(method, params[0])
            return [True, handler(self, user, method, *params[1:]), 0]
        except _RpcFailure as failure:
            return [False, failure.message, failure.code, failure.resp_id, 0]
        except TypeError as exc:
            return [False, f"[{method}] Wrong number or type of parameters: {exc}", RPC_API, -1, 0]

    def _auth(self, method: str, session: str) -> User:
        name, _, password = session.partition(":")
        user = self.users.get(name)
        if user is None or user.password != password:
            raise _RpcFailure(AUTHENTICATION, f"[{method}] User couldn't be authenticated, aborting call.")
        return user

    def _control(self, method: str, params: tuple[Any, ...]) -> Any:
        if method == "sim.inject":
            self.inject(Faults.from_dict(params[0]), int(params[1]) if len(params) > 1 else 1)
            return True
        if method == "sim.inject_matching":
            self.inject_matching(str(params[0]), Faults.from_dict(params[1]))
            return True
        if method == "sim.rpc_fault":
            self.rpc_fault(str(params[0]), int(params[1]) if len(params) > 1 else 1)
            return True
        if method == "sim.vms":
            return [
                {"id": vm.id, "name": vm.name, "state": vm.state, "lcm_state": vm.lcm, "ip": vm.ip} for vm in self.vms()
            ]
        if method == "sim.delays":
            self.delays = Delays(**params[0])
            return True
        raise Exception(f'method "{method}" is not supported')

    # -- helpers ------------------------------------------------------------------------------

    def _get_vm(self, method: str, user: User, vm_id: Any) -> VM:
        if type(vm_id) is not int:
            raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type: the VM id must be an integer")
        with self.lock:
            vm = self.vms_by_id.get(vm_id)
        if vm is None:
            raise _RpcFailure(NO_EXISTS, f"[{method}] Error getting virtual machine [{vm_id}].", vm_id)
        if vm.user.uid != user.uid and user.name not in self.admins:
            raise _RpcFailure(
                AUTHORIZATION, f"[{method}] User [{user.uid}] : Not authorized to perform MANAGE VM [{vm_id}].", vm_id
            )
        return vm

    def _set_state(self, vm: VM, state: int, lcm: int) -> None:
        with self.lock:
            if (vm.state, vm.lcm) != (state, lcm):
                vm.prev_state, vm.prev_lcm = vm.state, vm.lcm
                vm.state, vm.lcm = state, lcm
                vm.log.append((time.time(), state, lcm))
        vm.wake.set()

    def _faults_for(self, name: str) -> Faults:
        with self.lock:
            for pattern, faults in self._matching_faults:
                if pattern.search(name):
                    return copy.deepcopy(faults)
            if self._pending_faults:
                return self._pending_faults.pop(0)
        return Faults()

    def _allocate_index(self) -> int:
        if self.namespaces:
            return netns.allocate_index()
        with self.lock:
            index = self._next_fake_index
            self._next_fake_index += 1
            return index

    def _create(self, user: User, method: str, tmpl_id: int | None, name: str, hold: bool, extra: Template) -> int:
        base = copy.deepcopy(self.templates[tmpl_id]) if tmpl_id is not None else {}
        merged = templates.merge_top(base, extra)
        for attr in ("MEMORY", "CPU"):
            try:
                ok = float(str(merged.get(attr, "0"))) > 0
            except ValueError:
                ok = False
            if not ok:
                raise _RpcFailure(
                    ALLOCATE,
                    f"[{method}] Error allocating a new virtual machine. {attr} attribute must be a positive number",
                )
        with self.lock:
            if user.vm_quota is not None:
                used = sum(1 for vm in self.vms_by_id.values() if vm.user.uid == user.uid and vm.state != DONE)
                if used >= user.vm_quota:
                    raise _RpcFailure(
                        AUTHORIZATION,
                        f"[{method}] User [{user.uid}] : user [{user.uid}] limit of {user.vm_quota} reached for VMS"
                        " quota in VM.",
                    )
            vm_id = self._next_id
            self._next_id += 1
        merged.pop("NAME", None)
        tmpl, user_tmpl = templates.split(merged)
        index = self._allocate_index()
        _ns, _h, _g, host_ip, guest_ip = netns.names(index)
        nics = tmpl.get("NIC")
        nic_list = nics if isinstance(nics, list) else [nics] if isinstance(nics, dict) else []
        for n, nic in enumerate(nic_list):
            nic["NIC_ID"] = str(n)
            nic.setdefault("NETWORK", "hpcc-net")
            nic.setdefault("NETWORK_ID", "0")
            if n == 0:
                nic["IP"] = guest_ip
                nic["MAC"] = "02:00:" + ":".join(f"{int(x):02x}" for x in guest_ip.split("."))
        context = tmpl.get("CONTEXT")
        if isinstance(context, dict):
            if context.get("NETWORK", "").upper() == "YES" and nic_list:
                context["ETH0_IP"] = guest_ip
                context["ETH0_MASK"] = "255.255.255.252"
                context["ETH0_GATEWAY"] = host_ip
                context["ETH0_MAC"] = nic_list[0]["MAC"]
            context.setdefault("TARGET", "hda")
        tmpl["TEMPLATE_ID"] = str(tmpl_id if tmpl_id is not None else -1)
        tmpl["VMID"] = str(vm_id)
        actions = tmpl.get("SCHED_ACTION")
        for n, action in enumerate(actions if isinstance(actions, list) else [actions] if actions else []):
            if isinstance(action, dict):
                action.setdefault("ID", str(n))
                action.setdefault("PARENT_ID", str(vm_id))
                action.setdefault("TYPE", "VM")
        faults = self._faults_for(name)
        vm = VM(
            id=vm_id,
            name=name or f"one-{vm_id}",
            user=user,
            template=tmpl,
            user_template=user_tmpl,
            faults=faults,
            delays=faults.delays or replace(self.delays),
            index=index,
            state=HOLD if hold else PENDING,
        )
        vm.log.append((time.time(), vm.state, vm.lcm))
        with self.lock:
            self.vms_by_id[vm_id] = vm
        vm.thread = threading.Thread(target=self._life, args=(vm,), name=f"sim-vm-{vm_id}", daemon=True)
        vm.thread.start()
        return vm_id

    # -- the life cycle -----------------------------------------------------------------------

    def _wait(self, vm: VM, seconds: float) -> bool:
        """Sleep ``seconds``; False if the VM was terminated (from PENDING/HOLD) or vanished meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            if vm.vanished or vm.state == DONE:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            vm.wake.wait(min(left, 0.2))
            vm.wake.clear()

    def _life(self, vm: VM) -> None:
        try:
            self._life_inner(vm)
        except Exception as exc:
            log.exception("VM %s life cycle failed", vm.id)
            self.errors.append(f"VM {vm.id}: {exc}")
            with self.lock:
                vm.user_template["ERROR"] = f"{time.ctime()}: simulator error: {exc}"
            if vm.state != DONE and not vm.vanished:
                self._set_state(vm, ACTIVE, BOOT_FAILURE)
                with contextlib.suppress(Exception):
                    self._until_terminated(vm)

    def _life_inner(self, vm: VM) -> None:
        d = vm.delays
        while vm.state == HOLD:
            if not self._wait(vm, 0.2):
                return
        if not self._wait(vm, d.pending):
            return
        if vm.faults.stuck_pending:
            with self.lock:
                vm.user_template["SCHED_MESSAGE"] = (
                    f"{time.ctime()} : Cannot dispatch VM: No host with enough capacity to deploy the VM"
                )
            while self._wait(vm, 0.2):
                pass
            return
        self._set_state(vm, ACTIVE, PROLOG)
        if not self._wait(vm, d.prolog):
            return
        if vm.faults.prolog_failure:
            with self.lock:
                vm.user_template["ERROR"] = f"{time.ctime()}: Error executing image transfer script"
            self._set_state(vm, ACTIVE, PROLOG_FAILURE)
            self._until_terminated(vm)
            return
        self._set_state(vm, ACTIVE, BOOT)
        started = time.monotonic()
        if vm.faults.boot_failure:
            self._wait(vm, d.boot)
            with self.lock:
                vm.user_template["ERROR"] = f"{time.ctime()}: Error deploying virtual machine"
            self._set_state(vm, ACTIVE, BOOT_FAILURE)
            self._until_terminated(vm)
            return
        if self.namespaces:
            self._guest_up(vm)
        if not self._wait(vm, max(0.0, d.boot - (time.monotonic() - started))):
            return
        vm.running_since = time.monotonic()
        self._set_state(vm, ACTIVE, RUNNING)
        if self.namespaces and vm.guest is not None:
            self._guest_start(vm)
        self._until_terminated(vm)

    def _guest_up(self, vm: VM) -> None:
        context = vm.template.get("CONTEXT")
        ctx = dict(context) if isinstance(context, dict) else {}

        def on_update(update: Template) -> None:
            with self.lock:
                vm.user_template.update(update)

        guest = netns.Guest(vm.index, vm.id, {k: str(v) for k, v in ctx.items() if isinstance(v, str)}, on_update)
        vm.guest = guest
        guest.network_up()
        guest.disk_up()
        if ctx.get("TOKEN", "").upper() == "YES":
            guest.onegate_up()
            if isinstance(context, dict) and guest.onegate is not None:
                with self.lock:
                    context["ONEGATE_ENDPOINT"] = guest.onegate.endpoint

    def _guest_start(self, vm: VM) -> None:
        guest = vm.guest
        assert guest is not None
        f = vm.faults
        wait = 120.0 if f.ssh_late is None else f.ssh_late + 30
        guest.run_context(wait)
        if f.ssh_blackhole:
            guest.blackhole(True)
        if not f.no_ssh and f.ssh_late is None:
            guest.wait_host_key()
            guest.start_sshd()

    def _sched_due(self, vm: VM) -> bool:
        actions = vm.template.get("SCHED_ACTION")
        for action in actions if isinstance(actions, list) else [actions] if actions else []:
            if not isinstance(action, dict) or action.get("ACTION") not in ("terminate", "terminate-hard"):
                continue
            when = str(action.get("TIME", ""))
            try:
                due = vm.stime + int(when[1:]) if when.startswith("+") else int(when)
            except ValueError:
                continue
            if time.time() >= due and not action.get("DONE"):
                action["DONE"] = str(int(time.time()))
                return True
        return False

    def _until_terminated(self, vm: VM) -> None:
        """The VM's running life: timed faults, SCHED_ACTION, then the terminate path."""
        f = vm.faults
        t0 = vm.running_since or time.monotonic()
        timers: dict[str, float] = {}
        if vm.state == ACTIVE and vm.lcm == RUNNING and vm.guest is not None:
            if f.ssh_late is not None and not f.no_ssh:
                timers["ssh_late"] = t0 + f.ssh_late
            if f.kill_sshd_after is not None:
                timers["kill_sshd"] = t0 + f.kill_sshd_after
            if f.partition_after is not None:
                timers["partition"] = t0 + f.partition_after
            if f.vanish_after is not None:
                timers["vanish"] = t0 + f.vanish_after
            if f.poweroff_after is not None:
                timers["poweroff"] = t0 + f.poweroff_after
            if f.unknown_after is not None:
                timers["unknown"] = t0 + f.unknown_after
        while not vm.terminate_requested and not vm.vanished:
            if self._sched_due(vm):
                log.info("VM %s: SCHED_ACTION terminate-hard fired", vm.id)
                vm.terminate_requested = True
                break
            now = time.monotonic()
            for name, due in list(timers.items()):
                if now >= due:
                    del timers[name]
                    self._fire(vm, name, timers)
            if vm.vanished:
                return
            nxt = min([*timers.values(), now + 0.2]) - now
            vm.wake.wait(max(0.01, nxt))
            vm.wake.clear()
        if vm.vanished:
            return
        d = vm.delays
        if vm.state == ACTIVE and vm.lcm in (RUNNING, UNKNOWN):
            self._set_state(vm, ACTIVE, SHUTDOWN)
            time.sleep(d.shutdown)
        self._set_state(vm, ACTIVE, EPILOG)
        self._destroy_guest(vm, remove_disk=False)
        time.sleep(d.epilog)
        self._done(vm)

    def _fire(self, vm: VM, name: str, timers: dict[str, float]) -> None:
        guest = vm.guest
        f = vm.faults
        log.info("VM %s: fault %s", vm.id, name)
        if guest is None:
            return
        if name == "ssh_late":
            guest.wait_host_key()
            guest.start_sshd()
        elif name == "kill_sshd":
            guest.kill_sshd()
            if f.restart_sshd_after is not None:
                timers["restart_sshd"] = time.monotonic() + f.restart_sshd_after
        elif name == "restart_sshd":
            guest.start_sshd()
        elif name == "partition":
            guest.blackhole(True)
            timers["heal"] = time.monotonic() + f.partition_for
        elif name == "heal":
            guest.blackhole(False)
        elif name == "vanish":
            with self.lock:
                vm.vanished = True
                self.vms_by_id.pop(vm.id, None)
            self._destroy_guest(vm, remove_disk=True)
            if self.namespaces:
                netns.release_index(vm.index)
        elif name == "poweroff":
            guest.kill_sshd()
            self._set_state(vm, POWEROFF, LCM_INIT)
        elif name == "unknown":
            self._set_state(vm, ACTIVE, UNKNOWN)

    def _destroy_guest(self, vm: VM, *, remove_disk: bool) -> None:
        guest = vm.guest
        if guest is None:
            return
        try:
            guest.destroy()
        except Exception as exc:  # pragma: no cover - best effort
            self.errors.append(f"VM {vm.id}: destroy failed: {exc}")
        if remove_disk:
            guest.remove_disk()
            vm.guest = None

    def _done(self, vm: VM) -> None:
        with self.lock:
            vm.etime = int(time.time())
        self._set_state(vm, DONE, LCM_INIT)
        if vm.guest is not None:
            vm.guest.remove_disk()
            vm.guest = None
        if self.namespaces:
            netns.release_index(vm.index)

    # -- methods ------------------------------------------------------------------------------

    def m_version(self, user: User, method: str) -> str:
        return self.version

    def m_template_info(
        self, user: User, method: str, tmpl_id: Any, extended: Any = False, decrypt: Any = False
    ) -> str:
        if type(tmpl_id) is not int:
            raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type")
        tmpl = self.templates.get(tmpl_id)
        if tmpl is None:
            raise _RpcFailure(NO_EXISTS, f"[{method}] Error getting virtual machine template [{tmpl_id}].", tmpl_id)
        name = templates.text(tmpl.get("NAME", f"template-{tmpl_id}"))
        body = {k: v for k, v in tmpl.items()}
        return (
            f"<VMTEMPLATE><ID>{tmpl_id}</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>"
            f"<NAME>{name}</NAME><PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M><OWNER_A>0</OWNER_A>"
            "<GROUP_U>1</GROUP_U><GROUP_M>0</GROUP_M><GROUP_A>0</GROUP_A><OTHER_U>1</OTHER_U><OTHER_M>0</OTHER_M>"
            "<OTHER_A>0</OTHER_A></PERMISSIONS><LOCK/><REGTIME>0</REGTIME>"
            f"{templates.render_body('TEMPLATE', body)}</VMTEMPLATE>"
        )

    def m_instantiate(
        self, user: User, method: str, tmpl_id: Any, name: Any, hold: Any = False, extra: Any = "",
        persistent: Any = False,
    ) -> int:  # fmt: skip
        if type(tmpl_id) is not int or type(name) is not str or type(hold) is not bool:
            raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type (expected int, string, boolean)")
        if type(extra) is not str or type(persistent) is not bool:
            raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type (expected string, boolean)")
        if tmpl_id not in self.templates:
            raise _RpcFailure(NO_EXISTS, f"[{method}] Error getting virtual machine template [{tmpl_id}].", tmpl_id)
        try:
            extra_tmpl = templates.parse(extra)
        except templates.TemplateSyntaxError as exc:
            raise _RpcFailure(INTERNAL, f"[{method}] {exc}") from None
        vm_id = self._create(user, method, tmpl_id, name, hold, extra_tmpl)
        with self.lock:
            if self.lost_instantiate_replies > 0:
                self.lost_instantiate_replies -= 1
                self._local.lost_reply = True
        return vm_id

    def m_allocate(self, user: User, method: str, tmpl: Any, hold: Any = False) -> int:
        if type(tmpl) is not str or type(hold) is not bool:
            raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type")
        try:
            parsed = templates.parse(tmpl)
        except templates.TemplateSyntaxError as exc:
            raise _RpcFailure(INTERNAL, f"[{method}] {exc}") from None
        return self._create(user, method, None, str(parsed.get("NAME", "")), hold, parsed)

    def m_vm_info(self, user: User, method: str, vm_id: Any, decrypt: Any = False) -> str:
        vm = self._get_vm(method, user, vm_id)
        with self.lock:
            return vm_xml(vm, extended=True)

    def m_vm_action(self, user: User, method: str, action: Any, vm_id: Any) -> int:
        if type(action) is not str:
            raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type: the action must be a string")
        if action not in ("terminate", "terminate-hard", "hold", "release", "poweroff", "poweroff-hard", "resume",
                          "reboot", "reboot-hard", "undeploy", "undeploy-hard", "stop", "suspend", "resched",
                          "unresched"):  # fmt: skip
            raise _RpcFailure(RPC_API, f"[{method}] Wrong action: {action}")
        vm = self._get_vm(method, user, vm_id)
        with self.lock:
            if action in ("terminate", "terminate-hard"):
                if vm.state == DONE:
                    return vm.id
                if vm.faults.terminate_reject > 0:
                    vm.faults.terminate_reject -= 1
                    raise _RpcFailure(ACTION, f"[{method}] Could not terminate VM {vm.id}, wrong state ACTIVE.", vm.id)
                if vm.state in (PENDING, HOLD, INIT, CLONING, CLONING_FAILURE):
                    vm.etime = int(time.time())
                    self._set_state(vm, DONE, LCM_INIT)
                    if self.namespaces:
                        netns.release_index(vm.index)
                    return vm.id
                terminable = vm.state in (SUSPENDED, POWEROFF, STOPPED, UNDEPLOYED) or (
                    vm.state == ACTIVE and (vm.lcm in (RUNNING, UNKNOWN) or vm.lcm in FAILURE_LCM)
                )
                if not terminable or vm.terminate_requested:
                    if vm.terminate_requested:
                        return vm.id
                    state_name = {ACTIVE: "ACTIVE"}.get(vm.state, str(vm.state))
                    raise _RpcFailure(
                        ACTION, f"[{method}] Could not terminate VM {vm.id}, wrong state {state_name}.", vm.id
                    )
                vm.terminate_requested = True
                vm.wake.set()
                return vm.id
            if action == "hold":
                if vm.state != PENDING:
                    raise _RpcFailure(ACTION, f"[{method}] Could not hold VM {vm.id}, wrong state.", vm.id)
                self._set_state(vm, HOLD, LCM_INIT)
                return vm.id
            if action == "release":
                if vm.state != HOLD:
                    raise _RpcFailure(ACTION, f"[{method}] Could not release VM {vm.id}, wrong state.", vm.id)
                self._set_state(vm, PENDING, LCM_INIT)
                return vm.id
        raise _RpcFailure(ACTION, f"[{method}] Action {action} is not supported by the simulator.", vm.id)

    def m_vm_update(self, user: User, method: str, vm_id: Any, tmpl: Any, kind: Any = 0) -> int:
        if type(tmpl) is not str or type(kind) is not int:
            raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type")
        vm = self._get_vm(method, user, vm_id)
        try:
            update = templates.parse(tmpl)
        except templates.TemplateSyntaxError as exc:
            raise _RpcFailure(INTERNAL, f"[{method}] {exc}", vm.id) from None
        with self.lock:
            if kind == 1:
                vm.user_template.update(update)
            else:
                vm.user_template = update
        return vm.id

    def m_vm_recover(self, user: User, method: str, vm_id: Any, op: Any) -> int:
        vm = self._get_vm(method, user, vm_id)
        if user.name not in self.admins:
            raise _RpcFailure(
                AUTHORIZATION, f"[{method}] User [{user.uid}] : Not authorized to perform ADMIN VM [{vm.id}].", vm.id
            )
        if op not in (3, 5):
            raise _RpcFailure(ACTION, f"[{method}] Recover operation {op} is not supported by the simulator.", vm.id)
        vm.vanished = True
        vm.wake.set()
        self._destroy_guest(vm, remove_disk=True)
        with self.lock:
            vm.etime = int(time.time())
            vm.prev_state, vm.prev_lcm = vm.state, vm.lcm
            vm.state, vm.lcm = DONE, LCM_INIT
        if self.namespaces:
            netns.release_index(vm.index)
        return vm.id

    def _pool(self, user: User, method: str, flt: Any, start: Any, end: Any, state: Any, query: Any) -> list[VM]:
        for value in (flt, start, end, state):
            if type(value) is not int:
                raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type (filter, start, end, state are integers)")
        if query and not self.json_query_supported:
            raise _RpcFailure(INTERNAL, f"[{method}] JSON query search is not supported by the SQL backend")
        with self.lock:
            vms = sorted(self.vms_by_id.values(), key=lambda v: v.id)
        if flt == -2:
            vms = vms if user.name in self.admins else [v for v in vms if v.user.uid == user.uid]
        elif flt in (-3, -1):
            vms = [v for v in vms if v.user.uid == user.uid]
        elif flt == -4:
            vms = [v for v in vms if v.user.gid == user.gid]
        elif flt >= 0:
            vms = [v for v in vms if v.user.uid == flt]
        if state == -1:
            vms = [v for v in vms if v.state != DONE]
        elif state >= 0:
            vms = [v for v in vms if v.state == state]
        if end < -1:
            vms = vms[max(0, start) : max(0, start) + (-end)]
        else:
            vms = [v for v in vms if (start < 0 or v.id >= start) and (end < 0 or v.id <= end)]
        if query:
            pairs = [p.split("=", 1) for p in str(query).split("&") if "=" in p]
            vms = [v for v in vms if all(val in str(_lookup(v, key)) for key, val in pairs)]
        return vms

    def m_pool_info(self, user: User, method: str, flt: Any, start: Any, end: Any, state: Any, query: Any = "") -> str:
        vms = self._pool(user, method, flt, start, end, state, query)
        with self.lock:
            return "<VM_POOL>" + "".join(vm_xml(vm, extended=False) for vm in vms) + "</VM_POOL>"

    def m_pool_infoextended(
        self, user: User, method: str, flt: Any, start: Any, end: Any, state: Any, query: Any = ""
    ) -> str:
        vms = self._pool(user, method, flt, start, end, state, query)
        with self.lock:
            return "<VM_POOL>" + "".join(vm_xml(vm, extended=True) for vm in vms) + "</VM_POOL>"

    def m_pool_infoset(self, user: User, method: str, ids: Any, extended: Any = False) -> str:
        if type(ids) is not str or type(extended) is not bool:
            raise _RpcFailure(RPC_API, f"[{method}] Wrong parameter type")
        wanted = {int(x) for x in ids.split(",") if x.strip().isdigit()}
        vms = [v for v in self._pool(user, method, -2, -1, -1, -2, "") if v.id in wanted]
        with self.lock:
            return "<VM_POOL>" + "".join(vm_xml(vm, extended=extended) for vm in vms) + "</VM_POOL>"


def _lookup(vm: VM, key: str) -> Any:
    for source in (vm.user_template, vm.template):
        node: Any = source
        for part in key.split("/"):
            node = node.get(part.upper()) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


_METHODS: dict[str, Any] = {
    "one.system.version": Simulator.m_version,
    "one.template.info": Simulator.m_template_info,
    "one.template.instantiate": Simulator.m_instantiate,
    "one.vm.allocate": Simulator.m_allocate,
    "one.vm.info": Simulator.m_vm_info,
    "one.vm.action": Simulator.m_vm_action,
    "one.vm.update": Simulator.m_vm_update,
    "one.vm.recover": Simulator.m_vm_recover,
    "one.vmpool.info": Simulator.m_pool_info,
    "one.vmpool.infoextended": Simulator.m_pool_infoextended,
    "one.vmpool.infoset": Simulator.m_pool_infoset,
}

_PERMISSIONS = (
    "<PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M><OWNER_A>0</OWNER_A><GROUP_U>0</GROUP_U>"
    "<GROUP_M>0</GROUP_M><GROUP_A>0</GROUP_A><OTHER_U>0</OTHER_U><OTHER_M>0</OTHER_M><OTHER_A>0</OTHER_A>"
    "</PERMISSIONS>"
)
_SHORT_TEMPLATE_KEYS = ("CPU", "MEMORY", "VCPU", "DISK", "NIC", "GRAPHICS")
_SHORT_NIC_KEYS = ("IP", "EXTERNAL_IP", "IP6", "NETWORK_MODE", "MAC", "NETWORK", "NETWORK_ID", "NIC_ID",
                   "SECURITY_GROUPS")  # fmt: skip


def _short_nic(nic: Any) -> Any:
    if isinstance(nic, list):
        return [_short_nic(n) for n in nic]
    if isinstance(nic, dict):
        return {k: v for k, v in nic.items() if k in _SHORT_NIC_KEYS}
    return nic


def vm_xml(vm: VM, *, extended: bool) -> str:
    """A VM body in oned's element order (``to_xml_extended`` / ``to_xml_short``)."""
    t = templates.text
    gname = "oneadmin" if vm.user.gid == 0 else "users"
    head = (
        f"<VM><ID>{vm.id}</ID><UID>{vm.user.uid}</UID><GID>{vm.user.gid}</GID><UNAME>{t(vm.user.name)}</UNAME>"
        f"<GNAME>{gname}</GNAME><NAME>{t(vm.name)}</NAME>"
    )
    deploy = f"one-{vm.id}" if vm.state == ACTIVE and vm.lcm not in (PROLOG, LCM_INIT) else ""
    if extended:
        body = (
            f"{_PERMISSIONS}<LAST_POLL>0</LAST_POLL><STATE>{vm.state}</STATE><LCM_STATE>{vm.lcm}</LCM_STATE>"
            f"<PREV_STATE>{vm.prev_state}</PREV_STATE><PREV_LCM_STATE>{vm.prev_lcm}</PREV_LCM_STATE>"
            f"<RESCHED>0</RESCHED><STIME>{vm.stime}</STIME><ETIME>{vm.etime}</ETIME><DEPLOY_ID>{deploy}</DEPLOY_ID>"
            "<MONITORING/>"
            + templates.render_body("TEMPLATE", vm.template)
            + templates.render_body("USER_TEMPLATE", vm.user_template)
            + "<HISTORY_RECORDS/><BACKUPS><BACKUP_CONFIG/><BACKUP_IDS/></BACKUPS></VM>"
        )
    else:
        short_t = {k: (_short_nic(v) if k == "NIC" else v) for k, v in vm.template.items() if k in _SHORT_TEMPLATE_KEYS}
        short_u = {k: v for k, v in vm.user_template.items() if k in templates.SHORT_USER_KEYS}
        body = (
            f"<LAST_POLL>0</LAST_POLL><STATE>{vm.state}</STATE><LCM_STATE>{vm.lcm}</LCM_STATE><RESCHED>0</RESCHED>"
            f"<STIME>{vm.stime}</STIME><ETIME>{vm.etime}</ETIME><DEPLOY_ID>{deploy}</DEPLOY_ID>"
            f"{templates.render_body('TEMPLATE', short_t)}<MONITORING/>"
            f"{templates.render_body('USER_TEMPLATE', short_u)}<HISTORY_RECORDS/></VM>"
        )
    return head + body


def describe(vm: VM) -> dict[str, Any]:
    return {"id": vm.id, "name": vm.name, "state": _state_names(vm.state, vm.lcm), "faults": asdict(vm.faults)}
