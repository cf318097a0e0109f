"""The heap trimmer, on this machine's real C library (glibc)."""

from __future__ import annotations

import asyncio
import os

import pytest

from gateway.heap import HeapTrimmer
from tests.fixtures.gateway import rss_mib

pytestmark = pytest.mark.skipif(not HeapTrimmer(1).available, reason="no malloc_trim here")


def test_a_burst_of_freed_memory_goes_back_to_the_system() -> None:
    trimmer = HeapTrimmer(5)
    # 64 MiB in 2 KiB blocks (malloc's heap, not mmap), then one block kept on top so the
    # heap cannot simply shrink from its end: what a burst of short-lived requests leaves.
    burst = [bytearray(2048) for _ in range(32 * 1024)]
    survivor = bytearray(2048)
    del burst
    held = rss_mib(os.getpid())
    assert trimmer.free_bytes() >= 32 << 20

    assert trimmer.trim_if_worth_it() is True
    assert held - rss_mib(os.getpid()) > 32  # most of the 64 MiB went back
    del survivor


def test_a_small_free_heap_is_left_alone() -> None:
    trimmer = HeapTrimmer(5, worth=1 << 40)
    assert trimmer.trim_if_worth_it() is False


async def test_interval_zero_never_runs() -> None:
    await asyncio.wait_for(HeapTrimmer(0).run(), 1)  # returns at once instead of looping
