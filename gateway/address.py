"""One gateway per listening address: the launcher's claim on host:port.

Granian binds with ``SO_REUSEPORT``, so a second server on the same address would join
the first one's and take half its connections. The launcher therefore claims the address
before starting Granian: an exclusive lock on a file named for it (two launchers of this
gateway, even racing), and a trial bind without ``SO_REUSEPORT`` (any other program
listening there, or a gateway started by an older launcher).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
from pathlib import Path

from ipc.naming import SHM_DIR


class AddressTaken(Exception):
    """The address is held by something other than this launcher's own workers."""


def address_lock_path(host: str, port: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9.]", "_", host)
    # Not ".lock": those are namespace locks, which tools list.
    return SHM_DIR / f"gateway-address-{safe}-{port}.portlock"


class AddressClaim:
    """Held by ``gateway serve`` for its whole life, across restarts of its Granian server."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._fd: int | None = None

    def __enter__(self) -> AddressClaim:
        self.claim()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def claim(self) -> None:
        where = f"{self.host}:{self.port}"
        if self.port == 0:
            return  # an ephemeral port is never shared
        sweep_stale_claims()
        path = address_lock_path(self.host, self.port)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _first_line(path)
                raise AddressTaken(
                    f"GATEWAY_PORT: {where} must be free, got one served by another gateway "
                    f"(launcher pid {holder or '?'}; Address already in use): stop it, or "
                    "choose another --port"
                ) from None
            if _still_named(fd, path):
                break
            os.close(fd)  # swept (or released) between our open and our lock: again
        try:
            probe_bind(self.host, self.port)
        except AddressTaken:
            path.unlink(missing_ok=True)  # ours while we hold its lock: leave nothing behind
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        address_lock_path(self.host, self.port).unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def sweep_stale_claims() -> None:
    """Remove the claim files of launchers that died without releasing them (SIGKILL, an
    OOM kill): a file whose lock anyone can take has no holder. A launcher that opened a
    file just before it is removed finds its lock on a file no longer named and opens
    again (``_still_named``)."""
    for path in SHM_DIR.glob("gateway-address-*.portlock"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # gone meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # held: a live gateway's
            continue
        if _still_named(fd, path):
            path.unlink(missing_ok=True)
        os.close(fd)


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return path.stat().st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def probe_bind(host: str, port: int) -> None:
    """Bind (without listening) as a lone socket would: fails while anyone listens there."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AddressTaken(
            f"GATEWAY_HOST: must be an address of this host, got {host!r} ({exc.strerror})"
        ) from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # SO_REUSEADDR only: a port left in TIME_WAIT by our own last run is free, but one
        # a live socket listens on (with or without SO_REUSEPORT) is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressTaken(
                    f"GATEWAY_PORT: {host}:{port} must be free, got one another program "
                    f"listens on ({exc.strerror}): stop it, or choose another --port"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise AddressTaken(
                    f"GATEWAY_HOST: must be an address of this host, got {host!r} ({exc.strerror})"
                ) from None
            raise AddressTaken(f"GATEWAY_PORT: cannot bind {host}:{port}: {exc}") from None


def _first_line(path: Path) -> str:
    with contextlib.suppress(OSError), path.open() as fh:
        return fh.readline().strip()
    return ""
