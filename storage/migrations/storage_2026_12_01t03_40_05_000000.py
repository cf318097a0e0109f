"""usage_hourly is unique on (user, hour, model): the key of the workers' additive upsert.

Piccolo has no composite unique option, and raw SQL runs before the tables of its own
migration exist: hence a unique index in raw SQL, in a migration of its own. The same
statement serves SQLite and Postgres.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine import engine_finder

ID = "2026-12-01T03:40:05:000000"
VERSION = "1.38.0"
DESCRIPTION = "usage_hourly unique on (user, hour, model)"

FORWARDS = [
    'CREATE UNIQUE INDEX usage_hourly_user_hour_model ON usage_hourly ("user", hour, model)',
    # The settings page and the CLI read a time range for every user.
    "CREATE INDEX usage_hourly_hour ON usage_hourly (hour)",
]
BACKWARDS = [
    "DROP INDEX IF EXISTS usage_hourly_hour",
    "DROP INDEX IF EXISTS usage_hourly_user_hour_model",
]


async def _run(statements: list[str]) -> None:
    engine = engine_finder()
    if engine is None:
        raise RuntimeError("no Piccolo engine configured")
    for statement in statements:
        await engine.run_ddl(statement)


async def forwards():
    manager = MigrationManager(
        migration_id=ID, app_name="storage", description=DESCRIPTION
    )

    async def run():
        await _run(FORWARDS)

    async def run_backwards():
        await _run(BACKWARDS)

    manager.add_raw(run)
    manager.add_raw_backwards(run_backwards)

    return manager
