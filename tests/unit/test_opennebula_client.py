"""The OpenNebula client against the simulator (real pyone, real HTTP; no namespaces, no root):
error classification, real timeouts, XML parsing of full and short bodies, state tables."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hpc_compute.backends.base import SubmitError, Ticket
from hpc_compute.backends.opennebula import OpenNebulaBackend
from hpc_compute.backends.opennebula.client import OneClient, OneError, classify, vm_view
from hpc_compute.backends.opennebula.config import load_opennebula_settings
from hpc_compute.errors import ConfigError
from hpc_compute.spec import parse_spec
from tests.opennebula_sim import templates
from tests.opennebula_sim.fixtures import SESSION, one_sim_nons, opennebula_section  # noqa: F401
from tests.opennebula_sim.server import PROLOG, Delays, Simulator, User

EXTRA = {"CONTEXT": {"NETWORK": "YES", "SSH_PUBLIC_KEY": "ssh-ed25519 AAAA x", "TOKEN": "YES"}, "LABELS": "a,hpcc-t1"}


def _client(sim: Simulator, session: str = SESSION, timeout: float = 5.0, **kw: Any) -> OneClient:
    return OneClient(sim.endpoint, session, timeout=timeout, **kw)


def _kind(fn: Any) -> str:
    with pytest.raises(OneError) as info:
        fn()
    return info.value.kind


def test_instantiate_info_and_pool_bodies(one_sim_nons: Simulator) -> None:  # noqa: F811
    c = _client(one_sim_nons)
    assert c.version() == "6.10.0"
    vm_id = c.instantiate(0, "hpcc-t1", {**EXTRA, "HPCC_ATTEMPT_ID": "t1"})
    vm = c.vm_info(vm_id)
    assert (vm.id, vm.name, vm.state_name) == (vm_id, "hpcc-t1", "PENDING")
    assert vm.ip and vm.ip.startswith("10.213."), "the NIC IP is leased at allocate time"
    assert vm.user_template["HPCC_ATTEMPT_ID"] == "t1" and vm.labels == {"a", "hpcc-t1"}
    assert "CONTEXT" not in vm.user_template, "CONTEXT is a well-known attribute: TEMPLATE, not USER_TEMPLATE"
    (short,) = c.pool()
    assert short.name == "hpcc-t1" and short.labels == {"a", "hpcc-t1"} and short.ip == vm.ip
    assert "HPCC_ATTEMPT_ID" not in short.user_template, "short bodies carry only the documented subset"
    (full,) = c.pool(extended=True)
    assert full.user_template["HPCC_ATTEMPT_ID"] == "t1"
    assert one_sim_nons.wait_for(lambda: c.vm_info(vm_id).running, 5)
    c.update_user_template(vm_id, {"HPC_STATE": 'has "quotes"'})
    after = c.vm_info(vm_id)
    assert after.user_template["HPC_STATE"] == 'has "quotes"' and after.user_template["LABELS"] == "a,hpcc-t1"
    c.terminate(vm_id)
    assert one_sim_nons.wait_for(lambda: c.vm_info(vm_id).done, 5)
    assert c.pool() == [] and len(c.pool(include_done=True)) == 1


def test_error_classification(one_sim_nons: Simulator) -> None:  # noqa: F811
    sim = one_sim_nons
    c = _client(sim)
    assert _kind(lambda: c.vm_info(12345)) == "not_found"
    assert _kind(lambda: c.instantiate(99, "x", EXTRA)) == "not_found"
    assert _kind(lambda: _client(sim, "hpcc:wrong").vm_info(0)) == "authentication"
    assert _kind(lambda: c.action("explode", 0)) in ("api", "not_found")
    vm_id = c.instantiate(0, "hpcc-a", EXTRA)
    assert _kind(lambda: c.action("explode", vm_id)) == "api"
    assert _kind(lambda: c._call("vm.recover", lambda: c._server.vm.recover(vm_id, 3))) == "authorization"
    assert _kind(lambda: c._call("vmpool.info", lambda: c._server.vmpool.info(-3, -1, -1, -1, "LABELS=a"))) == (
        "internal"
    )
    sim.users["hpcc"].vm_quota = 1
    with pytest.raises(OneError) as info:
        c.instantiate(0, "hpcc-b", EXTRA)
    assert info.value.kind == "quota" and "limit of 1 reached for VMS quota" in str(info.value)
    sim.rpc_fault("500")
    assert _kind(lambda: c.vm_info(vm_id)) == "transport"
    sim.rpc_fault("drop")
    assert _kind(lambda: c.vm_info(vm_id)) == "transport"
    assert _kind(lambda: OneClient("http://127.0.0.1:9/RPC2", SESSION, timeout=1).version()) == "transport"
    c.terminate(vm_id)


def test_terminate_refused_in_prolog_is_wrong_state() -> None:
    sim = Simulator(namespaces=False, delays=Delays(pending=0.05, prolog=2.0, boot=0.05, shutdown=0.05, epilog=0.05))
    sim.start()
    try:
        c = _client(sim)
        vm_id = c.instantiate(0, "hpcc-p", EXTRA)
        assert sim.wait_for(lambda: sim.vm(vm_id).lcm == PROLOG, 5)
        with pytest.raises(OneError) as info:
            c.terminate(vm_id)
        assert info.value.kind == "wrong_state" and "wrong state ACTIVE" in str(info.value)
        assert sim.wait_for(lambda: c.vm_info(vm_id).running, 5)
        c.terminate(vm_id)
        assert sim.wait_for(lambda: c.vm_info(vm_id).done, 5)
    finally:
        sim.stop()


def test_every_call_has_a_real_timeout(one_sim_nons: Simulator) -> None:  # noqa: F811
    one_sim_nons.rpc_delay_s = 3.0
    c = _client(one_sim_nons, timeout=0.5)
    t0 = time.monotonic()
    assert _kind(c.version) == "transport"
    assert time.monotonic() - t0 < 2.0, "pyone's own timeout= does not work; ours must"
    one_sim_nons.rpc_delay_s = 0.0


def test_unknown_states_and_nic_shapes_never_raise(one_sim_nons: Simulator) -> None:  # noqa: F811
    c = _client(one_sim_nons)
    vm_id = c.instantiate(0, "hpcc-n", {**EXTRA, "NIC": [{"NETWORK_ID": "0"}, {"NETWORK_ID": "7"}]})
    vm = one_sim_nons.vm(vm_id)
    vm.template["NIC"][1]["IP"] = "10.213.200.2"
    assert c.vm_info(vm_id).ip == vm.ip, "NIC 0 by default"
    assert _client(one_sim_nons, network_id=7).vm_info(vm_id).ip == "10.213.200.2"
    vm.state, vm.lcm = 3, 69
    assert c.vm_info(vm_id).lcm_name == "BACKUP"
    vm.lcm = 99
    view = c.vm_info(vm_id)
    assert view.lcm_name == "LCM_99" and not view.running and not view.failed
    vm.state, vm.lcm = 3, 3
    c.terminate(vm_id)


def test_classify_maps_foreign_exceptions() -> None:
    import requests

    assert classify(requests.exceptions.ReadTimeout("slow")).kind == "transport"
    assert classify(IndexError("empty reply")).kind == "transport"
    assert classify(RuntimeError("bug")).kind == "other"
    assert vm_view(object()).id == -1


def _ticket(tmp_path: Path, attempt: str = "00000000-0000-4000-8000-00000000000a") -> Ticket:
    spec = parse_spec({"image": "host", "command": ["/bin/true"], "backend": "opennebula"})
    return Ticket(run_id="r1", attempt_id=attempt, number=1, spec=spec, attempt_dir=tmp_path / "r1" / attempt)


def test_submit_errors_quota_auth_and_lost_reply(tmp_path: Path, one_sim_nons: Simulator) -> None:  # noqa: F811
    sim = one_sim_nons
    backend = OpenNebulaBackend(load_opennebula_settings(opennebula_section(sim)), tmp_path)
    try:
        sim.users["hpcc"].vm_quota = 0
        with pytest.raises(SubmitError) as info:
            backend.submit(_ticket(tmp_path))
        assert info.value.definite and info.value.retryable and "quota" in str(info.value)
        sim.users["hpcc"].vm_quota = None
        sim.rpc_fault("lost_instantiate_reply")
        with pytest.raises(SubmitError) as info:
            backend.submit(_ticket(tmp_path, "00000000-0000-4000-8000-00000000000b"))
        assert not info.value.definite, "a lost reply means the outcome is unknown"
        (vm,) = sim.vms()
        assert vm.name == "hpcc-00000000-0000-4000-8000-00000000000b"
        assert vm.template["SCHED_ACTION"]["ACTION"] == "terminate-hard"
        assert vm.template["CONTEXT"]["SSH_PUBLIC_KEY"].startswith("ssh-ed25519 ")
        key = tmp_path / "r1" / "00000000-0000-4000-8000-00000000000b" / "vm_key"
        assert key.stat().st_mode & 0o777 == 0o600
        sim.vms_by_id.clear()
    finally:
        backend.close()
    bad = OpenNebulaBackend(load_opennebula_settings(opennebula_section(sim, session="hpcc:nope")), tmp_path / "b")
    try:
        with pytest.raises(SubmitError) as info:
            bad.submit(_ticket(tmp_path / "b"))
        assert info.value.definite and not info.value.retryable
    finally:
        bad.close()


def test_settings_validation() -> None:
    with pytest.raises(ConfigError):
        load_opennebula_settings({"endpoint": "one.example.org", "session": "a:b", "template_id": 1})
    with pytest.raises(ConfigError):
        load_opennebula_settings({"endpoint": "http://x/RPC2", "template_id": 1})
    s = load_opennebula_settings({"endpoint": "http://x/RPC2", "session": "a:b", "template_id": "3"})
    assert s.template_id == 3 and s.host_key_policy == "pinned" and s.runtime == "bubblewrap"


def test_simulator_template_syntax() -> None:
    parsed = templates.parse('SSH_HOST_KEY = "ssh-ed25519 AAAA c"\nREADY = YES\nCTX = [ A = "x, y", B = z ]\n')
    assert parsed == {"SSH_HOST_KEY": "ssh-ed25519 AAAA c", "READY": "YES", "CTX": {"A": "x, y", "B": "z"}}
    xml = templates.parse("<TEMPLATE><NIC><IP><![CDATA[1]]></IP></NIC><NIC><IP>2</IP></NIC></TEMPLATE>")
    assert xml == {"NIC": [{"IP": "1"}, {"IP": "2"}]}
    assert templates.parse(templates.render("TEMPLATE", {"A": "a]]>b"})) == {"A": "a]]>b"}


def test_users_of_the_simulator_are_isolated() -> None:
    sim = Simulator(namespaces=False, users=[User("u1", "p", 7, 1), User("u2", "p", 8, 1)]).start()
    try:
        one, two = _client(sim, "u1:p"), _client(sim, "u2:p")
        vm_id = one.instantiate(0, "hpcc-u", EXTRA)
        assert two.pool() == [] and _kind(lambda: two.vm_info(vm_id)) == "authorization"
        one.terminate(vm_id)
    finally:
        sim.stop()
