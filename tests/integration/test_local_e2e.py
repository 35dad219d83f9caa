"""End to end on this host: Client -> ledger -> engine -> local backend -> wrapper -> bubblewrap.

These run real sealed jobs. The crash tests run ``hpc-compute serve`` as a real process and
SIGKILL it (or make it exit hard at a named crash point), then restart it and check that the run
finishes exactly once: one attempt that ran user code, one terminal event.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hpc_compute import Client, FailureKind, RunState
from hpc_compute.config import Settings, load_settings
from hpc_compute.engine import Engine
from hpc_compute.ledger.store import Ledger
from hpc_compute.rundir import CLAIM_FILE, STARTED_FILE

pytestmark = pytest.mark.bwrap


def _settings(home: Path, **local: Any) -> Settings:
    overrides: dict[str, Any] = {
        "home": str(home),
        "scheduler": {"poll_interval": 0.2, "min_poll_interval": 0.05, "lease_seconds": 5},
        "local": {"reconcile_grace_s": 1.0, **local},
    }
    return load_settings(overrides, env={"HOME": str(home)}, system_file=home / "no-system.toml")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def client(home: Path) -> Client:
    c = Client(settings=_settings(home), owner="alice")
    yield c
    c.close()


def _job(*command: str, **extra: Any) -> dict[str, Any]:
    return {"image": "host", "command": list(command), **extra}


def _drive(client: Client, run_ids: list[str], timeout: float = 60) -> None:
    engine = Engine(client.settings, Ledger(client.settings.ledger_url))
    engine.start()
    try:
        assert engine.drive_until(run_ids, timeout=timeout), "runs did not finish in time"
    finally:
        engine.close()


def test_exit_codes_logs_and_artifacts(client: Client) -> None:
    ok = client.submit(
        _job("/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; mkdir -p /output/d; echo data > /output/d/r.txt")
    )
    bad = client.submit(_job("/bin/sh", "-c", "exit 7"))
    _drive(client, [ok.id, bad.id])

    ok_run, bad_run = client.get(ok.id), client.get(bad.id)
    assert ok_run.state == RunState.SUCCEEDED and ok_run.exit_code == 0 and ok_run.failure_kind is None
    assert bad_run.state == RunState.FAILED and bad_run.exit_code == 7
    assert bad_run.failure_kind == FailureKind.EXIT_CODE
    assert bad_run.attempts == 1, "a job's own failure is not retried by default"
    assert client.logs(ok.id) == b"to-stdout\n"
    assert client.logs(ok.id, stream="stderr") == b"to-stderr\n"
    (artifact,) = client.artifacts(ok.id)
    assert artifact.path == "d/r.txt" and artifact.size == 5
    with client.open_artifact(ok.id, "d/r.txt") as handle:
        assert handle.read() == b"data\n"
    states = [e.to_state for e in client.events(ok.id) if e.kind == "state"]
    assert states == ["queued", "submitting", "pending", "running", "succeeded"] or states == [
        "queued",
        "submitting",
        "pending",
        "succeeded",
    ]


def test_sealed_job_cannot_reach_network_env_or_input(client: Client, tmp_path: Path, monkeypatch: Any) -> None:
    import socket
    import threading

    monkeypatch.setenv("HPCC_TEST_SECRET", "do-not-leak")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    seen: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                seen.append(listener.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "in.txt").write_text("original")
    probe = (
        "import os, socket\n"
        "r = []\n"
        f"for host, port in (('127.0.0.1', {port}), ('1.1.1.1', 443)):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=2).close(); r.append('reached')\n"
        "    except OSError as e: r.append('blocked')\n"
        "r.append('leak' if 'HPCC_TEST_SECRET' in os.environ or 'do-not-leak' in str(os.environ) else 'clean')\n"
        "try:\n"
        "    open('/input/data/in.txt', 'w').write('tampered'); r.append('input-writable')\n"
        "except OSError: r.append('input-readonly')\n"
        "r.append('home-visible' if os.path.exists('/root') and os.listdir('/root') else 'home-hidden')\n"
        "open('/output/report', 'w').write(' '.join(r))\n"
    )
    run = client.submit(_job("/usr/bin/python3", "-c", probe, inputs=[{"source": str(data_dir), "name": "data"}]))
    _drive(client, [run.id])
    stop.set()
    thread.join()
    listener.close()
    assert client.get(run.id).state == RunState.SUCCEEDED, client.get(run.id).failure_message
    with client.open_artifact(run.id, "report") as handle:
        report = handle.read().decode().split()
    assert report == ["blocked", "blocked", "clean", "input-readonly", "home-hidden"]
    assert seen == [], "the host listener received a connection from the sandbox"
    assert (data_dir / "in.txt").read_text() == "original"


def test_hostile_outputs_are_refused_and_recorded(client: Client) -> None:
    script = (
        "ln -s /etc/passwd /output/passwd-link; mkfifo /output/fifo; echo fine > /output/ok.txt; "
        "echo x > /output/h1; ln /output/h1 /output/h2"
    )
    run = client.submit(_job("/bin/sh", "-c", script))
    _drive(client, [run.id])
    assert client.get(run.id).state == RunState.SUCCEEDED
    assert [a.path for a in client.artifacts(run.id)] == ["ok.txt"]
    refused_events = [e for e in client.events(run.id) if e.kind == "artifacts_refused"]
    assert len(refused_events) == 1
    assert refused_events[0].data is not None
    refused = {item["path"]: item["reason"] for item in refused_events[0].data["refused"]}
    assert set(refused) == {"passwd-link", "fifo", "h1", "h2"}
    assert refused["passwd-link"] == "symlink" and refused["fifo"] == "fifo"


def test_time_limit_gives_timeout(client: Client) -> None:
    run = client.submit(_job("/bin/sleep", "60", resources={"time_limit": "2s"}))
    started = time.monotonic()
    _drive(client, [run.id], timeout=40)
    final = client.get(run.id)
    assert final.state == RunState.FAILED and final.failure_kind == FailureKind.TIMEOUT
    assert time.monotonic() - started < 30
    assert final.attempts == 1, "a timeout is the job's own failure: no retry by default"


def test_cancel_running_job(client: Client) -> None:
    run = client.submit(_job("/bin/sleep", "120"))
    engine = Engine(client.settings, Ledger(client.settings.ledger_url))
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while client.get(run.id).state != RunState.RUNNING:
            assert time.monotonic() < deadline, "job never started"
            engine.cycle()
            time.sleep(0.1)
        client.cancel(run.id)
        assert engine.drive_until([run.id], timeout=30)
    finally:
        engine.close()
    final = client.get(run.id)
    assert final.state == RunState.CANCELLED
    assert subprocess.run(["pgrep", "-f", f"hpcc.*{run.id}"], capture_output=True).returncode == 1


def test_gpus_refused_on_a_host_without_them(client: Client) -> None:
    from hpc_compute import SpecError

    with pytest.raises(SpecError) as info:
        client.submit(_job("/bin/true", resources={"gpus": 1}))
    assert info.value.field == "resources.gpus"
    assert client.list() == []


def test_lost_wrapper_is_retried_on_a_new_attempt(client: Client) -> None:
    run = client.submit(_job("/bin/sleep", "3", retry={"max_attempts": 2, "backoff": 0}))
    engine = Engine(client.settings, Ledger(client.settings.ledger_url))
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while client.get(run.id).state != RunState.RUNNING:
            assert time.monotonic() < deadline
            engine.cycle()
            time.sleep(0.1)
        first = client.attempts(run.id)[0]
        claim = json.loads((Path(first.attempt_dir) / CLAIM_FILE).read_text())
        os.kill(int(claim["pid"]), signal.SIGKILL)
        assert engine.drive_until([run.id], timeout=40)
    finally:
        engine.close()
    attempts = client.attempts(run.id)
    assert [a.failure_kind for a in attempts] == [FailureKind.LOST, None]
    assert client.get(run.id).state == RunState.SUCCEEDED


# -- crash safety with a real `hpc-compute serve` ------------------------------------------------


def _serve(home: Path, *, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "HPC_COMPUTE_HOME": str(home),
        "HPC_COMPUTE_SCHEDULER__POLL_INTERVAL": "0.2",
        "HPC_COMPUTE_SCHEDULER__MIN_POLL_INTERVAL": "0.05",
        "HPC_COMPUTE_LOCAL__RECONCILE_GRACE_S": "1",
    }
    if crash_at:
        env["HPCC_TEST_CRASH_AT"] = crash_at
    log = open(home / f"serve-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "hpc_compute", "serve"], env=env, stdout=log, stderr=log)


def _wait_state(client: Client, run_id: str, states: set[RunState], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get(run_id).state not in states:
        assert time.monotonic() < deadline, f"run stayed {client.get(run_id).state}"
        time.sleep(0.1)


def _assert_ran_once(client: Client, run_id: str) -> None:
    run = client.get(run_id)
    assert run.state == RunState.SUCCEEDED, run.failure_message
    ran = [a for a in client.attempts(run_id) if (Path(a.attempt_dir) / STARTED_FILE).exists()]
    assert len(ran) == 1, f"user code started in {len(ran)} attempts"
    terminal = [e for e in client.events(run_id) if e.kind == "state" and e.to_state == "succeeded"]
    assert len(terminal) == 1
    (artifact,) = client.artifacts(run_id)
    with client.open_artifact(run_id, artifact.path) as handle:
        assert handle.read() == b"done\n"


def test_sigkill_serve_mid_run_then_restart_finishes_once(home: Path, client: Client) -> None:
    run = client.submit(_job("/bin/sh", "-c", "sleep 3; echo done > /output/marker"))
    first = _serve(home)
    try:
        _wait_state(client, run.id, {RunState.RUNNING})
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        time.sleep(0.5)
        # The job survives its scheduler: it runs in its own session.
        (attempt,) = client.attempts(run.id)
        claim = json.loads((Path(attempt.attempt_dir) / CLAIM_FILE).read_text())
        os.kill(int(claim["pid"]), 0)
        assert client.get(run.id).state == RunState.RUNNING
    finally:
        if first.poll() is None:
            first.kill()
    second = _serve(home)
    try:
        _wait_state(client, run.id, {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})
    finally:
        second.terminate()
        second.wait(10)
    assert second.returncode == 0, "serve should stop cleanly on SIGTERM"
    _assert_ran_once(client, run.id)
    assert any(e.kind == "adopted" for e in client.events(run.id))


@pytest.mark.parametrize("crash_at", ["after_claim", "after_submit", "before_mark_submitted", "before_finish"])
def test_crash_points_finish_exactly_once(home: Path, client: Client, crash_at: str) -> None:
    run = client.submit(_job("/bin/sh", "-c", "sleep 1; echo done > /output/marker"))
    crashing = _serve(home, crash_at=crash_at)
    assert crashing.wait(30) == 137, "serve should have died at the crash point"
    restarted = _serve(home)
    try:
        _wait_state(client, run.id, {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED}, timeout=40)
    finally:
        restarted.terminate()
        restarted.wait(10)
    _assert_ran_once(client, run.id)
    attempts = client.attempts(run.id)
    if crash_at == "after_claim":
        # Nothing was started: the attempt is tombstoned and a new one runs.
        assert [a.state for a in attempts] == ["not_submitted", "finished"]
        assert client.get(run.id).attempts == 1
    else:
        assert [a.state for a in attempts] == ["finished"]


def test_second_scheduler_on_sqlite_is_refused(home: Path, client: Client) -> None:
    first = _serve(home)
    try:
        time.sleep(1.5)
        assert first.poll() is None
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "HPC_COMPUTE_HOME": str(home)}
        second = subprocess.run(
            [sys.executable, "-m", "hpc_compute", "serve"], env=env, capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 3
        assert "SQLite allows one" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.terminate()
        first.wait(10)
