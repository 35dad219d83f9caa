"""Job spec validation: every rule, the field it names, job files, the canonical digest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hpc_compute.errors import SpecError
from hpc_compute.spec import (
    INFRA_FAILURES,
    JOB_FAILURES,
    RESERVED_ENV,
    FailureKind,
    JobSpec,
    check_submittable,
    load_spec_file,
    parse_spec,
)

BASE: dict[str, Any] = {"command": ["python3", "-c", "print(1)"]}


def spec_with(**fields: Any) -> dict[str, Any]:
    return {**BASE, **fields}


def refused(data: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value


def test_minimal_spec_has_defaults() -> None:
    spec = parse_spec(dict(BASE))
    assert spec.image == "host"
    assert spec.backend == "local"
    assert spec.command == ("python3", "-c", "print(1)")
    assert spec.resources.cpus == 1
    assert spec.resources.memory == 1024**3
    assert spec.resources.gpus == 0
    assert spec.resources.time_limit == 3600
    assert spec.retry.max_attempts == 3
    assert spec.env == {} and spec.labels == {} and spec.inputs == ()


def test_full_spec_parses_units() -> None:
    spec = parse_spec(
        spec_with(
            image="/images/a.sif",
            inputs=[{"source": "/data/x.csv", "name": "x.csv"}],
            env={"SEED": "1", "_X2": ""},
            resources={"cpus": 4, "memory": "512M", "gpus": 2, "gpu_type": "a100", "time_limit": "01:30:00"},
            backend="slurm",
            labels={"project": "p1", "team.example/x": "y"},
            name="n",
            kind="analysis",
            retry={"max_attempts": 5, "also_retry": ["timeout"], "backoff": "1m"},
            placement={"partition": "gpu", "account": "acc_1", "qos": "normal", "exclusive": True},
            owner="alice",
        )
    )
    assert spec.resources.memory == 512 * 1024**2
    assert spec.resources.time_limit == 5400
    assert spec.retry.backoff == 60
    assert spec.retry.also_retry == (FailureKind.TIMEOUT,)
    assert spec.placement.exclusive is True


@pytest.mark.parametrize(
    ("data", "field", "rule_part"),
    [
        # command
        ({}, "command", "required"),
        (spec_with(command=[]), "command", "at least the program"),
        (spec_with(command=[""]), "command", "must not be empty"),
        (spec_with(command=["echo", "a\x00b"]), "command", "NUL"),
        (spec_with(command="echo hi"), "command", ""),
        # image
        (spec_with(image="docker://ubuntu:22.04"), "image", "remote images"),
        (spec_with(image="oras://ghcr.io/x/y:1"), "image", "remote images"),
        (spec_with(image="library://alpine"), "image", "remote images"),
        (spec_with(image="https://example.org/a.sif"), "image", "remote images"),
        (spec_with(image="relative/a.sif"), "image", "absolute path"),
        (spec_with(image="/a\x00.sif"), "image", "NUL"),
        # backend
        (spec_with(backend="kubernetes"), "backend", "unknown backend"),
        (spec_with(backend=""), "backend", "unknown backend"),
        # resources
        (spec_with(resources={"cpus": 0}), "resources.cpus", "greater than or equal to 1"),
        (spec_with(resources={"cpus": -3}), "resources.cpus", "greater than or equal to 1"),
        (spec_with(resources={"cpus": 100_000}), "resources.cpus", "less than or equal to 1024"),
        (spec_with(resources={"cpus": "many"}), "resources.cpus", ""),
        (spec_with(resources={"memory": "-1G"}), "resources.memory", "not a size"),
        (spec_with(resources={"memory": -5}), "resources.memory", "negative"),
        (spec_with(resources={"memory": "512K"}), "resources.memory", "at least 1M"),
        (spec_with(resources={"memory": 0}), "resources.memory", "at least 1M"),
        (spec_with(resources={"memory": "65T"}), "resources.memory", "at most 64T"),
        (spec_with(resources={"memory": "9" * 400}), "resources.memory", ""),
        (spec_with(resources={"memory": True}), "resources.memory", "size"),
        (spec_with(resources={"memory": 1.5}), "resources.memory", "size"),
        (spec_with(resources={"gpus": -1}), "resources.gpus", "greater than or equal to 0"),
        (spec_with(resources={"gpus": 65}), "resources.gpus", "less than or equal to 64"),
        (spec_with(resources={"gpu_type": "a100;rm -rf"}), "resources.gpu_type", "only letters"),
        (spec_with(resources={"time_limit": 0}), "resources.time_limit", "at least 1s"),
        (spec_with(resources={"time_limit": "-5m"}), "resources.time_limit", "not a duration"),
        (spec_with(resources={"time_limit": "367d"}), "resources.time_limit", "at most 366 days"),
        (spec_with(resources={"time_limit": "1:61:00"}), "resources.time_limit", "below 60"),
        (spec_with(resources={"time_limit": float("inf")}), "resources.time_limit", "finite"),
        (spec_with(resources={"time_limit": float("nan")}), "resources.time_limit", "finite"),
        (spec_with(resources={"time_limit": [1]}), "resources.time_limit", "duration"),
        (spec_with(resources={"disk": "1G"}), "resources.disk", "not a known field"),
        # env
        (spec_with(env={"1A": "x"}), "env", "not a variable name"),
        (spec_with(env={"A-B": "x"}), "env", "not a variable name"),
        (spec_with(env={"A B": "x"}), "env", "not a variable name"),
        (spec_with(env={"": "x"}), "env", "not a variable name"),
        (spec_with(env={"A": "x\x00y"}), "env", "NUL"),
        (spec_with(env={"A": 1}), "env.A", "string"),
        # inputs
        (spec_with(inputs=[{"source": "", "name": "a"}]), "inputs[0].source", "must not be empty"),
        (spec_with(inputs=[{"source": "/a\x00", "name": "a"}]), "inputs[0].source", "NUL"),
        (spec_with(inputs=[{"source": "/a", "name": ".."}]), "inputs[0].name", "one path component"),
        (spec_with(inputs=[{"source": "/a", "name": "."}]), "inputs[0].name", "one path component"),
        (spec_with(inputs=[{"source": "/a", "name": "a/b"}]), "inputs[0].name", "one path component"),
        (spec_with(inputs=[{"source": "/a", "name": ""}]), "inputs[0].name", "one path component"),
        (spec_with(inputs=[{"source": "/a", "name": "x" * 129}]), "inputs[0].name", "one path component"),
        (spec_with(inputs=[{"source": "/a"}]), "inputs[0].name", "required"),
        (spec_with(inputs=[{"source": "/a", "name": "a", "mode": "rw"}]), "inputs[0].mode", "not a known field"),
        (
            spec_with(inputs=[{"source": "/a", "name": "a"}, {"source": "/b", "name": "a"}]),
            "inputs[1].name",
            "used twice",
        ),
        # labels
        (spec_with(labels={"-bad": "x"}), "labels", "label key"),
        (spec_with(labels={"a b": "x"}), "labels", "label key"),
        (spec_with(labels={"k" * 64: "x"}), "labels", "label key"),
        (spec_with(labels={"k": "v" * 257}), "labels", "at most 256"),
        (spec_with(labels={"k": "line\nbreak"}), "labels", "printable"),
        # name, kind, owner
        (spec_with(name=""), "name", "1 to 128"),
        (spec_with(name="x" * 129), "name", "1 to 128"),
        (spec_with(name="two\nlines"), "name", "1 to 128"),
        (spec_with(kind="a\x7f"), "kind", "1 to 128"),
        (spec_with(owner="\t"), "owner", "1 to 128"),
        # retry
        (spec_with(retry={"max_attempts": 0}), "retry.max_attempts", "greater than or equal to 1"),
        (spec_with(retry={"max_attempts": 21}), "retry.max_attempts", "less than or equal to 20"),
        (spec_with(retry={"also_retry": ["bogus"]}), "retry.also_retry[0]", ""),
        (spec_with(retry={"backoff": "soon"}), "retry.backoff", "not a duration"),
        # placement
        (spec_with(placement={"partition": "gpu --uid=0"}), "placement.partition", "only letters"),
        (spec_with(placement={"account": "a" * 65}), "placement.account", "only letters"),
        (spec_with(placement={"qos": "$(id)"}), "placement.qos", "only letters"),
        # unknown top-level field
        (spec_with(network=True), "network", "not a known field"),
    ],
)
def test_rule_names_field(data: dict[str, Any], field: str, rule_part: str) -> None:
    error = refused(data)
    assert error.field == field, str(error)
    assert rule_part.lower() in error.rule.lower(), str(error)
    assert str(error).startswith(f"{field}: ")
    assert "Value error," not in error.rule


@pytest.mark.parametrize("name", sorted(RESERVED_ENV))
def test_reserved_env_refused(name: str) -> None:
    error = refused(spec_with(env={name: "x"}))
    assert error.field == "env"
    assert name in error.rule and "sandbox" in error.rule


@pytest.mark.parametrize("data", [None, [], "command: [true]", 3])
def test_spec_must_be_a_mapping(data: Any) -> None:
    assert refused(data).field == "spec"


@pytest.mark.parametrize(
    ("cpus", "memory", "gpus", "time_limit"),
    [(1, "1M", 0, 1), (1024, "64T", 64, "366d"), (8, 2**30, 1, "10m")],
)
def test_boundaries_accepted(cpus: int, memory: Any, gpus: int, time_limit: Any) -> None:
    parse_spec(spec_with(resources={"cpus": cpus, "memory": memory, "gpus": gpus, "time_limit": time_limit}))


def test_all_failure_kinds_are_job_or_infrastructure_except_setup() -> None:
    assert not JOB_FAILURES & INFRA_FAILURES
    assert set(FailureKind) - JOB_FAILURES - INFRA_FAILURES == {FailureKind.SETUP}


# -- files ---------------------------------------------------------------------------------------

TOML_JOB = """
image = "host"
command = ["python3", "-c", "print(1)"]
name = "from-toml"

[env]
SEED = "42"

[resources]
cpus = 2
memory = "512M"
time_limit = "10m"

[labels]
project = "p1"
"""

YAML_JOB = """
image: host
command: [python3, -c, "print(1)"]
name: from-toml
env:
  SEED: "42"
resources:
  cpus: 2
  memory: 512M
  time_limit: 10m
labels:
  project: p1
"""


def test_toml_and_yaml_files_give_the_same_spec(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(TOML_JOB)
    (tmp_path / "job.yaml").write_text(YAML_JOB)
    (tmp_path / "job.yml").write_text(YAML_JOB)
    from_toml = load_spec_file(tmp_path / "job.toml")
    assert from_toml.resources.memory == 512 * 1024**2
    assert from_toml.resources.time_limit == 600
    assert from_toml.env == {"SEED": "42"}
    assert load_spec_file(tmp_path / "job.yaml") == from_toml
    assert load_spec_file(str(tmp_path / "job.yml")).digest() == from_toml.digest()


def test_json_file(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(json.dumps(BASE))
    assert load_spec_file(tmp_path / "job.json").command == tuple(BASE["command"])


@pytest.mark.parametrize(
    ("filename", "content", "field", "rule_part"),
    [
        ("job.toml", 'command = ["a"\n', "file", "not valid TOML"),
        ("job.yaml", "command: [a\n", "file", "not valid YAML"),
        ("job.yaml", "- a\n- b\n", "file", "mapping"),
        ("job.yaml", "", "file", "mapping"),
        ("job.txt", "command = ['a']", "file", "must end in"),
        ("job.toml", 'command = ["a"]\n[resources]\nmemory = "lots"\n', "resources.memory", "not a size"),
        ("job.toml", 'command = ["a"]\n[resources]\ntime_limit = inf\n', "resources.time_limit", "finite"),
        ("job.yaml", "command: [a]\nresources:\n  time_limit: .inf\n", "resources.time_limit", "finite"),
        ("job.yaml", "command: [a]\nimage: docker://x\n", "image", "remote"),
        ("job.toml", 'command = ["a"]\nbogus = 1\n', "bogus", "not a known field"),
    ],
)
def test_bad_files(tmp_path: Path, filename: str, content: str, field: str, rule_part: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(SpecError) as info:
        load_spec_file(path)
    assert info.value.field == field, str(info.value)
    assert rule_part in info.value.rule


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec_file(tmp_path / "nope.toml")
    assert info.value.field == "file"
    assert "cannot read" in info.value.rule


# -- host checks ---------------------------------------------------------------------------------


def test_check_submittable_inputs_and_image(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("x")
    image = tmp_path / "img.sif"
    image.write_text("not really")
    check_submittable(parse_spec(spec_with(inputs=[{"source": str(data), "name": "d"}], image=str(image))))

    cases = [
        (spec_with(inputs=[{"source": "rel/data.csv", "name": "d"}]), "inputs[0].source", "absolute"),
        (
            spec_with(inputs=[{"source": str(data), "name": "d"}, {"source": str(tmp_path / "nope"), "name": "e"}]),
            "inputs[1].source",
            "does not exist",
        ),
        (spec_with(image=str(tmp_path / "missing.sif")), "image", "does not exist"),
    ]
    for raw, field, rule_part in cases:
        spec = parse_spec(raw)  # parses: host-dependent rules are separate
        with pytest.raises(SpecError) as info:
            check_submittable(spec)
        assert info.value.field == field
        assert rule_part in info.value.rule


# -- canonical form ------------------------------------------------------------------------------


def test_digest_stable_and_order_independent() -> None:
    one = parse_spec(spec_with(env={"A": "1", "B": "2", "C": "3"}, labels={"x": "1", "y": "2"}))
    two = parse_spec(spec_with(labels={"y": "2", "x": "1"}, env={"C": "3", "A": "1", "B": "2"}))
    assert one.canonical_json() == two.canonical_json()
    assert one.digest() == two.digest()
    assert len(one.digest()) == 64
    # stable across processes and versions of dict ordering: a pinned value for a pinned spec
    assert one.digest() == parse_spec(json.loads(one.canonical_json())).digest()
    # units are normalised before hashing
    assert (
        parse_spec(spec_with(resources={"memory": "1G"})).digest()
        == parse_spec(spec_with(resources={"memory": 1024**3})).digest()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"command": ["python3", "-c", "print(2)"]},
        {"env": {"A": "1"}},
        {"labels": {"a": "b"}},
        {"resources": {"cpus": 2}},
        {"name": "other"},
        {"inputs": [{"source": "/a", "name": "a"}]},
    ],
)
def test_digest_changes_with_content(change: dict[str, Any]) -> None:
    assert parse_spec(spec_with(**change)).digest() != parse_spec(dict(BASE)).digest()


def test_canonical_json_is_sorted_compact_and_round_trips() -> None:
    spec = parse_spec(spec_with(env={"B": "2", "A": "1"}, resources={"memory": "2G"}))
    text = spec.canonical_json()
    assert " " not in text.replace("print(1)", "")
    decoded = json.loads(text)
    assert list(decoded) == sorted(decoded)
    assert list(decoded["env"]) == ["A", "B"]
    assert JobSpec.model_validate_json(text) == spec


def test_spec_is_frozen() -> None:
    spec = parse_spec(dict(BASE))
    with pytest.raises(Exception):
        spec.backend = "slurm"  # type: ignore[misc]
