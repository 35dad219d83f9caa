"""Contract tests of the Apptainer argv (Apptainer is not installable here: nothing is executed).

They pin research/apptainer.md §1/§2/§5.2: every sealed flag, options before the image, the image
before the command, exactly the documented binds, GPU on/off, literal values.
"""

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
from hpc_compute.runtimes.apptainer import apptainer_launch, env_arg, parse_env_flag

WRAPPER = Path(__file__).resolve().parents[2] / "sbatch" / "hpcc_wrapper.py"
IMAGE = "/var/lib/hpc-compute/images/sha256-abc.sif"
HOSTILE_ARGS = ("$(id)", "`id`", "a b", "'q'", '"dq"', "--bind=/:/host", "-B", "/:/x", ";", "|", "\n", "")

# apptainer exec options this builder may emit, with their arity
KNOWN_OPTIONS = {
    "--containall": 0,
    "--net": 0,
    "--network": 1,
    "--no-mount": 1,
    "--no-eval": 0,
    "--nv": 0,
    "--env": 1,
    "--workdir": 1,
    "--pwd": 1,
    "--bind": 1,
}
DENYLIST = (
    "--writable",
    "--writable-tmpfs",
    "--fakeroot",
    "--keep-privs",
    "--allow-setuid",
    "--add-caps",
    "--boot",
    "--overlay",
    "--fusemount",
    "--netns-path",
    "--network-args",
    "--dns",
    "--nvccli",
    "--home",
    "--scratch",
    "--app",
    "--env-file",
    "--cleanenv",
    "--no-home",
)


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
        "image": IMAGE,
        "command": ("python", "/app/train.py", "--epochs", "3"),
        "env": {"JOB_VAR": "x"},
        "inputs": (("/data/set-a", "a"), ("/data/b.csv", "b.csv")),
        "output_dir": "/work/r/a/output",
        "scratch_dir": "/local/scratch/a",
        "gpus": 0,
    }
    values.update(overrides)
    return SandboxPlan(**values)  # type: ignore[arg-type]


def parse(argv: list[str]) -> tuple[list[tuple[str, str | None]], int]:
    """Walk the options after ``apptainer exec``; return them and the index of the image."""
    assert argv[1] == "exec"
    opts: list[tuple[str, str | None]] = []
    i = 2
    while argv[i].startswith("-"):
        flag = argv[i]
        assert flag in KNOWN_OPTIONS, f"unexpected option {flag}"
        if KNOWN_OPTIONS[flag]:
            opts.append((flag, argv[i + 1]))
            i += 2
        else:
            opts.append((flag, None))
            i += 1
    return opts, i


def values(opts: list[tuple[str, str | None]], flag: str) -> list[str | None]:
    return [v for f, v in opts if f == flag]


def as_json_launch(launch: LaunchSpec) -> dict[str, object]:
    value = json.loads(json.dumps(asdict(launch)))
    assert isinstance(value, dict)
    return value


def test_every_sealed_flag() -> None:
    argv = list(apptainer_launch(plan()).argv)
    assert argv[:2] == ["apptainer", "exec"]
    opts, _ = parse(argv)
    flags = [f for f, _ in opts]
    assert "--containall" in flags
    assert "--net" in flags
    assert values(opts, "--network") == ["none"]
    network = argv.index("--network")
    assert argv[network + 1] == "none", "--network none must be adjacent tokens"
    assert values(opts, "--no-mount") == ["hostfs,bind-paths"]
    assert "--no-eval" in flags
    assert values(opts, "--pwd") == ["/scratch"]
    assert values(opts, "--workdir") == ["/local/scratch/a/.apptainer-work"]


def test_exactly_the_documented_binds() -> None:
    opts, _ = parse(list(apptainer_launch(plan()).argv))
    assert values(opts, "--bind") == [
        "/data/set-a:/input/a:ro",
        "/data/b.csv:/input/b.csv:ro",
        "/work/r/a/output:/output",
        "/local/scratch/a:/scratch",
    ]


def test_options_before_image_and_image_before_command() -> None:
    launch = apptainer_launch(plan(command=("/bin/prog", *HOSTILE_ARGS)))
    argv = list(launch.argv)
    _opts, image_at = parse(argv)
    assert argv[image_at] == IMAGE
    assert image_at == launch.insert_at
    assert tuple(argv[image_at + 1 :]) == ("/bin/prog", *HOSTILE_ARGS), (
        "each argument stays one literal element"
    )
    assert argv.count(IMAGE) == 1


def test_denylisted_flags_absent() -> None:
    argv = apptainer_launch(plan(gpus=1)).argv
    for flag in DENYLIST:
        assert flag not in argv, flag
    assert not any("://" in a for a in argv)


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_gpu_on_off(gpus: int) -> None:
    launch = apptainer_launch(plan(gpus=gpus))
    opts, _ = parse(list(launch.argv))
    assert ("--nv" in [f for f, _ in opts]) is (gpus > 0)
    assert not any("CUDA_VISIBLE_DEVICES" in a for a in launch.argv), "never hard-coded"
    if gpus:
        assert [(f.name, f.args) for f in launch.forward_env] == [
            ("CUDA_VISIBLE_DEVICES", ("--env", "CUDA_VISIBLE_DEVICES={value}"))
        ]
    else:
        assert launch.forward_env == ()


def test_cuda_forwarding_through_the_wrapper_insertion() -> None:
    wrapper = load_wrapper()
    launch = apptainer_launch(plan(gpus=1))
    final = wrapper.assemble_argv(as_json_launch(launch), {"CUDA_VISIBLE_DEVICES": "0,3", "OTHER": "x"}, None)
    _opts, image_at = parse(final)
    assert final[image_at] == IMAGE, "the forwarded --env lands among the options, before the image"
    assert final[image_at - 2 : image_at] == ["--env", "CUDA_VISIBLE_DEVICES=0,3"]
    assert parse_env_flag("CUDA_VISIBLE_DEVICES=0,3") == {"CUDA_VISIBLE_DEVICES": "0,3"}
    assert final[image_at + 1 :] == list(launch.argv[launch.insert_at + 1 :])
    # unset in the allocation: nothing inserted; no status fd for apptainer
    assert wrapper.assemble_argv(as_json_launch(launch), {}, 7) == list(launch.argv)


def test_hpcc_ids_and_job_env_passed_with_env() -> None:
    launch = apptainer_launch(plan(env={"JOB_VAR": "x", "LR": "1e-3"}))
    opts, _ = parse(list(launch.argv))
    env: dict[str, str] = {}
    for value in values(opts, "--env"):
        assert value is not None
        parsed = parse_env_flag(value)
        assert parsed is not None
        env.update(parsed)
    assert env == {"HPCC_RUN_ID": "run-1", "HPCC_ATTEMPT_ID": "att-1", "JOB_VAR": "x", "LR": "1e-3"}


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "",
        "$(touch /tmp/pwned)",
        "`id`",
        "${HOME}",
        "a,b",
        "a,INJECTED=1",
        "x=y",
        "a=b,c=d",
        '"quoted"',
        '"',
        'mid"dle',
        "with space",
        "it's",
        'trailing="',
        'a","B=1',
        'ends-with-quote"',
        '""',
    ],
)
def test_hostile_env_values_round_trip_literally(value: str) -> None:
    launch = apptainer_launch(plan(env={"JOB_VAR": value}))
    opts, _ = parse(list(launch.argv))
    job = [v for v in values(opts, "--env") if v is not None and "JOB_VAR" in v]
    assert len(job) == 1, "one argv element per variable"
    assert parse_env_flag(job[0]) == {"JOB_VAR": value}


@pytest.mark.parametrize("value", ["line\nbreak", "cr\r", "crlf\r\n"])
def test_env_values_apptainer_cannot_carry_are_refused(value: str) -> None:
    with pytest.raises(SpecError):
        apptainer_launch(plan(env={"JOB_VAR": value}))


def test_env_arg_prefers_the_raw_form() -> None:
    assert env_arg("A", "1") == "A=1"
    assert env_arg("A", "x,y") == "A=x,y"  # one '=': pflag takes it whole
    assert env_arg("A", "x=1,B=2") == '"A=x=1,B=2"'  # several '=': CSV-quoted so ',' does not split
    assert env_arg("A", 'x"') == '"A=x""","A=x"""'  # pflag would trim the quote: force the CSV reading


def test_parse_env_flag_matches_pflag_semantics() -> None:
    assert parse_env_flag("a=1") == {"a": "1"}
    assert parse_env_flag("a=1,b=2") == {"a": "1", "b": "2"}
    assert parse_env_flag('"a=1,b=2"') == {"a": "1,b=2"}
    assert parse_env_flag('"a=1"') == {"a": "1"}
    assert parse_env_flag("noequals") is None
    assert parse_env_flag('a="x,b=2') is None  # bare quote in an unquoted CSV field


@pytest.mark.parametrize(
    "image",
    [
        "docker://alpine:3",
        "library://u/c/i:latest",
        "oras://r/i:1",
        "shub://x/y",
        "https://example.org/i.sif",
        "instance://foo",
        "/images/rootfs",
        "/images/i.img",
        "/images/i.sif.bak",
        "host",
        "relative/i.sif",
        "/images/../etc/i.sif",
        "/images/a:b.sif",
    ],
)
def test_images_refused(image: str) -> None:
    with pytest.raises(SpecError) as info:
        apptainer_launch(plan(image=image))
    assert info.value.field == "image"


@pytest.mark.parametrize(
    "overrides",
    [
        {"inputs": (("/data/a:b", "x"),)},
        {"inputs": (("/data/a,b", "x"),)},
        {"inputs": (("/data/x", "../up"),)},
        {"inputs": (("data/x", "x"),)},
        {"output_dir": "/out:/etc"},
        {"scratch_dir": "relative"},
        {"env": {"HOME": "/x"}},
        {"env": {"PATH": "/x"}},
        {"env": {"1BAD": "x"}},
        {"command": ()},
    ],
)
def test_unsafe_plans_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        apptainer_launch(plan(**overrides))


def test_runtime_env_and_preflight() -> None:
    launch = apptainer_launch(plan())
    assert launch.runtime_env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert not any(k.startswith(("APPTAINER", "SINGULARITY")) for k in launch.runtime_env)
    assert launch.preflight_paths[0] == IMAGE
    assert {"/data/set-a", "/data/b.csv", "/work/r/a/output", "/local/scratch/a"} <= set(
        launch.preflight_paths
    )
    assert launch.status_fd_flag is None
    assert launch.runtime == "apptainer"


def test_build_launch_dispatch() -> None:
    launch = build_launch("apptainer", plan(), executable="/usr/bin/apptainer")
    assert launch.argv[:2] == ("/usr/bin/apptainer", "exec")
