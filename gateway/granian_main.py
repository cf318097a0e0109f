"""The Granian server process that ``gateway serve`` supervises (run as ``-m``).

Granian's ``serve()`` must own the main thread of its process, and when it detects a
worker crash loop it exits; so it runs in a child of the launcher, which keeps the
namespace, the reaper and the permits alive across such an exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

import msgspec
from granian.constants import HTTPModes, Interfaces, Loops
from granian.server import Server

from gateway.logs import logging_dictconfig
from gateway.settings import GranianOptions

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """If the launcher dies (even by SIGKILL), Granian gets SIGTERM and stops its workers."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    options = msgspec.json.decode(sys.argv[1], type=GranianOptions)
    _die_with_parent(options.launcher_pid)
    server = Server(
        "gateway.app:app_from_environment",
        factory=True,
        address=options.host,
        port=options.port,
        interface=Interfaces.ASGI,
        http=HTTPModes(options.http),
        loop=Loops(options.loop),
        workers=options.workers,
        backlog=options.backlog,
        backpressure=options.backpressure,
        respawn_failed_workers=True,
        respawn_interval=options.respawn_interval,
        workers_kill_timeout=options.worker_kill_timeout,
        workers_lifetime=options.worker_lifetime,
        workers_max_rss=options.worker_max_rss,
        log_access=False,
        log_dictconfig=logging_dictconfig(options.log_level),
        working_dir=Path.cwd(),
        ssl_cert=Path(options.tls_cert) if options.tls_cert else None,
        ssl_key=Path(options.tls_key) if options.tls_key else None,
    )
    server.serve()


if __name__ == "__main__":
    main()
