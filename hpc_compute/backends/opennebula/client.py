"""A small OpenNebula client over pyone: real per-call timeouts, classified errors, plain data.

* pyone's ``timeout=`` does not time XML-RPC calls out (it sets the process-wide socket default,
  which ``requests`` ignores), so the transport is replaced by one that passes ``timeout=`` to a
  pooled ``requests.Session``.
* Every failure becomes a :class:`OneError` with a ``kind``: ``quota``, ``authentication``,
  ``authorization``, ``not_found``, ``wrong_state``, ``api``, ``internal``, ``transport``
  (HTTP errors, refused or timed-out connections, unparsable replies: the outcome is unknown)
  or ``other``. Quota is told from a real permission error by oned's message text.
* State numbers are mapped by this module's own tables (pyone's ``LCM_STATE`` IntEnum lacks
  69-71 and raises on them); an unknown value is kept as a number and treated as "busy".
"""

from __future__ import annotations

import re
import threading
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyone
import requests

_T = TypeVar("_T")

try:  # pyone >= 7
    from pyone.server_xrpc import RequestsTransport as _RequestsTransport
except ImportError:  # pragma: no cover - pyone 6.x
    from pyone.server import RequestsTransport as _RequestsTransport

VM_STATES: dict[int, str] = {
    0: "INIT", 1: "PENDING", 2: "HOLD", 3: "ACTIVE", 4: "STOPPED", 5: "SUSPENDED", 6: "DONE", 7: "FAILED",
    8: "POWEROFF", 9: "UNDEPLOYED", 10: "CLONING", 11: "CLONING_FAILURE",
}  # fmt: skip
LCM_STATES: dict[int, str] = {
    0: "LCM_INIT", 1: "PROLOG", 2: "BOOT", 3: "RUNNING", 4: "MIGRATE", 5: "SAVE_STOP", 6: "SAVE_SUSPEND",
    7: "SAVE_MIGRATE", 8: "PROLOG_MIGRATE", 9: "PROLOG_RESUME", 10: "EPILOG_STOP", 11: "EPILOG", 12: "SHUTDOWN",
    15: "CLEANUP_RESUBMIT", 16: "UNKNOWN", 17: "HOTPLUG", 18: "SHUTDOWN_POWEROFF", 19: "BOOT_UNKNOWN",
    20: "BOOT_POWEROFF", 21: "BOOT_SUSPENDED", 22: "BOOT_STOPPED", 23: "CLEANUP_DELETE", 24: "HOTPLUG_SNAPSHOT",
    25: "HOTPLUG_NIC", 26: "HOTPLUG_SAVEAS", 27: "HOTPLUG_SAVEAS_POWEROFF", 28: "HOTPLUG_SAVEAS_SUSPENDED",
    29: "SHUTDOWN_UNDEPLOY", 30: "EPILOG_UNDEPLOY", 31: "PROLOG_UNDEPLOY", 32: "BOOT_UNDEPLOY",
    33: "HOTPLUG_PROLOG_POWEROFF", 34: "HOTPLUG_EPILOG_POWEROFF", 35: "BOOT_MIGRATE", 36: "BOOT_FAILURE",
    37: "BOOT_MIGRATE_FAILURE", 38: "PROLOG_MIGRATE_FAILURE", 39: "PROLOG_FAILURE", 40: "EPILOG_FAILURE",
    41: "EPILOG_STOP_FAILURE", 42: "EPILOG_UNDEPLOY_FAILURE", 43: "PROLOG_MIGRATE_POWEROFF",
    44: "PROLOG_MIGRATE_POWEROFF_FAILURE", 45: "PROLOG_MIGRATE_SUSPEND", 46: "PROLOG_MIGRATE_SUSPEND_FAILURE",
    47: "BOOT_UNDEPLOY_FAILURE", 48: "BOOT_STOPPED_FAILURE", 49: "PROLOG_RESUME_FAILURE",
    50: "PROLOG_UNDEPLOY_FAILURE", 51: "DISK_SNAPSHOT_POWEROFF", 52: "DISK_SNAPSHOT_REVERT_POWEROFF",
    53: "DISK_SNAPSHOT_DELETE_POWEROFF", 54: "DISK_SNAPSHOT_SUSPENDED", 55: "DISK_SNAPSHOT_REVERT_SUSPENDED",
    56: "DISK_SNAPSHOT_DELETE_SUSPENDED", 57: "DISK_SNAPSHOT", 59: "DISK_SNAPSHOT_DELETE", 60: "PROLOG_MIGRATE_UNKNOWN",
    61: "PROLOG_MIGRATE_UNKNOWN_FAILURE", 62: "DISK_RESIZE", 63: "DISK_RESIZE_POWEROFF",
    64: "DISK_RESIZE_UNDEPLOYED", 65: "HOTPLUG_NIC_POWEROFF", 66: "HOTPLUG_RESIZE", 67: "HOTPLUG_SAVEAS_UNDEPLOYED",
    68: "HOTPLUG_SAVEAS_STOPPED", 69: "BACKUP", 70: "BACKUP_POWEROFF", 71: "RESTORE",
}  # fmt: skip
FAILURE_LCM = frozenset(n for n, name in LCM_STATES.items() if name.endswith("_FAILURE"))
PROVISIONING_LCM = frozenset({0, 1, 2, 9, 19, 31, 32, 35})
TERMINATING_LCM = frozenset({11, 12, 23, 18, 29, 30})

ST_PENDING, ST_HOLD, ST_ACTIVE, ST_DONE, ST_POWEROFF = 1, 2, 3, 6, 8
LCM_RUNNING, LCM_UNKNOWN = 3, 16

_QUOTA_RE = re.compile(r"limit of .* quota", re.IGNORECASE | re.DOTALL)


class OneError(Exception):
    """A classified failure of one XML-RPC call."""

    KINDS = ("quota", "authentication", "authorization", "not_found", "wrong_state", "api", "internal",
             "transport", "other")  # fmt: skip

    def __init__(self, kind: str, message: str, *, method: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.method = method

    @property
    def transport(self) -> bool:
        """The call's outcome is unknown (it may or may not have been carried out)."""
        return self.kind == "transport"


def classify(exc: BaseException, method: str = "") -> OneError:
    """Map whatever pyone, requests or xmlrpc raised to a :class:`OneError`."""
    if isinstance(exc, OneError):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, pyone.OneAuthenticationException):
        return OneError("authentication", text, method=method)
    if isinstance(exc, pyone.OneAuthorizationException):
        return OneError("quota" if _QUOTA_RE.search(text) else "authorization", text, method=method)
    if isinstance(exc, pyone.OneNoExistsException):
        return OneError("not_found", text, method=method)
    if isinstance(exc, pyone.OneActionException):
        return OneError("wrong_state", text, method=method)
    if isinstance(exc, pyone.OneApiException):
        return OneError("api", text, method=method)
    if isinstance(exc, pyone.OneInternalException):
        return OneError("internal", text, method=method)
    if isinstance(exc, requests.RequestException | xmlrpc.client.ProtocolError | OSError | EOFError):
        return OneError("transport", f"{type(exc).__name__}: {text}", method=method)
    if isinstance(exc, xmlrpc.client.ResponseError | IndexError | ValueError):
        # an unparsable or empty reply: we do not know what the server did
        return OneError("transport", f"bad reply ({type(exc).__name__}: {text})", method=method)
    if isinstance(exc, pyone.OneException):
        return OneError("other", text, method=method)
    return OneError("other", f"{type(exc).__name__}: {text}", method=method)


class TimeoutTransport(_RequestsTransport):  # type: ignore[misc]
    """pyone's requests transport with a timeout on every call and pooled connections."""

    def __init__(self, timeout: float, https_verify: bool | str = True, https: bool = False) -> None:
        super().__init__()
        self.timeout = timeout
        self.set_https(https)
        self.set_https_verify(https_verify)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies from the environment for the cloud controller
            self._local.session = session
        return session

    def request(self, host: str, handler: str, request_body: bytes, verbose: bool = False) -> Any:
        url = self._build_url(host, handler)
        resp = self._session().post(
            url, data=request_body, headers=self.headers, verify=self.https_verify, timeout=self.timeout
        )
        try:
            resp.raise_for_status()
        except requests.RequestException as exc:
            raise xmlrpc.client.ProtocolError(url, resp.status_code, str(exc), dict(resp.headers)) from exc
        return self.parse_response(resp)


@dataclass(frozen=True)
class VmView:
    """What the backend needs to know about one VM."""

    id: int
    name: str
    state: int
    lcm_state: int
    ip: str | None
    user_template: dict[str, Any] = field(default_factory=dict)
    stime: int = 0
    etime: int = 0

    @property
    def state_name(self) -> str:
        return VM_STATES.get(self.state, f"STATE_{self.state}")

    @property
    def lcm_name(self) -> str:
        return LCM_STATES.get(self.lcm_state, f"LCM_{self.lcm_state}")

    @property
    def describe(self) -> str:
        return self.state_name if self.state != ST_ACTIVE else f"ACTIVE/{self.lcm_name}"

    @property
    def labels(self) -> set[str]:
        raw = self.user_template.get("LABELS")
        return {part.strip() for part in str(raw).split(",") if part.strip()} if raw else set()

    @property
    def done(self) -> bool:
        return self.state == ST_DONE

    @property
    def running(self) -> bool:
        return self.state == ST_ACTIVE and self.lcm_state == LCM_RUNNING

    @property
    def failed(self) -> bool:
        return (self.state == ST_ACTIVE and self.lcm_state in FAILURE_LCM) or self.state == 11

    def text(self, key: str) -> str | None:
        value = self.user_template.get(key)
        return value if isinstance(value, str) else None


def _as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _nic_ip(template: dict[str, Any], network_id: int | None) -> str | None:
    nics = template.get("NIC")
    items = nics if isinstance(nics, list) else [nics] if isinstance(nics, dict) else []
    chosen: dict[str, Any] | None = None
    for nic in items:
        if not isinstance(nic, dict):
            continue
        if network_id is not None and str(nic.get("NETWORK_ID")) == str(network_id):
            chosen = nic
            break
        if chosen is None or str(nic.get("NIC_ID")) == "0":
            chosen = chosen if chosen is not None and str(chosen.get("NIC_ID")) == "0" else nic
    if chosen is not None:
        for key in ("IP", "EXTERNAL_IP", "IP6_GLOBAL", "IP6"):
            value = chosen.get(key)
            if isinstance(value, str) and value:
                return value
    context = template.get("CONTEXT")
    if isinstance(context, dict):
        value = context.get("ETH0_IP")
        if isinstance(value, str) and value and not value.startswith("$"):
            return value
    return None


def _int(value: Any, default: int = 0) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def vm_view(vm: Any, network_id: int | None = None) -> VmView:
    """A :class:`VmView` from a pyone VM object (full or short body)."""
    template = _as_dict(getattr(vm, "TEMPLATE", None))
    return VmView(
        id=_int(getattr(vm, "ID", None), -1),
        name=str(getattr(vm, "NAME", "") or ""),
        state=_int(getattr(vm, "STATE", None), -1),
        lcm_state=_int(getattr(vm, "LCM_STATE", None), 0),
        ip=_nic_ip(template, network_id),
        user_template=_as_dict(getattr(vm, "USER_TEMPLATE", None)),
        stime=_int(getattr(vm, "STIME", None)),
        etime=_int(getattr(vm, "ETIME", None)),
    )


class OneClient:
    """The calls the backend makes. Every method raises :class:`OneError` and nothing else."""

    def __init__(
        self,
        endpoint: str,
        session: str,
        *,
        timeout: float = 20.0,
        https_verify: bool | str = True,
        network_id: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.network_id = network_id
        self._server = pyone.OneServer(endpoint, session=session, https_verify=https_verify)
        # pyone keeps its transport in ServerProxy's name-mangled attribute
        self._server._ServerProxy__transport = TimeoutTransport(timeout, https_verify, endpoint.startswith("https"))

    def _call(self, method: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except Exception as exc:
            raise classify(exc, method) from exc

    def version(self) -> str:
        return str(self._call("system.version", lambda: self._server.system.version()))

    def template_exists(self, template_id: int) -> None:
        self._call("template.info", lambda: self._server.template.info(template_id))

    def instantiate(self, template_id: int, name: str, extra: dict[str, Any]) -> int:
        """Create a VM (not on hold). ``extra`` is the nested TEMPLATE dict (sent as XML, CDATA-safe)."""
        result = self._call(
            "template.instantiate",
            lambda: self._server.template.instantiate(template_id, name, False, {"TEMPLATE": extra}, False),
        )
        if type(result) is not int:
            raise OneError("transport", f"template.instantiate returned {result!r}", method="template.instantiate")
        return result

    def vm_info(self, vm_id: int) -> VmView:
        vm = self._call("vm.info", lambda: self._server.vm.info(vm_id))
        return vm_view(vm, self.network_id)

    def pool(self, *, extended: bool = False, include_done: bool = False) -> list[VmView]:
        """Every VM of this user (one call; ``vmpool.info`` short bodies carry NAME and LABELS)."""
        state = -2 if include_done else -1
        if extended:
            pool = self._call("vmpool.infoextended", lambda: self._server.vmpool.infoextended(-3, -1, -1, state))
        else:
            pool = self._call("vmpool.info", lambda: self._server.vmpool.info(-3, -1, -1, state))
        return [vm_view(vm, self.network_id) for vm in (getattr(pool, "VM", None) or [])]

    def action(self, action: str, vm_id: int) -> None:
        self._call("vm.action", lambda: self._server.vm.action(action, vm_id))

    def terminate(self, vm_id: int) -> None:
        self.action("terminate-hard", vm_id)

    def update_user_template(self, vm_id: int, values: dict[str, str]) -> None:
        """Merge (never replace) attributes into USER_TEMPLATE."""
        self._call("vm.update", lambda: self._server.vm.update(vm_id, {"TEMPLATE": values}, 1))
