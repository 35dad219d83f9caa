"""Database engines for the ledger: SQLite (embedded default) and Postgres (shared use).

SQLite runs in WAL mode with a 30 s busy timeout; write transactions start with
``BEGIN IMMEDIATE`` so two writers queue instead of failing on a lock upgrade.
"""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from alembic import command
from hpc_compute.errors import LedgerUnavailable
from hpc_compute.resources import migrations_dir

SQLITE_BUSY_TIMEOUT_MS = 30_000
VERSION_TABLE = "hpcc_alembic_version"  # must match alembic/env.py


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and select the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # A small pool: connections (and their PRAGMAs) are reused; sqlite3 objects may cross
        # threads because SQLAlchemy hands each to one session at a time.
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=5,
            max_overflow=10,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        connect_args={"connect_timeout": 10},
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy's begin event issue BEGIN, instead of pysqlite's implicit transactions.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("hpcc_write", False) else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


def alembic_config(url: str) -> Config:
    """An Alembic config built in code, so ``hpc-compute db upgrade`` works from an installed wheel."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    config.attributes["hpcc_url"] = normalise_url(url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to ``revision``. On SQLite an flock next to the file serialises processes that
    migrate a fresh ledger at the same moment (Postgres serialises DDL itself)."""
    lock = None
    url = normalise_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            lock = open(f"{database}.migrate.lock", "a")  # noqa: SIM115 - closed in finally
            fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise LedgerUnavailable(
            f"cannot migrate the ledger at {safe_url(url)}: {exc.__class__.__name__}: {exc}"
        ) from exc
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable ledger URL>"
