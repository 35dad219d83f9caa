"""Settings of the OpenNebula backend, validated from the ``[opennebula]`` config section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from hpc_compute.errors import ConfigError


class OpenNebulaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # -- the cloud ----------------------------------------------------------------------------
    endpoint: str = Field(description="oned's XML-RPC URL, e.g. https://one.example.org:2633/RPC2")
    session: SecretStr | None = Field(default=None, description="'user:password' or 'user:token'")
    session_file: Path | None = Field(default=None, description="file holding the session (one_auth format)")
    https_verify: bool | str = Field(default=True, description="True, False or a CA bundle path")
    rpc_timeout_s: float = Field(default=20.0, gt=0, description="timeout of every XML-RPC call")
    template_id: int = Field(ge=0, description="the worker VM template")
    network_id: int | None = Field(default=None, description="pick the NIC on this network (else NIC 0)")
    context: dict[str, str] = Field(
        default_factory=dict, description="extra CONTEXT attributes (the whole CONTEXT vector is resent)"
    )
    labels: str = Field(default="hpc-compute", description="extra LABELS every VM carries (comma separated)")
    size_from_spec: bool = Field(default=True, description="set CPU/VCPU/MEMORY from the job's resources")

    # -- deadlines per stage ------------------------------------------------------------------
    pending_timeout_s: float = Field(default=900.0, gt=0, description="PENDING (no capacity) before boot_failure")
    boot_timeout_s: float = Field(default=600.0, gt=0, description="PROLOG/BOOT before boot_failure")
    ssh_timeout_s: float = Field(default=300.0, gt=0, description="RUNNING until READY and SSH login work")
    unreachable_timeout_s: float = Field(default=1200.0, gt=0, description="a running job's VM unreachable: lost")
    lease_margin_s: int = Field(default=900, ge=60, description="SCHED_ACTION terminate-hard at time limit + this")

    # -- SSH ----------------------------------------------------------------------------------
    host_key_policy: Literal["pinned", "tofu"] = Field(
        default="pinned", description="pinned: the key the guest published via OneGate; tofu: first key seen"
    )
    ssh_user: str = "root"
    ssh_port: int = Field(default=22, ge=1, le=65535)
    ssh_connect_timeout_s: float = Field(default=10.0, gt=0)
    ssh_io_timeout_s: float = Field(default=30.0, gt=0)

    # -- the guest ----------------------------------------------------------------------------
    remote_work_dir: str = Field(default="/var/tmp/hpcc", description="attempt directories on the VM")
    python: str = Field(default="/usr/bin/python3", description="python3 on the VM (runs the wrapper)")
    runtime: str = Field(default="bubblewrap", description="runtime on the VM")
    runtime_executable: str | None = Field(default=None, description="e.g. /usr/bin/bwrap on the VM")

    # -- pacing -------------------------------------------------------------------------------
    max_parallel: int = Field(default=16, ge=1, description="VMs at once")
    provision_poll_s: float = Field(default=3.0, gt=0, description="vm.info interval while a VM boots")
    probe_interval_s: float = Field(default=5.0, gt=0, description="SSH status probe of a running job")
    pool_refresh_s: float = Field(default=5.0, gt=0, description="minimum age of the vmpool snapshot")
    sweep_enabled: bool = Field(
        default=True, description="sweep hpcc-* VMs whose attempt is not active in the ledger"
    )
    sweep_interval_s: float = Field(default=120.0, gt=0, description="orphan sweep at most this often")
    sweep_grace_s: float = Field(default=300.0, ge=0, description="an unknown hpcc-* VM is swept once this old")
    terminate_retry_s: float = Field(default=10.0, gt=0, description="retry a refused terminate after this")
    reconcile_grace_s: float = Field(default=60.0, ge=0, description="absent this long after submit: not submitted")
    max_log_bytes: int = Field(default=256 * 1024**2, ge=0, description="per log file copied back")

    @model_validator(mode="after")
    def _check(self) -> OpenNebulaSettings:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("endpoint must be an http(s):// XML-RPC URL (…/RPC2)")
        if self.session is None and self.session_file is None:
            raise ValueError("give session or session_file")
        if not self.remote_work_dir.startswith("/") or ".." in self.remote_work_dir.split("/"):
            raise ValueError("remote_work_dir must be an absolute path without '..'")
        if not self.python.startswith("/"):
            raise ValueError("python must be an absolute path on the VM")
        return self

    def session_string(self) -> str:
        if self.session is not None:
            return self.session.get_secret_value().strip()
        assert self.session_file is not None
        try:
            text = self.session_file.expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"opennebula.session_file {self.session_file}: {exc.strerror}") from None
        if ":" not in text:
            raise ConfigError(f"opennebula.session_file {self.session_file} does not hold 'user:password'")
        return text.splitlines()[0].strip()


def load_opennebula_settings(section: dict[str, Any]) -> OpenNebulaSettings:
    try:
        return OpenNebulaSettings.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"config opennebula{'.' + where if where else ''}: {first['msg']}") from None
