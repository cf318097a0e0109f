"""Give a worker's freed heap back to the system after a burst (glibc's ``malloc_trim``).

A burst of new streams allocates per-request objects that are freed a moment later, but
glibc keeps the freed pages: measured on 2 workers, 2,000 streams opened at once left each
worker about 30 MB above what the same streams hold when they open at a steady pace.
``malloc_trim(0)`` hands those pages back.

Neither looking nor trimming is free on a large, fragmented heap (``mallinfo2`` walks
every free chunk: 2-3 ms; a trim 5-10 ms), and a trimmed page still counts as free heap,
so "trim while much is free" would trim every time for nothing. The trimmer therefore
trims on growth: every interval (``GATEWAY_HEAP_TRIM_INTERVAL``, 1 s) it reads the
resident size (a few microseconds) and trims when that rose 4 MiB or more since the last
trim; every fifth interval it also asks ``mallinfo2`` whether the free heap grew 4 MiB or
more (memory freed without the resident size moving: streams that ended). Where the C
library has no ``malloc_trim`` / ``mallinfo2`` (musl, macOS, glibc before 2.33) it does
nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from typing import Any, Final

log = logging.getLogger("gateway.heap")

WORTH_TRIMMING: Final = 4 << 20  # bytes of growth, resident or free
FREE_HEAP_EVERY: Final = 5  # looks at the resident size per look at the free heap
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
        self._resident_mark = self.resident_bytes()
        self._free_mark = self.free_bytes()
        self._looks = 0

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

    def trim_if_worth_it(self, *, look_at_free: bool = True) -> bool:
        """Trim when the resident size, or (``look_at_free``) the free heap, grew by
        ``worth`` bytes since the last trim; True if pages went back."""
        if not self.available:
            return False
        resident = self.resident_bytes()
        grew = resident - self._resident_mark >= self.worth
        self._resident_mark = min(self._resident_mark, resident)
        if not grew and look_at_free:
            free = self.free_bytes()
            grew = free - self._free_mark >= self.worth
            self._free_mark = min(self._free_mark, free)  # reused memory is resident again
        if not grew:
            return False
        started = time.perf_counter()
        released = bool(self._trim(0))
        self._resident_mark, self._free_mark = self.resident_bytes(), self.free_bytes()
        log.debug(
            "heap trimmed",
            extra={
                "resident_before": resident,
                "resident_after": self._resident_mark,
                "ms": round((time.perf_counter() - started) * 1e3, 2),
            },
        )
        return released

    async def run(self) -> None:
        """Until cancelled: look every ``interval`` seconds, at the free heap every fifth."""
        if not self.available or self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            self._looks += 1
            self.trim_if_worth_it(look_at_free=self._looks % FREE_HEAP_EVERY == 0)
