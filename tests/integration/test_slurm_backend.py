"""The Slurm backend against the real single-node cluster (ansible/playbooks/dev-cluster.yml),
through the real engine and a SQLite ledger, jobs sealed by bubblewrap.

Several runs go through one engine at once wherever the test allows, to keep the module's wall
time low (the cluster has 2 CPUs and 2 fake GPUs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hpc_compute.backends.base import FindKind, FindResult, Outcome, SubmitError, Ticket
from hpc_compute.backends.slurm import SlurmBackend, SlurmSettings
from hpc_compute.backends.slurm.backend import make_transport
from hpc_compute.config import load_settings
from hpc_compute.engine import Engine
from hpc_compute.errors import BackendUnavailable
from hpc_compute.harvest import HarvestLimits
from hpc_compute.ledger.states import RunState
from hpc_compute.ledger.store import Ledger
from hpc_compute.records import RunInfo
from hpc_compute.spec import FailureKind, parse_spec
from hpc_compute.transports.base import CommandResult, Transport

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import services_required
from sshd_support import running_sshd, sshd_available

pytestmark = [pytest.mark.slurm, pytest.mark.bwrap]

SLURMCTLD_PORT = 6817


def _slurm_state() -> str | None:
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _slurm_config() -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10, check=True)
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    deadline = time.monotonic() + 120
    while True:
        state = _slurm_state()
        if state and any(s in state for s in ("idle", "mixed", "alloc")):
            break
        if time.monotonic() > deadline:
            why = f"no usable Slurm cluster here (sinfo: {state!r})"
            if services_required():
                pytest.fail(f"{why}: services are required here, the Slurm tests must run", pytrace=False)
            pytest.skip(why)
        time.sleep(2)
    return _slurm_config()


def _accounting_on(config: dict[str, str]) -> bool:
    return config.get("AccountingStorageType", "accounting_storage/none") != "accounting_storage/none"


def _cgroup_memory(config: dict[str, str]) -> bool:
    if "cgroup" not in config.get("TaskPlugin", ""):
        return False
    try:
        text = Path("/etc/slurm/cgroup.conf").read_text()
    except OSError:
        return False
    return bool(re.search(r"^\s*ConstrainRAMSpace\s*=\s*yes", text, re.MULTILINE | re.IGNORECASE))


# ---------------------------------------------------------------------------------------------
# the harness


class TestBackend(SlurmBackend):
    """The real backend, recording its outcomes and reconciliation answers; ``modes`` makes the
    first submit of a run misbehave the way a crash or a lost sbatch reply would."""

    __test__ = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, Outcome] = {}
        self.finds: list[FindResult] = []
        self.modes: dict[str, str] = {}

    def submit(self, ticket: Ticket) -> str:
        mode = self.modes.pop(ticket.run_id, None)
        if mode is None:
            return super().submit(ticket)
        if mode == "never":  # staged, then the process "crashed" before sbatch
            self.stage(ticket)
            raise SubmitError("simulated: sbatch never ran", definite=False)
        job_id = super().submit(ticket)
        if mode == "twice":  # a retried sbatch after a lost reply created a second job (held)
            script = f"{self.remote_dir(ticket)}/sbatch.sh"
            extra = self._run("sbatch", ["--parsable", "--hold", script])
            assert extra.returncode == 0, extra.stderr
        raise SubmitError(f"simulated: sbatch reply for {job_id} lost", definite=False)

    array_reply_lost = False  # the next array sbatch succeeds, but its reply is "lost"

    def submit_array(self, tickets: list[Ticket]) -> list[str | Exception]:
        results = super().submit_array(tickets)
        if self.array_reply_lost:
            self.array_reply_lost = False
            assert all(isinstance(r, str) for r in results), results
            return [SubmitError("simulated: sbatch reply for the array lost", definite=False) for _ in results]
        return results

    def find(self, tickets: list[Ticket]) -> dict[str, FindResult]:
        found = super().find(tickets)
        self.finds.extend(found.values())
        return found

    def collect(self, ticket: Ticket, artifact_dir: Path, limits: HarvestLimits) -> Outcome:
        outcome = super().collect(ticket, artifact_dir, limits)
        self.outcomes[ticket.run_id] = outcome
        return outcome


class ShimTransport(Transport):
    """Wraps a transport: hides jobs from squeue (as if slurmctld had purged them after
    MinJobAge) or makes chosen Slurm commands fail."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name = inner.name
        self.remote = inner.remote
        self.hide_from_squeue = False
        self.failing: dict[str, str] = {}  # program -> "raise" | "rc"
        self.programs: list[str] = []
        self.argvs: list[list[str]] = []

    def run(self, argv: list[str], timeout: float, input: bytes | None = None) -> CommandResult:
        command = argv
        if Path(argv[0]).name == "env":  # env -i NAME=value ... program args (a scrubbed sbatch)
            command = [a for a in argv[1:] if a != "-i" and "=" not in a.split("/")[0]]
        program = Path(command[0]).name
        self.programs.append(program)
        self.argvs.append(command)
        how = self.failing.get(program)
        if how == "raise":
            raise BackendUnavailable(f"{program}: simulated: Socket timed out on send/recv operation")
        if how == "rc":
            return CommandResult(1, "", f"{program}: error: simulated: Unable to contact slurm controller\n")
        result = self.inner.run(argv, timeout, input)
        if program in ("squeue", "scontrol") and self.hide_from_squeue:
            return CommandResult(result.returncode, "", result.stderr)
        return result

    def put_file(self, source: Path | bytes, remote_path: str, mode: int = 0o600, *, sync: bool = True) -> None:
        self.inner.put_file(source, remote_path, mode, sync=sync)

    def sync(self, remote_path: str) -> None:
        self.inner.sync(remote_path)

    def read_file(self, remote_path: str, max_bytes: int) -> bytes | None:
        return self.inner.read_file(remote_path, max_bytes)

    def create_exclusive(self, remote_path: str, data: bytes, mode: int = 0o600) -> bool:
        return self.inner.create_exclusive(remote_path, data, mode)

    def makedirs(self, remote_path: str, mode: int = 0o700) -> None:
        self.inner.makedirs(remote_path, mode)

    def harvest(self, remote_dir: str, dest: Path, limits: HarvestLimits) -> Any:
        return self.inner.harvest(remote_dir, dest, limits)

    def fetch_file(self, remote_path: str, local_path: Path, max_bytes: int) -> bool:
        return self.inner.fetch_file(remote_path, local_path, max_bytes)

    def close(self) -> None:
        self.inner.close()


class Harness:
    def __init__(self, tmp_path: Path, *, inner: Transport | None = None, **slurm: Any) -> None:
        conf: dict[str, Any] = {
            "runtime": "bubblewrap",
            "bwrap": "/usr/bin/bwrap",
            "python": "/usr/bin/python3",
            "gpu_style": "gres",
            "min_poll_interval": 0.3,
            "reconcile_grace_s": 4.0,
            "accounting": "auto",
        }
        conf.update(slurm)
        self.settings = load_settings(
            {
                "home": str(tmp_path / "home"),
                "local": {"max_parallel": 32},
                "scheduler": {"poll_interval": 0.5, "min_poll_interval": 0.25},
                "slurm": conf,
            },
            env={"HOME": str(tmp_path)},
            system_file=tmp_path / "no-system-config.toml",
        )
        self.ledger = Ledger(self.settings.ledger_url)
        self.ledger.ensure_ready()
        conf_model = SlurmSettings.from_mapping(self.settings.slurm)
        self.shim = ShimTransport(inner or make_transport(conf_model))
        self.backend = TestBackend(self.settings, transport=self.shim)
        self.engine = Engine(self.settings, self.ledger, backends={"slurm": self.backend})
        self.engine.start()

    def submit(self, command: list[str], **fields: Any) -> str:
        data: dict[str, Any] = {"command": command, "backend": "slurm"}
        data.setdefault("resources", {"memory": "256M", "time_limit": "2m"})
        data.update(fields)
        spec = parse_spec(data)
        self.backend.check(spec)
        return self.ledger.create_run(spec, "tester").id

    def drive(self, run_ids: list[str], timeout: float, on_cycle: Callable[[Engine], None] | None = None) -> None:
        assert self.engine.drive_until(run_ids, timeout=timeout, on_cycle=on_cycle), {
            r: self.run(r).state for r in run_ids
        }

    def run(self, run_id: str) -> RunInfo:
        return self.ledger.get_run(run_id)

    def stdout(self, run_id: str) -> str:
        attempt = self.ledger.latest_attempt(run_id)
        assert attempt is not None
        path = Path(attempt.attempt_dir) / "logs" / "stdout.log"
        return path.read_text() if path.exists() else ""

    def artifacts(self, run_id: str) -> dict[str, int]:
        return {a.path: a.size for a in self.ledger.artifacts(run_id)}

    def close(self) -> None:
        self.engine.close()
        self.ledger.close()


@pytest.fixture
def harness(tmp_path: Path, cluster: dict[str, str]) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kwargs: Any) -> Harness:
        h = Harness(tmp_path / f"h{len(made)}", **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        with contextlib.suppress(Exception):
            h.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    why = sshd_available()
    if why:
        pytest.skip(why)
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def _host_can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# the core outcomes, through the local and the SSH transport

ARTIFACTS = "echo hello > /output/a.txt && mkdir /output/d && printf xy > /output/d/b && ln -s /etc/passwd /output/l"
NETWORK = f"import socket; socket.create_connection(('127.0.0.1', {SLURMCTLD_PORT}), timeout=3)"


@pytest.mark.parametrize("transport", ["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def test_core_outcomes(
    transport: str,
    harness: Callable[..., Harness],
    cluster: dict[str, str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    if transport == "ssh":
        server = request.getfixturevalue("sshd")
        # the remote work root differs from the local one, as on a real login node
        h = harness(transport="ssh", ssh=server.settings(), remote_work_root=str(tmp_path / "remote"))
        assert h.shim.remote
    else:
        h = harness()
    runs = {
        "ok": h.submit(["sh", "-c", f"{ARTIFACTS} && echo done"]),
        "exit3": h.submit(["sh", "-c", "echo failing; exit 3"]),
        "signal": h.submit(["sh", "-c", "kill -9 $$"]),
        "gpu": h.submit(["sh", "-c", 'echo "CVD=$CUDA_VISIBLE_DEVICES"'], resources={"gpus": 1, "memory": "256M"}),
        "gpus3": h.submit(["true"], resources={"gpus": 3, "memory": "256M"}),
        "network": h.submit(["python3", "-c", NETWORK]),
    }
    oom = _cgroup_memory(cluster)
    if oom:
        alloc = "b = bytearray(600 * 1024 * 1024); import time; time.sleep(2)"
        runs["oom"] = h.submit(["python3", "-c", alloc], resources={"memory": "64M", "time_limit": "2m"})
    h.drive(list(runs.values()), timeout=150)

    ok = h.run(runs["ok"])
    assert ok.state == RunState.SUCCEEDED, ok
    assert h.stdout(runs["ok"]) == "done\n"
    assert h.artifacts(runs["ok"]) == {"a.txt": 6, "d/b": 2}
    assert h.backend.outcomes[runs["ok"]].backend_record["state"] == "COMPLETED"
    refused = {r.path: r.reason for r in h.backend.outcomes[runs["ok"]].harvest.refused}  # type: ignore[union-attr]
    assert refused == {"l": "symlink"}

    exit3 = h.run(runs["exit3"])
    assert (exit3.state, exit3.failure_kind, exit3.exit_code) == (RunState.FAILED, FailureKind.EXIT_CODE, 3)
    assert h.backend.outcomes[runs["exit3"]].backend_record.get("exit_code") == "3:0", h.backend.outcomes[runs["exit3"]]

    sig = h.run(runs["signal"])
    assert (sig.state, sig.failure_kind, sig.signal) == (RunState.FAILED, FailureKind.SIGNAL, 9), sig

    gpu = h.run(runs["gpu"])
    assert gpu.state == RunState.SUCCEEDED, gpu
    assert re.fullmatch(r"CVD=\d\n", h.stdout(runs["gpu"])), h.stdout(runs["gpu"])

    gpus3 = h.run(runs["gpus3"])
    assert (gpus3.state, gpus3.failure_kind) == (RunState.FAILED, FailureKind.SUBMIT_ERROR)
    assert "Requested node configuration is not available" in (gpus3.failure_message or "")
    assert gpus3.attempts == 1  # not retried: no new attempt can succeed

    assert _host_can_connect(SLURMCTLD_PORT)  # the host can; the sealed job cannot
    net = h.run(runs["network"])
    assert (net.state, net.failure_kind, net.exit_code) == (RunState.FAILED, FailureKind.EXIT_CODE, 1), net

    if oom:
        run = h.run(runs["oom"])
        assert (run.state, run.failure_kind) == (RunState.FAILED, FailureKind.OOM), run
        assert h.backend.outcomes[runs["oom"]].backend_record["state"] == "OUT_OF_MEMORY"
    # one squeue per poll, never one per job
    polls = h.shim.programs.count("squeue")
    assert polls <= h.engine.cycles + 2


@pytest.mark.parametrize("export_env", ["scrubbed", "none"])
def test_no_scheduler_environment_reaches_the_job(
    harness: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export_env: str
) -> None:
    """The scheduler's environment (ledger URL, tokens) never reaches a job: the interpreter the
    job script execs is a shim that records the job's own environment, then runs the wrapper."""
    monkeypatch.setenv("HPCC_LEAK_CANARY", "s3cret-ledger-password")
    shim = tmp_path / f"python-shim-{export_env}"
    shim.write_text('#!/bin/sh\n/usr/bin/env > "$2/job-env.txt"\nexec /usr/bin/python3 "$@"\n')
    shim.chmod(0o755)
    h = harness(python=str(shim), export_env=export_env)
    run_id = h.submit(["/bin/true"])
    h.drive([run_id], 120)
    assert h.run(run_id).state == RunState.SUCCEEDED, h.run(run_id)
    attempt = h.ledger.latest_attempt(run_id)
    assert attempt is not None
    lines = (Path(attempt.attempt_dir) / "job-env.txt").read_text().splitlines()
    job_env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert "HPCC_LEAK_CANARY" not in job_env and "s3cret" not in " ".join(job_env.values())
    assert job_env.get("SLURM_JOB_ID") == h.run(run_id).backend_job_id
    if export_env == "scrubbed":
        # besides Slurm's own variables only what slurmd and the shell add, and our PATH and LANG
        allowed = {"PATH", "LANG", "SLURM_CONF", "PWD", "SHLVL", "_", "ENVIRONMENT", "HOSTNAME", "TMPDIR"}
        foreign = sorted(k for k in job_env if k not in allowed and not k.startswith(("SLURM", "CUDA_", "GPU_")))
        assert foreign == [], foreign
        assert job_env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    # (with --export=NONE, Slurm 22.05 loads the job user's *login* environment on the node, as
    # --get-user-env does: that is what makes every job start slower; it is not ours to check)


def test_alike_runs_go_as_one_job_array(harness: Callable[..., Harness]) -> None:
    """Five alike runs, one sbatch --array: each keeps its own attempt, exit code, logs, artifacts."""
    h = harness(array_min=2, array_throttle=2)
    runs = {
        "ok": h.submit(["sh", "-c", f"{ARTIFACTS} && echo done"]),
        "exit3": h.submit(["sh", "-c", "echo failing; exit 3"]),
        "signal": h.submit(["sh", "-c", "kill -9 $$"]),
        "echo1": h.submit(["sh", "-c", "echo one"]),
        "echo2": h.submit(["sh", "-c", "echo two"]),
    }
    h.drive(list(runs.values()), timeout=150)
    assert h.backend.calls["sbatch"] <= 2, h.backend.calls  # --test-only once, then the array
    job_ids = {name: h.run(run_id).backend_job_id or "" for name, run_id in runs.items()}
    heads = {job_id.partition("_")[0] for job_id in job_ids.values()}
    assert len(heads) == 1 and sorted(j.partition("_")[2] for j in job_ids.values()) == ["0", "1", "2", "3", "4"]
    ok = h.run(runs["ok"])
    assert ok.state == RunState.SUCCEEDED and h.stdout(runs["ok"]) == "done\n", ok
    assert h.artifacts(runs["ok"]) == {"a.txt": 6, "d/b": 2}
    exit3 = h.run(runs["exit3"])
    assert (exit3.state, exit3.failure_kind, exit3.exit_code) == (RunState.FAILED, FailureKind.EXIT_CODE, 3)
    assert h.backend.outcomes[runs["exit3"]].backend_record.get("exit_code") == "3:0"
    sig = h.run(runs["signal"])
    assert (sig.state, sig.failure_kind, sig.signal) == (RunState.FAILED, FailureKind.SIGNAL, 9), sig
    assert h.stdout(runs["echo1"]) == "one\n" and h.stdout(runs["echo2"]) == "two\n"
    for run_id in runs.values():
        assert h.run(run_id).attempts == 1


def _squeue_tasks(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-j", job_id, "-o", "%i|%r"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def test_a_job_array_is_released_by_its_id_only_when_every_task_is_committed(
    harness: Callable[..., Harness],
) -> None:
    """Strict submission holds the array; releasing the head would release every task, so it is
    done only when all k tasks were committed. Two of three committed: exactly those two go."""
    h = harness(array_min=2)
    tickets = [
        Ticket(
            run_id=f"r{i}",
            attempt_id=f"a{i}",
            number=1,
            spec=parse_spec({"command": ["sleep", "60"], "backend": "slurm", "resources": {"memory": "64M"}}),
            attempt_dir=h.settings.work_root / f"r{i}" / f"a{i}",
        )
        for i in range(3)
    ]
    job_ids = h.backend.submit_array(tickets)
    assert all(isinstance(j, str) for j in job_ids), job_ids
    head = str(job_ids[0]).partition("_")[0]
    committed = [replace(t, backend_job_id=str(j)) for t, j in zip(tickets, job_ids, strict=True)]
    try:
        assert {r for r in _squeue_tasks(head).values()} == {"JobHeldUser"}
        assert h.backend.confirm_many(committed[:2]) == {"a0", "a1"}
        tasks = _squeue_tasks(head)
        assert tasks[f"{head}_2"] == "JobHeldUser", tasks  # the uncommitted task stays held
        assert tasks.get(f"{head}_0") != "JobHeldUser" and tasks.get(f"{head}_1") != "JobHeldUser", tasks
        assert h.backend.confirm_many(committed[2:]) == {"a2"}
        assert "JobHeldUser" not in _squeue_tasks(head).values()
        # and a whole array is one id in one call
        again = [
            replace(t, attempt_id=f"b{i}", run_id=f"s{i}", attempt_dir=h.settings.work_root / f"s{i}" / f"b{i}")
            for i, t in enumerate(tickets)
        ]
        whole = h.backend.submit_array(again)
        second = str(whole[0]).partition("_")[0]
        calls = h.shim.programs.count("scontrol")
        h.backend.confirm_many([replace(t, backend_job_id=str(j)) for t, j in zip(again, whole, strict=True)])
        assert h.shim.programs.count("scontrol") == calls + 1
        assert "JobHeldUser" not in _squeue_tasks(second).values()
        released = [a for a in h.shim.argvs if "release" in a]
        assert released[-1][-1] == second, released[-1]
    finally:
        subprocess.run(["scancel", head], check=False)
        with contextlib.suppress(NameError):
            subprocess.run(["scancel", second], check=False)


def test_an_array_whose_sbatch_reply_was_lost_is_reconciled_task_by_task(harness: Callable[..., Harness]) -> None:
    h = harness(array_min=2, reconcile_grace_s=30.0)
    h.backend.array_reply_lost = True
    runs = [h.submit(["sh", "-c", f"echo task {i}"]) for i in range(3)]
    h.drive(runs, timeout=120)
    for i, run_id in enumerate(runs):
        run = h.run(run_id)
        assert run.state == RunState.SUCCEEDED and run.attempts == 1, run  # adopted, never resubmitted
        assert h.stdout(run_id) == f"task {i}\n"
    found = [f for f in h.backend.finds if f.kind == FindKind.FOUND]
    assert sorted(f.backend_job_id.partition("_")[2] for f in found if f.backend_job_id) == ["0", "1", "2"]
    assert h.backend.calls["sbatch"] <= 2, h.backend.calls


def test_gpus_beyond_the_largest_node_refused_early(harness: Callable[..., Harness]) -> None:
    from hpc_compute.errors import SpecError

    h = harness(max_node_gpus=2)
    with pytest.raises(SpecError) as info:
        h.submit(["true"], resources={"gpus": 3})
    assert info.value.field == "resources.gpus"
    with pytest.raises(SpecError):
        harness(runtime="apptainer").backend.check(parse_spec({"command": ["true"], "backend": "slurm"}))


@pytest.mark.timeout(240)
def test_time_limit(harness: Callable[..., Harness]) -> None:
    h = harness()
    run_id = h.submit(["sleep", "300"], resources={"time_limit": "1m", "memory": "128M"})
    h.drive([run_id], timeout=200)
    run = h.run(run_id)
    assert (run.state, run.failure_kind) == (RunState.FAILED, FailureKind.TIMEOUT), run


# ---------------------------------------------------------------------------------------------
# cancellation


class _Seen(Exception):
    pass


def test_cancel_pending_and_running(harness: Callable[..., Harness]) -> None:
    h = harness()
    hog = h.submit(["sleep", "120"], resources={"gpus": 2, "memory": "128M"})
    waiting = h.submit(["true"], resources={"gpus": 1, "memory": "128M"})

    def watch(engine: Engine) -> None:
        a, b = h.run(hog), h.run(waiting)
        if a.state == RunState.RUNNING and b.state == RunState.PENDING and b.pending_reason:
            raise _Seen(b.pending_reason)

    with pytest.raises(_Seen) as seen:
        h.engine.drive_until([hog, waiting], timeout=60, on_cycle=watch)
    # Resources, or Priority when other jobs wait too: either way the reason is shown
    assert str(seen.value) in {"Resources", "Priority"}, (h.run(hog), h.run(waiting))
    h.ledger.request_cancel(hog)
    h.ledger.request_cancel(waiting)
    h.drive([hog, waiting], timeout=60)
    for run_id in (hog, waiting):
        run = h.run(run_id)
        assert run.state == RunState.CANCELLED, run
        assert h.backend.outcomes[run_id].backend_record["state"].startswith("CANCELLED")


# ---------------------------------------------------------------------------------------------
# jobs that left squeue; accounting off


def test_job_purged_from_slurmctld_is_found_in_sacct(harness: Callable[..., Harness], cluster: dict[str, str]) -> None:
    """slurmctld forgets finished jobs after MinJobAge (300 s here). Waiting for that is slow, so
    the transport shim returns an empty squeue: exactly what squeue prints for a purged job."""
    if not _accounting_on(cluster):
        pytest.skip("accounting is off on this cluster")
    h = harness(accounting="on", reconcile_grace_s=30.0)
    run_id = h.submit(["sh", "-c", "exit 3"])
    h.engine.cycle()  # submitted
    h.shim.hide_from_squeue = True
    h.drive([run_id], timeout=60)
    run = h.run(run_id)
    assert (run.failure_kind, run.exit_code) == (FailureKind.EXIT_CODE, 3)
    assert h.backend.outcomes[run_id].backend_record["source"] == "sacct"


def test_accounting_detection_matches_the_cluster(harness: Callable[..., Harness], cluster: dict[str, str]) -> None:
    """``accounting = "auto"`` must see what the cluster really has. scripts/test-all.sh runs this
    module twice: with accounting on, then again after the playbook switched it off
    (HPCC_TEST_SLURM_ACCOUNTING tells which pass this is, so a pass cannot silently test the wrong one)."""
    expected = os.environ.get("HPCC_TEST_SLURM_ACCOUNTING")
    if expected is not None:
        assert _accounting_on(cluster) == (expected == "on"), f"the cluster should have accounting {expected}"
    h = harness(accounting="auto")
    assert h.backend.accounting() is _accounting_on(cluster)
    run_id = h.submit(["sh", "-c", "exit 5"])
    h.drive([run_id], timeout=60)
    assert (h.run(run_id).failure_kind, h.run(run_id).exit_code) == (FailureKind.EXIT_CODE, 5)
    if not _accounting_on(cluster):
        assert "sacct" not in h.shim.programs or h.shim.programs.count("sacct") <= 1  # only the probe


def test_accounting_off_uses_scontrol_and_the_result_file(harness: Callable[..., Harness]) -> None:
    h = harness(accounting="off")
    exit3 = h.submit(["sh", "-c", "exit 3"])
    ok = h.submit(["true"])
    h.drive([exit3, ok], timeout=60)
    assert (h.run(exit3).failure_kind, h.run(exit3).exit_code) == (FailureKind.EXIT_CODE, 3)
    assert h.backend.outcomes[exit3].backend_record["source"] == "scontrol"
    assert h.run(ok).state == RunState.SUCCEEDED
    # a job purged from slurmctld without accounting: the wrapper's result file is the evidence
    purged = h.submit(["sh", "-c", "exit 4"])
    h.engine.cycle()
    h.shim.hide_from_squeue = True
    h.drive([purged], timeout=60)
    assert (h.run(purged).failure_kind, h.run(purged).exit_code) == (FailureKind.EXIT_CODE, 4)
    assert h.backend.outcomes[purged].backend_record["source"] == "result-file"
    assert "sacct" not in h.shim.programs


# ---------------------------------------------------------------------------------------------
# reconciliation and failing queries


def test_reconciliation(harness: Callable[..., Harness]) -> None:
    h = harness(reconcile_grace_s=4.0)
    adopted = h.submit(["sh", "-c", "echo adopted"])
    duplicated = h.submit(["sh", "-c", "sleep 2; echo dup"])
    absent = h.submit(["sh", "-c", "echo second attempt"])
    h.backend.modes.update({adopted: "lost_reply", duplicated: "twice", absent: "never"})
    h.drive([adopted, duplicated, absent], timeout=90)
    for run_id in (adopted, duplicated, absent):
        assert h.run(run_id).state == RunState.SUCCEEDED, h.run(run_id)
    assert h.stdout(adopted) == "adopted\n"
    assert h.run(adopted).attempts == 1 and h.run(duplicated).attempts == 1
    extras = [f for f in h.backend.finds if f.extras_cancelled]
    assert len(extras) == 1 and len(extras[0].extras_cancelled) == 1
    extra_id = extras[0].extras_cancelled[0]
    state = subprocess.run(["squeue", "-h", "-t", "all", "-j", extra_id, "-o", "%T"], capture_output=True, text=True)
    assert state.stdout.strip() == "CANCELLED"
    attempts = h.ledger.attempts(absent)
    assert [a.state for a in attempts] == ["not_submitted", "finished"], attempts
    tombstone = json.loads((Path(attempts[0].attempt_dir) / "wrapper.json").read_text())
    assert tombstone["tombstone"] is True
    assert h.stdout(absent) == "second attempt\n"


def test_failed_queries_never_finish_a_run(harness: Callable[..., Harness]) -> None:
    h = harness(reconcile_grace_s=1.0)
    run_id = h.submit(["true"])
    never = h.submit(["true"])
    h.backend.modes[never] = "never"
    h.engine.cycle()
    assert h.run(run_id).state in (RunState.PENDING, RunState.RUNNING)  # submitted, maybe started
    h.shim.failing.update({"squeue": "rc", "sacct": "raise", "scontrol": "raise"})

    def still_open(engine: Engine) -> None:
        assert not h.run(run_id).terminal
        assert h.run(never).state == RunState.SUBMITTING

    assert not h.engine.drive_until([run_id, never], timeout=8, on_cycle=still_open)
    h.shim.failing.clear()
    h.drive([run_id, never], timeout=60)
    assert h.run(run_id).state == RunState.SUCCEEDED
    assert h.run(never).state == RunState.SUCCEEDED and h.run(never).attempts == 1


# ---------------------------------------------------------------------------------------------
# slurmctld restarted while jobs run


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _ctld_answers() -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_slurmctld_restart_while_jobs_run(harness: Callable[..., Harness], cluster: dict[str, str]) -> None:
    """Polls fail while slurmctld is down: nothing may finish for it; afterwards the runs end normally."""
    h = harness()
    ids = [h.submit(["/bin/sh", "-c", f"sleep 8; echo {i} > /output/n"]) for i in range(2)]

    def both_running(engine: Engine) -> None:
        if all(h.run(r).state == RunState.RUNNING for r in ids):
            raise _Seen("running")

    with pytest.raises(_Seen):
        h.engine.drive_until(ids, timeout=60, on_cycle=both_running)
    pid_file = Path(cluster.get("SlurmctldPidFile", "/run/slurmctld.pid"))
    pid = int(pid_file.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    _wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, "slurmctld to stop")
    try:
        for _ in range(4):  # cycles against a dead controller
            h.engine.cycle()
            time.sleep(0.5)
        assert all(h.run(r).state == RunState.RUNNING for r in ids), [h.run(r).state for r in ids]
    finally:
        subprocess.run(["/usr/sbin/slurmctld"], check=True, timeout=30)
        _wait_for(_ctld_answers, 60, "slurmctld to answer again")
    h.drive(ids, timeout=90)
    for index, run_id in enumerate(ids):
        run = h.run(run_id)
        assert run.state == RunState.SUCCEEDED and run.exit_code == 0, run
        assert run.attempts == 1
        assert h.artifacts(run_id) == {"n": len(f"{index}\n")}
