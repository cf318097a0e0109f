"""The heap trimmer, on this machine's real C library (glibc)."""

from __future__ import annotations

import asyncio
import os

import pytest

from gateway.heap import WORTH_TRIMMING, HeapTrimmer
from loadtests.procs import rss_mib

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

    assert trimmer.trim_if_worth_it() > 32 << 20  # most of the 64 MiB went back
    assert held - rss_mib(os.getpid()) > 32
    # Trimmed pages still count as free heap: the next trim runs, and gives nothing back.
    assert trimmer.free_bytes() >= 32 << 20
    assert trimmer.trim_if_worth_it() < WORTH_TRIMMING
    del survivor


class _Counting(HeapTrimmer):
    """The real scheduling loop, with the heap replaced by counters."""

    def __init__(self, pays: bool) -> None:
        self.pays = pays
        self.reads = self.looks = 0
        super().__init__(0.005)
        assert self.available

    def resident_bytes(self) -> int:  # type: ignore[override]
        self.reads += 1
        return 100 << 20  # flat: no growth ever calls for a look

    def trim_if_worth_it(self) -> int:
        self.looks += 1
        return self.worth if self.pays else 0


@pytest.mark.parametrize("pays", [True, False])
async def test_full_looks_back_off_while_trims_do_not_pay(pays: bool) -> None:
    trimmer = _Counting(pays)
    task = asyncio.create_task(trimmer.run())
    async with asyncio.timeout(60):
        while trimmer.reads - trimmer.looks < 200:  # about 200 intervals
            await asyncio.sleep(0.01)
    task.cancel()
    intervals = trimmer.reads - trimmer.looks - 1
    if pays:
        assert trimmer.looks >= intervals - 1  # every interval while trims give memory back
    else:
        assert trimmer.looks <= 12  # after intervals 1, 3, 7, 15, 31, then every 32: 10 in 200


def test_the_wait_doubles_up_to_a_cap_and_resets_when_a_trim_pays() -> None:
    trimmer = HeapTrimmer(1)
    assert [trimmer.next_wait(w, 0) for w in (1, 2, 16, 32)] == [2, 4, 32, 32]
    assert trimmer.next_wait(32, WORTH_TRIMMING) == 1


def test_a_small_free_heap_is_left_alone() -> None:
    trimmer = HeapTrimmer(5, worth=1 << 40)
    assert trimmer.trim_if_worth_it() == 0


async def test_interval_zero_never_runs() -> None:
    await asyncio.wait_for(HeapTrimmer(0).run(), 1)  # returns at once instead of looping
