"""The access log: one JSON line per proxied request, written without ``logging``.

The ``logging`` machinery costs a proxied request 12-27 µs of worker CPU (a
``LogRecord``, the handler lock, the formatter walking ``__dict__``, a write per line):
up to 15% of the whole request. Here a line is one ``msgspec`` encode of a small Struct
into a list, and the list is written by a callback the worker's loop runs right after the
current pass: every request that ended in one pass of the loop shares one write (under
load, many), and a line is on stderr microseconds after its request ended, as before.
Writes hold whole lines and at most ``PIPE_BUF`` bytes (a longer line alone): several
workers share one stderr pipe, and the kernel keeps such writes whole, so lines of
different workers never interleave mid-line.

The shape is the one ``gateway.logs.JsonFormatter`` gives every other log line (``ts``,
``level``, ``logger``, ``pid``, ``msg``, then the fields), so a log shipper sees one
format. It is on when the ``gateway.access`` logger is enabled for INFO
(``GATEWAY_LOG_LEVEL``); a clean stop writes what waits. A non-blocking stderr that is
full keeps the rest for a retry (up to ``MAX_QUEUED`` bytes, then new lines are counted
and dropped, with one warning when it takes writes again): no line is cut and glued to
another by this worker.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import time
from typing import Final

import msgspec

MAX_BUFFERED: Final = 64 * 1024  # bytes waiting that trigger a write at once
MAX_QUEUED: Final = 4 * 1024 * 1024  # past this, a stderr that takes nothing loses lines
RETRY_AFTER: Final = 0.01  # seconds before writing again to a full stderr
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
        self.dropped = 0  # lines given up while stderr stayed full (MAX_QUEUED)
        self._pid = os.getpid()
        self._lines: list[bytes] = []
        self._size = 0
        # Writes not yet taken by a full, non-blocking stderr: whole lines, except that
        # the first may be the rest of a line already partly written.
        self._out: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._encode = msgspec.json.Encoder().encode
        self._second = -1
        self._stamp = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False

    def open(self) -> None:
        """Start (in the worker's loop): on when ``gateway.access`` logs at INFO."""
        self.enabled = logging.getLogger("gateway.access").isEnabledFor(logging.INFO)
        self._pid = os.getpid()  # the worker's, not the process that imported this
        self._loop = asyncio.get_running_loop()
        self._scheduled = False

    def close(self) -> None:
        self.flush()
        self.enabled = False
        self._loop = None

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
        if self._queued + self._size > MAX_QUEUED:
            self.dropped += 1  # stderr has taken nothing for a long while
            return
        self._lines.append(encoded + b"\n")
        self._size += len(encoded) + 1
        if self._size >= MAX_BUFFERED:
            self.flush()
        elif not self._scheduled:
            loop = self._loop
            if loop is None or loop.is_closed():
                self.flush()
            else:
                self._scheduled = True
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what waits, in writes of whole lines of at most PIPE_BUF bytes (a longer
        line alone). A stderr that is full (non-blocking, EAGAIN) keeps the rest, in
        order, for a retry 10 ms later; one that fails otherwise drops it, as logging
        would."""
        self._scheduled = False
        if self._lines:
            lines, self._lines, self._size = self._lines, [], 0
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                if chunk and size + len(line) > PIPE_BUF:
                    self._out.append(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._out.append(b"".join(chunk))
            self._queued += sum(map(len, lines))
        out = self._out
        while out:
            data = out[0]
            try:
                written = self._write(data)
            except BlockingIOError:
                self._retry()
                return
            except OSError:
                out.clear()
                self._queued = 0
                return
            self._queued -= written
            if written < len(data):
                out[0] = data[written:]  # the rest of this write, before anything else
                continue
            out.popleft()
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            logging.getLogger("gateway.access").warning(
                "access log lines dropped: stderr took nothing while they came",
                extra={"dropped": dropped},
            )

    def _write(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def _retry(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._scheduled:
            return
        self._scheduled = True
        loop.call_later(RETRY_AFTER, self.flush)


ACCESS: Final = AccessLog()
