"""Shared fixtures.

``ledger_url`` gives every test a fresh, empty ledger database, once on SQLite (a file in
``tmp_path``) and once on the real Postgres (``HPCC_TEST_PG_URL``, default below):

* if the Postgres role may create databases, each test gets its own ``hpcc_t_<hex>`` database;
* else, if it may create schemas in its database, each test gets its own ``hpcc_t_<hex>`` schema
  (selected through ``search_path`` in the URL);
* else every ``hpcc_`` table and ``hpcc_alembic_version`` are dropped before the test.

When Postgres cannot be reached the Postgres parameter is *skipped* locally and *fails* in CI
(environment variable ``CI`` set): the issue asks for the whole ledger suite on both, in CI.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url

from hpc_compute.config import Settings, load_settings
from hpc_compute.ledger import db

PG_DEFAULT_URL = "postgresql+psycopg://hpcc:hpcc@127.0.0.1:5432/hpcc_test"
PG_URL_ENV = "HPCC_TEST_PG_URL"


def pg_base_url() -> URL:
    return make_url(db.normalise_url(os.environ.get(PG_URL_ENV) or PG_DEFAULT_URL))


def services_required() -> bool:
    """In CI (or with HPCC_TEST_REQUIRE_SERVICES=1, set by scripts/test-all.sh) a test whose
    service (Postgres, Slurm, sshd) is missing fails; elsewhere it may skip with the reason."""
    return bool(os.environ.get("CI") or os.environ.get("HPCC_TEST_REQUIRE_SERVICES"))


def _unavailable(reason: str) -> None:
    if services_required():
        pytest.fail(f"{reason} (services are required here: tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


class _PgAdmin:
    """An autocommit connection to the test database, to create and drop per-test namespaces."""

    def __init__(self, base: URL, engine: Engine, mode: str) -> None:
        self.base = base
        self.engine = engine
        self.mode = mode  # "database", "schema" or "tables"

    def exec(self, sql: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql))

    def fresh(self) -> tuple[str, str | None]:
        """Return (url, name of what to drop afterwards)."""
        name = f"hpcc_t_{uuid.uuid4().hex[:16]}"
        if self.mode == "database":
            self.exec(f'CREATE DATABASE "{name}"')
            return self.base.set(database=name).render_as_string(hide_password=False), name
        if self.mode == "schema":
            self.exec(f'CREATE SCHEMA "{name}"')
            url = self.base.update_query_dict({"options": f"-csearch_path={name}"})
            return url.render_as_string(hide_password=False), name
        self.drop_ledger_tables()
        return self.base.render_as_string(hide_password=False), None

    def drop(self, name: str | None) -> None:
        if name is None:
            self.drop_ledger_tables()
        elif self.mode == "database":
            self.exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            self.exec(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def drop_ledger_tables(self) -> None:
        with self.engine.connect() as conn:
            names = conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                    "AND (tablename LIKE 'hpcc\\_%' OR tablename = 'hpcc_alembic_version')"
                )
            ).scalars()
            for table in list(names):
                conn.execute(text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[_PgAdmin]:
    base = pg_base_url()
    safe = base.render_as_string(hide_password=True)
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:  # pragma: no cover - dev dependency
        _unavailable(f"psycopg 3 is not installed: {exc}")
    engine = create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            can_createdb = bool(
                conn.execute(text("SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user")).scalar()
            )
            can_schema = bool(
                conn.execute(text("SELECT has_database_privilege(current_database(), 'CREATE')")).scalar()
            )
    except Exception as exc:
        engine.dispose()
        _unavailable(f"Postgres is unreachable at {safe} ({PG_URL_ENV}): {exc.__class__.__name__}: {exc}")
    mode = "database" if can_createdb else "schema" if can_schema else "tables"
    admin = _PgAdmin(base, engine, mode)
    yield admin
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty ledger database (not migrated yet)."""
    if request.param == "sqlite":
        yield db.sqlite_url(tmp_path / "ledger.db")
        return
    admin: _PgAdmin = request.getfixturevalue("pg_admin")
    url, name = admin.fresh()
    try:
        yield url
    finally:
        admin.drop(name)


@pytest.fixture
def hpcc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HPC_COMPUTE_HOME in tmp, with no other hpc-compute variable and no user config leaking in."""
    for name in list(os.environ):
        if name.startswith("HPC_COMPUTE_"):
            monkeypatch.delenv(name)
    home = tmp_path / "hpcc-home"
    home.mkdir()
    monkeypatch.setenv("HPC_COMPUTE_HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    return home


@pytest.fixture
def settings(hpcc_home: Path, tmp_path: Path) -> Settings:
    return load_settings(system_file=tmp_path / "none.toml")
