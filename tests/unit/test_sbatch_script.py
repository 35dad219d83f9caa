"""The sbatch script: golden renders, `bash -n`, and hostile inputs that must not change it.

Regenerate the golden files with ``HPCC_UPDATE_GOLDEN=1 pytest tests/unit/test_sbatch_script.py``
(then read the diff: every change to an #SBATCH line is a change to what the cluster runs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpc_compute.backends.slurm.config import SlurmSettings
from hpc_compute.backends.slurm.script import (
    ArrayValues,
    ScriptValueError,
    ScriptValues,
    render_script,
    sbatch_directives,
    script_values,
    shell_quote,
    slurm_pattern,
)
from hpc_compute.errors import ConfigError
from hpc_compute.spec import JobSpec, parse_spec

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sbatch"
ATTEMPT = "3f2b8c1e-9d4a-4e7b-8a61-0c5d2e7f9a10"
ATTEMPT_DIR = f"/srv/hpcc/runs/run-1/{ATTEMPT}"
BASH = shutil.which("bash") or "/bin/bash"


def _spec(**fields: Any) -> JobSpec:
    data: dict[str, Any] = {"command": ["python3", "-c", "print(1)"], "backend": "slurm"}
    data.update(fields)
    return parse_spec(data)


def _render(spec: JobSpec, **site: Any) -> str:
    conf = SlurmSettings.model_validate({"runtime": "bubblewrap", **site})
    values = script_values(
        spec, conf, attempt_id=ATTEMPT, attempt_dir=ATTEMPT_DIR, wrapper=f"{ATTEMPT_DIR}/hpcc_wrapper.py"
    )
    return render_script(values)


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "cpu": ({"resources": {"cpus": 2, "memory": "1536M", "time_limit": "90m"}}, {}),
    "gpu_gres": ({"resources": {"gpus": 2}}, {"gpu_style": "gres"}),
    "gpu_gres_type": ({"resources": {"gpus": 1, "gpu_type": "a100"}}, {"gpu_style": "gres"}),
    "gpu_gpus": ({"resources": {"gpus": 1}}, {"gpu_style": "gpus"}),
    "gpu_gpus_per_node": ({"resources": {"gpus": 4}}, {"gpu_style": "gpus-per-node", "gpu_type": "h100"}),
    "placement": (
        {"placement": {"partition": "gpu", "account": "proj-42", "qos": "normal"}, "resources": {"time_limit": 59}},
        {"partitions": ["cpu", "gpu"]},
    ),
    "site_defaults_requeue_extra": (
        {},
        {
            "partition": "batch",
            "account": "research",
            "allow_requeue": True,
            "allowed_extra_options": ["constraint", "reservation", "hint"],
            "extra_sbatch_options": {"constraint": "avx512", "reservation": "maint_2024", "hint": ""},
        },
    ),
    "exclusive": ({"placement": {"exclusive": True}, "resources": {"cpus": 2}}, {}),
    "export_none": ({}, {"export_env": "none"}),
}


def _bash_n(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    proc = subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, tmp_path: Path) -> None:
    spec_fields, site = CASES[case]
    script = _render(_spec(**spec_fields), **site)
    golden = GOLDEN / f"{case}.sh"
    if os.environ.get("HPCC_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(script)
    assert script == golden.read_text(), f"{case}: render differs from {golden}"
    _bash_n(script, tmp_path)


def test_cpu_job_directives() -> None:
    script = _render(_spec(resources={"cpus": 3, "memory": "1G", "time_limit": "61s"}))
    lines = sbatch_directives(script)
    assert f"#SBATCH --job-name=hpcc-{ATTEMPT}" in lines
    assert f"#SBATCH --comment=hpcc:{ATTEMPT}" in lines
    # sbatch runs scrubbed (env -i), so ALL exports nothing of the scheduler's environment
    assert "#SBATCH --export=ALL" in lines and "#SBATCH --no-requeue" in lines
    assert "#SBATCH --cpus-per-task=3" in lines and "#SBATCH --mem=1024M" in lines
    assert "#SBATCH --time=0-00:02:00" in lines  # rounded up to whole minutes
    assert f"#SBATCH --output={ATTEMPT_DIR}/slurm.out" in lines
    assert f"#SBATCH --chdir={ATTEMPT_DIR}" in lines
    assert not any(
        "--gres" in line or "--gpus" in line or "--exclusive" in line or "--signal" in line for line in lines
    )
    assert script.rstrip().endswith('exec "$PYTHON" "$WRAPPER" "$ATTEMPT_DIR"')


def test_gpu_styles() -> None:
    def gpu_line(style: str, **res: Any) -> list[str]:
        lines = sbatch_directives(_render(_spec(resources={"gpus": 2, **res}), gpu_style=style))
        return [line for line in lines if "gpu" in line]

    assert gpu_line("gres") == ["#SBATCH --gres=gpu:2"]
    assert gpu_line("gres", gpu_type="v100") == ["#SBATCH --gres=gpu:v100:2"]
    assert gpu_line("gpus") == ["#SBATCH --gpus=2"]
    assert gpu_line("gpus-per-node") == ["#SBATCH --gpus-per-node=2"]


def test_percent_in_log_paths_is_escaped() -> None:
    assert slurm_pattern("/w/%j/%u/a") == "/w/%%j/%%u/a"
    values = ScriptValues(
        attempt_id=ATTEMPT,
        attempt_dir="/w/100%x/a",
        python="/usr/bin/python3",
        wrapper="/w/100%x/a/hpcc_wrapper.py",
        cpus=1,
        mem_mb=100,
        time=60,
    )
    lines = sbatch_directives(render_script(values))
    assert "#SBATCH --output=/w/100%%x/a/slurm.out" in lines
    assert "#SBATCH --error=/w/100%%x/a/slurm.err" in lines


@pytest.mark.parametrize(
    "bad_dir",
    ["relative/dir", "/with space/a", "/new\nline", "/quote'd", '/dq"x', "/back\\slash", "/a/../b", "/$(id)", "/`id`"],
)
def test_attempt_dir_that_cannot_stand_on_sbatch_lines_is_refused(bad_dir: str) -> None:
    values = ScriptValues(
        attempt_id=ATTEMPT, attempt_dir=bad_dir, python="/usr/bin/python3", wrapper="/w/x.py", cpus=1, mem_mb=1, time=1
    )
    with pytest.raises(ScriptValueError):
        render_script(values)


def test_shell_quote_refuses_control_characters_and_relative_paths() -> None:
    for bad in ("python3", "/usr/bin/py\nthon", "/x\ry", "/x\x00", "", "/tab\there"):
        with pytest.raises(ScriptValueError):
            shell_quote(bad)
    assert shell_quote("/opt/my python/bin/python3") == "'/opt/my python/bin/python3'"


def test_extra_options_need_the_allow_list_and_a_safe_value() -> None:
    with pytest.raises(ConfigError):
        SlurmSettings.from_mapping({"extra_sbatch_options": {"constraint": "x"}})
    with pytest.raises(ConfigError):
        SlurmSettings.from_mapping(
            {"allowed_extra_options": ["constraint"], "extra_sbatch_options": {"constraint": "a b"}}
        )
    with pytest.raises(ConfigError):
        SlurmSettings.from_mapping(
            {"allowed_extra_options": ["constraint"], "extra_sbatch_options": {"constraint": "a\n#SBATCH --uid=0"}}
        )
    with pytest.raises(ConfigError):  # options the template owns cannot be allow-listed
        SlurmSettings.from_mapping({"allowed_extra_options": ["output"]})
    with pytest.raises(ConfigError):
        SlurmSettings.from_mapping({"partition": "a;b"})
    for bad_path in ("usr/bin", "/usr/bin:$HOME/bin", "/usr/bin\n/x", "/usr/bin;id", ""):
        with pytest.raises(ConfigError, match="job_path"):
            SlurmSettings.from_mapping({"job_path": bad_path})
    with pytest.raises(ConfigError, match="export_env"):
        SlurmSettings.from_mapping({"export_env": "all"})


def test_partition_outside_the_site_list_is_refused() -> None:
    with pytest.raises(ScriptValueError):
        _render(_spec(placement={"partition": "secret"}), partitions=["cpu"])


# ---------------------------------------------------------------------------------------------
# hostile inputs

HOSTILE = st.sampled_from(
    [
        "'",
        '"',
        "$(touch /tmp/pwned)",
        "`id`",
        "\n#SBATCH --uid=0\n",
        "#SBATCH --partition=root",
        "%j%u%x",
        "\\",
        "; rm -rf /",
        "${IFS}",
        "\r",
        "\u2028",
        "--export=ALL",
        "*",
        "~",
        "!",
    ]
)
hostile_text = st.lists(st.one_of(HOSTILE, st.text(min_size=0, max_size=8)), min_size=1, max_size=4).map("".join)
safe_text = hostile_text.filter(lambda s: "\x00" not in s)
env_name = st.from_regex(r"\A[A-Z][A-Z0-9_]{0,10}\Z").filter(
    lambda n: n not in {"HOME", "PATH", "PWD", "TMPDIR", "CUDA_VISIBLE_DEVICES", "HPCC_RUN_ID", "HPCC_ATTEMPT_ID"}
)
one_line = safe_text.map(lambda s: re.sub(r"[\x00-\x1f\x7f]", "", s)[:128]).filter(bool)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=one_line,
    argv=st.lists(safe_text, min_size=1, max_size=5).filter(lambda a: bool(a[0])),
    env=st.dictionaries(env_name, safe_text, max_size=4),
    labels=st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9]{0,8}\Z"), one_line.map(lambda s: s[:256]), max_size=3),
    kind=one_line,
)
def test_user_strings_never_reach_the_script(
    name: str, argv: list[str], env: dict[str, str], labels: dict[str, str], kind: str
) -> None:
    benign = _render(_spec(command=["true"]))
    hostile = _render(_spec(command=argv, env=env, labels=labels, name=name, kind=kind))
    assert hostile == benign


PATH_HOSTILE = st.lists(
    st.one_of(
        HOSTILE,
        st.sampled_from(["a", "b", "dir", " ", "'x'", "$HOME", "%%", "#", "=", "@"]),
    ),
    min_size=1,
    max_size=5,
).map(lambda parts: "/" + "/".join(parts))


def _body_values(script: str, tmp_path: Path) -> list[str]:
    """Run the script's body with the exec replaced by a printf: the three words it would exec."""
    probe = script.replace(
        'exec "$PYTHON" "$WRAPPER" "$ATTEMPT_DIR"', 'printf \'%s\\0\' "$PYTHON" "$WRAPPER" "$ATTEMPT_DIR"'
    )
    assert probe != script
    path = tmp_path / "probe.sh"
    path.write_text(probe)
    out = subprocess.run([BASH, str(path)], capture_output=True, check=True, env={"PATH": "/usr/bin:/bin"})
    return out.stdout.decode("utf-8", "surrogateescape").split("\0")[:-1]


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(python=PATH_HOSTILE, wrapper=PATH_HOSTILE, attempt_dir=PATH_HOSTILE)
def test_hostile_paths_are_refused_or_quoted(python: str, wrapper: str, attempt_dir: str, tmp_path: Path) -> None:
    benign_values = ScriptValues(
        attempt_id=ATTEMPT,
        attempt_dir="/w/a",
        python="/usr/bin/python3",
        wrapper="/w/a/w.py",
        cpus=1,
        mem_mb=64,
        time=60,
    )
    benign = render_script(benign_values)
    values = ScriptValues(
        attempt_id=ATTEMPT, attempt_dir=attempt_dir, python=python, wrapper=wrapper, cpus=1, mem_mb=64, time=60
    )
    try:
        script = render_script(values)
    except ScriptValueError:
        return  # refused: nothing was written
    # same directives (names and count); only the attempt dir's own values may differ
    assert [d.split("=")[0] for d in sbatch_directives(script)] == [d.split("=")[0] for d in sbatch_directives(benign)]
    escaped = attempt_dir.replace("%", "%%")
    for line in sbatch_directives(script):
        if line.startswith(("#SBATCH --output=", "#SBATCH --error=")):
            assert line.split("=", 1)[1] in {f"{escaped}/slurm.out", f"{escaped}/slurm.err"}
        if line.startswith("#SBATCH --chdir="):
            assert line == f"#SBATCH --chdir={attempt_dir}"
    # the body has the same shape, and the shell sees exactly the three paths
    assert len(script.split("\n")) == len(benign.split("\n"))
    assert script.split("\n")[-2] == benign.split("\n")[-2]
    _bash_n(script, tmp_path)
    assert _body_values(script, tmp_path) == [python, wrapper, attempt_dir]


def test_array_script_golden(tmp_path: Path) -> None:
    """k alike attempts, one sbatch --array: task N execs the wrapper on the Nth directory."""
    conf = SlurmSettings.model_validate({"runtime": "bubblewrap", "array_throttle": 4})
    spec = _spec(resources={"cpus": 1, "memory": "256M", "time_limit": "60s"})
    dirs = (*(f"/srv/hpcc/runs/run-{i}/attempt-{i}" for i in range(3)), "/srv/hpcc/runs/it's here/a")
    values = script_values(spec, conf, attempt_id=ATTEMPT, attempt_dir=dirs[0], wrapper=f"{dirs[0]}/hpcc_wrapper.py")
    array = ArrayValues(tag="0123456789abcdef" * 2, attempt_dirs=dirs, throttle=conf.array_throttle)
    script = render_script(replace(values, array=array))
    golden = GOLDEN / "array.sh"
    if os.environ.get("HPCC_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()
    lines = sbatch_directives(script)
    assert "#SBATCH --array=0-3%4" in lines and f"#SBATCH --job-name=hpcc-arr-{array.tag}" in lines
    _bash_n(script, tmp_path)
    # the body picks each task's directory, quoted, and its own staged wrapper
    body = script.split("ATTEMPT_DIRS=(", 1)[1]
    fake = tmp_path / "task.sh"
    probe = "ATTEMPT_DIRS=(" + body.split("cd \"$ATTEMPT_DIR\"")[0] + 'printf "%s|%s" "$ATTEMPT_DIR" "$WRAPPER"\n'
    fake.write_text(probe)
    for task, expected in enumerate(dirs):
        out = subprocess.run(
            [BASH, str(fake)], env={"SLURM_ARRAY_TASK_ID": str(task)}, capture_output=True, text=True, check=True
        ).stdout
        assert out == f"{expected}|{expected}/hpcc_wrapper.py"
