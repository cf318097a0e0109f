"""Give a worker's freed heap back to the system after a burst (glibc's ``malloc_trim``).

A burst of new streams allocates per-request objects that are freed a moment later, but
glibc keeps the freed pages: measured on 2 workers, 2,000 streams opened at once left each
worker 15-30 MB above what the same streams hold when they open at a steady pace.
``malloc_trim(0)`` hands those pages back.

Neither looking nor trimming is free on a large, fragmented heap (``mallinfo2`` walks
every free chunk, a trim every free page: a few milliseconds each under heavy churn), and
a trimmed page still counts as free heap, so "trim every second while much is free"
would keep paying for nothing once a worker has settled. So the trimmer backs off: it
looks every ``GATEWAY_HEAP_TRIM_INTERVAL`` seconds (1 s) while trims give memory back,
doubles the wait (up to 32 intervals) while they give back less than 4 MiB, and looks at
once again when the resident size (a few microseconds to read) has grown 4 MiB since the
last look. Where the C library has no ``malloc_trim`` / ``mallinfo2`` (musl, macOS,
glibc before 2.33) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from typing import Any, Final

log = logging.getLogger("gateway.heap")

WORTH_TRIMMING: Final = 4 << 20  # bytes: free heap worth a trim, growth worth a look
MAX_BACKOFF: Final = 32.0  # intervals between full looks while trims do not pay
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


class HeapTrimmer:
    def __init__(self, interval: float, *, worth: int = WORTH_TRIMMING) -> None:
        self.interval = interval
        self.worth = worth
        self._trim: Any = None
        self._info: Any = None
        try:
            libc = ctypes.CDLL(None)  # the C library this process already runs on
            self._trim, self._info = libc.malloc_trim, libc.mallinfo2
            self.resident_bytes()
        except (OSError, AttributeError):
            self._trim = self._info = None
            return
        self._trim.argtypes, self._trim.restype = [ctypes.c_size_t], ctypes.c_int
        self._info.argtypes, self._info.restype = [], _MallInfo2

    @property
    def available(self) -> bool:
        return self._trim is not None

    def free_bytes(self) -> int:
        """Free memory the heap holds on to (0 where the C library cannot tell)."""
        return int(self._info().fordblks) if self._info is not None else 0

    @staticmethod
    def resident_bytes() -> int:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE

    def trim_if_worth_it(self) -> int:
        """Trim when the heap holds at least ``worth`` free bytes; the bytes that went
        back to the system (0 when it did not trim)."""
        if not self.available:
            return 0
        free = self.free_bytes()
        if free < self.worth:
            return 0
        started = time.perf_counter()
        before = self.resident_bytes()
        self._trim(0)
        released = max(0, before - self.resident_bytes())
        log.debug(
            "heap trimmed",
            extra={
                "free_bytes": free,
                "released": released,
                "ms": round((time.perf_counter() - started) * 1e3, 2),
            },
        )
        return released

    def next_wait(self, wait: float, released: int) -> float:
        """Intervals to wait before the next full look, after one that gave back
        ``released`` bytes: back to one when it paid, doubled (up to 32) when not."""
        if released >= self.worth:
            return 1
        return min(wait * 2, MAX_BACKOFF)

    async def run(self) -> None:
        """Until cancelled: a cheap look at the resident size every interval, a full look
        (free heap, then a trim) when it grew or when the backed-off wait is over."""
        if not self.available or self.interval <= 0:
            return
        wait, waited = 1.0, 0
        mark = self.resident_bytes()
        while True:
            await asyncio.sleep(self.interval)
            waited += 1
            resident = self.resident_bytes()
            if resident - mark < self.worth and waited < wait:
                mark = min(mark, resident)
                continue
            wait, waited = self.next_wait(wait, self.trim_if_worth_it()), 0
            mark = self.resident_bytes()
