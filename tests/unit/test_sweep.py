"""Sweeps expand to the cartesian product with literal token substitution; JSON lines name bad lines."""

from __future__ import annotations

import pytest

from hpc_compute.errors import SpecError
from hpc_compute.spec import parse_spec
from hpc_compute.sweep import expand, read_json_lines


def test_expand_is_the_cartesian_product_with_labels() -> None:
    jobs = expand(
        {
            "command": ["train", "--lr", "{lr}", "--seed={seed}"],
            "env": {"SEED": "{seed}"},
            "name": "t-{lr}-{seed}",
            "labels": {"project": "p"},
            "sweep": {"lr": [0.1, 0.01], "seed": [1, 2, 3]},
        }
    )
    assert len(jobs) == 6
    assert jobs[0]["command"] == ["train", "--lr", "0.1", "--seed=1"]
    assert jobs[-1]["command"] == ["train", "--lr", "0.01", "--seed=3"]
    assert jobs[4]["env"] == {"SEED": "2"} and jobs[4]["name"] == "t-0.01-2"
    assert jobs[4]["labels"] == {"project": "p", "sweep.lr": "0.01", "sweep.seed": "2"}
    assert all("sweep" not in job for job in jobs)
    for job in jobs:
        parse_spec(job)  # every expansion is a valid spec


def test_substitution_is_literal_not_a_format_string() -> None:
    (job,) = expand({"command": ["echo", "{x}", "{x.__class__}", "{y}", "{{x}}"], "sweep": {"x": ["$(id)"]}})
    assert job["command"] == ["echo", "$(id)", "{x.__class__}", "{y}", "{$(id)}"]


@pytest.mark.parametrize(
    ("sweep", "field"),
    [({}, "sweep"), ({"a": []}, "sweep.a"), ({"a": [True]}, "sweep.a"), ({"1a": [1]}, "sweep.1a"), ([1], "sweep")],
)
def test_bad_sweeps_name_the_field(sweep: object, field: str) -> None:
    with pytest.raises(SpecError) as info:
        expand({"command": ["x"], "sweep": sweep})
    assert info.value.field == field


def test_a_huge_sweep_is_refused() -> None:
    with pytest.raises(SpecError, match="expands to"):
        expand({"command": ["x"], "sweep": {"a": list(range(1000)), "b": list(range(1000))}})


def test_json_lines() -> None:
    jobs = list(read_json_lines(['{"command": ["a"]}', "", "# comment", '{"command": ["b"]}']))
    assert [j["command"] for j in jobs] == [["a"], ["b"]]
    with pytest.raises(SpecError) as info:
        list(read_json_lines(['{"command": ["a"]}', "not json"]))
    assert info.value.field == "line 2"
    with pytest.raises(SpecError):
        list(read_json_lines(["[1, 2]"]))
