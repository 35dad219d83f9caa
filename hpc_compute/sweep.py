"""Parameter sweeps and job lists: many runs from one job file or from JSON lines.

A job file may hold a ``[sweep]`` table mapping parameter names to lists of values; the file
stands for every combination (the cartesian product, in the order the table lists them).
``{name}`` in the command, env values, the display name and label values is replaced by the
combination's value (only these tokens: no format mini-language, no attribute access), and
each run is labelled ``sweep.<name>=<value>`` so ``list`` can filter by it::

    image = "host"
    command = ["/usr/bin/python3", "/input/code/train.py", "--lr", "{lr}", "--seed", "{seed}"]
    name = "train-lr{lr}-s{seed}"
    [sweep]
    lr = [0.1, 0.01]
    seed = [1, 2, 3]
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from hpc_compute.errors import SpecError

MAX_RUNS = 100_000
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _values(sweep: Any) -> list[tuple[str, list[str]]]:
    if not isinstance(sweep, dict) or not sweep:
        raise SpecError("sweep", "must be a table of parameter = [values, ...]")
    out: list[tuple[str, list[str]]] = []
    for name, values in sweep.items():
        if not isinstance(name, str) or not PARAM_RE.match(name):
            raise SpecError(f"sweep.{name}", "a parameter name must be letters, digits and '_'")
        if not isinstance(values, list) or not values:
            raise SpecError(f"sweep.{name}", "must be a non-empty list of values")
        texts: list[str] = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise SpecError(f"sweep.{name}", "values must be strings or numbers")
            texts.append(str(value))
        out.append((name, texts))
    return out


def _substitute(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def _apply(data: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    job = dict(data)
    if isinstance(job.get("command"), list):
        job["command"] = [_substitute(a, values) if isinstance(a, str) else a for a in job["command"]]
    if isinstance(job.get("env"), dict):
        job["env"] = {k: _substitute(v, values) if isinstance(v, str) else v for k, v in job["env"].items()}
    if isinstance(job.get("name"), str):
        job["name"] = _substitute(job["name"], values)
    labels = dict(job.get("labels") or {}) if isinstance(job.get("labels") or {}, dict) else job.get("labels")
    if isinstance(labels, dict):
        labels = {k: _substitute(v, values) if isinstance(v, str) else v for k, v in labels.items()}
        labels.update({f"sweep.{name}": value for name, value in values.items()})
        job["labels"] = labels
    return job


def expand(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One job mapping per combination of the ``sweep`` table (or the job itself without one)."""
    if "sweep" not in data:
        return [data]
    base = {k: v for k, v in data.items() if k != "sweep"}
    params = _values(data["sweep"])
    total = 1
    for _, values in params:
        total *= len(values)
    if total > MAX_RUNS:
        raise SpecError("sweep", f"expands to {total} runs; at most {MAX_RUNS} in one submission")
    names = [name for name, _ in params]
    return [_apply(base, dict(zip(names, combo, strict=True))) for combo in itertools.product(*(v for _, v in params))]


def read_json_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Job mappings from JSON lines (blank lines and ``#`` comments skipped); errors name the line."""
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"line {number}", f"is not JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise SpecError(f"line {number}", "must be a JSON object of job fields")
        yield value
