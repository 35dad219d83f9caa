"""Apptainer: the production runtime on Slurm. Its argv is pinned by contract tests (not executable here).

The flag set (research/apptainer.md §1, §2)::

    apptainer exec --containall --net --network none --no-mount hostfs,bind-paths --no-eval [--nv]
        --env NAME=VALUE ... --workdir <scratch>/.apptainer-work --pwd /scratch
        --bind IN:/input/NAME:ro ... --bind OUT:/output --bind SCR:/scratch
        [wrapper-inserted: --env CUDA_VISIBLE_DEVICES=<value>]  IMAGE.sif  CMD ARGS...

The wrapper runs it with exactly ``runtime_env`` (the research's ``env -i`` prefix), so no
``APPTAINER_*``/``APPTAINERENV_*`` variable of the allocation can add binds or inject variables.

Environment values: ``--env`` argv elements, not ``--env-file``. The env file is shell-evaluated on
the host side *with the host environment* (research §2.3/§3) and would have to exist on the
executing node, while this argv is built on the scheduler's; ``--env`` values are converted to
``APPTAINERENV_*`` and, with ``--no-eval``, taken literally inside the container. The one catch is
that ``--env`` is a map flag parsed like pflag's StringToString: an argument with one ``=`` is taken
as is after trimming ``"`` at both ends, and one with more ``=`` is read as a CSV record (``,``
separates pairs, ``"`` quotes). :func:`env_arg` therefore picks the raw or the CSV-quoted form,
whichever that parser maps back to exactly ``{NAME: VALUE}`` (for a value with no ``=`` ending in
``"``, the quoted pair twice, which forces the CSV reading), and refuses a value holding a newline
(Go's CSV reader rewrites line ends).

Only a local ``.sif`` image is accepted; any ``scheme://`` is refused (pulls are unsealed and
mutable). Apptainer's own failures exit 255 like a user's ``exit 255``: the wrapper's trusted
preflight (image and bind sources exist) and started marker tell them apart.

``--workdir`` must exist on the executing node before apptainer starts: it is listed in
``prepare_dirs`` and the wrapper creates it.
"""

from __future__ import annotations

import posixpath

from hpc_compute.errors import SpecError
from hpc_compute.rundir import ForwardEnv, LaunchSpec
from hpc_compute.runtimes import SandboxPlan
from hpc_compute.spec import ENV_NAME_RE, INPUT_NAME_RE, RESERVED_ENV, SCHEME_RE

RUNTIME_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
SEAL_FLAGS = (
    "--containall",
    "--net",
    "--network",
    "none",
    "--no-mount",
    "hostfs,bind-paths",
    "--no-eval",
)
WORKDIR_NAME = ".apptainer-work"
_BIND_FORBIDDEN = (":", ",", "\n", "\r", "\x00")


def _split_csv_record(text: str) -> list[str] | None:
    """One record as Go's encoding/csv reads it (no newlines, strict quotes); None on a parse error."""
    fields: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            i += 1
            field = []
            while True:
                if i >= n:
                    return None  # unterminated quote
                if text[i] == '"':
                    if i + 1 < n and text[i + 1] == '"':
                        field.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                field.append(text[i])
                i += 1
            fields.append("".join(field))
            if i == n:
                return fields
            if text[i] != ",":
                return None  # extraneous text after a closing quote
            i += 1
        else:
            end = text.find(",", i)
            chunk = text[i:] if end < 0 else text[i:end]
            if '"' in chunk:
                return None  # bare quote in a non-quoted field
            fields.append(chunk)
            if end < 0:
                return fields
            i = end + 1


def parse_env_flag(arg: str) -> dict[str, str] | None:
    """What Apptainer's ``--env`` map flag (pflag StringToString) makes of one argument; None = error."""
    count = arg.count("=")
    if count == 0:
        return None
    if count == 1:
        pairs: list[str] | None = [arg.strip('"')]
    else:
        pairs = _split_csv_record(arg)
    if pairs is None:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            return None
        out[key] = value
    return out


def env_arg(name: str, value: str) -> str:
    """The ``--env`` argument that Apptainer reads back as exactly ``name=value``."""
    if "\n" in value or "\r" in value or "\x00" in value:
        raise SpecError(f"env.{name}", "apptainer cannot pass a value holding a newline or NUL literally")
    raw = f"{name}={value}"
    if parse_env_flag(raw) == {name: value}:
        return raw
    quoted = '"' + raw.replace('"', '""') + '"'
    if parse_env_flag(quoted) == {name: value}:
        return quoted
    # one '=' and a trailing '"': pflag would trim it. The same pair twice forces the CSV reading.
    doubled = f"{quoted},{quoted}"
    if parse_env_flag(doubled) == {name: value}:
        return doubled
    raise SpecError(f"env.{name}", "apptainer's --env parser cannot carry this value literally")


def _host_path(value: str, what: str) -> str:
    if not value.startswith("/"):
        raise SpecError(what, f"{value!r} must be an absolute path")
    if ".." in value.split("/"):
        raise SpecError(what, f"{value!r} must not contain '..'")
    if any(c in value for c in _BIND_FORBIDDEN):
        raise SpecError(what, f"{value!r} must not contain ':', ',' or a newline (apptainer --bind syntax)")
    return posixpath.normpath(value)


def _image(image: str) -> str:
    if SCHEME_RE.match(image) or "://" in image:
        raise SpecError("image", "remote images (scheme://) are refused; give a local .sif path")
    if not image.endswith(".sif"):
        raise SpecError("image", f"{image!r} is not a .sif file; apptainer runs local SIF images only")
    return _host_path(image, "image")


def apptainer_launch(plan: SandboxPlan, apptainer: str = "apptainer") -> LaunchSpec:
    """The sealed ``apptainer exec`` argv for ``plan``."""
    image = _image(plan.image)
    if not plan.command or not plan.command[0]:
        raise SpecError("command", "must hold at least the program to run")
    output = _host_path(plan.output_dir, "output_dir")
    scratch = _host_path(plan.scratch_dir, "scratch_dir")

    argv: list[str] = [apptainer, "exec", *SEAL_FLAGS]
    if plan.gpus > 0:
        argv.append("--nv")

    env = {"HPCC_RUN_ID": plan.run_id, "HPCC_ATTEMPT_ID": plan.attempt_id}
    for name, value in plan.env.items():
        if not ENV_NAME_RE.match(name):
            raise SpecError(f"env.{name}", "is not a variable name")
        if name in RESERVED_ENV:
            raise SpecError(f"env.{name}", "is set by the sandbox and cannot be overridden")
        env[name] = value
    for name, value in env.items():
        argv += ["--env", env_arg(name, value)]

    argv += ["--workdir", posixpath.join(scratch, WORKDIR_NAME), "--pwd", "/scratch"]

    sources: list[str] = []
    for index, (source, name) in enumerate(plan.inputs):
        src = _host_path(source, f"inputs[{index}].source")
        if not INPUT_NAME_RE.match(name) or name in {".", ".."}:
            raise SpecError(f"inputs[{index}].name", f"{name!r} is not one safe path component")
        argv += ["--bind", f"{src}:/input/{name}:ro"]
        sources.append(src)
    argv += ["--bind", f"{output}:/output", "--bind", f"{scratch}:/scratch"]

    insert_at = len(argv)  # forwarded --env flags land here: after every option, before the image
    argv += [image, *plan.command]

    forward: tuple[ForwardEnv, ...] = ()
    if plan.gpus > 0:
        forward = (ForwardEnv(name="CUDA_VISIBLE_DEVICES", args=("--env", "CUDA_VISIBLE_DEVICES={value}")),)

    return LaunchSpec(
        runtime="apptainer",
        argv=tuple(argv),
        insert_at=insert_at,
        forward_env=forward,
        runtime_env=dict(RUNTIME_ENV),
        preflight_paths=(image, *sources, output, scratch),
        status_fd_flag=None,
        prepare_dirs=(posixpath.join(scratch, WORKDIR_NAME),),
    )
