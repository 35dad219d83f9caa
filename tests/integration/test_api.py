"""The Python API: owner scoping, idempotency, waiting, safe paths, nothing written on bad input, threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hpc_compute.api import Client
from hpc_compute.config import Settings, load_settings
from hpc_compute.errors import IdempotencyConflict, RunNotFound, SpecError, WaitTimeout
from hpc_compute.ledger import db
from hpc_compute.ledger.states import RunState

JOB: dict[str, Any] = {"image": "host", "command": ["python3", "-c", "print(1)"]}

ClientFactory = Callable[..., Client]


@pytest.fixture
def api_settings(ledger_url: str, hpcc_home: Path, tmp_path: Path) -> Settings:
    db.upgrade(ledger_url)
    return load_settings({"ledger_url": ledger_url}, system_file=tmp_path / "none.toml")


@pytest.fixture
def make_client(api_settings: Settings) -> Iterator[ClientFactory]:
    clients: list[Client] = []

    def make(owner: str | None = None) -> Client:
        client = Client(settings=api_settings, owner=owner)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def run_count(client: Client) -> int:
    return sum(client.ledger.count_runs().values())


def test_owner_scoping(make_client: ClientFactory) -> None:
    alice, bob, admin = make_client("alice"), make_client("bob"), make_client(None)
    a = alice.submit(JOB, idempotency_key="k")
    b = bob.submit(JOB, idempotency_key="k")
    assert a.owner == "alice" and b.owner == "bob" and a.id != b.id

    for call in (bob.get, bob.cancel, bob.events, bob.attempts, bob.artifacts):
        with pytest.raises(RunNotFound):
            call(a.id)
        with pytest.raises(RunNotFound):
            call(a.id[:8])
    with pytest.raises(RunNotFound):
        bob.logs(a.id)
    with pytest.raises(RunNotFound):
        bob.open_artifact(a.id, "x.txt")
    with pytest.raises(RunNotFound):
        bob.wait(a.id, timeout=0.1, drive=False)
    assert [r.id for r in bob.list()] == [b.id]
    assert [r.id for r in alice.list()] == [a.id]
    assert {r.id for r in admin.list()} == {a.id, b.id}
    assert admin.get(a.id).owner == "alice"
    assert alice.get(a.id).state == RunState.QUEUED  # bob's cancel did nothing

    assert alice.cancel(a.id).state == RunState.CANCELLED
    assert [r.id for r in alice.list(state="cancelled")] == [a.id]
    assert [r.id for r in admin.list(state=["queued"])] == [b.id]
    assert [e.to_state for e in alice.events(a.id)] == ["queued", "cancelled"]
    assert admin.cancel(b.id).state == RunState.CANCELLED  # an operator may cancel anyone's run


def test_owner_mismatch(make_client: ClientFactory) -> None:
    alice, admin = make_client("alice"), make_client(None)
    with pytest.raises(SpecError) as info:
        alice.submit(JOB, owner="bob")
    assert info.value.field == "owner"
    with pytest.raises(SpecError) as info:
        alice.submit({**JOB, "owner": "bob"})
    assert info.value.field == "owner"
    with pytest.raises(SpecError):
        admin.submit({**JOB, "owner": "bob"}, owner="carol")
    assert alice.submit(JOB, owner="alice").owner == "alice"
    assert alice.submit({**JOB, "owner": "alice"}).owner == "alice"
    assert admin.submit(JOB, owner="carol").owner == "carol"
    assert admin.submit({**JOB, "owner": "dave"}).owner == "dave"
    assert run_count(admin) == 4


def test_idempotency(make_client: ClientFactory) -> None:
    alice = make_client("alice")
    first = alice.submit({**JOB, "env": {"A": "1", "B": "2"}}, idempotency_key="analysis:1")
    again = alice.submit({**JOB, "env": {"B": "2", "A": "1"}}, idempotency_key="analysis:1")
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict):
        alice.submit({**JOB, "command": ["false"]}, idempotency_key="analysis:1")
    for bad in ("", "k" * 257):
        with pytest.raises(SpecError) as info:
            alice.submit(JOB, idempotency_key=bad)
        assert info.value.field == "idempotency_key"
    assert run_count(alice) == 1


def test_wait_times_out_on_a_queued_run(make_client: ClientFactory) -> None:
    alice = make_client("alice")
    run = alice.submit(JOB)
    seen: list[RunState] = []
    with pytest.raises(WaitTimeout):
        alice.wait(run.id, timeout=0.3, poll_interval=0.05, drive=False, on_progress=lambda r: seen.append(r.state))
    assert seen == [RunState.QUEUED]
    assert alice.get(run.id).state == RunState.QUEUED
    alice.cancel(run.id)
    assert alice.wait(run.id, timeout=1, drive=False).state == RunState.CANCELLED


@pytest.mark.parametrize("path", ["../x", "../../etc/passwd", "a/../../b", "/etc/passwd", "a/./b", "", "a\\b"])
def test_open_artifact_refuses_unsafe_paths(make_client: ClientFactory, path: str) -> None:
    alice = make_client("alice")
    run = alice.submit(JOB)
    with pytest.raises(SpecError) as info:
        alice.open_artifact(run.id, path)
    assert info.value.field == "path"


def test_logs_refuse_unknown_streams(make_client: ClientFactory) -> None:
    alice = make_client("alice")
    run = alice.submit(JOB)
    assert alice.logs(run.id) == b""  # nothing ran yet
    for stream in ("../stdout", "/etc/passwd", "stdin", "logs/../../x"):
        with pytest.raises(SpecError) as info:
            alice.logs(run.id, stream=stream)
        assert info.value.field == "stream"


def test_invalid_spec_writes_nothing(make_client: ClientFactory, tmp_path: Path) -> None:
    alice = make_client("alice")
    alice.submit(JOB)
    bad_specs: list[tuple[dict[str, Any], str]] = [
        ({"image": "host"}, "command"),
        ({**JOB, "backend": "nope"}, "backend"),
        ({**JOB, "backend": "slurm"}, "backend"),  # known, but not available here
        ({**JOB, "resources": {"cpus": -1}}, "resources.cpus"),
        ({**JOB, "resources": {"memory": "1000T"}}, "resources.memory"),
        ({**JOB, "resources": {"gpus": 1}}, "resources.gpus"),  # this host hands out none
        ({**JOB, "inputs": [{"source": str(tmp_path / "missing"), "name": "m"}]}, "inputs[0].source"),
        ({**JOB, "env": {"NOT-A-NAME": "x"}}, "env"),
        ({**JOB, "image": "docker://alpine"}, "image"),
        ({**JOB, "image": str(tmp_path / "missing.sif")}, "image"),
    ]
    for spec, field in bad_specs:
        with pytest.raises(SpecError) as info:
            alice.submit(spec, idempotency_key=f"k-{field}")
        assert info.value.field == field
        with pytest.raises(SpecError):
            alice.validate(spec)
    assert run_count(alice) == 1
    with pytest.raises(SpecError):
        alice.list(state="bogus")


def test_concurrent_submits_from_threads(make_client: ClientFactory) -> None:
    client = make_client("alice")
    barrier = threading.Barrier(8)

    def worker(n: int) -> list[str]:
        barrier.wait()
        return [client.submit({**JOB, "name": f"t{n}-{i}"}).id for i in range(25)]

    with ThreadPoolExecutor(8) as pool:
        ids = [rid for part in pool.map(worker, range(8)) for rid in part]
    assert len(ids) == 200 and len(set(ids)) == 200
    assert run_count(client) == 200
    assert len(client.list(limit=500)) == 200


def test_concurrent_same_key_from_threads(make_client: ClientFactory) -> None:
    client = make_client("alice")
    barrier = threading.Barrier(8)

    def worker(_: int) -> str:
        barrier.wait()
        return client.submit(JOB, idempotency_key="once").id

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(worker, range(8)))
    assert len(ids) == 1 and run_count(client) == 1


def test_client_from_url(ledger_url: str, hpcc_home: Path) -> None:
    db.upgrade(ledger_url)
    with Client(ledger_url, owner="alice") as client:
        run = client.submit(JOB, idempotency_key="u")
        assert client.get(run.id).id == run.id
        assert client.settings.home == hpcc_home
