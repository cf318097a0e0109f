"""Piccolo's configuration: the engine from GATEWAY_DATABASE_URL and the app registry."""

from piccolo.conf.apps import AppRegistry

from gateway.settings import Settings
from storage.engine import create_engine

DB = create_engine(Settings.from_env().database_url)

APP_REGISTRY = AppRegistry(apps=["storage.piccolo_app"])
