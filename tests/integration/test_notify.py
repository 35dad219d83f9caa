"""Notifications through the transactional outbox, on SQLite and Postgres, with a real HTTP receiver
on 127.0.0.1 (http.server in a thread) and real runs driven by the engine on the local backend."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from hpc_compute.config import Settings, load_settings
from hpc_compute.engine import Engine
from hpc_compute.ledger.models import Run
from hpc_compute.ledger.states import RunState
from hpc_compute.ledger.store import Ledger, transition
from hpc_compute.notify import Notifier, sign, verify_signature
from hpc_compute.spec import parse_spec

SECRET = "s3cret-for-tests"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def delivery_id(self) -> str:
        return self.headers["x-hpcc-delivery"]


class Receiver:
    """A webhook receiver on 127.0.0.1 that can be down (connection refused), failing (HTTP 500) or up."""

    def __init__(self) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self.status = 200
        self.seen: list[Delivery] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self, status: int = 200) -> None:
        self.status = status
        if self._server is not None:
            return
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.seen.append(
                        Delivery({k.lower(): v for k, v in self.headers.items()}, body, receiver.status)
                    )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ok(self) -> list[Delivery]:
        return [d for d in self.seen if d.status == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.down()


def _settings(tmp_path: Path, ledger_url: str, receiver: Receiver | None, **notify: Any) -> Settings:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    hooks: dict[str, Any] = {"hooks": False, "backoff": 0.05, "max_backoff": 0.2, "timeout": 5}
    if receiver is not None:
        hooks["webhooks"] = [{"url": receiver.url, "secret": SECRET}]
    overrides: dict[str, Any] = {
        "home": str(home),
        "ledger_url": ledger_url,
        "scheduler": {"poll_interval": 0.2, "min_poll_interval": 0.05, "lease_seconds": 5},
        "local": {"reconcile_grace_s": 1.0},
        "notify": {**hooks, **notify},
    }
    return load_settings(overrides, env={"HOME": str(home)}, system_file=home / "no-system.toml")


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    handle = Ledger(ledger_url)
    handle.upgrade()
    yield handle
    handle.close()


def _job(*command: str, **extra: Any) -> Any:
    return parse_spec({"image": "host", "command": list(command), **extra})


def _state_events(ledger: Ledger, run_id: str) -> list[tuple[int, str | None, str | None]]:
    return [(e.id, e.from_state, e.to_state) for e in ledger.events(run_id) if e.kind == "state"]


def _pump(notifier: Notifier, until: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "notifications not delivered in time"
        notifier.run_once()
        time.sleep(0.05)


# -- the outbox is written with the state change ---------------------------------------------------


def test_every_state_change_writes_one_outbox_row(ledger: Ledger) -> None:
    run = ledger.create_run(_job("true"), "alice")
    item = ledger.claim_queued("s1", backends=["local"], limit=1, work_root="/w", lease_s=60)[0]
    ledger.mark_submitted(item.attempt_id, item.fence, "j1")
    ledger.request_cancel(run.id)
    rows = ledger.outbox(run.id)
    events = _state_events(ledger, run.id)
    assert [r.event_id for r in rows] == [e[0] for e in events]
    assert [(r.payload["previous_state"], r.payload["state"]) for r in rows] == [(e[1], e[2]) for e in events]
    assert all(r.delivered_at is None and r.attempts == 0 for r in rows)
    first = rows[0].payload
    assert first["run_id"] == run.id and first["owner"] == "alice" and first["state"] == "queued"
    assert set(first) >= {"run_id", "owner", "state", "previous_state", "failure_kind", "exit_code", "signal", "at"}

    many = ledger.create_runs([_job("true") for _ in range(5)], "bob")
    assert all(len(ledger.outbox(r.id)) == 1 for r in many)


def test_a_rolled_back_state_change_leaves_no_notification(ledger: Ledger) -> None:
    run = ledger.create_run(_job("true"), "alice")
    before = len(ledger.outbox())
    with Session(ledger.engine) as session:
        row = session.get(Run, run.id)
        assert row is not None
        transition(session, row, RunState.CANCELLED, at=datetime.now(UTC))
        session.rollback()
    assert len(ledger.outbox()) == before
    assert ledger.get_run(run.id).state == RunState.QUEUED


# -- delivery ----------------------------------------------------------------------------------------


@pytest.mark.bwrap
def test_end_to_end_every_state_change_is_delivered_and_signed(
    ledger_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.up()
    settings = _settings(tmp_path, ledger_url, receiver)
    ledger = Ledger(ledger_url)
    ledger.upgrade()
    ok = ledger.create_run(_job("/bin/sh", "-c", "sleep 1; echo hi"), "alice")
    bad = ledger.create_run(_job("/bin/sh", "-c", "exit 3"), "bob")
    engine = Engine(settings, ledger)
    engine.start()
    try:
        assert engine.drive_until([ok.id, bad.id], timeout=60)
        expected = len(_state_events(ledger, ok.id)) + len(_state_events(ledger, bad.id))
        _pump(engine.notifier, lambda: len(receiver.ok()) >= expected)
    finally:
        engine.close()
    ledger.close()

    for run_id in (ok.id, bad.id):
        events = _state_events(Ledger(ledger_url), run_id)
        got = sorted((d for d in receiver.ok() if d.payload["run_id"] == run_id), key=lambda d: d.payload["event_id"])
        assert [(d.payload["previous_state"], d.payload["state"]) for d in got] == [(e[1], e[2]) for e in events]
        assert [d.payload["event_id"] for d in got] == [e[0] for e in events]
    states = [d.payload["state"] for d in receiver.ok() if d.payload["run_id"] == ok.id]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    final_bad = next(
        d.payload for d in receiver.ok() if d.payload["run_id"] == bad.id and d.payload["state"] == "failed"
    )
    assert final_bad["failure_kind"] == "exit_code" and final_bad["exit_code"] == 3 and final_bad["owner"] == "bob"

    ids = [d.delivery_id for d in receiver.ok()]
    assert len(ids) == len(set(ids)), "one delivery per state change"
    for d in receiver.ok():
        assert d.headers["content-type"] == "application/json"
        assert d.payload["delivery_id"] == d.delivery_id
        ts, sig = d.headers["x-hpcc-timestamp"], d.headers["x-hpcc-signature"]
        assert sig.startswith("sha256=")
        assert verify_signature(SECRET, ts, d.body, sig)
        assert verify_signature(SECRET.encode(), int(ts), d.body, sig, tolerance_s=600)
        assert not verify_signature("another-secret", ts, d.body, sig)
        assert not verify_signature(SECRET, ts, d.body + b" ", sig)
        assert not verify_signature(SECRET, str(int(ts) + 1), d.body, sig)
        # the documented construction, recomputed independently
        mac = hmac.new(SECRET.encode(), f"{ts}.".encode() + d.body, hashlib.sha256).hexdigest()
        assert sig == f"sha256={mac}"
    assert Ledger(ledger_url).outbox(undelivered=True) == []


def test_receiver_down_then_failing_then_up_delivers_with_the_same_id(
    ledger: Ledger, ledger_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    settings = _settings(tmp_path, ledger_url, receiver)
    notifier = Notifier(settings, ledger)
    run = ledger.create_run(_job("true"), "alice")
    (row,) = ledger.outbox(run.id)

    assert notifier.run_once() == 0  # connection refused
    (after,) = ledger.outbox(run.id)
    assert after.attempts == 1 and after.delivered_at is None
    assert after.last_error and "unreachable" in after.last_error
    assert after.next_attempt_at > after.created_at  # backoff, kept in the table

    receiver.up(status=500)
    _pump(notifier, lambda: len(receiver.seen) >= 2)
    (failing,) = ledger.outbox(run.id)
    assert failing.delivered_at is None and failing.last_error and "HTTP 500" in failing.last_error

    receiver.status = 200
    _pump(notifier, lambda: bool(receiver.ok()))
    (done,) = ledger.outbox(run.id)
    assert done.delivered_at is not None and done.last_error is None and done.attempts >= 4
    assert {d.delivery_id for d in receiver.seen} == {f"{row.id}-0"}, "the same delivery id on every try"
    assert all(verify_signature(SECRET, d.headers["x-hpcc-timestamp"], d.body, d.headers["x-hpcc-signature"])
               for d in receiver.seen)  # fmt: skip
    assert notifier.run_once() == 0 and len(receiver.ok()) == 1, "delivered once, then left alone"


def test_backoff_grows_with_jitter(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    notifier = Notifier(_settings(tmp_path, ledger_url, None, backoff=1.0, max_backoff=30.0), ledger)
    for tries, nominal in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (50, 30.0)]:
        samples = [notifier.backoff(tries) for _ in range(50)]
        assert all(nominal / 2 <= s <= nominal for s in samples)
        assert len(set(samples)) > 1, "jittered"


@pytest.mark.bwrap
def test_a_restarted_engine_delivers_what_was_pending(ledger_url: str, tmp_path: Path, receiver: Receiver) -> None:
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n")
    settings = _settings(tmp_path, ledger_url, None, webhooks=[{"url": receiver.url, "secret_file": str(secret_file)}])
    ledger = Ledger(ledger_url)
    ledger.upgrade()
    run = ledger.create_run(_job("/bin/true"), "alice")
    first = Engine(settings, ledger)
    first.start()
    try:
        assert first.drive_until([run.id], timeout=60)
    finally:
        first.close()
    pending = ledger.outbox(run.id, undelivered=True)
    assert pending and all(r.attempts >= 1 and r.last_error for r in pending), "tried while the receiver was down"
    assert receiver.seen == []

    receiver.up()
    second = Engine(settings, Ledger(ledger_url))  # a new scheduler process on the same ledger
    second.start()
    try:
        deadline = time.monotonic() + 15
        while ledger.outbox(run.id, undelivered=True):
            assert time.monotonic() < deadline, "pending notifications not delivered after the restart"
            second.cycle()
            time.sleep(0.1)
    finally:
        second.close()
    got = sorted(receiver.ok(), key=lambda d: d.payload["event_id"])
    assert [d.payload["state"] for d in got] == [e[2] for e in _state_events(ledger, run.id)]
    assert {d.delivery_id for d in got} == {f"{r.id}-0" for r in pending}
    assert all(verify_signature(SECRET, d.headers["x-hpcc-timestamp"], d.body, d.headers["x-hpcc-signature"])
               for d in got)  # fmt: skip
    ledger.close()


def test_gives_up_after_max_attempts_and_says_so(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    down = Receiver()  # never started: connection refused
    notifier = Notifier(_settings(tmp_path, ledger_url, down, max_attempts=2, backoff=0.01, max_backoff=0.01), ledger)
    run = ledger.create_run(_job("true"), "alice")
    for _ in range(2):
        time.sleep(0.05)
        notifier.run_once()
    time.sleep(0.05)
    assert notifier.run_once() == 0
    (row,) = ledger.outbox(run.id)
    assert row.attempts == 2 and row.delivered_at is None and row.last_error and "unreachable" in row.last_error
    failed = [e for e in ledger.events(run.id) if e.kind == "notify_failed"]
    assert len(failed) == 1 and failed[0].data and failed[0].data["outbox_id"] == row.id
    assert ledger.outbox(undelivered=True) == [row], "kept, visible, not dropped"


def test_two_notifiers_never_take_the_same_row(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    ledger.create_runs([_job("true") for _ in range(60)], "alice")
    barrier = threading.Barrier(3)

    def take(_: int) -> list[int]:
        barrier.wait()
        got: list[int] = []
        while batch := ledger.claim_outbox(limit=7, lease_s=60, max_attempts=10):
            got += [item.id for item in batch]
        return got

    with ThreadPoolExecutor(3) as pool:
        taken = [i for part in pool.map(take, range(3)) for i in part]
    assert len(taken) == 60 and len(set(taken)) == 60


def test_no_target_means_nothing_to_deliver(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    notifier = Notifier(_settings(tmp_path, ledger_url, None), ledger)
    ledger.create_runs([_job("true") for _ in range(3)], "alice")
    assert notifier.run_once() == 3
    assert ledger.outbox(undelivered=True) == []


# -- Python hooks (entry points) ---------------------------------------------------------------------


def _install_hook_distribution(root: Path, module: str, body: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[hpc_compute.hooks]\nrecord = {module}:record\nbroken = {module}:nope\n")


def test_entry_point_hooks_are_called_and_retried(
    ledger: Ledger, ledger_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    module = f"hpcc_test_hooks_{abs(hash(str(tmp_path))) % 10**8}"
    _install_hook_distribution(
        site,
        module,
        """
        CALLS = []
        FAIL_FIRST = [True]

        def record(payload):
            CALLS.append(payload)
            if FAIL_FIRST[0]:
                FAIL_FIRST[0] = False
                raise RuntimeError("hook hiccup")
        """,
    )
    monkeypatch.syspath_prepend(str(site))
    notifier = Notifier(_settings(tmp_path, ledger_url, None, hooks=True), ledger)
    labels = [t.label for t in notifier.targets]
    assert labels == ["hook broken", "hook record"]  # sorted by name; target index = position

    run = ledger.create_run(_job("true"), "alice")
    notifier.run_once()
    (row,) = ledger.outbox(run.id)
    assert row.delivered_at is None and row.last_error
    assert "hook hiccup" in row.last_error and "cannot load" in row.last_error
    assert row.delivered_targets == frozenset()

    # fix the broken hook; the record hook's second call succeeds
    notifier.targets[0].load_error = None
    notifier.targets[0].hook = lambda payload: None
    _pump(notifier, lambda: not ledger.outbox(run.id, undelivered=True))
    calls = sys.modules[module].CALLS
    assert [c["delivery_id"] for c in calls] == [f"{row.id}-1", f"{row.id}-1"]
    assert calls[-1]["run_id"] == run.id and calls[-1]["state"] == "queued"


def test_partial_delivery_is_not_repeated_to_the_targets_that_took_it(
    ledger: Ledger, ledger_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.up()
    calls: list[dict[str, Any]] = []
    state = {"fail": True}

    def flaky(payload: dict[str, Any]) -> None:
        calls.append(payload)
        if state["fail"]:
            raise ValueError("not now")

    notifier = Notifier(_settings(tmp_path, ledger_url, receiver), ledger, hooks={"flaky": flaky})
    run = ledger.create_run(_job("true"), "alice")
    notifier.run_once()
    (row,) = ledger.outbox(run.id)
    assert row.delivered_targets == frozenset({0}) and row.delivered_at is None
    state["fail"] = False
    _pump(notifier, lambda: not ledger.outbox(run.id, undelivered=True))
    assert len(receiver.seen) == 1, "the webhook that took it is not called again"
    assert [c["delivery_id"] for c in calls] == [f"{row.id}-1"] * len(calls) and len(calls) == 2


# -- the receiver's helper ---------------------------------------------------------------------------


def test_verify_signature_rules() -> None:
    body = b'{"a":1}'
    sig = sign("k", 1700000000, body)
    assert verify_signature("k", "1700000000", body, sig)
    assert verify_signature("k", "1700000000", body.decode(), sig.removeprefix("sha256="))
    assert verify_signature("k", "1700000000", body, sig.upper().replace("SHA256=", "sha256="))
    assert not verify_signature("k2", "1700000000", body, sig)
    assert not verify_signature("k", "not-a-number", body, sig)
    assert not verify_signature("k", "1700000000", body, "sha256=")
    assert verify_signature("k", "1700000000", body, sig, tolerance_s=60, now=1700000030)
    assert not verify_signature("k", "1700000000", body, sig, tolerance_s=60, now=1700000100)


def test_delivered_rows_are_pruned_undelivered_kept(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    from sqlalchemy import update
    from sqlmodel import col

    from hpc_compute.ledger.models import Outbox

    delivered = ledger.create_run(_job("true"), "alice")
    Notifier(_settings(tmp_path, ledger_url, None), ledger).run_once()  # no target: settled at once
    kept = ledger.create_run(_job("true"), "bob")
    notifier = Notifier(_settings(tmp_path, ledger_url, None, keep_delivered="1d"), ledger)
    assert notifier.prune(force=True) == 0  # delivered just now
    with Session(ledger.engine) as session:
        old = datetime.now(UTC).replace(year=2020)
        session.execute(update(Outbox).where(col(Outbox.run_id) == delivered.id).values(delivered_at=old))
        session.commit()
    assert notifier.prune(force=True) == 1
    assert ledger.outbox(delivered.id) == [] and len(ledger.outbox(kept.id)) == 1
