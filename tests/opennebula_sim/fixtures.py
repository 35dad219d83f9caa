"""pytest fixtures for the OpenNebula simulator; import them into a test module:

    from tests.opennebula_sim.fixtures import one_sim, one_sim_nons, sim_settings  # noqa: F401

``one_sim`` reaps leftovers of crashed runs, starts a simulator with small delays and, at
teardown, asserts that no VM is left that is not DONE and that no ``hpcc-sim-*`` namespace is left.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_compute.config import Settings, load_settings
from tests.opennebula_sim import netns
from tests.opennebula_sim.server import DONE, Delays, Simulator

FAST = Delays(pending=0.1, prolog=0.1, boot=0.1, shutdown=0.1, epilog=0.1)
SESSION = "hpcc:hpcc-pw"


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the OpenNebula simulator's VMs are network namespaces: needs root")


@pytest.fixture
def one_sim() -> Iterator[Simulator]:
    _require_root()
    netns.reap_stale()
    sim = Simulator(delays=FAST).start()
    try:
        yield sim
        ok = sim.wait_for(lambda: not sim.live_vms(), timeout=15)
        leftovers = [(vm.id, vm.name, vm.state, vm.lcm) for vm in sim.live_vms()]
    finally:
        sim.stop()
    assert ok, f"VMs not DONE at teardown: {leftovers}"
    mine = [ns for ns in netns.sim_namespaces() if ns in {netns.names(vm.index)[0] for vm in sim.vms()}]
    assert not mine, f"namespaces left: {mine}"
    assert not sim.errors, f"simulator errors: {sim.errors}"


@pytest.fixture
def one_sim_nons() -> Iterator[Simulator]:
    """A simulator without namespaces (no root needed): XML-RPC, states and errors only."""
    sim = Simulator(delays=FAST, namespaces=False).start()
    yield sim
    sim.stop()


def opennebula_section(sim: Simulator, **overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "endpoint": sim.endpoint,
        "session": SESSION,
        "template_id": 0,
        "rpc_timeout_s": 5,
        "remote_work_dir": f"{netns.GUEST_DISK}/work",
        "pending_timeout_s": 30,
        "boot_timeout_s": 30,
        "ssh_timeout_s": 20,
        "unreachable_timeout_s": 60,
        "ssh_connect_timeout_s": 2,
        "ssh_io_timeout_s": 3,
        "provision_poll_s": 0.1,
        "probe_interval_s": 0.2,
        "pool_refresh_s": 0.3,
        "sweep_interval_s": 0.5,
        "sweep_grace_s": 1.0,
        "terminate_retry_s": 0.3,
        "reconcile_grace_s": 3.0,
        "lease_margin_s": 60,
    }
    section.update(overrides)
    return section


def sim_settings(home: Path, sim: Simulator, max_parallel: int = 32, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "home": str(home),
        "scheduler": {"poll_interval": 0.2, "min_poll_interval": 0.05, "lease_seconds": 10},
        "local": {"max_parallel": max_parallel},
        "opennebula": opennebula_section(sim, **overrides),
    }
    return load_settings(data, env={"HOME": str(home)}, system_file=home / "no-system.toml")


def all_done(sim: Simulator) -> bool:
    return all(vm.state == DONE for vm in sim.vms())
