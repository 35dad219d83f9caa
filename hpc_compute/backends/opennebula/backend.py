"""The OpenNebula backend: one fresh VM per attempt, reached over SSH, never leaked.

Life of an attempt (the engine has already committed it as ``submitting``):

1. ``submit``: a fresh ed25519 key pair in the attempt directory (private key 0600), the
   attempt spec for the VM's paths, then one ``template.instantiate`` naming the VM
   ``hpcc-<attempt uuid>`` with ``LABELS`` carrying the same tag, the public key in
   ``CONTEXT/SSH_PUBLIC_KEY`` (the whole CONTEXT vector is resent), ``TOKEN=YES`` for OneGate and
   a server-side ``SCHED_ACTION`` terminate-hard as a lease. The VM id is the backend job id.
   Nothing else blocks the engine: a driver thread per attempt does the rest.
2. Provisioning, each stage with its own deadline: PENDING (``pending_timeout_s``, measured from
   the VM's STIME), PROLOG/BOOT (``boot_timeout_s``), RUNNING until the guest published
   ``READY=YES`` and ``SSH_HOST_KEY`` (context script, OneGate) and an SSH login with that key
   pinned works (``ssh_timeout_s``). TOFU only if the site configured it; the key seen first is
   stored in the attempt directory. Any failure here is ``boot_failure`` (retried on a new VM).
3. Stage-in over SFTP (the wrapper, spec.json, inputs), then the wrapper is started detached
   (``setsid nohup … &``, no pty), so an SSH drop does not kill it. A re-adopted attempt is never
   started twice: the wrapper's own O_EXCL claim file decides, and stage-in is skipped once it exists.
4. Monitoring with short SSH operations, each with a timeout: ``result.json`` → finished,
   ``started.json`` → running; logs are copied back by byte offset (the local size is the offset,
   so a restart resumes); a VM that vanished → ``lost``; unreachable for ``unreachable_timeout_s``
   → ``lost``.
5. ``collect``: the last log bytes, ``result.json``, and ``output/`` harvested over SFTP with the
   local harvesting rules. ``cleanup``: terminate-hard, recorded in a persistent list
   (``<home>/opennebula/terminate.json``) and retried until the VM is DONE or gone; refusals in
   PROLOG/BOOT are retried later. A janitor thread works the list and sweeps the pool for
   ``hpcc-*`` VMs whose attempt this scheduler does not track (orphans from lost replies or
   crashes), after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shlex
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc_compute.backends.base import (
    Backend,
    FindKind,
    FindResult,
    Observation,
    ObservationKind,
    Outcome,
    SubmitError,
    Ticket,
)
from hpc_compute.backends.opennebula.client import (
    ST_HOLD,
    ST_PENDING,
    TERMINATING_LCM,
    OneClient,
    OneError,
    VmView,
)
from hpc_compute.backends.opennebula.config import OpenNebulaSettings
from hpc_compute.backends.opennebula.ssh import SshError, VmSsh, generate_keypair, parse_host_key
from hpc_compute.backends.outcome import outcome_from_result
from hpc_compute.errors import BackendUnavailable, ConfigError, SpecError
from hpc_compute.harvest import HarvestLimits, HarvestReport, Refusal
from hpc_compute.resources import wrapper_path
from hpc_compute.rundir import (
    CLAIM_FILE,
    OUTPUT_DIR,
    RESULT_FILE,
    SCRATCH_DIR,
    SPEC_FILE,
    STARTED_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    WRAPPER_LOG,
    AttemptSpec,
    create_attempt_dir,
    read_json_file,
    write_atomic,
)
from hpc_compute.runtimes import SandboxPlan, build_launch
from hpc_compute.spec import FailureKind, JobSpec

log = logging.getLogger("hpc_compute.backends.opennebula")

KEY_FILE = "vm_key"
HOST_KEY_FILE = "vm_host_key"
VM_FILE = "vm.json"
WRAPPER_STDERR = "wrapper.stderr"
TAG_PREFIX = "hpcc-"
_LOG_FILES = (STDOUT_FILE, STDERR_FILE, WRAPPER_LOG, WRAPPER_STDERR)
_SMALL_FILES = (STARTED_FILE, CLAIM_FILE)

PROVISIONING, STAGING, RUNNING, FINISHED = "provisioning", "staging", "running", "finished"


@dataclass
class _Attempt:
    attempt_id: str
    run_id: str
    attempt_dir: Path
    spec: JobSpec
    vm_id: int
    stage: str = PROVISIONING
    reason: str = "queued"
    backend_state: str | None = None
    failure: tuple[FailureKind, str] | None = None
    cancel: bool = False
    cancelled: bool = False
    started_seen: bool = False
    boot_since: float | None = None
    running_since: float | None = None
    staging_since: float | None = None
    unreachable_since: float | None = None
    cancel_sent_at: float | None = None
    last_error: str | None = None
    ip: str | None = None
    ssh: VmSsh | None = None
    thread: threading.Thread | None = None
    last_vm: VmView | None = None
    timings: dict[str, float] = field(default_factory=dict)
    created_mono: float = field(default_factory=time.monotonic)

    @property
    def tag(self) -> str:
        return f"{TAG_PREFIX}{self.attempt_id}"

    def finish(self, failure: tuple[FailureKind, str] | None, state: str) -> None:
        if self.stage == FINISHED:
            return
        self.failure = failure
        self.backend_state = state
        self.stage = FINISHED
        self.timings.setdefault("finished", time.monotonic())
        if failure is not None:
            log.warning("attempt %s on VM %s: %s: %s", self.attempt_id, self.vm_id, failure[0].value, failure[1])


class OpenNebulaBackend(Backend):
    name = "opennebula"

    def __init__(self, settings: OpenNebulaSettings, home: Path, *, client: OneClient | None = None) -> None:
        self.cfg = settings
        self.home = home
        self.reconcile_grace_s = settings.reconcile_grace_s
        self.max_parallel = settings.max_parallel
        self.max_in_flight = settings.max_parallel
        self._client = client
        self._lock = threading.RLock()
        self._attempts: dict[str, _Attempt] = {}
        self._known: dict[str, float] = {}  # attempt id -> last time the engine mentioned it
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self._started_at: float | None = None
        self._engine_seen = False
        self._last_sweep = 0.0
        self._pool: dict[int, VmView] | None = None
        self._pool_at = 0.0
        self._pool_lock = threading.Lock()
        self._terminate_path = home / "opennebula" / "terminate.json"
        self._terminations: dict[int, dict[str, Any]] = {}
        self.swept: list[int] = []
        self._finished_timings: dict[str, dict[str, float]] = {}

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def client(self) -> OneClient:
        if self._client is None:
            self._client = OneClient(
                self.cfg.endpoint,
                self.cfg.session_string(),
                timeout=self.cfg.rpc_timeout_s,
                https_verify=self.cfg.https_verify,
                network_id=self.cfg.network_id,
            )
        return self._client

    def _ensure_started(self) -> None:
        with self._lock:
            if self._janitor is not None:
                return
            self._started_at = time.monotonic()
            self._load_terminations()
            self._janitor = threading.Thread(target=self._janitor_loop, name="one-janitor", daemon=True)
            self._janitor.start()

    def close(self) -> None:
        if self._janitor is None:
            return
        self._stop.set()
        with self._lock:
            attempts = list(self._attempts.values())
        deadline = time.monotonic() + 5.0
        for a in attempts:
            if a.thread is not None:
                a.thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if a.ssh is not None:
                a.ssh.close()
        self._janitor.join(timeout=max(0.5, deadline - time.monotonic()))
        # a last bounded round of terminations; what is left stays in the persistent list
        end = time.monotonic() + 10.0
        while self._terminations and time.monotonic() < end:
            self._process_terminations(force=True)
            if self._terminations:
                time.sleep(0.2)
        self._janitor = None
        with self._lock:
            # drivers are stopped: a later poll re-adopts these attempts from their tickets
            self._attempts.clear()
        self._stop = threading.Event()

    def check(self, spec: JobSpec) -> None:
        if spec.resources.gpus > 0:
            raise SpecError("resources.gpus", "the OpenNebula backend's worker template has no GPUs")
        if spec.image.endswith(".sif") and self.cfg.runtime == "bubblewrap":
            raise SpecError("image", "the VM runs bubblewrap: give 'host' or a rootfs directory on the VM")

    def remote_dir(self, attempt_id: str) -> str:
        return posixpath.join(self.cfg.remote_work_dir, attempt_id)

    def remote_wrapper(self) -> str:
        return posixpath.join(self.cfg.remote_work_dir, "hpcc_wrapper.py")

    # -- submit -------------------------------------------------------------------------------

    def attempt_spec(self, ticket: Ticket) -> AttemptSpec:
        remote = self.remote_dir(ticket.attempt_id)
        spec = ticket.spec
        plan = SandboxPlan(
            run_id=ticket.run_id,
            attempt_id=ticket.attempt_id,
            image=spec.image,
            command=spec.command,
            env=dict(spec.env),
            inputs=tuple((posixpath.join(remote, "input", i.name), i.name) for i in spec.inputs),
            output_dir=posixpath.join(remote, OUTPUT_DIR),
            scratch_dir=posixpath.join(remote, SCRATCH_DIR),
            gpus=spec.resources.gpus,
        )
        launch = build_launch(self.cfg.runtime, plan, executable=self.cfg.runtime_executable)
        return AttemptSpec(
            run_id=ticket.run_id, attempt_id=ticket.attempt_id, launch=launch, time_limit_s=spec.resources.time_limit
        )

    def lease_seconds(self, spec: JobSpec) -> int:
        """SCHED_ACTION's TIME is relative to the VM's creation: provisioning deadlines + limit + margin."""
        cfg = self.cfg
        provisioning = cfg.pending_timeout_s + cfg.boot_timeout_s + cfg.ssh_timeout_s
        return int(spec.resources.time_limit + cfg.lease_margin_s + provisioning)

    def vm_template(self, ticket: Ticket, public_key: str) -> dict[str, Any]:
        cfg = self.cfg
        context: dict[str, str] = dict(cfg.context)
        context.update({"NETWORK": "YES", "SSH_PUBLIC_KEY": public_key, "TOKEN": "YES"})
        if cfg.ssh_user != "root":
            context["USERNAME"] = cfg.ssh_user
        labels = [part for part in cfg.labels.split(",") if part] + [ticket.tag]
        extra: dict[str, Any] = {
            "CONTEXT": context,
            "LABELS": ",".join(labels),
            "HPCC_ATTEMPT_ID": ticket.attempt_id,
            "HPCC_RUN_ID": ticket.run_id,
            "SCHED_ACTION": {"ACTION": "terminate-hard", "TIME": f"+{self.lease_seconds(ticket.spec)}"},
        }
        if cfg.size_from_spec:
            res = ticket.spec.resources
            extra["CPU"] = str(res.cpus)
            extra["VCPU"] = str(res.cpus)
            extra["MEMORY"] = str(max(1, res.memory // (1024 * 1024)))
        return extra

    def submit(self, ticket: Ticket) -> str:
        self._ensure_started()
        self._engine_seen = True
        self._known[ticket.attempt_id] = time.monotonic()
        directory = ticket.attempt_dir
        try:
            create_attempt_dir(directory)
            public_key = generate_keypair(directory / KEY_FILE, ticket.tag)
            write_atomic(directory / SPEC_FILE, self.attempt_spec(ticket).to_json())
            for item in ticket.spec.inputs:
                if not os.path.lexists(item.source):
                    raise SpecError("inputs", f"{item.source} does not exist")
        except SpecError as exc:
            raise SubmitError(f"cannot prepare the attempt: {exc}", definite=True, retryable=False) from exc
        except (OSError, ConfigError) as exc:
            raise SubmitError(f"cannot prepare {directory}: {exc}", definite=True) from exc
        t0 = time.monotonic()
        try:
            vm_id = self.client.instantiate(self.cfg.template_id, ticket.tag, self.vm_template(ticket, public_key))
        except ConfigError as exc:
            raise SubmitError(str(exc), definite=True, retryable=False) from exc
        except OneError as exc:
            raise _submit_error(exc) from exc
        write_atomic(directory / VM_FILE, json.dumps({"vm_id": vm_id, "name": ticket.tag}))
        attempt = self._track(ticket, vm_id)
        attempt.timings["instantiate"] = time.monotonic() - t0
        attempt.timings["submitted"] = t0
        log.info("attempt %s: VM %s instantiated as %s", ticket.attempt_id, vm_id, ticket.tag)
        return str(vm_id)

    def _track(self, ticket: Ticket, vm_id: int) -> _Attempt:
        with self._lock:
            attempt = self._attempts.get(ticket.attempt_id)
            if attempt is not None:
                return attempt
            attempt = _Attempt(
                attempt_id=ticket.attempt_id,
                run_id=ticket.run_id,
                attempt_dir=ticket.attempt_dir,
                spec=ticket.spec,
                vm_id=vm_id,
                cancel=ticket.cancel_requested,
            )
            self._attempts[ticket.attempt_id] = attempt
            attempt.thread = threading.Thread(
                target=self._drive, args=(attempt,), name=f"one-{ticket.attempt_id[:8]}", daemon=True
            )
            attempt.thread.start()
            return attempt

    # -- the per-attempt driver ---------------------------------------------------------------

    def _drive(self, a: _Attempt) -> None:
        crashes = 0
        while not self._stop.is_set() and a.stage != FINISHED:
            try:
                if a.cancel and a.stage != RUNNING:
                    self._cancel_now(a)
                    break
                if a.stage == PROVISIONING:
                    delay = self._provision_step(a)
                elif a.stage == STAGING:
                    delay = self._stage_step(a)
                else:
                    delay = self._monitor_step(a)
                crashes = 0
            except Exception as exc:
                crashes += 1
                log.exception("attempt %s: driver step failed (%d)", a.attempt_id, crashes)
                a.last_error = f"{type(exc).__name__}: {exc}"
                if crashes >= 5:
                    a.finish((FailureKind.LOST, f"the backend failed to drive the VM: {a.last_error}"), "error")
                    break
                delay = 1.0
            if delay > 0:
                self._stop.wait(delay)

    def _cancel_now(self, a: _Attempt) -> None:
        self._request_termination(a.vm_id, a.tag)
        a.cancelled = True
        a.finish(None, "cancelled")

    def _provision_step(self, a: _Attempt) -> float:
        cfg = self.cfg
        poll = cfg.provision_poll_s
        try:
            vm = self.client.vm_info(a.vm_id)
        except OneError as exc:
            if exc.kind == "not_found":
                a.finish((FailureKind.LOST, f"VM {a.vm_id} vanished while provisioning"), "vanished")
                return 0
            a.reason = f"cloud unreachable: {exc}"
            return poll
        a.last_vm = vm
        a.ip = vm.ip or a.ip
        now = time.monotonic()
        a.backend_state = vm.describe
        if vm.done:
            a.finish((FailureKind.LOST, f"VM {a.vm_id} is DONE (terminated outside hpc-compute?)"), "DONE")
            return 0
        if vm.failed:
            error = vm.text("ERROR") or vm.lcm_name
            a.finish((FailureKind.BOOT_FAILURE, f"VM {a.vm_id} {vm.describe}: {error}"), vm.describe)
            return 0
        if vm.state in (ST_PENDING, ST_HOLD):
            waited = max(0.0, time.time() - vm.stime) if vm.stime else now - a.created_mono
            message = vm.text("SCHED_MESSAGE")
            a.reason = f"queued: {message}" if message else "queued"
            if waited > cfg.pending_timeout_s:
                why = f"VM {a.vm_id} stayed PENDING for {waited:.0f}s: {message or 'no host'}"
                a.finish((FailureKind.BOOT_FAILURE, why), vm.describe)
                return 0
            return poll
        if vm.state == 3 and vm.lcm_state in TERMINATING_LCM:
            a.finish((FailureKind.LOST, f"VM {a.vm_id} is being terminated ({vm.describe})"), vm.describe)
            return 0
        if vm.state != 3:
            a.finish((FailureKind.BOOT_FAILURE, f"VM {a.vm_id} stopped unexpectedly ({vm.describe})"), vm.describe)
            return 0
        if not vm.running:
            if a.boot_since is None:
                a.boot_since = now
            a.reason = f"booting ({vm.lcm_name})"
            if now - a.boot_since > cfg.boot_timeout_s:
                a.finish((FailureKind.BOOT_FAILURE, f"VM {a.vm_id} stuck in {vm.describe}"), vm.describe)
                return 0
            return poll
        # RUNNING: wait for the guest's READY + host key, then an SSH login
        if a.running_since is None:
            a.running_since = now
            a.timings.setdefault("vm_running", now)
        elapsed = now - a.running_since
        if elapsed > cfg.ssh_timeout_s:
            detail = a.last_error or "the guest never reported READY"
            a.finish((FailureKind.BOOT_FAILURE, f"VM {a.vm_id}: SSH never came up: {detail}"), vm.describe)
            return 0
        if not vm.ip:
            a.reason = "waiting for the VM's IP address"
            return poll
        host_key = self._host_key_for(a, vm)
        if host_key is None and cfg.host_key_policy == "pinned":
            a.reason = "waiting for the guest (READY and SSH_HOST_KEY through OneGate)"
            return min(poll, 0.5)
        try:
            ssh = self._ssh(a, vm.ip, host_key)
            ssh.connect()
        except SshError as exc:
            a.last_error = str(exc)
            a.reason = "waiting for SSH"
            if exc.host_key_mismatch or exc.auth_failed:
                a.finish((FailureKind.BOOT_FAILURE, f"VM {a.vm_id}: {exc}"), vm.describe)
                return 0
            return min(poll, 1.0)
        self._remember_host_key(a, ssh)
        a.timings.setdefault("ssh_ready", time.monotonic())
        a.stage = STAGING
        a.staging_since = time.monotonic()
        a.reason = "staging"
        a.last_error = None
        return 0

    def _host_key_for(self, a: _Attempt, vm: VmView) -> Any:
        stored = a.attempt_dir / HOST_KEY_FILE
        line: str | None = None
        if stored.exists():
            line = stored.read_text(encoding="ascii").strip()
        elif vm.text("SSH_HOST_KEY") and (vm.text("READY") or "").upper() == "YES":
            line = vm.text("SSH_HOST_KEY")
        if not line:
            return None
        try:
            return parse_host_key(line)
        except ValueError as exc:
            a.last_error = f"unusable SSH_HOST_KEY: {exc}"
            return None

    def _remember_host_key(self, a: _Attempt, ssh: VmSsh) -> None:
        stored = a.attempt_dir / HOST_KEY_FILE
        if stored.exists() or ssh.host_key is None:
            return
        key = ssh.host_key
        how = "trust on first use" if ssh.learned_host_key is not None else "pinned from SSH_HOST_KEY"
        write_atomic(stored, f"{key.get_name()} {key.get_base64()}\n")
        log.info("attempt %s: VM %s host key %s (%s)", a.attempt_id, a.vm_id, key.fingerprint, how)

    def _ssh(self, a: _Attempt, ip: str, host_key: Any) -> VmSsh:
        if a.ssh is not None and a.ssh.host == ip:
            return a.ssh
        if a.ssh is not None:
            a.ssh.close()
        a.ssh = VmSsh(
            ip,
            port=self.cfg.ssh_port,
            user=self.cfg.ssh_user,
            key_file=a.attempt_dir / KEY_FILE,
            host_key=host_key,
            tofu=self.cfg.host_key_policy == "tofu" and host_key is None,
            connect_timeout=self.cfg.ssh_connect_timeout_s,
            io_timeout=self.cfg.ssh_io_timeout_s,
        )
        return a.ssh

    def _stage_step(self, a: _Attempt) -> float:
        assert a.ssh is not None
        ssh = a.ssh
        remote = self.remote_dir(a.attempt_id)
        started = a.staging_since or time.monotonic()
        try:
            if ssh.exists(posixpath.join(remote, CLAIM_FILE)):
                # adopted after a restart: the wrapper already claimed the attempt
                a.stage, a.reason = RUNNING, "starting"
                return 0
            ssh.makedirs(self.cfg.remote_work_dir, 0o755)
            ssh.makedirs(remote)
            for sub in ("logs", OUTPUT_DIR, SCRATCH_DIR, "input"):
                ssh.makedirs(posixpath.join(remote, sub))
            ssh.put_file(wrapper_path(), self.remote_wrapper(), 0o755)
            for item in a.spec.inputs:
                self._put_tree(ssh, Path(item.source), posixpath.join(remote, "input", item.name))
            ssh.put_file(a.attempt_dir / SPEC_FILE, posixpath.join(remote, SPEC_FILE), 0o600)
            q = shlex.quote
            script = (
                f"cd {q(remote)} && setsid nohup {q(self.cfg.python)} {q(self.remote_wrapper())} {q(remote)} "
                f">>{q(WRAPPER_STDERR)} 2>&1 </dev/null &"
            )
            code, _out, err = ssh.run(script, timeout=self.cfg.ssh_io_timeout_s)
            if code != 0:
                raise SshError(f"starting the wrapper failed ({code}): {err.strip()[:500]}")
        except _LocalInputError as exc:
            a.finish((FailureKind.SETUP, f"stage-in: {exc}"), "staging")
            return 0
        except SshError as exc:
            a.last_error = str(exc)
            if time.monotonic() - started > self.cfg.ssh_timeout_s:
                a.finish((FailureKind.BOOT_FAILURE, f"VM {a.vm_id}: stage-in failed: {exc}"), "staging")
                return 0
            return 1.0
        a.timings.setdefault("launched", time.monotonic())
        a.stage, a.reason = RUNNING, "starting"
        return 0

    def _put_tree(self, ssh: VmSsh, source: Path, remote: str, depth: int = 0) -> None:
        """Upload a file or a directory tree: regular files and directories only, no symlinks."""
        try:
            st = os.lstat(source)
        except OSError as exc:
            raise _LocalInputError(f"{source}: {exc.strerror}") from exc
        if depth > 32:
            raise _LocalInputError(f"{source}: input tree too deep")
        if stat.S_ISREG(st.st_mode):
            ssh.put_file(source, remote, 0o644)
        elif stat.S_ISDIR(st.st_mode):
            ssh.mkdir(remote, 0o755)
            for child in sorted(os.listdir(source)):
                self._put_tree(ssh, source / child, posixpath.join(remote, child), depth + 1)
        else:
            raise _LocalInputError(f"{source}: only regular files and directories can be inputs")

    def _monitor_step(self, a: _Attempt) -> float:
        cfg = self.cfg
        now = time.monotonic()
        if a.cancel and a.cancel_sent_at is None:
            self._send_cancel(a)
        elif a.cancel_sent_at is not None and now - a.cancel_sent_at > a.spec.resources.time_limit + 60:
            self._cancel_now(a)
            return 0
        # the VM itself: gone means lost (confirmed by vm.info, not only by a pool snapshot)
        present, view = self._pool_lookup(a.vm_id)
        if present is False or (view is not None and (view.done or view.failed)):
            try:
                vm = self.client.vm_info(a.vm_id)
            except OneError as exc:
                if exc.kind == "not_found":
                    a.finish((FailureKind.LOST, f"VM {a.vm_id} vanished while the job ran"), "vanished")
                    return 0
                vm = None
            if vm is not None and (vm.done or vm.failed or vm.state not in (3,)):
                a.last_vm = vm
                a.finish((FailureKind.LOST, f"VM {a.vm_id} went {vm.describe} while the job ran"), vm.describe)
                return 0
        assert a.ssh is not None
        remote = self.remote_dir(a.attempt_id)
        try:
            probe = f"cd {shlex.quote(remote)} && for f in {STARTED_FILE} {RESULT_FILE}; do test -f $f && echo $f; done"
            code, out, _err = a.ssh.run(probe + "; true", timeout=cfg.ssh_io_timeout_s)
            present_files = set(out.split()) if code == 0 else set()
            self._sync_logs(a)
            if RESULT_FILE in present_files:
                self._fetch_small(a, RESULT_FILE)
                for name in _SMALL_FILES:
                    self._fetch_small(a, name)
                self._sync_logs(a)
                a.unreachable_since = None
                a.timings.setdefault("result_seen", time.monotonic())
                a.finish(None, "exited")
                return 0
            if STARTED_FILE in present_files and not a.started_seen:
                a.started_seen = True
                self._fetch_small(a, STARTED_FILE)
                self._fetch_small(a, CLAIM_FILE)
            a.reason = "running" if a.started_seen else "starting"
            if a.unreachable_since is not None:
                log.info("attempt %s: VM %s reachable again", a.attempt_id, a.vm_id)
            a.unreachable_since = None
        except SshError as exc:
            a.last_error = str(exc)
            if a.unreachable_since is None:
                a.unreachable_since = now
                log.warning("attempt %s: VM %s unreachable: %s", a.attempt_id, a.vm_id, exc)
            if now - a.unreachable_since > cfg.unreachable_timeout_s:
                why = f"VM {a.vm_id} unreachable for {now - a.unreachable_since:.0f}s: {exc}"
                a.finish((FailureKind.LOST, why), "unreachable")
                return 0
            return min(cfg.probe_interval_s, 2.0)
        return cfg.probe_interval_s

    def _send_cancel(self, a: _Attempt) -> None:
        assert a.ssh is not None
        remote = self.remote_dir(a.attempt_id)
        claim = posixpath.join(remote, CLAIM_FILE)
        script = (
            f"pid=$({shlex.quote(self.cfg.python)} -c 'import json,sys; print(json.load(open(sys.argv[1]))[\"pid\"])' "
            f'{shlex.quote(claim)} 2>/dev/null) && kill -TERM "$pid"'
        )
        try:
            code, _o, _e = a.ssh.run(script, timeout=self.cfg.ssh_io_timeout_s)
        except SshError as exc:
            a.last_error = str(exc)
            return
        a.cancel_sent_at = time.monotonic()
        if code != 0:  # not started yet: nothing to signal, the VM goes
            self._cancel_now(a)

    def _sync_logs(self, a: _Attempt) -> None:
        """Append what is new in the VM's logs to the local copies (the local size is the offset)."""
        assert a.ssh is not None
        remote = self.remote_dir(a.attempt_id)
        for rel in _LOG_FILES:
            local = a.attempt_dir / rel
            offset = local.stat().st_size if local.exists() else 0
            budget = self.cfg.max_log_bytes - offset
            if budget <= 0:
                continue
            data = a.ssh.read_from(posixpath.join(remote, rel), offset, budget)
            if data:
                local.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "ab") as handle:
                    handle.write(data)

    def _fetch_small(self, a: _Attempt, rel: str) -> None:
        assert a.ssh is not None
        data = a.ssh.read_from(posixpath.join(self.remote_dir(a.attempt_id), rel), 0, 1 << 20)
        if data:
            write_atomic(a.attempt_dir / rel, data.decode("utf-8", "replace"))

    # -- pool snapshot, terminations, sweeping ------------------------------------------------

    def _refresh_pool(self, force: bool = False) -> bool:
        with self._pool_lock:
            if not force and self._pool is not None and time.monotonic() - self._pool_at < self.cfg.pool_refresh_s:
                return True
            try:
                views = self.client.pool()
            except OneError as exc:
                log.warning("vmpool.info failed: %s", exc)
                self._pool = None
                return False
            self._pool = {v.id: v for v in views}
            self._pool_at = time.monotonic()
            return True

    def _pool_lookup(self, vm_id: int) -> tuple[bool | None, VmView | None]:
        """(present?, view) from the latest snapshot; (None, None) when no snapshot could be had."""
        if not self._refresh_pool():
            return None, None
        pool = self._pool
        if pool is None:
            return None, None
        view = pool.get(vm_id)
        return view is not None, view

    def _load_terminations(self) -> None:
        data = read_json_file(self._terminate_path) or {}
        for key, value in data.items():
            with contextlib.suppress(ValueError):
                entry = value if isinstance(value, dict) else {}
                entry.setdefault("since", time.time())
                entry["next"] = 0.0
                self._terminations[int(key)] = entry
        if self._terminations:
            log.warning("resuming termination of VMs %s", sorted(self._terminations))

    def _save_terminations(self) -> None:
        self._terminate_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            data = {str(k): {kk: vv for kk, vv in v.items() if kk != "next"} for k, v in self._terminations.items()}
        write_atomic(self._terminate_path, json.dumps(data, indent=1, sort_keys=True))

    def _request_termination(self, vm_id: int, name: str) -> None:
        with self._lock:
            if vm_id not in self._terminations:
                self._terminations[vm_id] = {"name": name, "since": time.time(), "tries": 0, "next": 0.0}
                fresh = True
            else:
                fresh = False
        if fresh:
            self._save_terminations()
        self._process_one(vm_id)

    def _process_terminations(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [vm_id for vm_id, e in self._terminations.items() if force or e.get("next", 0.0) <= now]
        for vm_id in due:
            self._process_one(vm_id)

    def _process_one(self, vm_id: int) -> None:
        with self._lock:
            entry = self._terminations.get(vm_id)
            if entry is None:
                return
            entry["tries"] = int(entry.get("tries", 0)) + 1
        gone = False
        try:
            vm = self.client.vm_info(vm_id)
            if vm.done:
                gone = True
            elif not entry.get("accepted") or vm.state != 3 or vm.lcm_state not in TERMINATING_LCM:
                self.client.terminate(vm_id)
                entry["accepted"] = True
                entry.pop("error", None)
        except OneError as exc:
            if exc.kind == "not_found":
                gone = True
            else:
                entry["error"] = str(exc)
                entry["accepted"] = False
                age = time.time() - float(entry.get("since", time.time()))
                level = logging.WARNING if exc.kind != "wrong_state" or age > 600 else logging.INFO
                log.log(level, "terminating VM %s (try %s, %.0fs): %s", vm_id, entry["tries"], age, exc)
        with self._lock:
            if gone:
                self._terminations.pop(vm_id, None)
            else:
                delay = self.cfg.terminate_retry_s if entry.get("error") else min(self.cfg.terminate_retry_s, 1.0)
                entry["next"] = time.monotonic() + delay
        if gone:
            log.info("VM %s is gone", vm_id)
            self._save_terminations()

    def pending_terminations(self) -> list[int]:
        with self._lock:
            return sorted(self._terminations)

    def _janitor_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._process_terminations()
                self._maybe_sweep()
            except Exception:
                log.exception("OpenNebula janitor step failed")

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if not self.cfg.sweep_enabled or now - self._last_sweep < self.cfg.sweep_interval_s:
            return
        started = self._started_at or now
        if not self._engine_seen and now - started < self.cfg.sweep_grace_s:
            return  # the engine has not told us yet which attempts are active
        self._last_sweep = now
        self.sweep()

    def sweep(self) -> list[int]:
        """Terminate ``hpcc-*`` VMs whose attempt this scheduler does not track (after a grace period)."""
        try:
            views = self.client.pool()
        except OneError as exc:
            log.warning("orphan sweep skipped: %s", exc)
            return []
        now = time.monotonic()
        horizon = max(60.0, 3 * self.cfg.sweep_interval_s)
        in_ledger: set[str] = set()
        if self.ledger_active_attempts is not None:
            try:
                in_ledger = self.ledger_active_attempts()
            except Exception as exc:  # the ledger is the authority: without it, sweep nothing
                log.warning("orphan sweep skipped: cannot read the ledger's active attempts: %s", exc)
                return []
        with self._lock:
            active = set(self._attempts) | {a for a, seen in self._known.items() if now - seen < horizon} | in_ledger
            queued = set(self._terminations)
        swept: list[int] = []
        for vm in views:
            tag = _tag_of(vm)
            if tag is None or vm.done or vm.id in queued:
                continue
            attempt_id = tag[len(TAG_PREFIX) :]
            if attempt_id in active:
                continue
            age = time.time() - vm.stime if vm.stime else 0.0
            if age < self.cfg.sweep_grace_s:
                continue
            log.warning(
                "sweeping orphan VM %s (%s, %s, %.0fs old): no active attempt", vm.id, vm.name, vm.describe, age
            )
            swept.append(vm.id)
            self._request_termination(vm.id, vm.name)
        self.swept.extend(swept)
        return swept

    # -- poll / find / cancel -----------------------------------------------------------------

    def _adopt(self, ticket: Ticket) -> _Attempt | None:
        try:
            vm_id = int(ticket.backend_job_id or "")
        except ValueError:
            return None
        log.info("attempt %s: adopting VM %s", ticket.attempt_id, vm_id)
        return self._track(ticket, vm_id)

    def poll(self, tickets: list[Ticket]) -> dict[str, Observation]:
        self._ensure_started()
        self._engine_seen = True
        now = time.monotonic()
        out: dict[str, Observation] = {}
        for ticket in tickets:
            self._known[ticket.attempt_id] = now
            a = self._attempts.get(ticket.attempt_id) or self._adopt(ticket)
            if a is None:
                out[ticket.attempt_id] = Observation(ObservationKind.FINISHED, backend_state="no VM id")
                continue
            if ticket.cancel_requested:
                a.cancel = True
            out[ticket.attempt_id] = self._observe(a)
        self._maybe_sweep()
        return out

    def _observe(self, a: _Attempt) -> Observation:
        if a.stage == FINISHED:
            return Observation(ObservationKind.FINISHED, backend_state=a.backend_state)
        if a.stage == RUNNING:
            if a.unreachable_since is not None:
                return Observation(ObservationKind.UNKNOWN, reason="VM unreachable", backend_state="unreachable")
            if a.started_seen:
                return Observation(ObservationKind.RUNNING, backend_state="running")
            return Observation(ObservationKind.PENDING, reason="starting", backend_state="starting")
        return Observation(ObservationKind.PENDING, reason=a.reason, backend_state=a.backend_state)

    def find(self, tickets: list[Ticket]) -> dict[str, FindResult]:
        self._ensure_started()
        self._engine_seen = True
        now_mono = time.monotonic()
        for ticket in tickets:
            self._known[ticket.attempt_id] = now_mono
        try:
            views = self.client.pool()
        except OneError as exc:
            return {t.attempt_id: FindResult(FindKind.UNKNOWN, detail=f"vmpool.info failed: {exc}") for t in tickets}
        by_tag: dict[str, list[VmView]] = {}
        for vm in views:
            tag = _tag_of(vm)
            if tag is not None:
                by_tag.setdefault(tag, []).append(vm)
        out: dict[str, FindResult] = {}
        now = time.time()
        for ticket in tickets:
            matches = sorted(by_tag.get(ticket.tag, []), key=lambda v: v.id)
            if matches:
                keep, extras = matches[0], matches[1:]
                for extra in extras:
                    log.warning("attempt %s: duplicate VM %s terminated", ticket.attempt_id, extra.id)
                    self._request_termination(extra.id, extra.name)
                self._track(ticket, keep.id)
                write_atomic(ticket.attempt_dir / VM_FILE, json.dumps({"vm_id": keep.id, "name": ticket.tag}))
                out[ticket.attempt_id] = FindResult(
                    FindKind.FOUND, backend_job_id=str(keep.id), extras_cancelled=tuple(str(e.id) for e in extras)
                )
                continue
            created = ticket.submitted_at or now
            if now - created < self.reconcile_grace_s:
                out[ticket.attempt_id] = FindResult(FindKind.UNKNOWN, detail="within the grace period")
            else:
                out[ticket.attempt_id] = FindResult(FindKind.ABSENT, detail=f"no VM named {ticket.tag}")
        return out

    def cancel(self, ticket: Ticket) -> None:
        self._ensure_started()
        a = self._attempts.get(ticket.attempt_id) or self._adopt(ticket)
        if a is not None:
            a.cancel = True

    # -- collect / cleanup --------------------------------------------------------------------

    def collect(self, ticket: Ticket, artifact_dir: Path, limits: HarvestLimits) -> Outcome:
        a = self._attempts.get(ticket.attempt_id)
        record: dict[str, str] = {"vm_id": str(ticket.backend_job_id or "")}
        if a is not None:
            record["vm_state"] = a.backend_state or ""
            if a.ip:
                record["vm_ip"] = a.ip
        result = read_json_file(ticket.attempt_dir / RESULT_FILE)
        report: HarvestReport | None = None
        if a is not None and a.cancelled and result is None:
            return Outcome(
                exit_code=None, signal=None, failure_kind=None, message="cancelled", cancelled=True,
                backend_record=record,
            )  # fmt: skip
        if a is not None and a.failure is not None and result is None:
            kind, message = a.failure
            return Outcome(exit_code=None, signal=None, failure_kind=kind, message=message, backend_record=record)
        if a is not None and a.ssh is not None and result is not None:
            try:
                self._sync_logs(a)
                report = a.ssh.harvest(posixpath.join(self.remote_dir(a.attempt_id), OUTPUT_DIR), artifact_dir, limits)
            except SshError as exc:
                if self._vm_gone(a.vm_id):
                    report = HarvestReport(refused=[Refusal(".", f"VM gone before harvesting: {exc}")])
                else:
                    raise BackendUnavailable(f"harvest from VM {a.vm_id}: {exc}") from exc
        elif result is not None:
            report = HarvestReport(refused=[Refusal(".", "no connection to the VM: outputs not harvested")])
        outcome = outcome_from_result(result, ticket, harvest=report, lost_message="the VM ended without a result file")
        outcome.backend_record.update(record)
        if a is not None:
            self._record_timings(a)
        return outcome

    def _vm_gone(self, vm_id: int) -> bool:
        try:
            return self.client.vm_info(vm_id).done
        except OneError as exc:
            return exc.kind == "not_found"

    def _record_timings(self, a: _Attempt) -> None:
        t = a.timings
        if "submitted" in t and "ssh_ready" in t:
            log.info(
                "attempt %s timings: ready %.2fs, launched %.2fs, result %.2fs",
                a.attempt_id,
                t["ssh_ready"] - t["submitted"],
                t.get("launched", t["ssh_ready"]) - t["submitted"],
                t.get("result_seen", t["ssh_ready"]) - t["submitted"],
            )

    def timings(self, attempt_id: str) -> dict[str, float]:
        a = self._attempts.get(attempt_id)
        return dict(a.timings) if a is not None else {}

    def cleanup(self, ticket: Ticket) -> None:
        self._ensure_started()
        with self._lock:
            a = self._attempts.pop(ticket.attempt_id, None)
            self._known.pop(ticket.attempt_id, None)
        if a is not None and a.ssh is not None:
            a.ssh.close()
        vm_id: int | None = a.vm_id if a is not None else None
        if vm_id is None:
            with contextlib.suppress(ValueError):
                vm_id = int(ticket.backend_job_id or "")
        if vm_id is not None:
            if a is not None:
                self._finished_timings[ticket.attempt_id] = dict(a.timings)
            self._request_termination(vm_id, ticket.tag)

    def finished_timings(self) -> dict[str, dict[str, float]]:
        return dict(self._finished_timings)


class _LocalInputError(Exception):
    pass


def _tag_of(vm: VmView) -> str | None:
    """The attempt tag a VM carries by NAME (or, failing that, in LABELS)."""
    if vm.name.startswith(TAG_PREFIX) and len(vm.name) > len(TAG_PREFIX):
        return vm.name
    for label in vm.labels:
        if label.startswith(TAG_PREFIX) and len(label) > len(TAG_PREFIX):
            return label
    return None


def _submit_error(exc: OneError) -> SubmitError:
    if exc.kind == "quota":
        return SubmitError(
            f"OpenNebula quota reached, try again later: {exc}", definite=True, retryable=True, defer_s=30.0
        )
    if exc.kind in ("authentication", "authorization", "not_found", "api"):
        return SubmitError(f"OpenNebula refused the VM ({exc.kind}): {exc}", definite=True, retryable=False)
    if exc.kind in ("internal", "wrong_state"):
        return SubmitError(f"OpenNebula could not create the VM: {exc}", definite=True, retryable=True)
    return SubmitError(f"outcome of template.instantiate unknown: {exc}", definite=False)
