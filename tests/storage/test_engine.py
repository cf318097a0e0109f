"""Engines: reachability, migrations, SQLite settings and error translation."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from piccolo.apps.migrations.tables import Migration

from storage.engine import (
    AnyEngine,
    bind_engine,
    close_engine,
    create_engine,
    migrate,
    open_engine,
    ping,
)
from storage.errors import StorageError, StorageUnavailable, translate_errors
from storage.tables import User


async def test_ping_succeeds_on_a_migrated_database(db: AnyEngine) -> None:
    await ping()


async def test_migrate_twice_is_a_no_op(db: AnyEngine) -> None:
    before = await Migration.select(Migration.name).where(Migration.app_name == "storage").run()
    # the tables, the max_concurrent bound, the key id, usage by hour (table and index),
    # token expiry and use, the name and label rule
    assert len(before) == 7
    await migrate(db)
    after = await Migration.select(Migration.name).where(Migration.app_name == "storage").run()
    assert after == before
    assert await User.table_exists().run()


SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
POSTGRES_ONLY = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@SQLITE_ONLY
async def test_sqlite_runs_in_wal_mode(db: AnyEngine) -> None:
    rows = await db.run_ddl("PRAGMA journal_mode")
    assert rows[0]["journal_mode"] == "wal"


async def test_ping_unreachable_postgres_raises_storage_unavailable() -> None:
    engine = create_engine("postgresql://postgres@127.0.0.1:1/test")
    bind_engine(engine)
    with pytest.raises(StorageUnavailable):
        await ping()
    with pytest.raises(StorageUnavailable):
        await open_engine(engine)
    await close_engine(engine)  # nothing was opened; must not complain


@POSTGRES_ONLY
async def test_ping_missing_postgres_database_raises_storage_unavailable(
    database_url: str,
) -> None:
    base, _, _ = database_url.rpartition("/")
    bind_engine(create_engine(f"{base}/gwtest_no_such_database"))
    with pytest.raises(StorageUnavailable):
        await ping()


async def test_ping_unopenable_sqlite_raises_storage_unavailable(tmp_path: Path) -> None:
    bind_engine(create_engine(f"sqlite:///{tmp_path}"))  # a directory, not a file
    with pytest.raises(StorageUnavailable):
        await ping()
    await _aiosqlite_threads_finished()


async def _aiosqlite_threads_finished() -> None:
    # aiosqlite stops the worker thread of a connection that failed to open without
    # waiting for it; the thread then reports to this test's event loop, which must
    # still be open. Production loops outlive it; a test's loop closes at once.
    for _ in range(200):
        if not any("_connection_worker_thread" in t.name for t in threading.enumerate()):
            return
        await asyncio.sleep(0.01)


def test_sqlite_parent_that_cannot_be_created_raises_storage_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StorageUnavailable):
        create_engine(f"sqlite:///{blocker}/sub/gateway.sqlite3")


def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    create_engine(f"sqlite:///{tmp_path}/new/dir/gateway.sqlite3")
    assert (tmp_path / "new" / "dir").is_dir()


def test_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(StorageError):
        create_engine("mysql://localhost/db")


def test_sqlite_lock_timeout_is_storage_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    waiter = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageUnavailable), translate_errors():
            waiter.execute("BEGIN IMMEDIATE")
    finally:
        holder.close()
        waiter.close()


def test_other_sqlite_errors_are_storage_errors(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "x.sqlite3")
    try:
        with pytest.raises(StorageError) as caught, translate_errors():
            connection.execute("SELECT * FROM no_such_table")
        assert not isinstance(caught.value, StorageUnavailable)
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        connection.close()
