"""The job spec: what a user asks to run, validated before anything is written to the ledger.

Rules are checked here once; every error names the field (``resources.memory``) and the rule.
Checks that depend on this host (an input path exists, a backend is configured) live in
:func:`check_submittable`, so a spec read back from the ledger later never fails to parse.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpc_compute.errors import SpecError
from hpc_compute.units import parse_duration, parse_size

KNOWN_BACKENDS = ("local", "slurm", "opennebula")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INPUT_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
SITE_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Environment names the sandbox sets itself; a job may not override them.
RESERVED_ENV = frozenset({"HOME", "PATH", "PWD", "TMPDIR", "CUDA_VISIBLE_DEVICES", "HPCC_RUN_ID", "HPCC_ATTEMPT_ID"})

MAX_MEMORY = 64 * 1024**4
MAX_TIME = 366 * 86400


class FailureKind(StrEnum):
    """Why a run failed. The first four are the job's own doing; the rest are infrastructure."""

    EXIT_CODE = "exit_code"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    OOM = "oom"
    NODE_FAIL = "node_fail"
    PREEMPTED = "preempted"
    BOOT_FAILURE = "boot_failure"
    SETUP = "setup"
    SUBMIT_ERROR = "submit_error"
    LOST = "lost"


JOB_FAILURES = frozenset({FailureKind.EXIT_CODE, FailureKind.SIGNAL, FailureKind.TIMEOUT, FailureKind.OOM})
INFRA_FAILURES = frozenset(
    {FailureKind.NODE_FAIL, FailureKind.PREEMPTED, FailureKind.BOOT_FAILURE, FailureKind.LOST, FailureKind.SUBMIT_ERROR}
)


def _size(value: Any) -> int:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return parse_size(value)
    raise ValueError("must be a size such as 512M or 4G")


def _duration(value: Any) -> int:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return parse_duration(value)
    raise ValueError("must be a duration such as 90s, 10m, 2h or HH:MM:SS")


Size = Annotated[int, BeforeValidator(_size)]
Duration = Annotated[int, BeforeValidator(_duration)]


def _no_control(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class Resources(_Strict):
    cpus: int = Field(default=1, ge=1, le=1024, description="CPU cores")
    memory: Size = Field(default=1024**3, description="memory limit in bytes (512M, 4G)")
    gpus: int = Field(default=0, ge=0, le=64)
    gpu_type: str | None = Field(default=None, description="GPU type for --gres=gpu:TYPE:N")
    time_limit: Duration = Field(default=3600, description="wall-clock limit in seconds (90s, 10m, 2h)")

    @field_validator("memory")
    @classmethod
    def _memory_range(cls, value: int) -> int:
        if value < 1024**2:
            raise ValueError("must be at least 1M")
        if value > MAX_MEMORY:
            raise ValueError("must be at most 64T")
        return value

    @field_validator("time_limit")
    @classmethod
    def _time_range(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1s")
        if value > MAX_TIME:
            raise ValueError("must be at most 366 days")
        return value

    @field_validator("gpu_type")
    @classmethod
    def _gpu_type(cls, value: str | None) -> str | None:
        if value is not None and not SITE_VALUE_RE.match(value):
            raise ValueError("may hold only letters, digits, '.', '_' and '-' (at most 64)")
        return value


class InputSpec(_Strict):
    source: str = Field(description="host path, mounted read-only")
    name: str = Field(description="name under /input")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        _no_control(value, "an input source")
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not INPUT_NAME_RE.match(value) or value in {".", ".."}:
            raise ValueError("must be one path component of letters, digits, '.', '_' or '-' (not '.' or '..')")
        return value


class RetryPolicy(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=20, description="attempts in all, the first included")
    also_retry: tuple[FailureKind, ...] = Field(
        default=(), description="job failure kinds to retry too (infrastructure failures always are)"
    )
    backoff: Duration = Field(default=10, description="wait before the second attempt; doubles after")


class Placement(_Strict):
    """Site placement for batch backends; values are checked against a safe alphabet."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False

    @field_validator("partition", "account", "qos")
    @classmethod
    def _site_value(cls, value: str | None) -> str | None:
        if value is not None and not SITE_VALUE_RE.match(value):
            raise ValueError("may hold only letters, digits, '.', '_' and '-' (at most 64)")
        return value


class JobSpec(_Strict):
    image: str = Field(default="host", description="'host', a rootfs directory, or a local .sif file")
    command: tuple[str, ...] = Field(description="argv, run without a shell")
    inputs: tuple[InputSpec, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    backend: str = "local"
    labels: dict[str, str] = Field(default_factory=dict)
    name: str | None = None
    kind: str | None = None
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    placement: Placement = Field(default_factory=Placement)
    owner: str | None = None

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        _no_control(value, "an image")
        if SCHEME_RE.match(value):
            raise ValueError(
                "remote images (scheme://) are refused; give a local .sif path, a rootfs directory or 'host'"
            )
        if value != "host" and not value.startswith("/"):
            raise ValueError("must be 'host' or an absolute path")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must hold at least the program to run")
        if not value[0]:
            raise ValueError("the program (first element) must not be empty")
        for arg in value:
            _no_control(arg, "an argument")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not ENV_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
            if key in RESERVED_ENV:
                raise ValueError(f"{key!r} is set by the sandbox and cannot be overridden")
            _no_control(val, f"the value of {key}")
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in KNOWN_BACKENDS:
            raise ValueError(f"unknown backend {value!r}; known: {', '.join(KNOWN_BACKENDS)}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not LABEL_KEY_RE.match(key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY_RE.pattern}")
            if len(val) > 256 or any(ord(c) < 32 for c in val):
                raise ValueError(f"label {key!r}: value must be at most 256 printable characters")
        return value

    @field_validator("name", "kind", "owner")
    @classmethod
    def _short_text(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value or len(value) > 128 or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must be 1 to 128 printable characters on one line")
        return value

    @model_validator(mode="after")
    def _unique_inputs(self) -> JobSpec:
        names = [i.name for i in self.inputs]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise SpecError(f"inputs[{index}].name", f"{name!r} is used twice")
        return self

    def canonical_json(self) -> str:
        """The spec as sorted, compact JSON: what is stored and hashed."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "spec"


def spec_error_from(exc: ValidationError) -> SpecError:
    """The first validation error as a SpecError naming the field."""
    first = exc.errors()[0]
    loc = tuple(p for p in first["loc"] if p not in ("function-after",))
    raised = (first.get("ctx") or {}).get("error")
    if isinstance(raised, SpecError):  # a validator that names a sub-field itself
        where = _loc(loc)
        return SpecError(raised.field if where == "spec" else f"{where}.{raised.field}", raised.rule)
    message = str(first["msg"])
    message = message.removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not a known field"
    elif first["type"] == "missing":
        message = "is required"
    return SpecError(_loc(loc), message)


def parse_spec(data: Any) -> JobSpec:
    """Validate a mapping into a JobSpec, raising SpecError (never a raw pydantic error)."""
    if not isinstance(data, dict):
        raise SpecError("spec", "must be a mapping of fields")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error_from(exc) from None


def load_spec_file(path: str | Path) -> JobSpec:
    """Read a job from a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file."""
    return parse_spec(load_spec_mapping(path))


def load_spec_mapping(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError("file", f"cannot read {file}: {exc.strerror}") from None
    try:
        if file.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif file.suffix in {".yaml", ".yml", ".json"}:
            data = yaml.safe_load(text)
        else:
            raise SpecError("file", "must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SpecError("file", f"{file} is not valid {file.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError("file", f"{file} must hold a mapping of job fields")
    return data


def check_submittable(spec: JobSpec) -> None:
    """Host-dependent rules, checked once at submission: inputs exist and are readable."""
    for index, item in enumerate(spec.inputs):
        source = Path(item.source)
        if not source.is_absolute():
            raise SpecError(f"inputs[{index}].source", "must be an absolute path")
        if not source.exists():
            raise SpecError(f"inputs[{index}].source", f"{item.source} does not exist")
        if not os.access(source, os.R_OK):
            raise SpecError(f"inputs[{index}].source", f"{item.source} is not readable")
    if spec.image not in {"host"}:
        image = Path(spec.image)
        if not image.exists():
            raise SpecError("image", f"{spec.image} does not exist")
