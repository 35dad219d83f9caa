"""The built wheel carries what runs (wrapper, templates, migrations): install it into a fresh
virtualenv, outside the checkout, and run a sealed job with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        cwd=out,
    )
    (built,) = out.glob("hpc_compute-*.whl")
    return built


def test_wheel_contains_runtime_resources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hpc_compute/_data/sbatch/hpcc_wrapper.py" in names
    assert "hpc_compute/_data/alembic/env.py" in names
    assert any(n.startswith("hpc_compute/_data/alembic/versions/0001") for n in names)
    assert "hpc_compute/py.typed" in names
    assert any(n.startswith("hpc_compute/_data/templates/") for n in names)


def test_installed_wheel_runs_a_sealed_job_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # System site packages provide the dependencies (no network needed); the wheel itself goes
    # into the venv, which shadows the editable checkout.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True)
    env = {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "HPC_COMPUTE_HOME": str(tmp_path / "h"),
    }
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import hpc_compute.resources as r; print(r.wrapper_path())"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)) and "/_data/sbatch/" in where, where
    cli = str(venv / "bin" / "hpc-compute")
    subprocess.run([cli, "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True)
    done = subprocess.run(
        [cli, "submit", "--wait", "--json", "--", "/bin/sh", "-c", "echo packaged > /output/p.txt; exit 5"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 5, done.stderr
    summary = json.loads(done.stdout)
    assert summary["state"] == "failed" and summary["exit_code"] == 5
    listed = subprocess.run(
        [cli, "artifacts", summary["id"], "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert [a["path"] for a in json.loads(listed.stdout)] == ["p.txt"]
