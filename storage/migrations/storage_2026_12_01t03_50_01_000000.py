"""One rule for user names and token labels on both engines (storage.names), and the
key-stored time of keys stored before it had a column.

As for the cap bound: a check on Postgres, triggers on SQLite (which cannot add a check
to a table), in raw SQL, in a migration of its own. Rows written before this migration
are left as they are (NOT VALID on Postgres; SQLite's triggers see only new writes), so
an upgrade never fails on an old name; every new or renamed one must follow the rule.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine import engine_finder

ID = "2026-12-01T03:50:01:000000"
VERSION = "1.38.0"
DESCRIPTION = "user names 1..64 of letters, digits, . _ - @; labels without control characters"

NAME_MESSAGE = "CHECK constraint failed: name must be 1..64 characters of letters, digits and . _ - @"
LABEL_MESSAGE = "CHECK constraint failed: label must be at most 100 characters, with no control characters"

BACKFILL = (
    "UPDATE user_anthropic_keys SET key_stored_at = updated_at WHERE key_stored_at IS NULL"
)

POSTGRES_FORWARDS = [
    """
    ALTER TABLE users ADD CONSTRAINT users_name_rule
    CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$') NOT VALID
    """,
    """
    ALTER TABLE gateway_tokens ADD CONSTRAINT gateway_tokens_label_rule
    CHECK (char_length(label) <= 100 AND label !~ '[[:cntrl:]]') NOT VALID
    """,
    BACKFILL,
]
POSTGRES_BACKWARDS = [
    "ALTER TABLE users DROP CONSTRAINT users_name_rule",
    "ALTER TABLE gateway_tokens DROP CONSTRAINT gateway_tokens_label_rule",
]

# GLOB has no character classes for "control": the class is spelled out with char().
_CONTROL_CLASS = "'*[' || char(" + ", ".join(str(c) for c in [*range(1, 32), 127]) + ") || ']*'"
_SQLITE_NAME = """
    CREATE TRIGGER users_name_rule_{event}
    BEFORE {what} ON users
    FOR EACH ROW
    WHEN typeof(NEW.name) != 'text' OR length(NEW.name) NOT BETWEEN 1 AND 64
         OR NEW.name GLOB '*[^A-Za-z0-9._@-]*'
    BEGIN
        SELECT RAISE(ABORT, '{message}');
    END
"""
_SQLITE_LABEL = """
    CREATE TRIGGER gateway_tokens_label_rule_{event}
    BEFORE {what} ON gateway_tokens
    FOR EACH ROW
    WHEN length(NEW.label) > 100 OR NEW.label GLOB {control}
    BEGIN
        SELECT RAISE(ABORT, '{message}');
    END
"""
SQLITE_FORWARDS = [
    *(
        _SQLITE_NAME.format(event=event, what=what, message=NAME_MESSAGE)
        for event, what in (("insert", "INSERT"), ("update", "UPDATE OF name"))
    ),
    *(
        _SQLITE_LABEL.format(event=event, what=what, message=LABEL_MESSAGE, control=_CONTROL_CLASS)
        for event, what in (("insert", "INSERT"), ("update", "UPDATE OF label"))
    ),
    BACKFILL,
]
SQLITE_BACKWARDS = [
    f"DROP TRIGGER IF EXISTS {table}_rule_{event}"
    for table in ("users_name", "gateway_tokens_label")
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
