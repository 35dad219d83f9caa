"""bubblewrap: the sealed runtime that works everywhere (tests, the local backend).

The argv is complete and literal: every value (environment, paths, the command) is its own
argv element, never shell text. Sealing, with the reason for each element:

* ``--unshare-all`` (user-try, ipc, pid, net, uts, cgroup-try) plus an explicit ``--unshare-user``
  so that ``--disable-userns`` can forbid nested user namespaces inside the sandbox;
* ``--die-with-parent``: the sandbox dies when the wrapper dies (even by SIGKILL);
* ``--new-session``: no TIOCSTI into a terminal of the caller;
* ``--clearenv`` then ``--setenv`` for an allowlist. bwrap applies ``--clearenv`` *while parsing*,
  so any ``--setenv`` before it is wiped: the wrapper's insertion point (``insert_at``) is therefore
  just before ``--``, after ``--clearenv``, so a forwarded ``CUDA_VISIBLE_DEVICES`` survives;
* ``--cap-drop ALL``; ``--proc /proc``; a minimal ``--dev /dev``; ``--tmpfs /tmp``;
* ``/input`` is a tmpfs holding one read-only bind per input, then remounted read-only;
  ``/output`` and ``/scratch`` are writable binds; the working directory is ``/scratch``.

Images:

* ``host``: the host's ``/usr`` read-only with the merged-usr symlinks and a handful of read-only
  files from ``/etc``; never ``--ro-bind / /``, because a unix socket on a read-only bind is still
  connectable (``/run/postgresql``, munge, D-Bus ...). No ``/home``, ``/root``, ``/run`` or ``/var``.
  The root is bwrap's own tmpfs, remounted read-only once every mount point exists.
* an absolute directory: bound read-only at ``/``. The mount points ``/input``, ``/output``,
  ``/scratch``, ``/tmp``, ``/proc`` and ``/dev`` must already exist in it (bwrap cannot create them
  on a read-only root; it then fails before the program starts, which the wrapper reports as setup).

GPUs: ``CUDA_VISIBLE_DEVICES`` is forwarded by the wrapper when set. Binding the ``/dev/nvidia*``
nodes (``--dev-bind-try``) and the host driver libraries is not done here: those exist only on the
executing host, and the argv is built on the scheduler's.
"""

from __future__ import annotations

import os
import posixpath

from hpc_compute.errors import SpecError
from hpc_compute.rundir import ForwardEnv, LaunchSpec
from hpc_compute.runtimes import SandboxPlan
from hpc_compute.spec import ENV_NAME_RE, INPUT_NAME_RE, RESERVED_ENV, SCHEME_RE

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
SANDBOX_HOSTNAME = "hpcc-sandbox"
RUNTIME_PATH = "/usr/bin:/bin"
STATUS_FD_FLAG = "--json-status-fd"

# Read-only files from the host's /etc that ordinary programs need; each is optional.
HOST_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
)
# Merged-usr symlinks: (link, target). /lib64 only where the host has it.
HOST_USR_LINKS = (("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64"))

SEAL_FLAGS = (
    "--unshare-all",
    "--unshare-user",
    "--disable-userns",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "ALL",
    "--hostname",
    SANDBOX_HOSTNAME,
)


def _host_path(value: str, what: str) -> str:
    """An absolute, normalised host path with no NUL or newline."""
    if not value or "\x00" in value or "\n" in value:
        raise SpecError(what, "must be a non-empty path without NUL or newline")
    if not value.startswith("/"):
        raise SpecError(what, f"{value!r} must be an absolute path")
    if ".." in value.split("/"):
        raise SpecError(what, f"{value!r} must not contain '..'")
    return posixpath.normpath(value)


def _check_env(plan: SandboxPlan) -> None:
    for name, value in plan.env.items():
        if not ENV_NAME_RE.match(name):
            raise SpecError(f"env.{name}", "is not a variable name")
        if name in RESERVED_ENV:
            raise SpecError(f"env.{name}", "is set by the sandbox and cannot be overridden")
        if "\x00" in value:
            raise SpecError(f"env.{name}", "must not contain NUL bytes")


def _root_args(image: str) -> list[str]:
    if image == "host":
        args = ["--ro-bind", "/usr", "/usr"]
        for link, target in HOST_USR_LINKS:
            if link == "/lib64" and not os.path.lexists("/usr/lib64"):
                continue
            args += ["--symlink", target, link]
        args += ["--perms", "0755", "--dir", "/etc"]
        for path in HOST_ETC_FILES:
            args += ["--ro-bind-try", path, path]
        return args
    if SCHEME_RE.match(image):
        raise SpecError("image", "remote images (scheme://) are refused")
    return ["--ro-bind", _host_path(image, "image"), "/"]


def bubblewrap_launch(plan: SandboxPlan, bwrap: str = "bwrap") -> LaunchSpec:
    """The sealed bwrap argv for ``plan``; the wrapper adds ``--json-status-fd`` and GPU env."""
    if not plan.command or not plan.command[0]:
        raise SpecError("command", "must hold at least the program to run")
    _check_env(plan)
    output = _host_path(plan.output_dir, "output_dir")
    scratch = _host_path(plan.scratch_dir, "scratch_dir")

    argv: list[str] = [bwrap, *SEAL_FLAGS]
    argv += _root_args(plan.image)
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]

    preflight: list[str] = []
    argv += ["--perms", "0755", "--tmpfs", "/input"]
    for index, (source, name) in enumerate(plan.inputs):
        src = _host_path(source, f"inputs[{index}].source")
        if not INPUT_NAME_RE.match(name) or name in {".", ".."}:
            raise SpecError(f"inputs[{index}].name", f"{name!r} is not one safe path component")
        argv += ["--ro-bind", src, f"/input/{name}"]
        preflight.append(src)
    argv += ["--remount-ro", "/input"]
    argv += ["--bind", output, "/output", "--bind", scratch, "/scratch"]
    if plan.image == "host":
        # every mount point now exists on bwrap's tmpfs root: make the root itself read-only
        argv += ["--remount-ro", "/"]

    argv += ["--clearenv"]
    env = {
        "PATH": SANDBOX_PATH,
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "HPCC_RUN_ID": plan.run_id,
        "HPCC_ATTEMPT_ID": plan.attempt_id,
    }
    env.update(plan.env)
    for name, value in env.items():
        argv += ["--setenv", name, value]
    argv += ["--chdir", "/scratch"]

    insert_at = len(argv)  # after --clearenv, before "--": see the module docstring
    argv += ["--", *plan.command]

    preflight += [output, scratch]
    if plan.image != "host":
        preflight.append(_host_path(plan.image, "image"))

    forward: tuple[ForwardEnv, ...] = ()
    if plan.gpus > 0:
        forward = (
            ForwardEnv(name="CUDA_VISIBLE_DEVICES", args=("--setenv", "CUDA_VISIBLE_DEVICES", "{value}")),
        )

    return LaunchSpec(
        runtime="bubblewrap",
        argv=tuple(argv),
        insert_at=insert_at,
        forward_env=forward,
        runtime_env={"PATH": RUNTIME_PATH},
        preflight_paths=tuple(preflight),
        status_fd_flag=STATUS_FD_FLAG,
    )
