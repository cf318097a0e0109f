from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.columns.column_types import Timestamptz
from piccolo.columns.indexes import IndexMethod

ID = "2026-12-01T03:50:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "token expiry and last use; when the key itself was last stored"

_PARAMS = {
    "default": None,
    "null": True,
    "primary_key": False,
    "unique": False,
    "index": False,
    "index_method": IndexMethod.btree,
    "choices": None,
    "db_column_name": None,
    "secret": False,
}


async def forwards():
    manager = MigrationManager(
        migration_id=ID, app_name="storage", description=DESCRIPTION
    )
    for table_class_name, tablename, column_name in (
        ("GatewayToken", "gateway_tokens", "expires_at"),
        ("GatewayToken", "gateway_tokens", "last_used_at"),
        ("UserAnthropicKey", "user_anthropic_keys", "key_stored_at"),
    ):
        manager.add_column(
            table_class_name=table_class_name,
            tablename=tablename,
            column_name=column_name,
            db_column_name=column_name,
            column_class_name="Timestamptz",
            column_class=Timestamptz,
            params=dict(_PARAMS),
            schema=None,
        )
    return manager
