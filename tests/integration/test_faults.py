"""Fault injection against the real single-node Slurm and the real Postgres ledger.

Schedulers are real ``python -m hpc_compute serve`` processes configured through the environment
(tests/fault_support.py); every scenario gets a fresh Postgres schema as its ledger and one shared
HPC_COMPUTE_HOME (work root) for its schedulers. After each scenario the shared checker asserts:

* I1 nothing lost, I2 at most one execution per run (wrapper start markers, the payload's own
  stdout line, and Slurm's record of which attempts got a job that started), I3 no orphan job,
  I4 ledger == Slurm's record (sacct), I5 fencing (fences never decrease, FencedOut only where
  expected, a stale-fence write raises and changes nothing).

Tests that stop or restart slurmctld, slurmdbd or Postgres first check that no other test run or
benchmark uses them (the machine is shared), skip otherwise, and always restore the services.
Run: ``pytest tests/integration/test_faults.py --override-ini="addopts=-ra"`` (until the
``faults`` marker is registered). ``HPCC_SOAK_N`` sizes the soak (default 200).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import services_required
from fault_support import (
    ECHO_ATTEMPT,
    LEASE_S,
    Cluster,
    FenceMonitor,
    Report,
    Serve,
    ShimBin,
    check_invariants,
    new_ledger,
    others_using_services,
    percentile,
    submit,
    takeover_latencies,
    wait_for,
    wait_terminal,
)

from hpc_compute.engine import CRASH_POINTS
from hpc_compute.ledger.states import RunState

pytestmark = [pytest.mark.slurm, pytest.mark.faults, pytest.mark.bwrap]

FIGURES = Path(os.environ.get("HPCC_FAULTS_FIGURES", "/tmp/hpcc-faults-figures.json"))


def _record(name: str, data: dict[str, Any]) -> None:
    """Append a scenario's figures to a JSON file (docs/reliability.md quotes them)."""
    try:
        current = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    except ValueError:
        current = {}
    current[name] = data
    FIGURES.write_text(json.dumps(current, indent=2, sort_keys=True))


def _summary(report: Report, **extra: Any) -> dict[str, Any]:
    return {
        "runs": report.runs,
        "attempts": report.attempts,
        "states": report.states,
        "executions": report.executions,
        "lost": len(report.lost),
        "duplicated": len(report.duplicated),
        "orphans": len(report.orphans),
        "mismatches": len(report.mismatches),
        "fence_violations": len(report.fence_violations),
        **extra,
    }


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    c = Cluster()
    try:
        wait_for(lambda: c.ctld_up() and c.node_idle(), 60, "an idle Slurm node")
    except AssertionError as exc:
        _unavailable(f"no usable Slurm cluster here: {exc}")
    if not c.pg_up():
        _unavailable("Postgres is not accepting connections on 127.0.0.1")
    return c


def _unavailable(reason: str) -> None:
    """Skip on a developer machine; fail where services are required (CI, scripts/test-all.sh)."""
    if services_required():
        pytest.fail(f"{reason} (services are required here: the fault tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def scenario(pg_admin: Any, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(ledger URL of a fresh Postgres schema, shared HPC_COMPUTE_HOME)."""
    url, name = pg_admin.fresh()
    home = tmp_path / "home"
    home.mkdir()
    try:
        yield url, home
    finally:
        pg_admin.drop(name)


@pytest.fixture
def exclusive(cluster: Cluster) -> Iterator[Cluster]:
    """For tests that stop or restart a shared service: only when nobody else uses them; and
    whatever happens, every service is restored and the node left idle."""
    others = others_using_services()
    if others:
        _unavailable(f"other test runs/benchmarks use Slurm/Postgres now, not restarting services: {others[:3]}")
    try:
        yield cluster
    finally:
        cluster.healthy()


# ---------------------------------------------------------------------------------------------
# 1. crash-point matrix


SBATCH_BEHAVIOURS = ("ok", "fail", "timeout")
#: with a timing-out first sbatch the first attempt is adopted by reconciliation, never through
#: the submit path, so the submit-path crash points are not reached in that cell
UNREACHABLE = {("after_submit", "timeout"), ("before_mark_submitted", "timeout")}
SUBMIT_PATH = ("after_submit", "before_mark_submitted")


def _cell(pg_admin: Any, root: Path, crash_at: str, behaviour: str) -> dict[str, Any]:
    url, schema = pg_admin.fresh()
    home = root / f"{crash_at}-{behaviour}"
    home.mkdir(parents=True)
    shim = ShimBin(home, behaviour)
    env = {"HPC_COMPUTE_SLURM__BIN_DIR": str(shim.dir)}
    ledger = new_ledger(url)
    started = time.monotonic()
    serves: list[Serve] = []
    out: dict[str, Any] = {"crash_at": crash_at, "behaviour": behaviour, "schema": schema, "url": url}
    try:
        with FenceMonitor(url) as monitor:
            run_id = submit(ledger, ["/bin/sh", "-c", 'echo "$HPCC_ATTEMPT_ID"; echo done > /output/marker'])
            out["run_id"] = run_id
            crashing = Serve(home, url, env={**env, "HPCC_TEST_CRASH_AT": crash_at})
            serves.append(crashing)
            deadline = time.monotonic() + 150
            while crashing.alive() and not ledger.get_run(run_id).terminal and time.monotonic() < deadline:
                time.sleep(0.2)
            out["crashed"] = crashing.proc.poll() == 137
            # a real sbatch slower than sbatch_timeout (a loaded controller) takes the adoption path
            out["slow_sbatch"] = crashing.log().count("timed out after") > (1 if behaviour == "timeout" else 0)
            if crashing.alive():
                crashing.terminate()
            second = Serve(home, url, env=env)
            serves.append(second)
            wait_terminal(ledger, [run_id], 180, f"run of cell {crash_at}/{behaviour}")
            for serve in serves:
                serve.terminate()
            out["report"] = check_invariants(ledger, [run_id], monitor=monitor, schedulers=serves)
        out["run"] = ledger.get_run(run_id)
        out["attempts"] = ledger.attempts(run_id)
        out["events"] = [e.kind for e in ledger.events(run_id)]
        out["sbatch_calls"] = shim.calls()
    finally:
        for serve in serves:
            serve.terminate()
        ledger.close()
        out["seconds"] = round(time.monotonic() - started, 1)
    return out


@pytest.mark.timeout(400)
def test_crash_point_matrix(cluster: Cluster, pg_admin: Any, tmp_path: Path) -> None:
    cells = [(c, b) for c in CRASH_POINTS for b in SBATCH_BEHAVIOURS]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cells)) as pool:
        futures = {pool.submit(_cell, pg_admin, tmp_path, c, b): (c, b) for c, b in cells}
        results = {futures[f]: f.result() for f in concurrent.futures.as_completed(futures)}
    elapsed = time.monotonic() - started
    failures: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    try:
        for (crash_at, behaviour), out in sorted(results.items()):
            key = f"{crash_at}/{behaviour}"
            report: Report = out["report"]
            run = out["run"]
            states = [a.state for a in out["attempts"]]
            figures[key] = {
                "seconds": out["seconds"],
                "crashed": out["crashed"],
                "attempts": states,
                "slow_sbatch": out["slow_sbatch"],
            }
            problems = report.problems()
            if run.state != RunState.SUCCEEDED:
                problems["outcome"] = [f"{run.state} {run.failure_kind} {run.failure_message}"]
            reachable = (crash_at, behaviour) not in UNREACHABLE
            if reachable and not out["crashed"] and not (out["slow_sbatch"] and crash_at in SUBMIT_PATH):
                problems["crash"] = ["the scheduler never reached its crash point"]
            if report.executions != 1:
                problems["executions"] = [f"{report.executions} executions"]
            # the expected path: a crash before sbatch, or a failed sbatch, tombstones the attempt
            # (a new one runs); everywhere else the one attempt is adopted and finishes
            if (behaviour == "fail" or crash_at == "after_claim") and "not_submitted" not in states:
                problems["path"] = [f"expected a tombstoned attempt, got {states}"]
            if behaviour != "fail" and crash_at != "after_claim" and not out["slow_sbatch"] and states != ["finished"]:
                problems["path"] = [f"expected one adopted/finished attempt, got {states}"]
            if out["crashed"] and "adopted" not in out["events"]:
                problems["adopted"] = ["no adopted event after the crash"]
            if problems:
                failures[key] = problems
    finally:
        for out in results.values():
            pg_admin.drop(out["schema"])
    _record("crash_matrix", {"cells": len(cells), "wall_s": round(elapsed, 1), "cells_detail": figures})
    assert not failures, failures


# ---------------------------------------------------------------------------------------------
# 2. SIGKILL soak


@pytest.mark.timeout(900)
def test_sigkill_soak(cluster: Cluster, scenario: tuple[str, Path]) -> None:
    url, home = scenario
    n = int(os.environ.get("HPCC_SOAK_N", "200"))
    bound = float(os.environ.get("HPCC_SOAK_BOUND_S", "600"))
    rng = random.Random(int(os.environ.get("HPCC_SOAK_SEED", "20261202")))
    ledger = new_ledger(url)
    run_ids = [submit(ledger, ECHO_ATTEMPT, resources={"memory": "64M", "time_limit": "5m"}) for _ in range(n)]
    serves = [Serve(home, url) for _ in range(3)]
    all_serves = list(serves)
    kills: list[tuple[float, str]] = []
    started = time.monotonic()
    try:
        with FenceMonitor(url, every=1.0) as monitor:
            ids = {s.pid: s.scheduler_id() for s in serves}
            next_kill = time.monotonic() + rng.uniform(2, 5)
            while True:
                remaining = [r for r in run_ids if not ledger.get_run(r).terminal]
                if not remaining:
                    break
                assert time.monotonic() - started < bound, f"{len(remaining)} of {n} runs not terminal after {bound}s"
                if time.monotonic() >= next_kill:
                    index = rng.randrange(len(serves))
                    victim = serves[index]
                    victim.kill()
                    kills.append((victim.killed_at or time.time(), ids[victim.pid]))
                    replacement = Serve(home, url)
                    serves[index] = replacement
                    all_serves.append(replacement)
                    ids[replacement.pid] = replacement.scheduler_id()
                    next_kill = time.monotonic() + rng.uniform(2, 5)
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            for serve in serves:
                serve.terminate()
            report = check_invariants(
                ledger, run_ids, monitor=monitor, schedulers=all_serves, stale_fence_samples=10, sacct_wait=90
            )
        latencies = takeover_latencies(url, kills)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        figures = _summary(
            report,
            kills=len(kills),
            wall_s=round(elapsed, 1),
            takeover_samples=len(latencies),
            takeover_p50_s=None if p50 is None else round(p50, 2),
            takeover_p99_s=None if p99 is None else round(p99, 2),
            lease_s=LEASE_S,
        )
        _record(f"soak_n{n}", figures)
        print("soak figures:", json.dumps(figures))
        report.assert_ok()
        assert report.states == {"succeeded": n}, report.states
        assert report.executions == n
        assert len(kills) >= 3
    finally:
        for serve in all_serves:
            serve.terminate()
        ledger.close()


# ---------------------------------------------------------------------------------------------
# 3. a scheduler paused past its lease just before sbatch (strict submission)


@pytest.mark.timeout(240)
def test_sigstop_before_sbatch_past_the_lease(cluster: Cluster, scenario: tuple[str, Path]) -> None:
    url, home = scenario
    ledger = new_ledger(url)
    run_id = submit(ledger, ECHO_ATTEMPT)
    paused = Serve(home, url, env={"HPCC_TEST_PAUSE_AT": "before_sbatch"})
    serves = [paused]
    try:
        with FenceMonitor(url) as monitor:
            wait_for(paused.stopped, 60, "the first scheduler to pause before sbatch")
            (first,) = ledger.attempts(run_id)
            assert first.state == "submitting" and first.backend_job_id is None
            takeover = Serve(home, url)
            serves.append(takeover)
            wait_terminal(ledger, [run_id], 90)
            assert ledger.get_run(run_id).state == RunState.SUCCEEDED
            assert paused.stopped(), "the paused scheduler should still be stopped"
            os.kill(paused.pid, signal.SIGCONT)
            wait_for(lambda: "withdrawing job" in paused.log(), 60, "the resumed scheduler to withdraw its job")
            time.sleep(3)
            assert paused.alive(), "the resumed scheduler keeps serving"
            for serve in serves:
                serve.terminate()
            report = check_invariants(ledger, [run_id], monitor=monitor, schedulers=serves, max_fenced_warnings=1)
        attempts = ledger.attempts(run_id)
        assert [a.state for a in attempts] == ["not_submitted", "finished"], attempts
        log = paused.log()
        assert log.count("fenced out:") == 1, log
        stale_tag = f"hpcc-{attempts[0].id}"
        match = re.search(rf"attempt {attempts[0].id}: withdrawing job (\d+)", log)
        assert match, log
        # the stale scheduler did call sbatch (held), and its job never got a node. (By job id: a
        # job cancelled while held was never eligible, so a time-windowed sacct -S omits it.)
        argv = ["sacct", "-X", "-P", "-n", "-j", match.group(1), "-o", "JobIDRaw,State,NodeList,JobName"]
        lines: list[list[str]] = []
        deadline = time.monotonic() + 60
        settled = False
        while not settled and time.monotonic() < deadline:  # slurmdbd ingests with a lag
            proc = subprocess.run(argv, capture_output=True, text=True, check=True)
            lines = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
            # a held job cancelled at once can show first as a placeholder record (JobName
            # "allocation") until slurmdbd has the whole job: wait for the real record
            settled = bool(lines) and all(len(row) == 4 and row[3] == stale_tag for row in lines)
            if not settled:
                time.sleep(2)
        never_ran = all(
            state.startswith("CANCELLED") and nodes == "None assigned" and name == stale_tag
            for _, state, nodes, name in lines
        )
        assert lines and never_ran, lines
        _record("sigstop_before_sbatch", _summary(report, stale_jobs=len(lines)))
        report.assert_ok()
        assert report.executions == 1
    finally:
        for serve in serves:
            serve.terminate()
        ledger.close()


# ---------------------------------------------------------------------------------------------
# 4. slurmctld restarted mid-run, then stopped for two minutes


@pytest.mark.timeout(420)
def test_slurmctld_restart_and_outage(exclusive: Cluster, scenario: tuple[str, Path]) -> None:
    url, home = scenario
    cluster = exclusive
    outage = float(os.environ.get("HPCC_CTLD_OUTAGE_S", "120"))
    ledger = new_ledger(url)
    serves = [Serve(home, url), Serve(home, url)]
    try:
        with FenceMonitor(url) as monitor:
            first = [submit(ledger, ["/bin/sh", "-c", 'echo "$HPCC_ATTEMPT_ID"; sleep 6']) for _ in range(4)]
            wait_for(lambda: sum(ledger.get_run(r).state == RunState.RUNNING for r in first) >= 2, 60, "2 running")
            cluster.stop_ctld()
            cluster.start_ctld()  # a restart while jobs run and others wait
            # the outage: jobs running through it, jobs pending, and runs submitted while it lasts
            second = [submit(ledger, ["/bin/sh", "-c", 'echo "$HPCC_ATTEMPT_ID"; sleep 4']) for _ in range(3)]
            # after a restart slurmd re-registers and the queue drains first: give it time
            wait_for(lambda: any(ledger.get_run(r).state == RunState.RUNNING for r in second), 180, "a second running")
            cluster.stop_ctld()
            down_at = time.monotonic()
            try:
                during = [submit(ledger, ECHO_ATTEMPT) for _ in range(2)]
                while time.monotonic() - down_at < outage:
                    for run_id in first + second + during:
                        run = ledger.get_run(run_id)
                        assert run.state != RunState.FAILED, f"run failed while slurmctld was down: {run}"
                    time.sleep(2)
            finally:
                cluster.start_ctld()
            run_ids = first + second + during
            wait_terminal(ledger, run_ids, 180)
            for serve in serves:
                serve.terminate()
            report = check_invariants(ledger, run_ids, monitor=monitor, schedulers=serves)
            # neither scheduler died: however long a cycle blocked on Slurm's timeouts, their
            # leases (renewed on a thread of their own) held, so nothing changed hands
            takeovers = [e.message for r in run_ids for e in ledger.events(r) if e.kind == "adopted"]
        _record("slurmctld_restart_and_outage", _summary(report, outage_s=outage, takeovers=len(takeovers)))
        report.assert_ok()
        assert report.states == {"succeeded": len(run_ids)}, report.states
        assert takeovers == [], takeovers
    finally:
        for serve in serves:
            serve.terminate()
        ledger.close()


# ---------------------------------------------------------------------------------------------
# 5. slurmdbd stopped while jobs finish


@pytest.mark.timeout(300)
def test_slurmdbd_down_while_jobs_finish(exclusive: Cluster, scenario: tuple[str, Path]) -> None:
    url, home = scenario
    cluster = exclusive
    ledger = new_ledger(url)
    serves = [Serve(home, url)]
    codes = [0, 3, 5, 0, 7, 0]
    try:
        with FenceMonitor(url) as monitor:
            warm = submit(ledger, ECHO_ATTEMPT)  # accounting detected while slurmdbd is up
            wait_terminal(ledger, [warm], 60)
            cluster.stop_dbd()
            try:
                run_ids = [
                    submit(ledger, ["/bin/sh", "-c", f'echo "$HPCC_ATTEMPT_ID"; sleep 1; exit {code}'])
                    for code in codes
                ]
                wait_terminal(ledger, run_ids, 120, "runs finishing while slurmdbd is down")
                assert not cluster.dbd_up()
            finally:
                cluster.start_dbd()
            for serve in serves:
                serve.terminate()
            report = check_invariants(ledger, [warm, *run_ids], monitor=monitor, schedulers=serves, sacct_wait=120)
        for run_id, code in zip(run_ids, codes, strict=True):
            run = ledger.get_run(run_id)
            assert run.exit_code == code, run
            assert run.state == (RunState.SUCCEEDED if code == 0 else RunState.FAILED), run
            assert run.failure_kind is None or run.failure_kind.value == "exit_code", run
        _record("slurmdbd_down", _summary(report))
        report.assert_ok()
    finally:
        for serve in serves:
            serve.terminate()
        ledger.close()


# ---------------------------------------------------------------------------------------------
# 6. Postgres restarted under load


@pytest.mark.timeout(300)
def test_postgres_restart_under_load(exclusive: Cluster, scenario: tuple[str, Path]) -> None:
    url, home = scenario
    cluster = exclusive
    ledger = new_ledger(url)
    run_ids = [submit(ledger, ECHO_ATTEMPT, resources={"memory": "64M"}) for _ in range(40)]
    serves = [Serve(home, url), Serve(home, url)]
    try:
        with FenceMonitor(url) as monitor:
            wait_for(lambda: sum(ledger.get_run(r).terminal for r in run_ids) >= 8, 120, "8 runs to finish")
            cluster.restart_pg()
            cluster.ensure_pg()
            restarted_at = time.monotonic()
            wait_terminal(ledger, run_ids, 240)
            after_s = time.monotonic() - restarted_at
            assert all(s.alive() for s in serves), "a scheduler died of the Postgres restart"
            for serve in serves:
                serve.terminate()
            report = check_invariants(ledger, run_ids, monitor=monitor, schedulers=serves)
        _record("postgres_restart", _summary(report, finish_after_restart_s=round(after_s, 1)))
        report.assert_ok()
        assert report.states == {"succeeded": len(run_ids)}, report.states
    finally:
        for serve in serves:
            serve.terminate()
        ledger.close()


# ---------------------------------------------------------------------------------------------
# 7. the run directory's file system fills up


@pytest.mark.timeout(240)
def test_full_disk_in_the_run_directory(cluster: Cluster, scenario: tuple[str, Path]) -> None:
    url, home = scenario
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    runs_dir = home / "runs"
    runs_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(runs_dir)], check=True)
    ledger = new_ledger(url)
    serves = [Serve(home, url)]
    try:
        with FenceMonitor(url) as monitor:
            big = submit(
                ledger,
                ["/bin/sh", "-c", 'echo "$HPCC_ATTEMPT_ID"; head -c 4000000 /dev/zero > /output/big'],
                retry={"max_attempts": 1},
            )
            wait_terminal(ledger, [big], 90, "the run that fills the disk")
            small = submit(ledger, ["/bin/sh", "-c", 'echo "$HPCC_ATTEMPT_ID"; echo ok > /output/small'])
            wait_terminal(ledger, [small], 90, "the small run after it")
            assert serves[0].alive()
            for serve in serves:
                serve.terminate()
            report = check_invariants(ledger, [big, small], monitor=monitor, schedulers=serves)
        big_run, small_run = ledger.get_run(big), ledger.get_run(small)
        print("full disk:", big_run.state, big_run.failure_kind, big_run.exit_code, big_run.failure_message)
        assert big_run.state == RunState.FAILED and big_run.failure_message, big_run
        assert small_run.state == RunState.SUCCEEDED, small_run
        assert [a.path for a in ledger.artifacts(small)] == ["small"]
        _record(
            "full_disk",
            _summary(
                report,
                big=f"{big_run.state.value} {big_run.failure_kind} exit={big_run.exit_code}: {big_run.failure_message}",
            ),
        )
        report.assert_ok()
    finally:
        for serve in serves:
            serve.terminate()
        ledger.close()
        subprocess.run(["umount", "-l", str(runs_dir)], check=False)
