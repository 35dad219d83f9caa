"""Contract tests of the bubblewrap argv (nothing is executed here)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest

from hpc_compute.errors import SpecError
from hpc_compute.rundir import LaunchSpec
from hpc_compute.runtimes import SandboxPlan, build_launch
from hpc_compute.runtimes.bubblewrap import bubblewrap_launch

WRAPPER = Path(__file__).resolve().parents[2] / "sbatch" / "hpcc_wrapper.py"
HOSTILE = "$(touch /tmp/pwned); `id` 'q' \"dq\" \\ ; | & > < * ? ~ # \n newline ,=,"


def load_wrapper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hpcc_wrapper_under_test", WRAPPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan(**overrides: object) -> SandboxPlan:
    values: dict[str, object] = {
        "run_id": "run-1",
        "attempt_id": "att-1",
        "image": "host",
        "command": ("/usr/bin/python3", "-c", "print(1)"),
        "env": {"JOB_VAR": "x"},
        "inputs": (("/data/set-a", "a"), ("/data/b.csv", "b.csv")),
        "output_dir": "/work/r/a/output",
        "scratch_dir": "/work/r/a/scratch",
        "gpus": 0,
    }
    values.update(overrides)
    return SandboxPlan(**values)  # type: ignore[arg-type]


def options(launch: LaunchSpec) -> list[str]:
    """Everything before the ``--`` that ends bwrap's options."""
    argv = list(launch.argv)
    return argv[: argv.index("--")]


def pairs(argv: list[str], flag: str, arity: int) -> list[tuple[str, ...]]:
    return [tuple(argv[i + 1 : i + 1 + arity]) for i, a in enumerate(argv) if a == flag]


def as_json_launch(launch: LaunchSpec) -> dict[str, object]:
    value = json.loads(json.dumps(asdict(launch)))
    assert isinstance(value, dict)
    return value


def test_sealing_flags_present() -> None:
    launch = bubblewrap_launch(plan())
    opts = options(launch)
    for flag in (
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert flag in opts, flag
    assert ("ALL",) in pairs(opts, "--cap-drop", 1)
    assert ("hpcc-sandbox",) in pairs(opts, "--hostname", 1)
    assert ("/proc",) in pairs(opts, "--proc", 1)
    assert ("/dev",) in pairs(opts, "--dev", 1)
    assert ("/tmp",) in pairs(opts, "--tmpfs", 1)
    assert ("/input",) in pairs(opts, "--tmpfs", 1)
    assert ("/input",) in pairs(opts, "--remount-ro", 1)
    assert pairs(opts, "--chdir", 1) == [("/scratch",)]
    assert launch.argv[0] == "bwrap"
    assert launch.runtime == "bubblewrap"
    assert launch.status_fd_flag == "--json-status-fd"
    assert launch.runtime_env == {"PATH": "/usr/bin:/bin"}


def test_binds_inputs_read_only_output_scratch_writable() -> None:
    opts = options(bubblewrap_launch(plan()))
    ro = pairs(opts, "--ro-bind", 2)
    assert ("/data/set-a", "/input/a") in ro
    assert ("/data/b.csv", "/input/b.csv") in ro
    assert pairs(opts, "--bind", 2) == [("/work/r/a/output", "/output"), ("/work/r/a/scratch", "/scratch")]
    # input binds come after the /input tmpfs and before it is remounted read-only
    assert opts.index("/input/a") > opts.index("--tmpfs", opts.index("/tmp"))
    remount = max(i for i, a in enumerate(opts) if a == "--remount-ro" and opts[i + 1] == "/input")
    assert remount > opts.index("/input/b.csv")


def test_environment_allowlist_after_clearenv() -> None:
    launch = bubblewrap_launch(plan(env={"JOB_VAR": HOSTILE, "OTHER": ""}))
    opts = options(launch)
    env = {name: value for name, value in pairs(opts, "--setenv", 2)}
    assert env == {
        "PATH": env["PATH"],
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "HPCC_RUN_ID": "run-1",
        "HPCC_ATTEMPT_ID": "att-1",
        "JOB_VAR": HOSTILE,
        "OTHER": "",
    }
    assert "/usr/bin" in env["PATH"].split(":")
    clear = opts.index("--clearenv")
    assert all(i > clear for i, a in enumerate(opts) if a == "--setenv"), "bwrap applies --clearenv in order"


def test_command_is_literal_after_double_dash() -> None:
    command = ("/bin/sh", "-c", HOSTILE, "--bind", "/", "/x")
    launch = bubblewrap_launch(plan(command=command))
    argv = list(launch.argv)
    assert tuple(argv[argv.index("--") + 1 :]) == command


def test_host_image_does_not_expose_root_run_home() -> None:
    opts = options(bubblewrap_launch(plan()))
    bound: list[tuple[str, ...]] = []
    for flag in ("--bind", "--ro-bind", "--ro-bind-try", "--dev-bind", "--dev-bind-try", "--bind-try"):
        bound += pairs(opts, flag, 2)
    sources = {src for src, _dest in bound}
    dests = {dest for _src, dest in bound}
    assert "/" not in sources and "/" not in dests
    for hidden in ("/run", "/home", "/root", "/var", "/etc", "/tmp", "/mnt", "/srv", "/opt"):
        assert not any(
            s == hidden or s.startswith(hidden + "/") for s in sources if not s.startswith("/etc/")
        ), hidden
    assert ("/usr", "/usr") in pairs(opts, "--ro-bind", 2)
    etc = {src for src, _ in pairs(opts, "--ro-bind-try", 2)}
    assert etc <= {
        "/etc/ld.so.cache",
        "/etc/alternatives",
        "/etc/localtime",
        "/etc/nsswitch.conf",
        "/etc/passwd",
        "/etc/group",
    }
    assert "/etc/shadow" not in etc
    links = pairs(opts, "--symlink", 2)
    assert ("usr/bin", "/bin") in links and ("usr/lib", "/lib") in links and ("usr/sbin", "/sbin") in links
    assert ("/",) in pairs(opts, "--remount-ro", 1)


def test_directory_image_is_the_read_only_root() -> None:
    launch = bubblewrap_launch(plan(image="/images/rootfs"))
    opts = options(launch)
    ro = pairs(opts, "--ro-bind", 2)
    assert ro[0] == ("/images/rootfs", "/")
    assert ("/usr", "/usr") not in ro
    assert "/images/rootfs" in launch.preflight_paths


def test_preflight_paths() -> None:
    launch = bubblewrap_launch(plan())
    assert set(launch.preflight_paths) == {
        "/data/set-a",
        "/data/b.csv",
        "/work/r/a/output",
        "/work/r/a/scratch",
    }


def test_insert_point_is_after_clearenv_and_before_command() -> None:
    launch = bubblewrap_launch(plan(gpus=1))
    argv = list(launch.argv)
    assert argv.index("--clearenv") < launch.insert_at <= argv.index("--")
    wrapper = load_wrapper()
    final = wrapper.assemble_argv(as_json_launch(launch), {"CUDA_VISIBLE_DEVICES": "0,1"}, 5)
    at = launch.insert_at
    assert final[at : at + 5] == ["--json-status-fd", "5", "--setenv", "CUDA_VISIBLE_DEVICES", "0,1"]
    assert final[:at] == argv[:at] and final[at + 5 :] == argv[at:]


def test_gpu_forwarding_only_with_gpus() -> None:
    wrapper = load_wrapper()
    without = bubblewrap_launch(plan(gpus=0))
    assert without.forward_env == ()
    final = wrapper.assemble_argv(as_json_launch(without), {"CUDA_VISIBLE_DEVICES": "0"}, None)
    assert "CUDA_VISIBLE_DEVICES" not in final
    with_gpu = bubblewrap_launch(plan(gpus=2))
    assert [f.name for f in with_gpu.forward_env] == ["CUDA_VISIBLE_DEVICES"]
    unset = wrapper.assemble_argv(as_json_launch(with_gpu), {}, None)
    assert unset == list(with_gpu.argv)


def test_build_launch_dispatch() -> None:
    launch = build_launch("bubblewrap", plan(), executable="/usr/bin/bwrap")
    assert launch.argv[0] == "/usr/bin/bwrap"


@pytest.mark.parametrize(
    "overrides",
    [
        {"env": {"HOME": "/root"}},
        {"env": {"PATH": "/evil"}},
        {"env": {"CUDA_VISIBLE_DEVICES": "0"}},
        {"env": {"bad-name": "x"}},
        {"inputs": (("/data/x", "../escape"),)},
        {"inputs": (("/data/x", "a/b"),)},
        {"inputs": (("relative/x", "x"),)},
        {"inputs": (("/data/../etc", "x"),)},
        {"output_dir": "relative/out"},
        {"image": "docker://alpine"},
        {"image": "relative/rootfs"},
        {"command": ()},
    ],
)
def test_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        bubblewrap_launch(plan(**overrides))
