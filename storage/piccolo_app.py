"""The Piccolo app of the storage package: its tables and migrations folder."""

from __future__ import annotations

from pathlib import Path

from piccolo.conf.apps import AppConfig

from storage.tables import TABLES

APP_CONFIG = AppConfig(
    app_name="storage",
    migrations_folder_path=Path(__file__).parent / "migrations",
    table_classes=list(TABLES),
    migration_dependencies=[],
    commands=[],
)
