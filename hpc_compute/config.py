"""Settings: built-in defaults < system file < user file < environment < explicit arguments.

* system file: ``/etc/hpc-compute/config.toml`` (admin-managed, e.g. by the Ansible role); the
  admin *floors* (``min_poll_interval``) set there cannot be lowered by users.
* user file: ``$HPC_COMPUTE_CONFIG``, else ``$XDG_CONFIG_HOME/hpc-compute/config.toml``.
* environment: ``HPC_COMPUTE_HOME``, ``HPC_COMPUTE_LEDGER_URL``, and ``HPC_COMPUTE_<SECTION>__<KEY>``
  for any other setting (``HPC_COMPUTE_LOCAL__MAX_PARALLEL=4``).
"""

from __future__ import annotations

import os
import pwd
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpc_compute.errors import ConfigError
from hpc_compute.harvest import HarvestLimits
from hpc_compute.ledger.db import sqlite_url
from hpc_compute.units import parse_duration

SYSTEM_CONFIG = Path("/etc/hpc-compute/config.toml")
ENV_PREFIX = "HPC_COMPUTE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalSettings(_Section):
    runtime: str = "bubblewrap"
    bwrap: str = "bwrap"
    python: str = "/usr/bin/python3"
    max_parallel: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1) * 2, ge=1)
    gpus: int = Field(default=0, ge=0, description="GPUs this host may hand out (none by default)")
    reconcile_grace_s: float = Field(default=10.0, ge=0, description="wait before an unclaimed attempt is abandoned")


class HarvestSettings(_Section):
    max_files: int = Field(default=10_000, ge=1)
    max_total_bytes: int = Field(default=10 * 1024**3, ge=0)
    max_depth: int = Field(default=32, ge=1)

    def limits(self) -> HarvestLimits:
        return HarvestLimits(max_files=self.max_files, max_total_bytes=self.max_total_bytes, max_depth=self.max_depth)


def _seconds(value: Any) -> Any:
    """Durations in config: a number of seconds (fractions allowed) or ``90s``, ``10m``, ``2h``."""
    if isinstance(value, str):
        stripped = value.strip()
        try:
            return float(stripped)
        except ValueError:
            return float(parse_duration(stripped))
    return value


Seconds = Annotated[float, BeforeValidator(_seconds)]


class SchedulerSettings(_Section):
    poll_interval: float = Field(default=2.0, gt=0, description="seconds between polls when idle")
    min_poll_interval: float = Field(default=0.5, gt=0, description="admin floor")
    lease_seconds: float = Field(default=60.0, gt=0)
    stall_seconds: Seconds = Field(
        default=900.0,
        gt=0,
        description=(
            "leases are renewed from a thread of their own while the cycle loop progresses; a loop "
            "stuck longer than this stops renewing, so another scheduler takes its attempts over"
        ),
    )
    submit_batch: int = Field(
        default=64,
        ge=1,
        description="queued runs claimed per backend and cycle (a backend building job arrays: up to array_max)",
    )
    kind_limits: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict,
        description="active attempts per run kind across every scheduler of the ledger ({training = 2})",
    )
    max_in_flight_per_owner: int | None = Field(
        default=None, ge=0, description="active attempts per owner across every scheduler of the ledger"
    )
    time_limit_grace: Seconds = Field(
        default=120.0,
        ge=0,
        description="an attempt running longer than its time limit plus this is cancelled and fails as timeout",
    )
    max_queue_time: Seconds | None = Field(
        default=None,
        gt=0,
        description="an attempt pending in its backend longer than this is cancelled and fails as timeout",
    )


class WebhookSettings(_Section):
    """One webhook target. The secret signs every delivery (``X-HPCC-Signature``)."""

    url: str
    secret: str | None = Field(default=None, repr=False)
    secret_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookSettings:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret and secret_file")
        if self.secret is not None and not self.secret:
            raise ValueError("secret must not be empty")
        return self

    def read_secret(self) -> bytes:
        if self.secret is not None:
            return self.secret.encode()
        assert self.secret_file is not None
        try:
            value = self.secret_file.expanduser().read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"notify webhook {self.url}: cannot read secret_file {self.secret_file}: {exc}") from exc
        if not value:
            raise ConfigError(f"notify webhook {self.url}: secret_file {self.secret_file} is empty")
        return value


class NotifySettings(_Section):
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    hooks: bool = Field(default=True, description="call the hpc_compute.hooks entry points too")
    timeout: Seconds = Field(default=10.0, gt=0, description="seconds per webhook request")
    max_attempts: int = Field(default=1000, ge=1, description="tries per notification before giving up")
    batch: int = Field(default=100, ge=1, description="notifications delivered per scheduler cycle at most")
    backoff: Seconds = Field(default=2.0, gt=0, description="first retry delay; doubles, with jitter")
    max_backoff: Seconds = Field(default=3600.0, gt=0)
    keep_delivered: Seconds = Field(default=7 * 86400.0, ge=0, description="delivered rows are deleted after this")


class Settings(_Section):
    home: Path
    ledger_url: str
    owner: str = Field(default_factory=lambda: os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name)
    local: LocalSettings = Field(default_factory=LocalSettings)
    harvest: HarvestSettings = Field(default_factory=HarvestSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    slurm: dict[str, Any] = Field(default_factory=dict)
    opennebula: dict[str, Any] = Field(default_factory=dict)

    @property
    def work_root(self) -> Path:
        return self.home / "runs"

    @property
    def artifact_root(self) -> Path:
        return self.home / "artifacts"

    @property
    def effective_poll_interval(self) -> float:
        return max(self.scheduler.poll_interval, self.scheduler.min_poll_interval)


def default_home(env: dict[str, str]) -> Path:
    data = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", str(Path.home()))) / ".local" / "share")
    return Path(data) / "hpc-compute"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    """``HPC_COMPUTE_<FIELD>`` and ``HPC_COMPUTE_<SECTION>__<KEY>``. Only names of real settings
    are taken, so an unrelated variable that shares the prefix cannot break start-up; a wrong key
    inside a known section is still an error."""
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in {f"{ENV_PREFIX}CONFIG"}:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        parts = key.split("__")
        if parts[0] not in Settings.model_fields:
            continue
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_settings(
    overrides: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
    system_file: Path = SYSTEM_CONFIG,
) -> Settings:
    environ = dict(os.environ if env is None else env)
    system = _read_toml(system_file)
    user_path = environ.get(f"{ENV_PREFIX}CONFIG")
    if user_path:
        user_file = Path(user_path)
        if not user_file.exists():
            raise ConfigError(f"HPC_COMPUTE_CONFIG names {user_file}, which does not exist")
    else:
        xdg = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", str(Path.home()))) / ".config")
        user_file = Path(xdg) / "hpc-compute" / "config.toml"
    merged = _merge(_merge(system, _read_toml(user_file)), _env_overrides(environ))
    merged = _merge(merged, overrides or {})
    home = Path(merged.get("home") or default_home(environ)).expanduser()
    merged["home"] = home
    merged.setdefault("ledger_url", sqlite_url(home / "ledger.db"))
    floor = system.get("scheduler", {}).get("min_poll_interval")
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config {where}: {first['msg']}") from None
    if floor is not None and settings.scheduler.min_poll_interval < float(floor):
        settings.scheduler.min_poll_interval = float(floor)
    slurm_floor = system.get("slurm", {}).get("min_poll_interval")
    if settings.slurm:
        if slurm_floor is not None:
            current = float(settings.slurm.get("min_poll_interval", 0) or 0)
            settings.slurm["min_poll_interval"] = max(current, float(slurm_floor))
        from hpc_compute.backends.slurm.config import SlurmSettings

        SlurmSettings.from_mapping(settings.slurm)  # a bad [slurm] section fails here, with its field named
    return settings
