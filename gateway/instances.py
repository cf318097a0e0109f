"""Running gateways on this host: what each launcher records of itself, and finding them.

The launcher writes one JSON line into its namespace's lock file (``GatewayInfo``); the
command line reads it to use the running gateway's database when none is configured, and
``gateway status`` prints it.
"""

from __future__ import annotations

import msgspec

from gateway.settings import database_identity, redacted_url
from ipc.namespace import RunningLauncher, running_launchers


class GatewayInfo(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: str
    # The lock file is mode 0600, like the master key file; `status` prints it redacted.
    database_url: str
    host: str
    port: int
    workers: int
    started_at: str
    version: str = ""


class RunningGateway(msgspec.Struct, frozen=True):
    launcher: RunningLauncher
    info: GatewayInfo

    @property
    def database(self) -> str:
        return database_identity(self.info.database_url)

    def describe(self) -> str:
        info = self.info
        return (
            f"gateway on {info.host}:{info.port} (launcher pid {self.launcher.pid}, "
            f"{info.workers} workers, namespace {self.launcher.namespace}, "
            f"database {redacted_url(info.database_url)}, data folder {info.data_dir})"
        )


def encode_info(info: GatewayInfo) -> str:
    return msgspec.json.encode(info).decode()


def running_gateways() -> list[RunningGateway]:
    """Every gateway whose launcher runs on this host (older launchers, which wrote no
    info line, are left out)."""
    found = []
    for launcher in running_launchers():
        try:
            info = msgspec.json.decode(launcher.info, type=GatewayInfo)
        except msgspec.DecodeError:
            continue
        found.append(RunningGateway(launcher, info))
    return sorted(found, key=lambda gateway: (gateway.info.port, gateway.launcher.namespace))
