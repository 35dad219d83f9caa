"""``hpc-compute doctor``: what is installed, reachable and migrated, and whether sealing holds here.

The sealing check is not a flag test: it runs a real sealed job through the job-side wrapper
that tries to reach a TCP listener this process opens on loopback, reads a canary variable
from the host environment and writes into its read-only input.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from hpc_compute.config import Settings
from hpc_compute.errors import HpcComputeError
from hpc_compute.resources import wrapper_path
from hpc_compute.rundir import (
    OUTPUT_DIR,
    RESULT_FILE,
    SCRATCH_DIR,
    SPEC_FILE,
    STDOUT_FILE,
    AttemptSpec,
    create_attempt_dir,
)
from hpc_compute.runtimes import SandboxPlan, build_launch

PROBE = r"""
import os, socket, sys
port = int(sys.argv[1])
report = []
try:
    socket.create_connection(("127.0.0.1", port), timeout=2).close(); report.append("loopback-reached")
except OSError: report.append("loopback-blocked")
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2).close(); report.append("internet-reached")
except OSError: report.append("internet-blocked")
report.append("canary-leaked" if "HPCC_DOCTOR_CANARY" in os.environ else "env-clean")
try:
    open("/input/probe/x", "w").write("x"); report.append("input-writable")
except OSError: report.append("input-readonly")
print(" ".join(report))
"""


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _ledger_check(settings: Settings) -> Check:
    from hpc_compute.ledger import db
    from hpc_compute.ledger.store import Ledger

    try:
        ledger = Ledger(settings.ledger_url, auto_upgrade=False)
        current = db.current_revision(ledger.engine)
        head = db.head_revision()
        ledger.close()
    except Exception as exc:
        return Check("ledger", "fail", f"{db.safe_url(settings.ledger_url)} unreachable: {exc}")
    if current != head:
        status = "warn" if db.is_sqlite(settings.ledger_url) else "fail"
        return Check("ledger", status, f"at revision {current or 'none'}, head is {head}: run `hpc-compute db upgrade`")
    return Check("ledger", "ok", f"{db.safe_url(settings.ledger_url)} at revision {current}")


def sealing_probe(settings: Settings) -> Check:
    """Run the probe job sealed and report what it could reach."""
    if shutil.which(settings.local.bwrap) is None:
        return Check("sealing", "fail", f"{settings.local.bwrap} not found: the local backend cannot run jobs")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    reached = threading.Event()

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            reached.set()
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory(prefix="hpcc-doctor-") as tmp:
        base = Path(tmp)
        attempt = base / "attempt"
        create_attempt_dir(attempt)
        probe_in = base / "probe"
        probe_in.mkdir()
        plan = SandboxPlan(
            run_id="doctor",
            attempt_id="doctor",
            image="host",
            command=("/usr/bin/python3", "-c", PROBE, str(port)),
            env={},
            inputs=((str(probe_in), "probe"),),
            output_dir=str(attempt / OUTPUT_DIR),
            scratch_dir=str(attempt / SCRATCH_DIR),
        )
        try:
            launch = build_launch(settings.local.runtime, plan, executable=settings.local.bwrap)
        except HpcComputeError as exc:
            return Check("sealing", "fail", str(exc))
        spec = AttemptSpec(run_id="doctor", attempt_id="doctor", launch=launch, time_limit_s=30)
        (attempt / SPEC_FILE).write_text(spec.to_json())
        env = {"PATH": "/usr/bin:/bin", "HPCC_DOCTOR_CANARY": "secret"}
        try:
            subprocess.run(
                [settings.local.python, str(wrapper_path()), str(attempt)], env=env, timeout=60, capture_output=True
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Check("sealing", "fail", f"probe job did not run: {exc}")
        listener.close()
        report_file = attempt / STDOUT_FILE
        if not report_file.exists() or not report_file.read_text().strip():
            result = (attempt / RESULT_FILE).read_text() if (attempt / RESULT_FILE).exists() else "{}"
            setup = json.loads(result).get("setup_error")
            return Check("sealing", "fail", f"probe job did not report: {setup or 'no result'}")
        report = report_file.read_text().split()
        if reached.is_set():
            report.append("listener-saw-connection")
    bad = [r for r in report if r in {"loopback-reached", "internet-reached", "canary-leaked", "input-writable"}]
    bad += ["listener-saw-connection"] if "listener-saw-connection" in report else []
    if bad:
        return Check("sealing", "fail", "NOT SEALED: " + ", ".join(bad))
    return Check("sealing", "ok", "network unreachable, host env hidden, /input read-only (" + " ".join(report) + ")")


def run_checks(settings: Settings) -> list[Check]:
    checks = [Check("python", "ok", sys.version.split()[0])]
    checks.append(_ledger_check(settings))
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        writable = os.access(settings.home, os.W_OK)
        checks.append(
            Check("home", "ok" if writable else "fail", f"{settings.home} {'writable' if writable else 'not writable'}")
        )
    except OSError as exc:
        checks.append(Check("home", "fail", f"{settings.home}: {exc}"))
    bwrap = shutil.which(settings.local.bwrap)
    if bwrap:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        checks.append(Check("bubblewrap", "ok", f"{bwrap} ({version})"))
    else:
        checks.append(Check("bubblewrap", "fail", "not installed (apt-get install bubblewrap)"))
    checks.append(sealing_probe(settings))
    for tool in ("sbatch", "squeue", "sacct"):
        path = shutil.which(tool)
        checks.append(Check(tool, "ok" if path else "warn", path or "not on PATH (needed only for the slurm backend)"))
    for module, purpose in (("psycopg", "Postgres ledgers"), ("paramiko", "SSH transport"), ("pyone", "OpenNebula")):
        try:
            __import__(module)
            checks.append(Check(module, "ok", f"installed ({purpose})"))
        except ImportError:
            checks.append(Check(module, "warn", f"not installed (needed only for {purpose})"))
    return checks
