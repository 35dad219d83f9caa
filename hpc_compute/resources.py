"""Where the files the installed package needs at run time live: the job-side wrapper, the
templates and the migrations. In a wheel they sit in ``hpc_compute/_data/``; in a checkout
they are the top-level ``sbatch/``, ``templates/`` and ``alembic/`` folders."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_DATA = _PACKAGE / "_data"
_CHECKOUT = _PACKAGE.parent


def resource_dir(name: str) -> Path:
    """The folder ``name`` (one of sbatch, templates, alembic)."""
    for base in (_DATA, _CHECKOUT):
        candidate = base / name
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"hpc-compute resource folder {name!r} is missing from the installation")


def wrapper_path() -> Path:
    return resource_dir("sbatch") / "hpcc_wrapper.py"


def templates_dir() -> Path:
    return resource_dir("templates")


def migrations_dir() -> Path:
    return resource_dir("alembic")
