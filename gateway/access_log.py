"""The access log: one JSON line per proxied request, written without ``logging``.

The ``logging`` machinery costs a proxied request about 27 µs of worker CPU (a
``LogRecord``, the handler lock, the formatter walking ``__dict__``, a write per line):
15% of the whole request. Here a line is one ``msgspec`` encode of a small Struct into a
list, and the list goes to stderr a few times a second from a task of the worker's loop
(or at once when it grows past ``MAX_BUFFERED``), in writes of whole lines no longer than
``PIPE_BUF``: several workers share one stderr pipe, and the kernel keeps such writes
whole, so lines of different workers never interleave mid-line.

The shape is the one ``gateway.logs.JsonFormatter`` gives every other log line (``ts``,
``level``, ``logger``, ``pid``, ``msg``, then the fields), so a log shipper sees one
format. It is on when the ``gateway.access`` logger is enabled for INFO
(``GATEWAY_LOG_LEVEL``). What it costs: a worker SIGKILLed loses at most the lines of
its last ``FLUSH_INTERVAL``; a clean stop (SIGTERM, the lifespan's end) writes them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import time
from typing import Final

import msgspec

FLUSH_INTERVAL: Final = 0.2  # seconds between writes while lines wait
MAX_BUFFERED: Final = 64 * 1024  # bytes waiting that trigger a write at once
PIPE_BUF: Final = getattr(select, "PIPE_BUF", 4096)


class AccessLine(msgspec.Struct, omit_defaults=True):
    ts: str
    level: str
    logger: str
    pid: int
    msg: str
    user_id: str | None
    method: str
    path: str
    status: int
    duration_ms: float
    bytes: int
    outcome: str
    waited_ms: float | None = None


class AccessLog:
    """Per worker: lines gathered on the request path, written off it."""

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd
        self.enabled = False
        self._pid = os.getpid()
        self._lines: list[bytes] = []
        self._size = 0
        self._encode = msgspec.json.Encoder().encode
        self._second = -1
        self._stamp = ""
        self._task: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Start (in the worker's loop): on when ``gateway.access`` logs at INFO."""
        self.enabled = logging.getLogger("gateway.access").isEnabledFor(logging.INFO)
        self._pid = os.getpid()  # the worker's, not the process that imported this
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flusher())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()

    def line(
        self,
        method: str,
        path: str,
        user_id: object,
        status: int,
        duration: float,
        sent: int,
        outcome: str,
        waited: float = 0.0,
    ) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        encoded = self._encode(
            AccessLine(
                ts=f"{self._stamp}.{int((now - second) * 1000):03d}Z",
                level="info",
                logger="gateway.access",
                pid=self._pid,
                msg="proxied",
                user_id=None if user_id is None else str(user_id),
                method=method,
                path=path,
                status=status,
                duration_ms=round(duration * 1000, 2),
                bytes=sent,
                outcome=outcome,
                waited_ms=round(waited * 1000, 2) if waited else None,
            )
        )
        self._lines.append(encoded + b"\n")
        self._size += len(encoded) + 1
        if self._size >= MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        """Write every waiting line, in writes of whole lines of at most PIPE_BUF bytes
        (a longer line alone). A stderr that fails drops the lines, as logging would."""
        lines, self._lines, self._size = self._lines, [], 0
        chunk: list[bytes] = []
        size = 0
        try:
            for line in lines:
                if chunk and size + len(line) > PIPE_BUF:
                    self._write(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._write(b"".join(chunk))
        except OSError:
            pass

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if self._lines:
                self.flush()


ACCESS: Final = AccessLog()
