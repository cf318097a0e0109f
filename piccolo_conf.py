"""Piccolo's configuration: the engine from GATEWAY_DATABASE_URL and the app registry."""

from piccolo.conf.apps import AppRegistry

from gateway.settings import database_url_from_env
from storage.engine import create_engine

# Only the database is read here (the gateway validates every other setting itself and
# replaces this engine when it migrates), and no folder is made: importing this module
# must neither fail on an unrelated variable nor create ./gateway-data.
DB = create_engine(database_url_from_env(), mkdir=False)

APP_REGISTRY = AppRegistry(apps=["storage.piccolo_app"])
