"""The sbatch script: a constant Jinja template plus validated values the service built itself.

No user string (the job's name, environment, argv, labels) is ever rendered: those live in
spec.json. The values that are rendered are checked here, each by the rule of the place it goes:

* ``#SBATCH`` lines are parsed by sbatch (not by a shell) and end at a newline, so nothing with a
  newline, whitespace or a quote may appear there; ``--output``/``--error`` paths are Slurm
  filename patterns, so ``%`` is written ``%%``;
* the three shell values of the body (python, wrapper, attempt directory) are absolute paths
  without control characters, quoted with :func:`shlex.quote`.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jinja2

from hpc_compute.backends.slurm.config import (
    OPTION_NAME_RE,
    OPTION_VALUE_RE,
    RESERVED_OPTIONS,
    SITE_VALUE_RE,
    SlurmSettings,
)
from hpc_compute.errors import SpecError
from hpc_compute.resources import templates_dir
from hpc_compute.spec import JobSpec
from hpc_compute.units import format_slurm_time

TEMPLATE_NAME = "sbatch.sh.j2"
TAG_VALUE_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# A path that may stand on an #SBATCH line: absolute, and nothing sbatch could split or unquote.
SBATCH_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+@,:=%~-]*$")
GPU_STYLES = ("gres", "gpus", "gpus-per-node")
MIB = 1024 * 1024


class ScriptValueError(SpecError):
    """A value refused for the sbatch script (``field`` names what it was)."""


def _control(value: str) -> bool:
    """Control characters, and the Unicode line separators some readers break lines at."""
    return any(ord(c) < 32 or 127 <= ord(c) <= 159 or c in "\u2028\u2029" for c in value)


def shell_quote(value: Any) -> str:
    """An absolute path as one shell word (:func:`shlex.quote`); refuses control characters."""
    if not isinstance(value, str) or not value.startswith("/") or _control(value):
        raise ScriptValueError("script", f"{value!r} must be an absolute path without newlines or control characters")
    return shlex.quote(value)


def sbatch_path(value: Any) -> str:
    if not isinstance(value, str) or not SBATCH_PATH_RE.match(value) or "/../" in f"{value}/":
        raise ScriptValueError(
            "attempt_dir",
            f"{value!r} cannot stand on an #SBATCH line: it must be an absolute path of letters, digits"
            " and ._/+@,:=%~-",
        )
    return value


def slurm_pattern(value: Any) -> str:
    """A literal path for ``--output``/``--error``, where Slurm expands ``%j``, ``%u`` ...: ``%`` -> ``%%``."""
    return sbatch_path(value).replace("%", "%%")


def site_value(value: Any) -> str:
    if not isinstance(value, str) or not SITE_VALUE_RE.match(value):
        raise ScriptValueError("placement", f"{value!r} may hold only letters, digits, '.', '_' and '-' (at most 64)")
    return value


def tag_value(value: Any) -> str:
    if not isinstance(value, str) or not TAG_VALUE_RE.match(value):
        raise ScriptValueError("attempt_id", f"{value!r} is not an attempt id")
    return value


def count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ScriptValueError("resources", f"{value!r} is not a non-negative integer")
    return value


def slurm_time(value: Any) -> str:
    return format_slurm_time(count(value) or 1)


def option_name(value: Any) -> str:
    if not isinstance(value, str) or not OPTION_NAME_RE.match(value) or value in RESERVED_OPTIONS:
        raise ScriptValueError("extra_sbatch_options", f"{value!r} is not an allowed sbatch option")
    return value


def option_value(value: Any) -> str:
    if not isinstance(value, str) or not OPTION_VALUE_RE.match(value):
        raise ScriptValueError("extra_sbatch_options", f"{value!r} must match {OPTION_VALUE_RE.pattern}")
    return value


def export_mode(value: Any) -> str:
    if value not in ("ALL", "NONE"):
        raise ScriptValueError("export_env", f"{value!r} is not ALL or NONE")
    return str(value)


def unknown_gpu_style(value: Any) -> str:
    raise ScriptValueError("gpu_style", f"{value!r} is not one of {', '.join(GPU_STYLES)}")


FILTERS = {
    "shell_quote": shell_quote,
    "sbatch_path": sbatch_path,
    "slurm_pattern": slurm_pattern,
    "site_value": site_value,
    "tag_value": tag_value,
    "count": count,
    "slurm_time": slurm_time,
    "option_name": option_name,
    "option_value": option_value,
    "unknown_gpu_style": unknown_gpu_style,
    "export_mode": export_mode,
}


@lru_cache(maxsize=4)
def _environment(directory: str) -> jinja2.Environment:
    # shell text, not HTML: every value goes through one of the filters above instead
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    return env


@dataclass(frozen=True)
class ArrayValues:
    """One job array of alike attempts: task N runs the attempt in ``attempt_dirs[N]``."""

    tag: str  # the array's own tag: job name ``hpcc-arr-<tag>``
    attempt_dirs: tuple[str, ...]
    throttle: int | None = None  # at most this many tasks at once (``--array=0-9%2``)
    wrapper: str | None = None  # the site's wrapper path; None: each attempt's staged copy

    def context(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "attempt_dirs": list(self.attempt_dirs),
            "throttle": self.throttle,
            "wrapper": self.wrapper,
        }


@dataclass(frozen=True)
class ScriptValues:
    """Everything the template may see. Built by :func:`script_values`; user strings never get here."""

    attempt_id: str
    attempt_dir: str
    python: str
    wrapper: str
    cpus: int
    mem_mb: int
    time: int
    gpus: int = 0
    gpu_style: str = "gres"
    gpu_type: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False
    allow_requeue: bool = False
    export: str = "ALL"  # ALL (sbatch runs in a scrubbed environment) or NONE
    extra_options: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    array: ArrayValues | None = None

    def context(self) -> dict[str, Any]:
        return {
            "attempt_id": self.attempt_id,
            "attempt_dir": self.attempt_dir,
            "python": self.python,
            "wrapper": self.wrapper,
            "cpus": self.cpus,
            "mem_mb": self.mem_mb,
            "time": self.time,
            "gpus": self.gpus,
            "gpu_style": self.gpu_style,
            "gpu_type": self.gpu_type,
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "exclusive": bool(self.exclusive),
            "allow_requeue": bool(self.allow_requeue),
            "export": self.export,
            "array": None if self.array is None else self.array.context(),
            "extra_options": list(self.extra_options),
        }


def script_values(
    spec: JobSpec,
    settings: SlurmSettings,
    *,
    attempt_id: str,
    attempt_dir: str,
    wrapper: str,
) -> ScriptValues:
    """The template values for one attempt: resources from the spec, placement from the spec or the
    site defaults (partition checked against the site's list when it has one)."""
    placement = spec.placement
    partition = placement.partition or settings.partition
    if partition is not None and settings.partitions is not None and partition not in settings.partitions:
        allowed = ", ".join(settings.partitions)
        raise ScriptValueError("placement.partition", f"{partition!r} is not one of this site's partitions: {allowed}")
    resources = spec.resources
    return ScriptValues(
        attempt_id=attempt_id,
        attempt_dir=attempt_dir,
        python=settings.python,
        wrapper=wrapper,
        cpus=resources.cpus,
        mem_mb=max(1, math.ceil(resources.memory / MIB)),
        time=resources.time_limit,
        gpus=resources.gpus,
        gpu_style=settings.gpu_style,
        gpu_type=resources.gpu_type or settings.gpu_type,
        partition=partition,
        account=placement.account or settings.account,
        qos=placement.qos or settings.qos,
        exclusive=placement.exclusive,
        allow_requeue=settings.allow_requeue,
        export="NONE" if settings.export_env == "none" else "ALL",
        extra_options=tuple(sorted(settings.extra_sbatch_options.items())),
    )


def render_script(values: ScriptValues, *, template_dir: str | None = None) -> str:
    """Render the sbatch script; raises :class:`ScriptValueError` for any value that breaks its rule."""
    env = _environment(template_dir or str(templates_dir()))
    try:
        return env.get_template(TEMPLATE_NAME).render(values.context())
    except jinja2.UndefinedError as exc:  # pragma: no cover - a template bug, not a user error
        raise ScriptValueError("template", str(exc)) from exc


def sbatch_directives(script: str) -> list[str]:
    """The ``#SBATCH`` lines sbatch will read: those before the first line that is not a comment."""
    out: list[str] = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            out.append(stripped)
    return out
