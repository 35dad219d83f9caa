"""The attempt directory: one folder per attempt, the only place a job and the scheduler meet.

Layout (``<work_root>/<run_id>/<attempt_id>/``)::

    spec.json      what the job-side wrapper runs (written by the scheduler, read by the wrapper)
    wrapper.json   the wrapper's claim: pid and start time, created with O_EXCL
    started.json   written by the wrapper when the payload starts
    result.json    written by the wrapper when the payload ends (atomic rename)
    wrapper.log    the wrapper's own diagnostics
    logs/          stdout.log, stderr.log of the payload
    output/        bound writable at /output
    scratch/       bound writable at /scratch

Only ``output/`` and ``scratch/`` are visible to the job, so it cannot forge the files the
scheduler trusts. The attempt spec is plain JSON so the stdlib-only wrapper can read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ATTEMPT_SPEC_SCHEMA = "hpc-compute/attempt-spec/1"
RESULT_SCHEMA = "hpc-compute/result/1"

SPEC_FILE = "spec.json"
CLAIM_FILE = "wrapper.json"
STARTED_FILE = "started.json"
RESULT_FILE = "result.json"
WRAPPER_LOG = "wrapper.log"
LOGS_DIR = "logs"
STDOUT_FILE = "logs/stdout.log"
STDERR_FILE = "logs/stderr.log"
OUTPUT_DIR = "output"
SCRATCH_DIR = "scratch"


@dataclass(frozen=True)
class ForwardEnv:
    """A variable of the allocation (e.g. CUDA_VISIBLE_DEVICES) passed into the sandbox by the wrapper.

    ``args`` are inserted into the runtime argv with ``{value}`` replaced by the variable's value;
    nothing is inserted when the variable is unset.
    """

    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class LaunchSpec:
    """How the wrapper starts the sealed payload: a complete argv, never shell text."""

    runtime: str
    argv: tuple[str, ...]
    insert_at: int
    forward_env: tuple[ForwardEnv, ...] = ()
    runtime_env: dict[str, str] = field(default_factory=dict)
    preflight_paths: tuple[str, ...] = ()
    status_fd_flag: str | None = None
    #: directories the wrapper creates on the executing node before the preflight
    prepare_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttemptSpec:
    """The content of spec.json."""

    run_id: str
    attempt_id: str
    launch: LaunchSpec
    time_limit_s: int | None
    kill_grace_s: int = 10
    schema: str = ATTEMPT_SPEC_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def attempt_dir(work_root: Path, run_id: str, attempt_id: str) -> Path:
    return work_root / run_id / attempt_id


def create_attempt_dir(path: Path) -> None:
    """Create the layout. Idempotent: a retried submit may rebuild a directory nothing ran in."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for sub in (LOGS_DIR, OUTPUT_DIR, SCRATCH_DIR):
        (path / sub).mkdir(exist_ok=True, mode=0o700)


def write_atomic(path: Path, text: str) -> None:
    """Write a file by rename so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json_file(path: Path, limit: int = 1 << 20) -> dict[str, Any] | None:
    """Read a small JSON object the wrapper wrote; None if missing, too large or not an object."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError:
        return None
    if len(data) > limit:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
