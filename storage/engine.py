"""Database engines: picked by URL, bound to the tables, opened per worker, migrated."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final, TypeAlias

from piccolo.apps.migrations.tables import Migration
from piccolo.engine.base import Engine
from piccolo.engine.postgres import PostgresEngine
from piccolo.engine.sqlite import SQLiteEngine
from piccolo.table import Table

from storage.errors import StorageError, translate_errors
from storage.tables import TABLES, User

log = logging.getLogger("storage.engine")

# Piccolo's Engine is generic in its transaction class; callers need not care which.
AnyEngine: TypeAlias = Engine[Any]

SQLITE_BUSY_TIMEOUT: Final = 5.0
POOL_MAX_SIZE: Final = 10
APP_NAME: Final = "storage"


class _PostgresEngine(PostgresEngine):
    """Piccolo's PostgresEngine without the version check in its constructor.

    That check connects synchronously (on a helper thread when a loop is running), so
    building the engine would block, and warn when the server is down; reachability is
    reported by ``ping`` and ``open_engine`` instead.
    """

    async def check_version(self) -> None:
        return None


def create_engine(url: str, *, mkdir: bool = True) -> AnyEngine:
    """The engine for a ``sqlite:///path`` or ``postgres(ql)://`` URL; no I/O but mkdir."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if mkdir:
            with translate_errors():
                path.parent.mkdir(parents=True, exist_ok=True)
        # timeout is sqlite3's busy timeout: wait this long for another worker's write lock.
        return SQLiteEngine(path=str(path), timeout=SQLITE_BUSY_TIMEOUT)
    if url.startswith(("postgres://", "postgresql://")):
        return _PostgresEngine(config={"dsn": url})
    raise StorageError(f"unsupported database URL scheme: {url.split(':', 1)[0]!r}")


def bind_engine(engine: AnyEngine) -> None:
    """Point every table at ``engine`` (``migrate`` also points Piccolo's own lookups)."""
    tables: tuple[type[Table], ...] = (*TABLES, Migration)
    for table in tables:
        table._meta.db = engine


def _piccolo_conf_module() -> types.ModuleType:
    from piccolo.conf.apps import AppRegistry, Finder  # heavy (imports black): only here

    # Piccolo's migration machinery finds the engine and app registry by importing
    # piccolo_conf (or $PICCOLO_CONF). An installed `gateway` command cannot import the
    # repository's piccolo_conf.py (it is not part of the package), so then a stand-in
    # module with the same two names takes its place.
    try:
        found = Finder().get_piccolo_conf_module()
    except ModuleNotFoundError as exc:
        if exc.name != "piccolo_conf":
            raise
        stand_in = types.ModuleType("piccolo_conf", "Stand-in registered by storage.engine.")
        stand_in.APP_REGISTRY = AppRegistry(apps=["storage.piccolo_app"])  # type: ignore[attr-defined]
        sys.modules["piccolo_conf"] = stand_in
        return stand_in
    assert found is not None  # Piccolo raises rather than return None
    return found


async def open_engine(engine: AnyEngine, *, max_pool_size: int = POOL_MAX_SIZE) -> None:
    """Start what this worker needs: a Postgres pool, or WAL mode on the SQLite file."""
    with translate_errors():
        if isinstance(engine, PostgresEngine):
            if engine.pool is None:
                await engine.start_connection_pool(min_size=1, max_size=max_pool_size)
        else:
            # WAL lets readers run beside one writer across worker processes; the
            # setting persists in the file, so once per open is plenty.
            await engine.run_ddl("PRAGMA journal_mode=WAL")


async def close_engine(engine: AnyEngine) -> None:
    """Close the Postgres pool, if one is open; SQLite holds nothing between queries."""
    if isinstance(engine, PostgresEngine) and engine.pool is not None:
        with translate_errors():
            await engine.close_connection_pool()


async def migrate(engine: AnyEngine) -> None:
    """Bind ``engine`` and apply the storage app's pending migrations; idempotent."""
    # Imported here: Piccolo's migration commands pull in black and friends (about 9 MB),
    # which the workers, who never migrate, need not carry.
    from piccolo.apps.migrations.commands.forwards import run_forwards

    bind_engine(engine)
    # Piccolo's migration machinery finds its engine through engine_finder (piccolo_conf).
    _piccolo_conf_module().DB = engine  # type: ignore[attr-defined]
    # Piccolo reports progress with print(); keep stdout clean and log it instead.
    out = io.StringIO()
    with translate_errors(), contextlib.redirect_stdout(out):
        result = await run_forwards(app_name=APP_NAME)
    if out.getvalue().strip():
        log.debug("piccolo migrations: %s", out.getvalue().strip())
    if not result.success:
        raise StorageError(f"migration failed: {result.message}")


async def ping() -> None:
    """One cheap query that reads a table; ``StorageUnavailable`` when unreachable.

    Not ``SELECT 1``: SQLite answers that without opening the file at all.
    """
    with translate_errors():
        await User.raw("SELECT 1 FROM users LIMIT 1").run()




@contextlib.asynccontextmanager
async def connected(url: str, *, migrated: bool = True) -> AsyncIterator[AnyEngine]:
    """A bound, opened (and by default migrated) engine for a one-off job, closed after."""
    engine = create_engine(url)
    bind_engine(engine)
    await open_engine(engine)
    try:
        if migrated:
            await migrate(engine)
        yield engine
    finally:
        await close_engine(engine)
