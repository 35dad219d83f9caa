"""The Slurm backend: a constant sbatch script per attempt, batched status queries, Slurm's
record as the authority on how a job ended.

Per poll, whatever the number of runs: one ``squeue -h -t all --me`` for every job still in
slurmctld's memory; ``scontrol show job -o`` (one call) for the exit codes of the jobs squeue
shows as finished; ``sacct -X`` in chunks, only for jobs that left squeue and only when
accounting works. A query that fails is *unknown*, never *finished*: the run keeps its state.

Submission: the attempt directory (spec.json, a copy of the wrapper, the script) is staged
through the transport, then ``sbatch --parsable`` runs the script. The script carries the tag
``hpcc-<attempt>`` as job name and comment, so a crash between sbatch and the ledger commit is
reconciled by name (:meth:`SlurmBackend.find`).

Strict submission (``strict_submit``, the default): the job is submitted held (``sbatch
--hold``); the engine commits its id under the attempt's fence and only then calls
:meth:`SlurmBackend.confirm`, which releases it. A scheduler that lost its lease while it was
paused before sbatch therefore creates at most a *held* job: its fenced commit fails and it
withdraws the job (:meth:`SlurmBackend.abandon`); the tags of tombstoned attempts stay on a watch
list, and a job that shows up under one is cancelled (:meth:`SlurmBackend.sweep_abandoned`, and every poll).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import pwd
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace
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
from hpc_compute.backends.outcome import outcome_from_result
from hpc_compute.backends.slurm import parse
from hpc_compute.backends.slurm.config import SlurmSettings
from hpc_compute.backends.slurm.parse import SlurmRecord
from hpc_compute.backends.slurm.script import ArrayValues, ScriptValues, render_script, script_values
from hpc_compute.config import Settings
from hpc_compute.errors import BackendUnavailable, ConfigError, SpecError
from hpc_compute.harvest import HarvestLimits, HarvestReport
from hpc_compute.resources import wrapper_path
from hpc_compute.rundir import (
    CLAIM_FILE,
    LOGS_DIR,
    OUTPUT_DIR,
    RESULT_FILE,
    SCRATCH_DIR,
    SPEC_FILE,
    STDERR_FILE,
    STDOUT_FILE,
    WRAPPER_LOG,
    AttemptSpec,
)
from hpc_compute.runtimes import SandboxPlan, build_launch
from hpc_compute.spec import JobSpec
from hpc_compute.transports.base import CommandResult, Transport
from hpc_compute.transports.local import LocalTransport

log = logging.getLogger("hpc_compute.backends.slurm")

SCRIPT_FILE = "sbatch.sh"
ARRAY_SCRIPT_FILE = "sbatch-array.sh"  # in the first member's directory
ARRAY_FILE = "array.json"  # in every member's directory, written before sbatch: which array, which task
_ARRAY_NAME_RE = re.compile(r"^hpcc-arr-[0-9a-f]{32}$")
WRAPPER_FILE = "hpcc_wrapper.py"
SLURM_LOGS = ("slurm.out", "slurm.err")
RESULT_MAX_BYTES = 1 << 20
TEST_ONLY_CACHE_S = 60.0  # a resource shape sbatch --test-only accepted is not asked again for this long
LOG_MAX_BYTES = 256 << 20
_PARSABLE_RE = re.compile(r"^(\d+)(;\S+)?$")

#: sbatch messages after which the job surely does not exist and never will (retrying cannot help)
PERMANENT_REFUSALS = (
    "Requested node configuration is not available",
    "Invalid generic resource",
    "Invalid account or account/partition combination",
    "Invalid account",
    "Invalid qos specification",
    "Invalid partition name specified",
    "invalid partition specified",
    "Requested partition configuration not available",
    "More processors requested than permitted",
    "Memory required by task is not available",
    "Requested time limit is invalid",
    "Invalid feature specification",
    "Node count specification invalid",
    "Job violates accounting/QOS policy",
    "Access/permission denied",
    "User's group not permitted to use this partition",
    "Invalid Trackable RESource (TRES) specification",
)
NODE_CONFIG_REFUSAL = "Requested node configuration is not available"
NODES_NOT_READY_DEFER_S = 15.0
#: messages after which nobody knows whether slurmctld created the job
AMBIGUOUS_ERRORS = (
    "Socket timed out",
    "temporarily unable",
    "Unable to contact slurm controller",
    "Zero Bytes were transmitted or received",
    "Communication connection failure",
    "Slurm backup controller in standby mode",
)
_REFUSED_MARK = "Batch job submission failed"
_GONE = ("Invalid job id specified", "already completing or completed", "Job has already finished")
WATCH_S = 86400.0  #: how long a tombstoned tag stays on the watch list
SWEEP_EVERY_S = 10.0  #: the watch list is checked with its own squeue at most this often


@dataclass(frozen=True)
class ArrayMember:
    """An attempt submitted as task ``index`` of the job array named ``name``."""

    name: str
    index: int

    @staticmethod
    def parse(raw: bytes | None) -> ArrayMember | None:
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        name, index = data.get("array"), data.get("index")
        if not isinstance(name, str) or not _ARRAY_NAME_RE.match(name):
            return None
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1_000_000:
            return None
        return ArrayMember(name, index)


def _task_index(job_id: str) -> str | None:
    """``123_4`` -> ``4`` (None for a plain job id)."""
    _, sep, task = job_id.partition("_")
    return task if sep else None


def _job_order(job_id: str) -> tuple[int, int]:
    head, _, task = job_id.partition("_")
    return int(head), int(task) if task.isdigit() else -1


def make_transport(conf: SlurmSettings) -> Transport:
    if conf.transport == "ssh":
        from hpc_compute.transports.ssh import SshTransport

        ssh = conf.ssh
        return SshTransport(
            ssh.host,
            port=ssh.port,
            user=ssh.user,
            key_file=ssh.key_file,
            known_hosts=ssh.known_hosts,
            connect_timeout=ssh.connect_timeout,
            keepalive=ssh.keepalive,
            io_timeout=conf.command_timeout,
        )
    return LocalTransport()


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[:2000]


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(
        self,
        settings: Settings,
        *,
        slurm: SlurmSettings | dict[str, Any] | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.settings = settings
        if isinstance(slurm, SlurmSettings):
            self.conf = slurm
        else:
            self.conf = SlurmSettings.from_mapping(slurm if slurm is not None else settings.slurm)
        self.transport = transport if transport is not None else make_transport(self.conf)
        self.reconcile_grace_s = self.conf.reconcile_grace_s
        self.max_in_flight = self.conf.max_in_flight
        self.submit_concurrency = self.conf.submit_parallel
        self.array_min = self.conf.array_min
        self.array_max = self.conf.array_max
        #: attempts known to be array tasks (from submission, or read back from their array.json)
        self._members: dict[str, ArrayMember | None] = {}
        self._wrapper_cache: bytes | None = None
        #: array job id -> its number of tasks, for arrays submitted by this process
        self._array_sizes: dict[str, int] = {}
        self._accounting: bool | None = {"on": True, "off": False}.get(self.conf.accounting)
        self._user_name: str | None = None
        self._test_ok: dict[tuple[object, ...], float] = {}  # resource shape -> --test-only OK until
        #: the last terminal record seen per job id, for collect()
        self._records: dict[str, SlurmRecord] = {}
        #: job ids proved absent (past the grace period, every query succeeded)
        self._absent: set[str] = set()
        self._squeue_cache: tuple[float, dict[str, SlurmRecord]] | None = None
        #: tags of attempts given up (tombstoned or abandoned) -> until when they are watched
        self._watch: dict[str, float] = {}
        self._last_sweep = 0.0
        #: commands run, by program name (tests and metrics)
        self.calls: Counter[str] = Counter()

    # -- plumbing -----------------------------------------------------------------------------

    def _bin(self, program: str) -> str:
        return posixpath.join(self.conf.bin_dir, program) if self.conf.bin_dir else program

    def _run(
        self, program: str, args: list[str], *, timeout: float | None = None, scrubbed: bool = False
    ) -> CommandResult:
        """Run a Slurm command. ``scrubbed``: under ``env -i`` with only PATH, LANG and SLURM_CONF,
        so nothing of this process's environment (ledger URL, tokens) can reach a job through
        ``--export=ALL``."""
        self.calls[program] += 1
        argv = [self._bin(program), *args]
        if scrubbed:
            argv = [*self._scrubbed_env(), self._resolved(program), *args]
        return self.transport.run(argv, timeout or self.conf.command_timeout)

    def _scrubbed_env(self) -> list[str]:
        env = ["env", "-i", f"PATH={self.conf.job_path}", "LANG=C.UTF-8"]
        slurm_conf = os.environ.get("SLURM_CONF") if not self.transport.remote else None
        if slurm_conf:
            env.append(f"SLURM_CONF={slurm_conf}")
        return env

    def _resolved(self, program: str) -> str:
        """The command's absolute path where we can tell it (a scrubbed PATH may not reach it)."""
        path = self._bin(program)
        if not posixpath.isabs(path) and not self.transport.remote:
            return shutil.which(path) or path
        return path

    def remote_dir(self, ticket: Ticket) -> str:
        """The attempt directory as the cluster sees it."""
        if self.conf.remote_work_root:
            return posixpath.join(self.conf.remote_work_root, ticket.run_id, ticket.attempt_id)
        return str(ticket.attempt_dir)

    def close(self) -> None:
        self.transport.close()

    def _member(self, ticket: Ticket, *, look: bool = False) -> ArrayMember | None:
        """The array task this attempt was submitted as, if any: known since submission, or read
        back from its ``array.json`` (after a restart; ``look`` when its job id is not known yet)."""
        if ticket.attempt_id in self._members:
            return self._members[ticket.attempt_id]
        job_id = ticket.backend_job_id
        if not look and (job_id is None or _task_index(job_id) is None):
            return None
        raw = self.transport.read_file(posixpath.join(self.remote_dir(ticket), ARRAY_FILE), 4096)
        member = ArrayMember.parse(raw)
        if member is not None and job_id is not None and _task_index(job_id) != str(member.index):
            member = None  # the handle says another task: trust neither
        self._members[ticket.attempt_id] = member
        return member

    def _name_for(self, ticket: Ticket) -> str:
        """The job name Slurm shows for this attempt: its tag, or its array's name."""
        member = self._member(ticket)
        return member.name if member is not None else ticket.tag

    def _watch_key(self, ticket: Ticket) -> str:
        """What the watch list holds for a given-up attempt: its tag, or (array name, task)."""
        member = self._member(ticket, look=True)
        return f"{member.name}#{member.index}" if member is not None else ticket.tag

    # -- check / submit -----------------------------------------------------------------------

    def check(self, spec: JobSpec) -> None:
        conf = self.conf
        if conf.max_node_gpus is not None and spec.resources.gpus > conf.max_node_gpus:
            raise SpecError(
                "resources.gpus",
                f"asked for {spec.resources.gpus} GPU(s); the largest node of this cluster has {conf.max_node_gpus}",
            )
        if conf.runtime == "apptainer" and not spec.image.endswith(".sif"):
            raise SpecError("image", "this Slurm site runs Apptainer: give a local .sif image")
        if conf.runtime == "bubblewrap" and spec.image.endswith(".sif"):
            raise SpecError("image", "this Slurm site runs bubblewrap: give 'host' or a rootfs directory, not a .sif")
        partition = spec.placement.partition
        if partition is not None and conf.partitions is not None and partition not in conf.partitions:
            raise SpecError("placement.partition", f"{partition!r} is not one of: {', '.join(conf.partitions)}")

    def _inputs(self, spec: JobSpec) -> tuple[tuple[str, str], ...]:
        if self.transport.remote:
            return tuple((i.source, i.name) for i in spec.inputs)  # paths on the cluster
        return tuple((str(Path(i.source).resolve()), i.name) for i in spec.inputs)

    def render(self, ticket: Ticket) -> tuple[str, str]:
        """(spec.json text, sbatch script) for the attempt; raises SpecError/ConfigError."""
        return self._spec_json(ticket), self._script(ticket)

    def _spec_json(self, ticket: Ticket) -> str:
        spec = ticket.spec
        remote = self.remote_dir(ticket)
        plan = SandboxPlan(
            run_id=ticket.run_id,
            attempt_id=ticket.attempt_id,
            image=spec.image,
            command=spec.command,
            env=dict(spec.env),
            inputs=self._inputs(spec),
            output_dir=posixpath.join(remote, OUTPUT_DIR),
            scratch_dir=posixpath.join(remote, SCRATCH_DIR),
            gpus=spec.resources.gpus,
        )
        executable = self.conf.bwrap if self.conf.runtime == "bubblewrap" else self.conf.apptainer
        launch = build_launch(self.conf.runtime, plan, executable=executable)
        attempt_spec = AttemptSpec(
            run_id=ticket.run_id,
            attempt_id=ticket.attempt_id,
            launch=launch,
            time_limit_s=spec.resources.time_limit,
        )
        return attempt_spec.to_json()

    def _script_values(self, ticket: Ticket, wrapper: str) -> ScriptValues:
        return script_values(
            ticket.spec, self.conf, attempt_id=ticket.attempt_id, attempt_dir=self.remote_dir(ticket), wrapper=wrapper
        )

    def _script(self, ticket: Ticket) -> str:
        wrapper = self.conf.wrapper or posixpath.join(self.remote_dir(ticket), WRAPPER_FILE)
        return render_script(self._script_values(ticket, wrapper))

    def _wrapper_bytes(self) -> bytes:
        if self._wrapper_cache is None:
            self._wrapper_cache = wrapper_path().read_bytes()
        return self._wrapper_cache

    def _stage_dir(self, ticket: Ticket, spec_json: str, *, wrapper: bool, sync: bool) -> str:
        """The attempt directory (logs/, output/, scratch/) with its spec.json, and the wrapper
        when asked; ``sync=False`` leaves durability to one transport.sync() for the batch."""
        remote = self.remote_dir(ticket)
        transport = self.transport
        transport.makedirs(remote, 0o700)
        for sub in (LOGS_DIR, OUTPUT_DIR, SCRATCH_DIR):
            transport.makedirs(posixpath.join(remote, sub), 0o700)
        transport.put_file(spec_json.encode(), posixpath.join(remote, SPEC_FILE), 0o600, sync=sync)
        if wrapper:
            transport.put_file(self._wrapper_bytes(), posixpath.join(remote, WRAPPER_FILE), 0o600, sync=sync)
        return remote

    def stage(self, ticket: Ticket) -> str:
        """Write the attempt directory through the transport; return the script's path there."""
        spec_json, script = self.render(ticket)  # a SpecError before anything is written
        remote = self._stage_dir(ticket, spec_json, wrapper=self.conf.wrapper is None, sync=True)
        script_path = posixpath.join(remote, SCRIPT_FILE)
        self.transport.put_file(script.encode(), script_path, 0o600)
        if self.transport.remote:
            # a local copy of what was submitted, next to the logs collect() brings back
            ticket.attempt_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            (ticket.attempt_dir / SCRIPT_FILE).write_text(script)
        return script_path

    def submit(self, ticket: Ticket) -> str:
        try:
            script_path = self.stage(ticket)
        except (SpecError, ConfigError) as exc:
            raise SubmitError(f"cannot build the job: {exc}", definite=True, retryable=False) from exc
        except (OSError, BackendUnavailable) as exc:
            raise SubmitError(f"cannot stage {self.remote_dir(ticket)}: {exc}", definite=True) from exc
        return self._sbatch(ticket, script_path)

    def array_key(self, ticket: Ticket) -> Hashable | None:
        """Alike attempts (same resources and placement) can share one job array."""
        return self._shape(ticket.spec) if self.array_min > 0 else None

    def submit_array(self, tickets: list[Ticket]) -> list[str | Exception]:
        """One ``sbatch --array=0-(k-1)`` for k alike attempts. Every member gets its own
        directory and spec.json, plus ``array.json`` naming the array and its task, all written
        before sbatch (made durable by one sync for the batch) so reconciliation after a crash
        finds the task; task N runs the Nth directory with the one wrapper copy in the first
        member's directory. The job id of member N is ``<array job id>_N``."""
        if len(tickets) == 1:
            try:
                return [self.submit(tickets[0])]
            except SubmitError as exc:
                return [exc]
        name = f"hpcc-arr-{uuid.uuid4().hex}"
        first = tickets[0]
        first_dir = self.remote_dir(first)
        # one wrapper for the whole array, in the first member's directory (cleanup() never
        # removes it); every member still gets its own directory, spec.json and array.json
        wrapper = self.conf.wrapper or posixpath.join(first_dir, WRAPPER_FILE)
        try:
            specs = [self._spec_json(ticket) for ticket in tickets]  # SpecError before any write
            for index, (ticket, spec_json) in enumerate(zip(tickets, specs, strict=True)):
                copy_wrapper = index == 0 and self.conf.wrapper is None
                remote = self._stage_dir(ticket, spec_json, wrapper=copy_wrapper, sync=False)
                record = json.dumps({"array": name, "index": index}).encode()
                self.transport.put_file(record, posixpath.join(remote, ARRAY_FILE), 0o600, sync=False)
                self._members[ticket.attempt_id] = ArrayMember(name, index)
            array = ArrayValues(
                tag=name.removeprefix("hpcc-arr-"),
                attempt_dirs=tuple(self.remote_dir(t) for t in tickets),
                throttle=self.conf.array_throttle,
                wrapper=wrapper,
            )
            script = render_script(replace(self._script_values(first, wrapper), array=array))
            script_path = posixpath.join(first_dir, ARRAY_SCRIPT_FILE)
            self.transport.put_file(script.encode(), script_path, 0o600, sync=False)
            self.transport.sync(first_dir)  # every member's files durable before sbatch
        except (SpecError, ConfigError) as exc:
            return [SubmitError(f"cannot build the job array: {exc}", definite=True, retryable=False)] * len(tickets)
        except (OSError, BackendUnavailable) as exc:
            return [SubmitError(f"cannot stage the job array: {exc}", definite=True)] * len(tickets)
        try:
            job_id = self._sbatch(first, script_path)
        except SubmitError as exc:
            return [exc] * len(tickets)
        self._array_sizes[job_id] = len(tickets)
        return [f"{job_id}_{index}" for index in range(len(tickets))]

    def _sbatch(self, ticket: Ticket, script_path: str) -> str:
        """Run sbatch on a staged script (held under strict submission); the job id, or SubmitError."""
        self._squeue_cache = None  # the next poll must see the new job
        if self.conf.strict_submit:
            self._test_only_once(ticket, script_path)
        try:
            hold = ["--hold"] if self.conf.strict_submit else []
            result = self._run(
                "sbatch",
                ["--parsable", *hold, script_path],
                timeout=self.conf.sbatch_timeout,
                scrubbed=self.conf.export_env == "scrubbed",
            )
        except BackendUnavailable as exc:
            raise SubmitError(f"sbatch outcome unknown: {exc}", definite=False) from exc
        stdout = result.stdout.strip()
        if result.returncode == 0:
            match = _PARSABLE_RE.match(stdout)
            if match:
                return match.group(1)
            raise SubmitError(f"sbatch printed no job id: {stdout[:200]!r}", definite=False)
        message = _first_line(result.stderr) or f"sbatch exited with {result.returncode}"
        if any(marker in message for marker in AMBIGUOUS_ERRORS):
            raise SubmitError(f"sbatch outcome unknown: {message}", definite=False)
        if any(marker in message for marker in PERMANENT_REFUSALS):
            raise self._refusal(message)
        if _REFUSED_MARK in message:
            raise SubmitError(f"Slurm refused the job: {message}", definite=True, retryable=True)
        raise SubmitError(f"sbatch failed ({result.returncode}): {message}", definite=False)

    def _refusal(self, message: str) -> SubmitError:
        """A refusal that names the request, e.g. "Requested node configuration is not available",
        is permanent only while the nodes are really there: right after a slurmctld restart the
        node is not registered yet and the same words come back for a valid request. Then the run
        is deferred (no retry burnt) instead of failed."""
        if NODE_CONFIG_REFUSAL in message and not self._nodes_ready():
            return SubmitError(
                f"Slurm cannot place the job now (its nodes are not ready): {message}",
                definite=True,
                retryable=True,
                defer_s=NODES_NOT_READY_DEFER_S,
            )
        return SubmitError(f"Slurm refused the job: {message}", definite=True, retryable=False)

    def _nodes_ready(self) -> bool:
        """Whether every node answers (``sinfo``): none unknown, down, not responding or failing."""
        try:
            result = self._run("sinfo", ["-h", "-o", "%T"])
        except BackendUnavailable:
            return False
        states = [line.strip().lower() for line in result.stdout.splitlines() if line.strip()]
        if result.returncode != 0 or not states:
            return False
        bad = ("unknown", "down", "not_responding", "fail", "future", "power")
        return not any(state.endswith("*") or any(b in state for b in bad) for state in states)

    @staticmethod
    def _shape(spec: JobSpec) -> tuple[object, ...]:
        """What the sbatch directives of an attempt depend on (not its command, env or inputs)."""
        resources, placement = spec.resources, spec.placement
        return (
            resources.cpus,
            resources.memory,
            resources.gpus,
            resources.gpu_type,
            resources.time_limit,
            placement.partition,
            placement.account,
            placement.qos,
            placement.exclusive,
        )

    def _test_only_once(self, ticket: Ticket, script_path: str) -> None:
        """``--test-only`` once per resource shape a minute: a sweep of 500 alike runs asks once."""
        shape = self._shape(ticket.spec)
        now = time.monotonic()
        if self._test_ok.get(shape, 0.0) > now:
            return
        self._test_only(script_path)
        self._test_ok[shape] = now + TEST_ONLY_CACHE_S

    def _test_only(self, script_path: str) -> None:
        """Strict submit: slurmctld accepts a *held* job it can never run (e.g. more GPUs than any
        node has: pending ``BadConstraints`` forever once released), so ask ``sbatch --test-only``
        first (no job is created) and refuse what Slurm would refuse. Any other answer, including a
        failed query, lets the held submission go ahead and speak for itself."""
        try:
            result = self._run("sbatch", ["--test-only", script_path], timeout=self.conf.sbatch_timeout)
        except BackendUnavailable:
            return
        if result.returncode == 0:
            return
        message = _first_line(result.stderr) or f"sbatch --test-only exited with {result.returncode}"
        if any(marker in message for marker in PERMANENT_REFUSALS):
            raise self._refusal(message)
        if _REFUSED_MARK in message:
            raise SubmitError(f"Slurm refused the job: {message}", definite=True, retryable=True)

    # -- queries ------------------------------------------------------------------------------

    def _squeue(self, extra: list[str]) -> dict[str, SlurmRecord]:
        # -r: one line per array task, pending ones included (else "123_[0-9]")
        result = self._run("squeue", ["-h", "-r", "-t", "all", "--me", *extra, "-o", parse.SQUEUE_FORMAT])
        if result.returncode != 0:
            raise BackendUnavailable(f"squeue failed ({result.returncode}): {_first_line(result.stderr)}")
        return parse.parse_squeue(result.stdout)

    def _squeue_all(self) -> dict[str, SlurmRecord]:
        now = time.monotonic()
        cached = self._squeue_cache
        if cached is not None and now - cached[0] < self.conf.min_poll_interval:
            return cached[1]
        records = {k: v for k, v in self._squeue([]).items() if parse.is_ours(v.name)}
        self._squeue_cache = (time.monotonic(), records)
        self._cancel_watched(records.values())
        return records

    def _watching(self) -> list[str]:
        now = time.time()
        for tag in [t for t, until in self._watch.items() if until < now]:
            del self._watch[tag]
        return list(self._watch)

    def _cancel_watched(self, records: Iterable[SlurmRecord]) -> None:
        """Cancel every live job carrying the tag of an attempt we gave up (never runs user code
        under strict submission: such a job is still held)."""
        if not self._watch:
            return
        watched = set(self._watching())
        for record in records:
            task = _task_index(record.job_id)
            keys = {record.name} if task is None else {f"{record.name}#{task}"}
            if keys & watched and not record.terminal:
                log.warning("job %s carries the tag of a given-up attempt (%s): cancelling", record.job_id, record.name)
                try:
                    self._scancel(record.job_id)
                except BackendUnavailable as exc:
                    log.warning("could not cancel %s: %s", record.job_id, exc)

    def accounting(self) -> bool | None:
        """Whether sacct works here: detected once (``auto``); None while the probe fails."""
        if self._accounting is not None:
            return self._accounting
        try:
            result = self._run("sacct", ["-n", "-X", "-j", "1", "-o", "JobIDRaw"])
        except BackendUnavailable:
            return None
        if parse.accounting_disabled(result.stdout, result.stderr):
            self._accounting = False
        elif result.returncode == 0:
            self._accounting = True
        else:
            log.warning("sacct probe failed (%s): %s", result.returncode, _first_line(result.stderr))
            return None
        return self._accounting

    def _user(self) -> str:
        """The account our jobs run as on the cluster (asked once through the transport)."""
        if self._user_name is None:
            result = self.transport.run(["id", "-un"], timeout=self.conf.command_timeout)
            name = result.stdout.strip()
            if result.returncode != 0 or not name:
                raise BackendUnavailable(f"cannot tell the cluster user: {_first_line(result.stderr)}")
            self._user_name = name
        return self._user_name

    @staticmethod
    def _since(times: Iterable[float | None], slack: float) -> str:
        now = time.time()
        earliest = min((t for t in times if t is not None), default=now)
        return f"now-{int(max(0.0, now - earliest) + slack) + 1}"

    def _sacct(self, selector: list[str], since: str) -> list[SlurmRecord]:
        fields = ["-X", "-D", "-P", "-n", f"--delimiter={parse.SEP}", f"--format={parse.SACCT_FORMAT}"]
        result = self._run("sacct", [*fields, *selector, "-S", since, "-E", "now"])
        if parse.accounting_disabled(result.stdout, result.stderr):
            self._accounting = False if self.conf.accounting == "auto" else self._accounting
            raise BackendUnavailable("sacct: accounting storage is disabled")
        if result.returncode != 0:
            raise BackendUnavailable(f"sacct failed ({result.returncode}): {_first_line(result.stderr)}")
        return parse.parse_sacct(result.stdout)

    def _sacct_ids(self, job_ids: list[str], since: str) -> dict[str, SlurmRecord]:
        out: dict[str, SlurmRecord] = {}
        chunk = self.conf.sacct_chunk
        for start in range(0, len(job_ids), chunk):
            part = job_ids[start : start + chunk]
            out.update(parse.latest_by_id(self._sacct(["-j", ",".join(part)], since)))
        return out

    def _scontrol(self) -> dict[str, SlurmRecord]:
        result = self._run("scontrol", ["show", "job", "-o"])
        if result.returncode != 0:
            raise BackendUnavailable(f"scontrol failed ({result.returncode}): {_first_line(result.stderr)}")
        return parse.parse_scontrol(result.stdout, ours_only=True, terminal_only=True)

    def _result_exists(self, ticket: Ticket) -> bool:
        path = posixpath.join(self.remote_dir(ticket), RESULT_FILE)
        return self.transport.read_file(path, RESULT_MAX_BYTES) is not None

    # -- poll ---------------------------------------------------------------------------------

    def poll(self, tickets: list[Ticket]) -> dict[str, Observation]:
        out: dict[str, Observation] = {}
        try:
            queue = self._squeue_all()
        except BackendUnavailable as exc:
            log.warning("squeue failed; every job's state is unknown this cycle: %s", exc)
            return {t.attempt_id: Observation(ObservationKind.UNKNOWN, reason=str(exc)[:200]) for t in tickets}
        finished: list[tuple[Ticket, SlurmRecord]] = []
        missing: list[Ticket] = []
        for ticket in tickets:
            job_id = ticket.backend_job_id
            if not job_id:
                out[ticket.attempt_id] = Observation(ObservationKind.UNKNOWN, reason="no job id yet")
                continue
            record = queue.get(job_id)
            if record is None or record.name != self._name_for(ticket):
                missing.append(ticket)
                continue
            observation = parse.observe(record)
            if observation.kind == ObservationKind.FINISHED:
                finished.append((ticket, record))
            out[ticket.attempt_id] = observation
        if finished:
            self._finished_details(finished)
        if missing:
            out.update(self._poll_missing(missing))
        return out

    def _finished_details(self, finished: list[tuple[Ticket, SlurmRecord]]) -> None:
        """Exit codes of jobs squeue shows as finished (squeue has none): one scontrol call; sacct
        besides for jobs cancelled by someone else, to learn who."""
        try:
            details = self._scontrol()
        except BackendUnavailable as exc:
            log.warning("scontrol failed, collect() will ask again: %s", exc)
            details = {}
        for ticket, record in finished:
            job_id = record.job_id
            detail = details.get(job_id)
            if detail is None:
                log.info("scontrol has no record of finished job %s (squeue: %s)", job_id, record.state)
            self._records[job_id] = detail if detail is not None and detail.name == self._name_for(ticket) else record
        foreign = [t for t, r in finished if r.base_state == "CANCELLED" and not t.cancel_requested]
        if foreign and self.accounting():
            try:
                found = self._sacct_ids([t.backend_job_id or "" for t in foreign], self._since([], 86400))
            except BackendUnavailable:
                return
            for ticket in foreign:
                rec = found.get(ticket.backend_job_id or "")
                if rec is not None and rec.base_state == "CANCELLED" and rec.name == self._name_for(ticket):
                    self._records[rec.job_id] = rec

    def _poll_missing(self, missing: list[Ticket]) -> dict[str, Observation]:
        """Jobs squeue no longer shows: sacct (accounting on), else the result file."""
        out: dict[str, Observation] = {}
        accounting = self.accounting()
        found: dict[str, SlurmRecord] = {}
        if accounting:
            since = self._since([t.submitted_at for t in missing], self.conf.sacct_slack_s)
            try:
                found = self._sacct_ids([t.backend_job_id or "" for t in missing], since)
            except BackendUnavailable as exc:
                log.warning("sacct failed; the jobs that left squeue stay unknown: %s", exc)
                return {t.attempt_id: Observation(ObservationKind.UNKNOWN, reason=str(exc)[:200]) for t in missing}
        now = time.time()
        for ticket in missing:
            job_id = ticket.backend_job_id or ""
            record = found.get(job_id)
            if record is not None and record.name == self._name_for(ticket):
                observation = parse.observe(record)
                if observation.kind == ObservationKind.FINISHED:
                    self._records[job_id] = record
                out[ticket.attempt_id] = observation
                continue
            within_grace = now - (ticket.submitted_at or now) < self.reconcile_grace_s
            if accounting and within_grace:
                # sacct lags behind slurmctld: give it the grace period before believing the file alone
                out[ticket.attempt_id] = Observation(
                    ObservationKind.UNKNOWN, reason=f"job {job_id}: not in squeue or sacct yet"
                )
                continue
            try:
                has_result = self._result_exists(ticket)
            except BackendUnavailable as exc:
                out[ticket.attempt_id] = Observation(ObservationKind.UNKNOWN, reason=str(exc)[:200])
                continue
            if has_result:
                # purged from slurmctld, and sacct has nothing (or is off): the wrapper's result stands
                out[ticket.attempt_id] = Observation(ObservationKind.FINISHED, backend_state="left the queue")
            elif accounting:
                self._absent.add(job_id)
                out[ticket.attempt_id] = Observation(ObservationKind.FINISHED, backend_state="lost")
            else:
                why = "not visible yet" if within_grace else "left squeue and accounting is off"
                out[ticket.attempt_id] = Observation(ObservationKind.UNKNOWN, reason=f"job {job_id}: {why}")
        return out

    # -- reconciliation -----------------------------------------------------------------------

    def find(self, tickets: list[Ticket]) -> dict[str, FindResult]:
        if not tickets:
            return {}
        failures: list[str] = []
        members: dict[str, ArrayMember | None] = {}
        for ticket in tickets:
            try:
                members[ticket.attempt_id] = self._member(ticket, look=True)
            except BackendUnavailable as exc:
                failures.append(f"cannot read {ARRAY_FILE}: {exc}")
                members[ticket.attempt_id] = None
        names = sorted({m.name if (m := members[t.attempt_id]) else t.tag for t in tickets})
        by_name: dict[str, dict[str, SlurmRecord]] = {name: {} for name in names}
        try:
            for record in self._squeue(["--name", ",".join(names)]).values():
                if record.name in by_name:
                    by_name[record.name][record.job_id] = record
        except BackendUnavailable as exc:
            failures.append(str(exc))
        accounting = self.accounting()
        if accounting is None:
            failures.append("cannot tell whether accounting works")
        elif accounting:
            since = self._since([t.submitted_at for t in tickets], self.conf.sacct_slack_s)
            try:
                # As root (or an operator) sacct --name lists every user's jobs: only ours count.
                for record in self._sacct(["--name", ",".join(names), "--user", self._user()], since):
                    if record.name in by_name:
                        by_name[record.name].setdefault(record.job_id, record)
            except BackendUnavailable as exc:
                failures.append(str(exc))
        now = time.time()
        out: dict[str, FindResult] = {}
        for ticket in tickets:
            member = members[ticket.attempt_id]
            if member is None:
                jobs = by_name[ticket.tag]
            else:  # only this attempt's task of its array
                jobs = {j: r for j, r in by_name[member.name].items() if _task_index(j) == str(member.index)}
            if jobs:
                out[ticket.attempt_id] = self._adopt(ticket, jobs)
            elif failures:
                out[ticket.attempt_id] = FindResult(FindKind.UNKNOWN, detail="; ".join(failures)[:500])
            elif now - (ticket.submitted_at or now) < self.reconcile_grace_s:
                out[ticket.attempt_id] = FindResult(FindKind.UNKNOWN, detail="within the grace period")
            else:
                out[ticket.attempt_id] = self._tombstone(ticket)
        return out

    def _adopt(self, ticket: Ticket, jobs: dict[str, SlurmRecord]) -> FindResult:
        ordered = sorted(jobs, key=_job_order)
        keep, extras = ordered[0], ordered[1:]
        cancelled: list[str] = []
        for job_id in extras:
            if jobs[job_id].terminal:
                continue
            try:
                self._scancel(job_id)
            except BackendUnavailable as exc:
                log.warning("could not scancel duplicate %s of %s: %s", job_id, ticket.tag, exc)
                continue
            cancelled.append(job_id)
        detail = f"{len(ordered)} jobs named {ticket.tag}" if extras else None
        return FindResult(FindKind.FOUND, backend_job_id=keep, extras_cancelled=tuple(cancelled), detail=detail)

    def _tombstone(self, ticket: Ticket) -> FindResult:
        """Claim the attempt directory for nobody, so a job that appears after all can never run it."""
        claim = posixpath.join(self.remote_dir(ticket), CLAIM_FILE)
        data = json.dumps({"tombstone": True, "at": time.time()}).encode()
        try:
            created = self.transport.create_exclusive(claim, data)
        except FileNotFoundError:
            self._watch[self._watch_key(ticket)] = time.time() + WATCH_S
            return FindResult(FindKind.ABSENT, detail="no attempt directory")
        except BackendUnavailable as exc:
            return FindResult(FindKind.UNKNOWN, detail=f"cannot tombstone: {exc}")
        if created:
            self._watch[self._watch_key(ticket)] = time.time() + WATCH_S
            return FindResult(FindKind.ABSENT, detail="not found by squeue or sacct after the grace period")
        try:
            existing = self.transport.read_file(claim, RESULT_MAX_BYTES)
        except BackendUnavailable as exc:
            return FindResult(FindKind.UNKNOWN, detail=f"cannot read the claim: {exc}")
        if existing is not None and b'"tombstone": true' in existing:
            self._watch[self._watch_key(ticket)] = time.time() + WATCH_S
            return FindResult(FindKind.ABSENT, detail="tombstoned earlier")
        # a wrapper claimed the attempt, yet Slurm shows no job: never declare it absent
        return FindResult(FindKind.UNKNOWN, detail="a wrapper claimed the attempt but Slurm shows no job by its tag")

    # -- cancel / collect ---------------------------------------------------------------------

    def _scancel(self, job_id: str) -> None:
        result = self._run("scancel", [job_id])
        if result.returncode != 0 and not any(g in result.stderr for g in _GONE):
            raise BackendUnavailable(f"scancel {job_id} failed ({result.returncode}): {_first_line(result.stderr)}")

    def cancel(self, ticket: Ticket) -> None:
        if ticket.backend_job_id:
            self._scancel(ticket.backend_job_id)
            self._squeue_cache = None

    def confirm(self, ticket: Ticket) -> None:
        """Strict submit: release the hold once the job id is committed (a job that already left
        the hold, finished or vanished counts as released: the hold is gone either way)."""
        if not self.conf.strict_submit or not ticket.backend_job_id:
            return
        self._release(ticket.backend_job_id)
        self._squeue_cache = None

    def confirm_many(self, tickets: list[Ticket]) -> set[str]:
        """Strict submit: release every committed hold in one ``scontrol release a,b,c`` per chunk;
        a job array whose tasks are all committed is released by its array job id (one id, not
        k). scontrol answers for the whole list; when a chunk fails (one job already gone makes it
        complain), fall back to one call per entry so the others are still released."""
        if not self.conf.strict_submit:
            return {t.attempt_id for t in tickets}
        done: set[str] = {t.attempt_id for t in tickets if not t.backend_job_id}
        entries = self._release_entries([t for t in tickets if t.backend_job_id])
        chunk = self.conf.sacct_chunk
        for start in range(0, len(entries), chunk):
            part = entries[start : start + chunk]
            result = self._run("scontrol", ["release", ",".join(job_id for job_id, _ in part)])
            if result.returncode == 0:
                done.update(t.attempt_id for _, members in part for t in members)
                continue
            for job_id, members in part:
                try:
                    self._release(job_id)
                except BackendUnavailable as exc:
                    log.warning("release of %s failed, will retry: %s", job_id, exc)
                    continue
                done.update(t.attempt_id for t in members)
        self._squeue_cache = None
        return done

    def _release_entries(self, tickets: list[Ticket]) -> list[tuple[str, list[Ticket]]]:
        """(job id to release, the attempts it releases): an array submitted here whose every task
        is among ``tickets`` is one entry; any other ticket is an entry of its own."""
        entries: list[tuple[str, list[Ticket]]] = []
        tasks: dict[str, list[Ticket]] = {}
        for ticket in tickets:
            job_id = ticket.backend_job_id or ""
            head, sep, _ = job_id.partition("_")
            if sep:
                tasks.setdefault(head, []).append(ticket)
            else:
                entries.append((job_id, [ticket]))
        for head, members in tasks.items():
            if len({t.backend_job_id for t in members}) == self._array_sizes.get(head):
                entries.append((head, members))
            else:
                entries += [(t.backend_job_id or "", [t]) for t in members]
        return entries

    def _release(self, job_id: str) -> None:
        result = self._run("scontrol", ["release", job_id])
        if result.returncode != 0 and not any(g in result.stderr for g in _GONE):
            message = _first_line(result.stderr)
            raise BackendUnavailable(f"scontrol release {job_id} failed ({result.returncode}): {message}")

    def abandon(self, ticket: Ticket) -> None:
        """Cancel the job we created for an attempt that is no longer ours, and watch its tag."""
        self._watch[self._watch_key(ticket)] = time.time() + WATCH_S
        if ticket.backend_job_id:
            self._scancel(ticket.backend_job_id)
        self._squeue_cache = None

    def cleanup(self, ticket: Ticket) -> None:
        """After the finish is recorded: free the attempt's ``output/`` (harvested into the
        artifact store by then) and ``scratch/``, so a job that filled the work root's file system
        does not keep it full for the next runs. Logs, spec and result stay. Nothing is followed:
        ``rm -r`` removes symlinks, never their targets."""
        if self.conf.keep_outputs:
            return
        remote = self.remote_dir(ticket)
        paths = [posixpath.join(remote, sub) for sub in (OUTPUT_DIR, SCRATCH_DIR)]
        try:
            result = self.transport.run(["rm", "-rf", "--one-file-system", "--", *paths], self.conf.command_timeout)
        except BackendUnavailable as exc:
            log.warning("could not free the outputs of %s: %s", ticket.attempt_id, exc)
            return
        if result.returncode != 0:
            log.warning("could not free the outputs of %s: %s", ticket.attempt_id, _first_line(result.stderr))

    def sweep_abandoned(self) -> None:
        """At most every SWEEP_EVERY_S while tags are watched: one squeue by name, cancel what lives."""
        if not self._watch or time.monotonic() - self._last_sweep < max(SWEEP_EVERY_S, self.conf.min_poll_interval):
            return
        self._last_sweep = time.monotonic()
        names = sorted({key.partition("#")[0] for key in self._watching()})
        if names:
            self._cancel_watched(self._squeue(["--name", ",".join(names)]).values())

    def _record_for(self, ticket: Ticket) -> SlurmRecord | None:
        job_id = ticket.backend_job_id
        if not job_id:
            return None
        record = self._records.pop(job_id, None)
        if record is not None and (record.exit_code is not None or record.base_state == "CANCELLED"):
            return record
        # a fresh process, or the poll saw only squeue's record (no exit code): ask again
        try:
            detail = self._scontrol().get(job_id)
        except BackendUnavailable:
            detail = None
        if detail is not None and detail.name == self._name_for(ticket) and detail.terminal:
            return detail
        if self.accounting():
            try:
                found = self._sacct_ids([job_id], self._since([ticket.submitted_at], self.conf.sacct_slack_s))
            except BackendUnavailable:
                found = {}
            rec = found.get(job_id)
            if rec is not None and rec.name == self._name_for(ticket) and rec.terminal:
                return rec
        return record

    def _who(self, record: SlurmRecord) -> str | None:
        uid = record.cancelled_by
        if uid is None or self.transport.remote or not uid.isdigit():
            return f"uid {uid}" if uid else None
        try:
            return f"{pwd.getpwuid(int(uid)).pw_name} (uid {uid})"
        except KeyError:
            return f"uid {uid}"

    def _harvest(self, remote_output: str, artifact_dir: Path, limits: HarvestLimits) -> HarvestReport:
        """Harvest into a fresh sibling, then rename: a harvest cut short by a broken connection
        leaves nothing half-done for the retry."""
        staging = artifact_dir.with_name(f".{artifact_dir.name}.partial.{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        try:
            report = self.transport.harvest(remote_output, staging, limits)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if artifact_dir.is_dir() and not artifact_dir.is_symlink() and not any(artifact_dir.iterdir()):
            artifact_dir.rmdir()
        os.replace(staging, artifact_dir)
        return report

    def collect(self, ticket: Ticket, artifact_dir: Path, limits: HarvestLimits) -> Outcome:
        remote = self.remote_dir(ticket)
        raw = self.transport.read_file(posixpath.join(remote, RESULT_FILE), RESULT_MAX_BYTES)
        result: dict[str, Any] | None = None
        if raw is not None:
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            result = value if isinstance(value, dict) else None
        if self.transport.remote:
            for name in (STDOUT_FILE, STDERR_FILE, WRAPPER_LOG, *SLURM_LOGS):
                self.transport.fetch_file(posixpath.join(remote, name), ticket.attempt_dir / name, LOG_MAX_BYTES)
        report = self._harvest(posixpath.join(remote, OUTPUT_DIR), artifact_dir, limits)
        base = outcome_from_result(
            result,
            ticket,
            harvest=report,
            lost_message="the job ended without a result file (killed, or its node went away)",
        )
        record = self._record_for(ticket)
        job_id = ticket.backend_job_id or ""
        if record is not None:
            self._absent.discard(job_id)
            return parse.refine_outcome(
                base, record, result=result, cancel_requested=ticket.cancel_requested, who=self._who(record)
            )
        if job_id in self._absent:
            self._absent.discard(job_id)
            note = "Slurm has no record of the job (not in squeue, not in sacct after the grace period)"
            message = f"{base.message}; {note}" if base.message else note
            return replace(base, message=message, backend_record={"source": "none", "job_id": job_id})
        return replace(base, backend_record={"source": "result-file", "job_id": job_id})
