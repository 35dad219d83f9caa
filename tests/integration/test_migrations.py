"""Alembic migrations on SQLite and Postgres: upgrade from empty, no drift from the models, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

import hpc_compute.ledger.models  # noqa: F401  (registers the tables)
from hpc_compute.ledger import db
from hpc_compute.ledger.store import Ledger

TABLES = {"hpcc_run", "hpcc_attempt", "hpcc_event", "hpcc_artifact", "hpcc_scheduler", "hpcc_alembic_version"}


def _tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _drift(url: str) -> list[object]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            # the version table is named as alembic/env.py names it (autogenerate skips it by that name)
            opts = {"compare_type": True, "version_table": db.VERSION_TABLE}
            context = MigrationContext.configure(conn, opts=opts)
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_models(ledger_url: str) -> None:
    assert _tables(ledger_url) & TABLES == set()
    db.upgrade(ledger_url)
    assert _tables(ledger_url) >= TABLES
    engine = db.make_engine(ledger_url)
    try:
        assert db.current_revision(engine) == db.head_revision() is not None
    finally:
        engine.dispose()
    assert _drift(ledger_url) == []


def test_downgrade_to_base_and_upgrade_again(ledger_url: str) -> None:
    db.upgrade(ledger_url)
    from alembic import command

    command.downgrade(db.alembic_config(ledger_url), "base")
    assert _tables(ledger_url) & (TABLES - {"hpcc_alembic_version"}) == set()
    engine = db.make_engine(ledger_url)
    try:
        assert db.current_revision(engine) is None
    finally:
        engine.dispose()
    db.upgrade(ledger_url)
    assert _drift(ledger_url) == []
    ledger = Ledger(ledger_url, auto_upgrade=False)
    try:
        ledger.ensure_ready()  # a fresh handle sees the migrated schema as current
        assert ledger.count_runs() == {}
    finally:
        ledger.close()


def test_upgrade_is_idempotent(ledger_url: str) -> None:
    db.upgrade(ledger_url)
    db.upgrade(ledger_url)
    assert _drift(ledger_url) == []


def test_drift_check_can_fail(ledger_url: str) -> None:
    """The comparison really looks: an extra column in the database shows up."""
    db.upgrade(ledger_url)
    engine = db.make_engine(ledger_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE hpcc_run ADD COLUMN surprise INTEGER"))
    finally:
        engine.dispose()
    assert _drift(ledger_url) != []


def test_sqlite_wal_and_busy_timeout(tmp_path: Path) -> None:
    url = db.sqlite_url(tmp_path / "sub" / "ledger.db")
    ledger = Ledger(url)
    try:
        ledger.ensure_ready()
        with ledger.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        ledger.close()
    assert (tmp_path / "sub" / "ledger.db").exists()
    # WAL is a property of the file: a plain sqlite3 connection sees it too
    import sqlite3

    with sqlite3.connect(tmp_path / "sub" / "ledger.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h/d", "postgresql+psycopg://u:p@h/d"),
        ("postgresql://u:p@h/d", "postgresql+psycopg://u:p@h/d"),
        ("postgresql+psycopg://u:p@h/d", "postgresql+psycopg://u:p@h/d"),
        ("sqlite:////x/y.db", "sqlite:////x/y.db"),
    ],
)
def test_normalise_url_selects_psycopg3(given: str, expected: str) -> None:
    assert db.normalise_url(given) == expected
    assert "p@" not in db.safe_url(given)
