"""The CLI as users run it (a subprocess): exit codes, messages naming the field, nothing written on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hpc_compute import __version__
from hpc_compute.ledger import db
from hpc_compute.ledger.store import Ledger

UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
UNREACHABLE = "postgresql://hpcc:secret@127.0.0.1:1/hpcc_nothing"


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPC_COMPUTE_")}
    env["HPC_COMPUTE_HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home.parent / "xdg-config")
    env.update(extra)
    return env


def cli(home: Path, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpc_compute", *args],
        env=cli_env(home, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=home.parent,
    )


def run_count(home: Path) -> int:
    ledger = Ledger(db.sqlite_url(home / "ledger.db"))
    try:
        return sum(ledger.count_runs().values())
    finally:
        ledger.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose ledger already holds one queued run (so 'unchanged' means something)."""
    path = tmp_path_factory.mktemp("cli") / "home"
    result = cli(path, "submit", "--parsable", "--name", "seed", "--", "true")
    assert result.returncode == 0, result.stderr
    assert run_count(path) == 1
    return path


@pytest.fixture(scope="module")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("jobs")
    (folder / "bad-mem.toml").write_text('command = ["true"]\n[resources]\nmemory = "-4G"\n')
    (folder / "bad-env.yaml").write_text('command: ["true"]\nenv:\n  1BAD: x\n')
    (folder / "broken.toml").write_text("command = [\n")
    (folder / "no-command.yaml").write_text("image: host\n")
    return folder


BAD_INPUT = [
    # (arguments, text the message must contain: the field, and the flag where there is one)
    (["submit"], "command"),
    (["submit", "--backend", "kubernetes", "--", "true"], "backend"),
    (["submit", "--backend", "slurm", "--", "true"], "backend"),
    (["submit", "--cpus", "-1", "--", "true"], "resources.cpus"),
    (["submit", "--cpus", "100000", "--", "true"], "resources.cpus"),
    (["submit", "--mem", "-1G", "--", "true"], "resources.memory"),
    (["submit", "--mem", "1000T", "--", "true"], "resources.memory"),
    (["submit", "--mem", "9" * 400, "--", "true"], "resources.memory"),
    (["submit", "--gpus", "1000", "--", "true"], "resources.gpus"),
    (["submit", "--gpus", "1", "--", "true"], "resources.gpus"),  # this host hands out no GPU
    (["submit", "--time", "-5m", "--", "true"], "resources.time_limit"),
    (["submit", "--time", "400d", "--", "true"], "resources.time_limit"),
    (["submit", "--time", "9" * 400, "--", "true"], "resources.time_limit"),
    (["submit", "--input", "/definitely/not/here", "--", "true"], "inputs[0].source"),
    (["submit", "--env", "1A=b", "--", "true"], "env"),
    (["submit", "--env", "=c", "--", "true"], "env"),
    (["submit", "--env", "PATH=/evil", "--", "true"], "env"),
    (["submit", "--label", "bad key=x", "--", "true"], "labels"),
    (["submit", "--image", "docker://ubuntu:22.04", "--", "true"], "image"),
    (["submit", "--image", "library://alpine", "--", "true"], "image"),
    (["submit", "--image", "/no/such/image.sif", "--", "true"], "image"),
    (["submit", "--idempotency-key", "k" * 300, "--", "true"], "idempotency_key"),
    (["submit", "-f", "{jobs}/missing.toml"], "file"),
    (["submit", "-f", "{jobs}/broken.toml"], "file"),
    (["submit", "-f", "{jobs}/bad-mem.toml"], "resources.memory"),
    (["submit", "-f", "{jobs}/bad-env.yaml"], "env"),
    (["submit", "--cpus", "two", "--", "true"], "--cpus"),  # click's own usage error
    (["submit", "--bogus", "--", "true"], "--bogus"),
    (["list", "--state", "bogus"], "state"),
]


@pytest.fixture(scope="module")
def bad_input_results(home: Path, job_files: Path) -> tuple[int, int, dict[int, subprocess.CompletedProcess[str]]]:
    """Run the whole matrix at once (in parallel: each CLI start costs most of a second)."""
    before = run_count(home)

    def one(index: int) -> subprocess.CompletedProcess[str]:
        return cli(home, *[a.replace("{jobs}", str(job_files)) for a in BAD_INPUT[index][0]])

    with ThreadPoolExecutor(max(4, 2 * (os.cpu_count() or 1))) as pool:
        results = dict(zip(range(len(BAD_INPUT)), pool.map(one, range(len(BAD_INPUT))), strict=True))
    return before, run_count(home), results


@pytest.mark.parametrize("index", range(len(BAD_INPUT)), ids=[" ".join(a)[:60] for a, _ in BAD_INPUT])
def test_bad_input_exits_2_naming_the_field(
    bad_input_results: tuple[int, int, dict[int, subprocess.CompletedProcess[str]]], index: int
) -> None:
    before, after, results = bad_input_results
    result, names = results[index], BAD_INPUT[index][1]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert names in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert after == before  # nothing written to the ledger by any of them


def test_flag_is_named_for_cli_fields(home: Path) -> None:
    result = cli(home, "submit", "--mem", "-1G", "--", "true")
    assert "resources.memory (--mem)" in result.stderr
    assert result.stderr.startswith("hpc-compute: error: ")


@pytest.mark.parametrize(
    "args",
    [
        ["status", UNKNOWN_ID],
        ["status", "--json", UNKNOWN_ID],
        ["cancel", UNKNOWN_ID],
        ["logs", UNKNOWN_ID],
        ["artifacts", UNKNOWN_ID],
        ["wait", "--timeout", "1", UNKNOWN_ID],
        ["status", "deadbeef"],
    ],
)
def test_unknown_run_exits_4(home: Path, args: list[str]) -> None:
    result = cli(home, *args)
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "no run" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["list"], ["status", UNKNOWN_ID], ["submit", "--", "true"], ["cancel", UNKNOWN_ID]])
def test_unreachable_ledger_exits_3(home: Path, args: list[str]) -> None:
    result = cli(home, *args, HPC_COMPUTE_LEDGER_URL=UNREACHABLE, timeout=30)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "ledger" in result.stderr and "127.0.0.1" in result.stderr
    assert "secret" not in result.stderr  # the password is never printed
    assert "Traceback" not in result.stderr


def test_parsable_prints_only_the_id(home: Path) -> None:
    before = run_count(home)
    result = cli(home, "submit", "--parsable", "--label", "k=v", "--", "true")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    assert result.stdout == run_id + "\n"
    assert len(run_id) == 36 and run_id.count("-") == 4
    assert run_count(home) == before + 1
    status = cli(home, "status", "--json", run_id)
    assert json.loads(status.stdout)["state"] == "queued"
    assert cli(home, "cancel", run_id[:8]).returncode == 0
    assert json.loads(cli(home, "status", "--json", run_id).stdout)["state"] == "cancelled"


def test_idempotency_conflict_exits_2(home: Path) -> None:
    first = cli(home, "submit", "--parsable", "--idempotency-key", "cli-k", "--", "true")
    again = cli(home, "submit", "--parsable", "--idempotency-key", "cli-k", "--", "true")
    assert first.returncode == again.returncode == 0
    assert first.stdout == again.stdout
    before = run_count(home)
    other = cli(home, "submit", "--parsable", "--idempotency-key", "cli-k", "--", "false")
    assert other.returncode == 2 and "cli-k" in other.stderr
    assert run_count(home) == before


def test_version(home: Path) -> None:
    result = cli(home, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"hpc-compute {__version__}"


STATUS_FIELDS = {
    "id", "state", "failure_kind", "exit_code", "signal", "backend", "backend_job_id", "attempts",
    "created_at", "started_at", "finished_at",
}  # fmt: skip


@pytest.mark.bwrap
def test_submit_wait_success_with_artifact(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = cli(
        home, "submit", "--wait", "--parsable", "--time", "2m", "--",
        "sh", "-c", "printf hello > /output/greeting.txt; echo done",
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    assert len(run_id) == 36

    status = cli(home, "status", "--json", run_id)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert set(data) >= STATUS_FIELDS
    assert data["id"] == run_id and data["state"] == "succeeded" and data["exit_code"] == 0
    assert data["failure_kind"] is None and data["signal"] is None
    assert data["backend"] == "local" and data["backend_job_id"]
    assert data["attempts"] == 1
    assert data["created_at"] <= data["started_at"] <= data["finished_at"]

    arts = cli(home, "artifacts", "--json", run_id)
    assert arts.returncode == 0, arts.stderr
    import hashlib

    assert json.loads(arts.stdout) == [
        {"path": "greeting.txt", "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    ]
    logs = cli(home, "logs", run_id)
    assert logs.returncode == 0 and logs.stdout == "done\n"


@pytest.mark.bwrap
def test_submit_wait_exits_with_the_job_exit_code(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = cli(home, "submit", "--wait", "--json", "--", "sh", "-c", "exit 7", timeout=120)
    assert result.returncode == 7, result.stderr
    data = json.loads(result.stdout)
    assert data["state"] == "failed" and data["failure_kind"] == "exit_code" and data["exit_code"] == 7


def test_sweep_file_and_json_lines_are_accepted_in_one_call(tmp_path: Path) -> None:
    home = tmp_path / "home"
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('command = ["/bin/echo", "{a}-{b}"]\n[sweep]\na = [1, 2]\nb = ["x", "y", "z"]\n')
    done = cli(home, "submit", "-f", str(sweep), "--parsable")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 6 and run_count(home) == 6
    listed = json.loads(cli(home, "list", "--json").stdout)
    assert sorted(r["command"][1] for r in listed) == ["1-x", "1-y", "1-z", "2-x", "2-y", "2-z"]
    lines = '{"command": ["/bin/true"]}\n{"command": ["/bin/false"], "name": "second"}\n'
    done = subprocess.run(
        [sys.executable, "-m", "hpc_compute", "submit", "--jobs", "-", "--parsable"],
        input=lines,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 2 and run_count(home) == 8
    bad = subprocess.run(
        [sys.executable, "-m", "hpc_compute", "submit", "--jobs", "-"],
        input='{"command": ["/bin/true"]}\n{"command": []}\n',
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "jobs[1].command" in bad.stderr and "Traceback" not in bad.stderr
    assert run_count(home) == 8, "one bad job rejects the whole list"
