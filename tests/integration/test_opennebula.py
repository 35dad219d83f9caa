"""End to end: ledger -> real engine -> OpenNebula backend -> real pyone -> simulated oned, whose
VMs are network namespaces running a real sshd and the image's own context script; the job runs
under the real wrapper and bubblewrap inside the "VM", and is harvested over SFTP.
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
from hpc_compute.backends.opennebula import OpenNebulaBackend, make_backend
from hpc_compute.config import Settings
from hpc_compute.engine import Engine
from hpc_compute.ledger.store import Ledger
from tests.opennebula_sim.fixtures import one_sim, opennebula_section, sim_settings  # noqa: F401
from tests.opennebula_sim.server import DONE, Faults, Simulator

pytestmark = [pytest.mark.opennebula, pytest.mark.timeout(120)]

TIMINGS: dict[str, Any] = {}


def _job(*command: str, **extra: Any) -> dict[str, Any]:
    return {"image": "host", "command": list(command), "backend": "opennebula", **extra}


class Rig:
    def __init__(self, home: Path, sim: Simulator, **overrides: Any) -> None:
        self.home = home
        self.sim = sim
        self.settings: Settings = sim_settings(home, sim, **overrides)
        self.client = Client(settings=self.settings, owner="alice")
        self.backend: OpenNebulaBackend = make_backend(self.settings)

    def drive(self, run_ids: list[str], timeout: float = 60) -> float:
        engine = Engine(self.settings, Ledger(self.settings.ledger_url), backends={"opennebula": self.backend})
        engine.start()
        t0 = time.monotonic()
        try:
            assert engine.drive_until(run_ids, timeout=timeout), "runs did not finish in time"
        finally:
            engine.close()
        return time.monotonic() - t0

    def close(self) -> None:
        self.backend.close()
        self.client.close()


@pytest.fixture
def rig(tmp_path: Path, one_sim: Simulator) -> Any:  # noqa: F811
    home = tmp_path / "home"
    home.mkdir()
    r = Rig(home, one_sim)
    yield r
    r.close()


def _vm_names(sim: Simulator) -> list[str]:
    return sorted(vm.name for vm in sim.vms())


def test_exit_codes_logs_artifacts_and_hostile_outputs(rig: Rig) -> None:
    script = (
        "echo to-stdout; echo to-stderr >&2; mkdir -p /output/d; echo data > /output/d/r.txt; "
        "ln -s /etc/passwd /output/passwd-link; mkfifo /output/fifo"
    )
    ok = rig.client.submit(_job("/bin/sh", "-c", script))
    bad = rig.client.submit(_job("/bin/sh", "-c", "exit 7"))
    wall = rig.drive([ok.id, bad.id])
    TIMINGS["two runs wall"] = round(wall, 2)

    ok_run, bad_run = rig.client.get(ok.id), rig.client.get(bad.id)
    assert ok_run.state == RunState.SUCCEEDED, rig.client.events(ok.id)
    assert ok_run.exit_code == 0
    assert bad_run.state == RunState.FAILED and bad_run.exit_code == 7
    assert bad_run.failure_kind == FailureKind.EXIT_CODE and bad_run.attempts == 1
    assert rig.client.logs(ok.id) == b"to-stdout\n"
    assert rig.client.logs(ok.id, stream="stderr") == b"to-stderr\n"
    (artifact,) = rig.client.artifacts(ok.id)
    assert artifact.path == "d/r.txt" and artifact.size == 5
    with rig.client.open_artifact(ok.id, "d/r.txt") as handle:
        assert handle.read() == b"data\n"
    attempt = rig.client.attempts(ok.id)[-1]
    store = rig.settings.artifact_root / ok.id / attempt.id
    assert not (store / "passwd-link").exists() and not (store / "fifo").exists()
    # every VM carried the attempt's tag and was terminated
    assert all(vm.name.startswith("hpcc-") and vm.name in vm.user_template["LABELS"] for vm in rig.sim.vms())
    assert rig.sim.wait_for(lambda: all(vm.state == DONE for vm in rig.sim.vms()), 10)
    key = Path(attempt.attempt_dir) / "vm_key"
    assert key.stat().st_mode & 0o777 == 0o600


def _rig(tmp_path: Path, sim: Simulator, name: str, **overrides: Any) -> Rig:
    home = tmp_path / name
    home.mkdir()
    return Rig(home, sim, **overrides)


def test_stuck_pending_times_out_as_boot_failure_and_the_vm_is_terminated(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    one_sim.inject(Faults(stuck_pending=True))
    r = _rig(tmp_path, one_sim, "h", pending_timeout_s=1.0)
    try:
        run = r.client.submit(_job("/bin/true", retry={"max_attempts": 1}))
        r.drive([run.id], timeout=30)
        got = r.client.get(run.id)
        assert got.state == RunState.FAILED and got.failure_kind == FailureKind.BOOT_FAILURE
        message = got.failure_message or ""
        assert "PENDING" in message and "No host with enough capacity" in message
        assert one_sim.wait_for(lambda: all(vm.state == DONE for vm in one_sim.vms()), 10)
    finally:
        r.close()


def test_boot_failure_is_retried_on_a_new_vm(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    one_sim.inject(Faults(boot_failure=True))
    r = _rig(tmp_path, one_sim, "h")
    try:
        run = r.client.submit(_job("/bin/sh", "-c", "echo second", retry={"max_attempts": 2, "backoff": "1s"}))
        r.drive([run.id], timeout=40)
        got = r.client.get(run.id)
        assert got.state == RunState.SUCCEEDED, r.client.events(run.id)
        attempts = r.client.attempts(run.id)
        assert [a.failure_kind for a in attempts] == [FailureKind.BOOT_FAILURE, None]
        assert "BOOT_FAILURE" in (attempts[0].message or "")
        assert len({vm.name for vm in one_sim.vms()}) == 2, "the retry ran on a fresh VM"
    finally:
        r.close()


def test_sshd_killed_mid_run_job_survives_and_is_harvested_after_reconnect(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    one_sim.inject(Faults(kill_sshd_after=0.8, restart_sshd_after=1.5))
    r = _rig(tmp_path, one_sim, "h")
    try:
        run = r.client.submit(_job("/bin/sh", "-c", "sleep 3; echo survived > /output/marker; echo out"))
        r.drive([run.id], timeout=40)
        got = r.client.get(run.id)
        assert got.state == RunState.SUCCEEDED and got.attempts == 1, r.client.events(run.id)
        with r.client.open_artifact(run.id, "marker") as handle:
            assert handle.read() == b"survived\n"
        assert r.client.logs(run.id) == b"out\n"
    finally:
        r.close()


def test_partition_heals_and_the_run_finishes(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    one_sim.inject(Faults(partition_after=0.5, partition_for=4.0))
    r = _rig(tmp_path, one_sim, "h")
    try:
        run = r.client.submit(_job("/bin/sh", "-c", "for i in 1 2 3 4 5; do echo line-$i; sleep 1; done"))
        r.drive([run.id], timeout=40)
        got = r.client.get(run.id)
        assert got.state == RunState.SUCCEEDED and got.attempts == 1, r.client.events(run.id)
        assert r.client.logs(run.id) == b"".join(f"line-{i}\n".encode() for i in range(1, 6))
    finally:
        r.close()


def test_vm_vanishing_mid_run_is_lost(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    one_sim.inject(Faults(vanish_after=1.0))
    r = _rig(tmp_path, one_sim, "h")
    try:
        run = r.client.submit(_job("/bin/sleep", "20", retry={"max_attempts": 1}))
        r.drive([run.id], timeout=30)
        got = r.client.get(run.id)
        assert got.state == RunState.FAILED and got.failure_kind == FailureKind.LOST, r.client.events(run.id)
    finally:
        r.close()


def test_lost_instantiate_reply_is_adopted_and_an_orphan_is_swept(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    orphan = one_sim.create_orphan("hpcc-00000000-0000-4000-8000-000000000000")
    one_sim.rpc_fault("lost_instantiate_reply")
    r = _rig(tmp_path, one_sim, "h")
    try:
        run = r.client.submit(_job("/bin/sh", "-c", "sleep 1.5; echo once"))
        r.drive([run.id], timeout=40)
        got = r.client.get(run.id)
        assert got.state == RunState.SUCCEEDED and got.attempts == 1, r.client.events(run.id)
        mine = [vm for vm in one_sim.vms() if vm.id != orphan]
        assert len(mine) == 1, "one VM for the attempt: the lost reply was reconciled, not re-sent"
        assert any("reconciled" in (e.message or "") for e in r.client.events(run.id))
        assert one_sim.wait_for(lambda: one_sim.vm(orphan).state == DONE, 10), "the orphan was not swept"
        assert orphan in r.backend.swept
    finally:
        r.close()


def test_terminate_refused_then_retried_until_done(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    one_sim.inject(Faults(terminate_reject=3))
    r = _rig(tmp_path, one_sim, "h")
    try:
        run = r.client.submit(_job("/bin/true"))
        r.drive([run.id], timeout=30)
        assert r.client.get(run.id).state == RunState.SUCCEEDED
        (vm,) = one_sim.vms()
        assert one_sim.wait_for(lambda: vm.state == DONE, 15), "the refused terminate was not retried"
        assert vm.faults.terminate_reject == 0
        assert one_sim.wait_for(lambda: not r.backend.pending_terminations(), 5)
        saved = json.loads((r.home / "opennebula" / "terminate.json").read_text())
        assert saved == {}, "the persistent to-terminate list is emptied once the VM is DONE"
    finally:
        r.close()


def test_twenty_runs_at_once(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    r = _rig(tmp_path, one_sim, "h")
    try:
        runs = r.client.submit_many([_job("/bin/sh", "-c", f"echo {i} > /output/n") for i in range(20)])
        wall = r.drive([x.id for x in runs], timeout=90)
        TIMINGS["20 runs wall"] = round(wall, 2)
        for i, x in enumerate(runs):
            got = r.client.get(x.id)
            assert got.state == RunState.SUCCEEDED, (i, r.client.events(x.id))
            with r.client.open_artifact(x.id, "n") as handle:
                assert handle.read() == f"{i}\n".encode()
        timings = r.backend.finished_timings()
        ready = sorted(t["ssh_ready"] - t["submitted"] for t in timings.values() if "ssh_ready" in t)
        TIMINGS["20 runs provision-to-ready median"] = round(ready[len(ready) // 2], 2)
        TIMINGS["20 runs provision-to-ready max"] = round(ready[-1], 2)
        print("TIMINGS", TIMINGS)
    finally:
        r.close()


def test_provision_to_ready_and_overhead(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    r = _rig(tmp_path, one_sim, "h")
    try:
        run = r.client.submit(_job("/bin/true"))
        wall = r.drive([run.id], timeout=30)
        (t,) = r.backend.finished_timings().values()
        d = one_sim.delays
        sim_floor = d.pending + d.prolog + d.boot  # the simulator's own delays before RUNNING
        ready = t["ssh_ready"] - t["submitted"]
        TIMINGS["single provision-to-ready"] = round(ready, 3)
        TIMINGS["single overhead beyond sim delays (to ready)"] = round(ready - sim_floor, 3)
        TIMINGS["single submit-to-result"] = round(t["result_seen"] - t["submitted"], 3)
        TIMINGS["single run wall (drive)"] = round(wall, 3)
        print("TIMINGS", TIMINGS)
        assert ready < sim_floor + 5
    finally:
        r.close()


# -- a real `hpc-compute serve`, SIGKILLed mid-run ---------------------------------------------


def _serve(home: Path, config: Path) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "HPC_COMPUTE_HOME": str(home),
        "HPC_COMPUTE_CONFIG": str(config),
    }
    log = open(home / f"serve-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "hpc_compute", "serve"], env=env, stdout=log, stderr=log)


def _toml(section: dict[str, Any]) -> str:
    lines = ["[scheduler]", "poll_interval = 0.2", "min_poll_interval = 0.05", "lease_seconds = 5", "", "[opennebula]"]
    for key, value in section.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _wait_state(client: Client, run_id: str, states: set[RunState], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get(run_id).state not in states:
        assert time.monotonic() < deadline, f"run stayed {client.get(run_id).state}"
        time.sleep(0.1)


def test_sigkill_serve_mid_run_then_restart_readopts_by_label(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    home = tmp_path / "home"
    home.mkdir()
    config = home / "config.toml"
    config.write_text(_toml(opennebula_section(one_sim)))
    client = Client(settings=sim_settings(home, one_sim), owner="alice")
    try:
        run = client.submit(_job("/bin/sh", "-c", "sleep 3; echo done > /output/marker"))
        first = _serve(home, config)
        try:
            _wait_state(client, run.id, {RunState.RUNNING})
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        (vm,) = one_sim.vms()
        assert vm.state == 3, "the VM and its job outlive the scheduler"
        second = _serve(home, config)
        try:
            _wait_state(client, run.id, {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED}, timeout=40)
        finally:
            second.terminate()
            second.wait(20)
        got = client.get(run.id)
        assert got.state == RunState.SUCCEEDED and got.attempts == 1, client.events(run.id)
        assert len(one_sim.vms()) == 1, "no second VM"
        terminal = [e for e in client.events(run.id) if e.kind == "state" and e.to_state == "succeeded"]
        assert len(terminal) == 1
        with client.open_artifact(run.id, "marker") as handle:
            assert handle.read() == b"done\n"
        assert one_sim.wait_for(lambda: vm.state == DONE, 10)
    finally:
        client.close()


def test_the_sweeper_spares_vms_of_attempts_another_scheduler_owns(tmp_path: Path, one_sim: Simulator) -> None:  # noqa: F811
    """With several schedulers on one ledger, a VM this scheduler does not track may still be live
    for another: the sweeper asks the ledger, and only sweeps what no scheduler holds active."""
    r = _rig(tmp_path, one_sim, "h", sweep_grace_s=0)
    try:
        ledger = Ledger(r.settings.ledger_url)
        run = r.client.submit(_job("/bin/true"))
        (claimed,) = ledger.claim_queued(
            "another-scheduler", backends=["opennebula"], limit=1, work_root=str(tmp_path / "w"), lease_s=60
        )
        vm = one_sim.create_orphan(f"hpcc-{claimed.attempt_id}")
        Engine(r.settings, ledger, backends={"opennebula": r.backend})  # wires the ledger into the backend
        assert r.backend.sweep() == [], "a VM of an attempt active in the ledger is not an orphan"
        ledger.mark_not_submitted(claimed.attempt_id, claimed.fence, "given up")
        assert r.backend.sweep() == [vm]
        assert one_sim.wait_for(lambda: one_sim.vm(vm).state == DONE, 10)
        ledger.request_cancel(run.id)
    finally:
        r.close()
