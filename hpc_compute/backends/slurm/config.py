"""Site settings of the Slurm backend, read from the ``[slurm]`` table of the configuration.

Every value that reaches an ``#SBATCH`` line is validated here or in :mod:`.script`; none comes
from a user's job spec except the validated placement values (partition, account, qos).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hpc_compute.errors import ConfigError

SITE_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
OPTION_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
OPTION_VALUE_RE = re.compile(r"^[A-Za-z0-9._:=,/@+-]*$")

#: options the template sets itself; an allow-list may never override them
RESERVED_OPTIONS = frozenset(
    {
        "job-name",
        "comment",
        "export",
        "export-file",
        "requeue",
        "no-requeue",
        "output",
        "error",
        "input",
        "chdir",
        "wrap",
        "partition",
        "account",
        "qos",
        "cpus-per-task",
        "mem",
        "mem-per-cpu",
        "mem-per-gpu",
        "time",
        "gres",
        "gpus",
        "gpus-per-node",
        "exclusive",
        "nodes",
        "ntasks",
        "signal",
        "get-user-env",
        "uid",
        "gid",
        "parsable",
    }
)


def _site_value(value: str | None, what: str) -> str | None:
    if value is not None and not SITE_VALUE_RE.match(value):
        raise ValueError(f"{what} may hold only letters, digits, '.', '_' and '-' (at most 64)")
    return value


class SshSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "localhost"
    port: int = Field(default=22, ge=1, le=65535)
    user: str | None = None
    key_file: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout: float = Field(default=15.0, gt=0)
    keepalive: int = Field(default=30, ge=0, description="seconds between SSH keepalives (0: off)")


class SlurmSettings(BaseModel):
    """The ``settings.slurm`` mapping, validated."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    partitions: tuple[str, ...] | None = Field(
        default=None, description="partitions a job may name (None: any value of the safe alphabet)"
    )
    account: str | None = None
    qos: str | None = None
    gpu_style: Literal["gres", "gpus", "gpus-per-node"] = "gres"
    gpu_type: str | None = None
    max_node_gpus: int | None = Field(default=None, ge=0, description="refuse jobs asking for more GPUs early")
    runtime: Literal["apptainer", "bubblewrap"] = "apptainer"
    apptainer: str = "apptainer"
    bwrap: str = "/usr/bin/bwrap"
    python: str = "/usr/bin/python3"
    wrapper: str | None = Field(default=None, description="the wrapper's path on the nodes (default: staged copy)")
    allow_requeue: bool = False
    keep_outputs: bool = Field(
        default=False, description="keep output/ and scratch/ in the attempt directory after harvest"
    )
    strict_submit: bool = Field(
        default=True,
        description="submit held (sbatch --hold), commit the job id under the fence, then scontrol release",
    )
    allowed_extra_options: tuple[str, ...] = ()
    extra_sbatch_options: dict[str, str] = Field(default_factory=dict)
    max_in_flight: int = Field(default=1000, ge=1, description="jobs one scheduler keeps submitted at most")
    submit_parallel: int = Field(default=4, ge=1, le=64, description="sbatch calls one scheduler runs at once")
    array_min: int = Field(
        default=8,
        ge=0,
        description=(
            "alike runs (same resources and placement) claimed together, at least this many, "
            "go as one job array (0: never)"
        ),
    )
    array_max: int = Field(default=1000, ge=1, description="tasks per job array at most (below Slurm's MaxArraySize)")
    array_throttle: int | None = Field(
        default=None, ge=1, description="tasks of one array running at once (--array=...%N)"
    )
    export_env: Literal["scrubbed", "none"] = Field(
        default="scrubbed",
        description=(
            "how no scheduler environment reaches a job: 'scrubbed' runs sbatch under 'env -i' with only "
            "PATH (job_path), LANG and SLURM_CONF, with --export=ALL; 'none' uses --export=NONE, which "
            "Slurm 22.05 pays for with a slower start of every job (see bench/RESULTS.md)"
        ),
    )
    job_path: str = Field(default="/usr/local/bin:/usr/bin:/bin", description="PATH of a job (export_env=scrubbed)")
    min_poll_interval: float = Field(default=1.0, ge=0)
    sacct_chunk: int = Field(default=200, ge=1, le=5000)
    reconcile_grace_s: float = Field(default=120.0, ge=0)
    sacct_slack_s: float = Field(default=600.0, ge=0)
    command_timeout: float = Field(default=60.0, gt=0)
    sbatch_timeout: float = Field(default=120.0, gt=0)
    accounting: Literal["auto", "on", "off"] = "auto"
    transport: Literal["local", "ssh"] = "local"
    ssh: SshSettings = Field(default_factory=SshSettings)
    remote_work_root: str | None = Field(
        default=None, description="the work root as the cluster sees it (default: the same path as here)"
    )
    bin_dir: str | None = Field(default=None, description="directory of the Slurm commands (default: PATH)")

    @field_validator("partition", "account", "qos", "gpu_type")
    @classmethod
    def _site(cls, value: str | None) -> str | None:
        return _site_value(value, "this value")

    @field_validator("job_path")
    @classmethod
    def _path_list(cls, value: str) -> str:
        if not re.fullmatch(r"/[A-Za-z0-9_./+-]*(:/[A-Za-z0-9_./+-]*)*", value):
            raise ValueError("must be absolute directories separated by ':' (letters, digits, _ . / + - only)")
        return value

    @field_validator("partitions")
    @classmethod
    def _partitions(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for item in value or ():
            _site_value(item, "a partition")
        return value

    @field_validator("python", "bwrap", "wrapper", "remote_work_root", "bin_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must be an absolute path without control characters")
        return value

    @model_validator(mode="after")
    def _extra_options(self) -> SlurmSettings:
        for name in self.allowed_extra_options:
            if not OPTION_NAME_RE.match(name):
                raise ValueError(f"allowed_extra_options: {name!r} is not an sbatch long option name")
            if name in RESERVED_OPTIONS:
                raise ValueError(f"allowed_extra_options: --{name} is set by hpc-compute itself")
        for name, value in self.extra_sbatch_options.items():
            if name not in self.allowed_extra_options:
                raise ValueError(f"extra_sbatch_options: --{name} is not in allowed_extra_options")
            if not OPTION_VALUE_RE.match(value) or "\n" in value:
                raise ValueError(f"extra_sbatch_options: the value of --{name} must match {OPTION_VALUE_RE.pattern}")
        return self

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> SlurmSettings:
        try:
            return cls.model_validate(data or {})
        except Exception as exc:  # pydantic.ValidationError: one readable message
            errors = getattr(exc, "errors", None)
            if callable(errors):
                first = errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ConfigError(f"config slurm.{where}: {first['msg']}") from None
            raise ConfigError(f"config slurm: {exc}") from None
