"""Enforce 1 <= max_concurrent <= 256 in the database itself, on either engine.

Piccolo's own Check constraint migrates on Postgres but fails on SQLite, and raw SQL runs
before the tables of its own migration exist: hence raw SQL, in a migration of its own.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine import engine_finder

ID = "2026-11-29T05:50:50:571699"
VERSION = "1.38.0"
DESCRIPTION = "max_concurrent between 1 and 256, enforced by the database"

POSTGRES_FORWARDS = [
    """
    ALTER TABLE user_anthropic_keys
    ADD CONSTRAINT user_anthropic_keys_max_concurrent_range
    CHECK (max_concurrent BETWEEN 1 AND 256)
    """,
]
POSTGRES_BACKWARDS = [
    "ALTER TABLE user_anthropic_keys DROP CONSTRAINT user_anthropic_keys_max_concurrent_range",
]

# SQLite cannot add a CHECK to an existing table, so triggers refuse bad rows instead.
# typeof() also refuses text and reals, which SQLite's type affinity would otherwise keep.
_SQLITE_TRIGGER = """
    CREATE TRIGGER user_anthropic_keys_max_concurrent_{event}
    BEFORE {event} ON user_anthropic_keys
    FOR EACH ROW
    WHEN typeof(NEW.max_concurrent) != 'integer' OR NEW.max_concurrent NOT BETWEEN 1 AND 256
    BEGIN
        SELECT RAISE(ABORT, 'CHECK constraint failed: max_concurrent must be between 1 and 256');
    END
"""
SQLITE_FORWARDS = [_SQLITE_TRIGGER.format(event=event) for event in ("insert", "update")]
SQLITE_BACKWARDS = [
    f"DROP TRIGGER IF EXISTS user_anthropic_keys_max_concurrent_{event}"
    for event in ("insert", "update")
]


async def _run(*, forwards: bool) -> None:
    engine = engine_finder()
    if engine is None:
        raise RuntimeError("no Piccolo engine configured")
    if engine.engine_type == "sqlite":
        statements = SQLITE_FORWARDS if forwards else SQLITE_BACKWARDS
    else:
        statements = POSTGRES_FORWARDS if forwards else POSTGRES_BACKWARDS
    for statement in statements:
        await engine.run_ddl(statement)


async def forwards():
    manager = MigrationManager(
        migration_id=ID, app_name="storage", description=DESCRIPTION
    )

    async def run():
        await _run(forwards=True)

    async def run_backwards():
        await _run(forwards=False)

    manager.add_raw(run)
    manager.add_raw_backwards(run_backwards)

    return manager
