"""The workers' Prometheus files: one folder per namespace, kept tidy by the launcher.

prometheus_client's multiprocess mode has every worker write its counters and histograms
to files named for its pid (``counter_1234.db``) in ``PROMETHEUS_MULTIPROC_DIR``; a
collector adds them up. A dead worker's files must stay, since its counts are part of
every total; but with workers recycled (``--worker-lifetime``, ``--worker-max-rss``,
crashes) the folder would then grow for ever and every scrape would read every file any
worker ever wrote. So the launcher folds a dead worker's files into one archive file per
kind (``counter_archive.db``), under an exclusive lock that every reader takes shared: no
reader ever sees a count twice, or not at all, and no counter seems to go backwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ipc.ledger import process_start_time
from ipc.naming import metrics_dir

log = logging.getLogger("gateway.metrics")

_LOCK_FILE: Final = ".lock"
# A worker's own files; other names (the archives, live gauges) are left alone.
_WORKER_FILE: Final = re.compile(r"^(counter|histogram)_(\d+)\.db$")


class MetricsFolder:
    """``PROMETHEUS_MULTIPROC_DIR`` of one namespace: made by the launcher, read by it
    and by ``gateway caps --watch``, removed with the namespace."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, namespace: str) -> MetricsFolder:
        return cls(metrics_dir(namespace))

    def prepare(self) -> None:
        """An empty folder (whatever an earlier run left is gone), only ours to read."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(mode=0o700)
        (self.path / _LOCK_FILE).touch(mode=0o600)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def exists(self) -> bool:
        return (self.path / _LOCK_FILE).exists()

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        fd = os.open(self.path / _LOCK_FILE, os.O_RDONLY)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # also drops the lock

    def collect(self) -> list[Metric]:
        """Every worker's counters and histograms, added up (histograms made cumulative).

        Raises ``FileNotFoundError`` when the folder is not there (metrics off, or no
        gateway runs on the namespace).
        """
        with self._locked(fcntl.LOCK_SH):
            files = [str(path) for path in self.path.glob("*.db")]
            return list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]

    def workers_died(self, pids: list[int]) -> None:
        """What the reaper saw: those workers' live gauges go (prometheus_client's own
        bookkeeping), and every dead worker's counts are folded into the archives."""
        for pid in pids:
            mark_process_dead(pid, str(self.path))  # type: ignore[no-untyped-call]
        self.fold_dead()

    def fold_dead(self) -> list[int]:
        """Fold the files of every worker whose process is gone into the archives;
        returns their pids. Also finds workers that ended cleanly (the reaper only sees
        those that died holding a ledger)."""
        dead: dict[str, list[Path]] = {}
        pids = set()
        for path in self.path.iterdir():
            match = _WORKER_FILE.match(path.name)
            if match is None:
                continue
            pid = int(match.group(2))
            # Gone, or a zombie: its files are final. A pid taken over by another process
            # only delays the fold until that one ends too.
            if process_start_time(pid) is None:
                dead.setdefault(match.group(1), []).append(path)
                pids.add(pid)
        if not dead:
            return []
        with self._locked(fcntl.LOCK_EX):
            for kind, files in dead.items():
                _fold(self.path / f"{kind}_archive.db", files)
        log.debug("folded the metrics of dead workers %s", sorted(pids))
        return sorted(pids)


def _fold(archive: Path, files: list[Path]) -> None:
    """Under the exclusive lock: archive + files, summed per series, written to a new
    archive that replaces the old one (a rename), then the files removed."""
    sources = [str(path) for path in [archive, *files] if path.exists()]
    # accumulate=False keeps each histogram bucket's own count, as the files store them.
    merged = MultiProcessCollector.merge(sources, accumulate=False)  # type: ignore[no-untyped-call]
    fresh = archive.with_name(archive.name + ".new")  # not *.db: no reader globs it
    fresh.unlink(missing_ok=True)
    out = MmapedDict(str(fresh))  # type: ignore[no-untyped-call]
    try:
        for metric in merged:
            for sample in metric.samples:
                labels = sample.labels
                key = mmap_key(
                    metric.name, sample.name, list(labels), list(labels.values()),
                    metric.documentation,
                )  # fmt: skip
                out.write_value(key, sample.value, 0.0)  # type: ignore[no-untyped-call]
    finally:
        out.close()  # type: ignore[no-untyped-call]
    fresh.replace(archive)
    for path in files:
        path.unlink(missing_ok=True)
