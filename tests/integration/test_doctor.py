"""`hpc-compute doctor`: its sealing check runs a real job, so it must also catch a runtime
that does not seal (a fake bwrap that runs the command unsandboxed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bwrap

FAKE_BWRAP = """#!/bin/sh
# Pretends to be bubblewrap: drops every option and runs the command with full host access.
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done
shift
exec "$@"
"""


def _doctor(home: Path, **env: str) -> tuple[int, dict[str, dict[str, str]]]:
    full_env = {"PATH": os.environ["PATH"], "HOME": str(home), "HPC_COMPUTE_HOME": str(home), **env}
    done = subprocess.run(
        [sys.executable, "-m", "hpc_compute", "doctor", "--json"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    return done.returncode, checks


def test_doctor_reports_real_sealing(tmp_path: Path) -> None:
    rc, checks = _doctor(tmp_path)
    assert checks["sealing"]["status"] == "ok", checks["sealing"]
    assert "loopback-blocked" in checks["sealing"]["detail"]
    assert rc == 0


def test_doctor_catches_a_runtime_that_does_not_seal(tmp_path: Path) -> None:
    fake = tmp_path / "fake-bwrap"
    fake.write_text(FAKE_BWRAP)
    fake.chmod(0o755)
    rc, checks = _doctor(tmp_path, HPC_COMPUTE_LOCAL__BWRAP=str(fake))
    assert checks["sealing"]["status"] == "fail", checks["sealing"]
    assert "NOT SEALED" in checks["sealing"]["detail"] and "loopback-reached" in checks["sealing"]["detail"]
    assert rc == 1
