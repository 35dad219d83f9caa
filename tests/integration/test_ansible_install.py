"""The admin path: ansible/playbooks/install.yml installs hpc-compute (venv, site config, ledger
migration) on localhost; a second run changes nothing; the installed CLI runs a sealed job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.bwrap


def _playbook(extra: dict[str, object]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ansible-playbook",
            "-i",
            str(REPO / "ansible/inventory/localhost.yml"),
            str(REPO / "ansible/playbooks/install.yml"),
            "-e",
            json.dumps({"hpcc_install_hosts": "dev_cluster", **extra}),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_install_playbook_is_idempotent_and_the_install_works(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
    )
    (wheel,) = dist.glob("hpc_compute-*.whl")
    extra = {
        "hpcc_service_package": str(wheel),
        "hpcc_service_python": sys.executable,
        "hpcc_service_venv": str(tmp_path / "venv"),
        "hpcc_service_venv_site_packages": True,
        "hpcc_service_home": str(tmp_path / "home"),
        "hpcc_service_config_dir": str(tmp_path / "etc"),
        "hpcc_service_create_user": False,
        "hpcc_service_user": "root",
        "hpcc_service_group": "root",
        "hpcc_service_systemd": False,
        "hpcc_service_min_poll_interval": 3,
    }
    first = _playbook(extra)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    second = _playbook(extra)
    assert second.returncode == 0, second.stdout[-3000:]
    recap = re.search(r"changed=(\d+)", second.stdout)
    assert recap is not None and recap.group(1) == "0", second.stdout[-3000:]

    config = (tmp_path / "etc" / "config.toml").read_text()
    assert "min_poll_interval = 3" in config
    env = {
        "PATH": f"{tmp_path / 'venv' / 'bin'}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "HPC_COMPUTE_CONFIG": str(tmp_path / "etc" / "config.toml"),
    }
    cli = str(tmp_path / "venv" / "bin" / "hpc-compute")
    done = subprocess.run(
        [cli, "submit", "--wait", "--json", "--", "/bin/sh", "-c", "echo installed > /output/i.txt"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "succeeded"
    assert (tmp_path / "home" / "ledger.db").exists(), "the run went into the configured home"
