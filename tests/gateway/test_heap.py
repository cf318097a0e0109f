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


def test_a_trimmed_heap_is_not_trimmed_again_for_nothing() -> None:
    """Trimmed pages still count as free heap: only new growth may trigger the next trim
    (each trim walks the whole heap, milliseconds on a fragmented one)."""
    trimmer = HeapTrimmer(5)
    burst = [bytearray(2048) for _ in range(32 * 1024)]
    survivor = bytearray(2048)
    del burst
    assert trimmer.trim_if_worth_it() is True
    assert trimmer.trim_if_worth_it() is False
    assert trimmer.trim_if_worth_it() is False
    burst = [bytearray(2048) for _ in range(32 * 1024)]  # a second burst, freed again
    del burst
    assert trimmer.trim_if_worth_it() is True
    del survivor


def test_memory_freed_without_growth_is_found_by_the_free_heap_look() -> None:
    """Streams that end free their memory without the resident size moving."""
    held = [bytearray(2048) for _ in range(32 * 1024)]
    survivor = bytearray(2048)
    trimmer = HeapTrimmer(5)  # the held memory is already counted as resident
    del held
    before = rss_mib(os.getpid())
    assert trimmer.trim_if_worth_it(look_at_free=False) is False
    assert trimmer.trim_if_worth_it(look_at_free=True) is True
    assert before - rss_mib(os.getpid()) > 32
    del survivor


def test_a_small_free_heap_is_left_alone() -> None:
    trimmer = HeapTrimmer(5, worth=1 << 40)
    assert trimmer.trim_if_worth_it() is False


async def test_interval_zero_never_runs() -> None:
    await asyncio.wait_for(HeapTrimmer(0).run(), 1)  # returns at once instead of looping
