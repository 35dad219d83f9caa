"""Build ready attempt directories and run the real job-side wrapper on them (bubblewrap).

The wrapper runs under ``/usr/bin/python3`` (not the test interpreter) because that is what a
Slurm node or a VM has. Everything here runs as whoever runs the tests; as root, the attempt
directories are root-owned, which is what root-in-userns can write to (research §9.5).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpc_compute.rundir import (
    RESULT_FILE,
    SPEC_FILE,
    STARTED_FILE,
    AttemptSpec,
    attempt_dir,
    create_attempt_dir,
    read_json_file,
    write_atomic,
)
from hpc_compute.runtimes import SandboxPlan, build_launch

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "sbatch" / "hpcc_wrapper.py"
SYSTEM_PYTHON = "/usr/bin/python3"
BWRAP = "/usr/bin/bwrap"

_counter = 0


def make_attempt(
    tmp_path: Path,
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    inputs: Sequence[tuple[str, str]] = (),
    time_limit_s: int | None = None,
    image: str = "host",
    gpus: int = 0,
    kill_grace_s: int = 10,
    run_id: str = "run-test",
    attempt_id: str | None = None,
) -> Path:
    """A ready attempt directory (layout + spec.json) for ``command`` sealed by bubblewrap."""
    global _counter
    _counter += 1
    attempt = attempt_id or f"att-{os.getpid()}-{_counter}"
    path = attempt_dir(tmp_path / "work", run_id, attempt)
    create_attempt_dir(path)
    plan = SandboxPlan(
        run_id=run_id,
        attempt_id=attempt,
        image=image,
        command=tuple(command),
        env=dict(env or {}),
        inputs=tuple(inputs),
        output_dir=str(path / "output"),
        scratch_dir=str(path / "scratch"),
        gpus=gpus,
    )
    launch = build_launch("bubblewrap", plan, executable=BWRAP)
    spec = AttemptSpec(
        run_id=run_id, attempt_id=attempt, launch=launch, time_limit_s=time_limit_s, kill_grace_s=kill_grace_s
    )
    write_atomic(path / SPEC_FILE, spec.to_json())
    return path


def wrapper_command(attempt: Path) -> list[str]:
    return [SYSTEM_PYTHON, str(WRAPPER), str(attempt)]


def wrapper_env(extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra_env or {})
    return env


def run_wrapper(
    attempt: Path, *, extra_env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the wrapper to completion; its own stdout/stderr are captured (the payload's go to logs/)."""
    return subprocess.run(
        wrapper_command(attempt),
        env=wrapper_env(extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_wrapper(attempt: Path, *, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start the wrapper in the background (for signal tests)."""
    return subprocess.Popen(
        wrapper_command(attempt),
        env=wrapper_env(extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_file(path: Path, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


def result(attempt: Path) -> dict[str, Any]:
    data = read_json_file(attempt / RESULT_FILE)
    assert data is not None, f"no result.json; wrapper.log:\n{wrapper_log(attempt)}"
    return data


def started(attempt: Path) -> dict[str, Any] | None:
    return read_json_file(attempt / STARTED_FILE)


def stdout(attempt: Path) -> str:
    return (attempt / "logs" / "stdout.log").read_text(encoding="utf-8", errors="replace")


def stderr(attempt: Path) -> str:
    return (attempt / "logs" / "stderr.log").read_text(encoding="utf-8", errors="replace")


def wrapper_log(attempt: Path) -> str:
    try:
        return (attempt / "wrapper.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "<no wrapper.log>"


def stdout_json(attempt: Path) -> Any:
    """The last stdout line of the payload, parsed as JSON."""
    lines = [line for line in stdout(attempt).splitlines() if line.strip()]
    assert lines, f"no stdout; stderr:\n{stderr(attempt)}\nwrapper.log:\n{wrapper_log(attempt)}"
    return json.loads(lines[-1])
