"""A process's children and resident size, from /proc (for the load tools and the tests)."""

from __future__ import annotations

from pathlib import Path


def children(pid: int) -> list[int]:
    """Child pids of ``pid`` (none once it has gone)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def grandchildren(pid: int) -> list[int]:
    """A launcher's Granian workers: launcher > Granian server > workers."""
    return [worker for child in children(pid) for worker in children(child)]


def rss_mib(pid: int) -> float:
    """Resident MiB of ``pid`` (0 once it has gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
