"""Configuration precedence and admin floors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_compute.config import load_settings
from hpc_compute.errors import ConfigError


def _load(tmp_path: Path, system: str = "", user: str = "", env: dict[str, str] | None = None, **overrides: object):
    (tmp_path / "system.toml").write_text(system)
    (tmp_path / "user.toml").write_text(user)
    environ = {"HOME": str(tmp_path), "HPC_COMPUTE_CONFIG": str(tmp_path / "user.toml"), **(env or {})}
    return load_settings(dict(overrides), env=environ, system_file=tmp_path / "system.toml")


def test_precedence_defaults_system_user_env(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        system="[local]\nmax_parallel = 3\ngpus = 1\n",
        user="[local]\nmax_parallel = 5\n",
        env={"HPC_COMPUTE_LOCAL__GPUS": "2"},
    )
    assert settings.local.max_parallel == 5  # user file over system file
    assert settings.local.gpus == 2  # environment over both
    assert settings.harvest.max_files == 10_000  # built-in default


def test_admin_floors_cannot_be_lowered(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        system="[scheduler]\nmin_poll_interval = 5\n[slurm]\nruntime = 'bubblewrap'\nmin_poll_interval = 30\n",
        user="[scheduler]\nmin_poll_interval = 0.1\n[slurm]\nmin_poll_interval = 1\n",
    )
    assert settings.scheduler.min_poll_interval == 5
    assert settings.effective_poll_interval >= 5
    assert settings.slurm["min_poll_interval"] == 30


def test_a_bad_slurm_section_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"slurm\.gpu_style"):
        _load(tmp_path, user="[slurm]\ngpu_style = 'sideways'\n")


def test_unrelated_variables_with_the_prefix_are_ignored_but_typos_in_sections_are_not(tmp_path: Path) -> None:
    assert _load(tmp_path, env={"HPC_COMPUTE_SOMETHING_ELSE": "x"}).local.max_parallel >= 1
    with pytest.raises(ConfigError, match="max_paralel"):
        _load(tmp_path, env={"HPC_COMPUTE_LOCAL__MAX_PARALEL": "2"})


def test_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env={"HOME": str(tmp_path), "HPC_COMPUTE_CONFIG": str(tmp_path / "nope.toml")})
