"""Each stored ciphertext names the master key that made it (NULL: made before key ids).

No data moves: a NULL key id is tried under every key of the keyring, and
``gateway keys rotate-master`` gives every row one.
"""

from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.columns.column_types import Varchar
from piccolo.columns.indexes import IndexMethod

ID = "2026-12-01T03:39:57:288405"
VERSION = "1.38.0"
DESCRIPTION = "key id of the master key that made each ciphertext"


async def forwards():
    manager = MigrationManager(
        migration_id=ID, app_name="storage", description=DESCRIPTION
    )

    manager.add_column(
        table_class_name="UserAnthropicKey",
        tablename="user_anthropic_keys",
        column_name="key_id",
        db_column_name="key_id",
        column_class_name="Varchar",
        column_class=Varchar,
        params={
            "length": 16,
            "default": None,
            "null": True,
            "primary_key": False,
            "unique": False,
            "index": False,
            "index_method": IndexMethod.btree,
            "choices": None,
            "db_column_name": None,
            "secret": False,
        },
        schema=None,
    )

    return manager
