"""Alembic environment for the hpc-compute ledger (SQLite and Postgres)."""

from __future__ import annotations

from sqlmodel import SQLModel

import hpc_compute.ledger.models  # noqa: F401  (registers the tables)
from alembic import context
from hpc_compute.ledger.db import make_engine

config = context.config
target_metadata = SQLModel.metadata
VERSION_TABLE = "hpcc_alembic_version"


def _url() -> str:
    url = config.attributes.get("hpcc_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no ledger URL given to alembic")
    return str(url)


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
