"""The metrics' parts on their own: the worker's tallies and the launcher's folder.

Workers here are real processes with ``PROMETHEUS_MULTIPROC_DIR`` set, as the launcher
starts them; the folder is read with prometheus_client's own collector.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric

from gateway.metrics.catalog import BUCKETS
from gateway.metrics.folder import MetricsFolder
from tests.fixtures.gateway import ROOT

# A worker: tallies what argv says, flushes like the worker's task, and also records the
# same durations through prometheus_client's own observe() under another name (the
# reference the bulk flush must equal). With "wait" it stays alive until stdin closes.
WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import Histogram
    from gateway.metrics.catalog import BUCKETS
    from gateway.metrics.tally import WorkerMetrics

    metrics = WorkerMetrics()
    reference = Histogram("reference_seconds", "x", ["streamed"], buckets=BUCKETS, registry=None)
    requests, rejections = int(sys.argv[1]), int(sys.argv[2])
    durations = [0.001, 0.005, 0.0051, 0.7, 1.0, 42.0, 600.0, 900.0]
    for index in range(requests):
        duration = durations[index % len(durations)]
        metrics.tally.relayed(
            "ok", 200, streamed=index % 2 == 0, admitted_at=100.0, sent_at=100.0, headers_at=100.5,
            ended=100.0 + duration,
        )
        reference.labels("true" if index % 2 == 0 else "false").observe(duration)
        if index % 3 == 0:
            metrics.flush()  # several flushes add up
    for _ in range(rejections):
        metrics.tally.rejected("credential", "2f1b0c1e-0000-4000-8000-000000000001")
    metrics.tally.answered("auth_failed", 401)
    metrics.flush()
    if sys.argv[3:] == ["wait"]:
        print("ready", flush=True)
        sys.stdin.read()
    """
)


def run_worker(folder: Path, requests: int, rejections: int) -> int:
    """A worker that counts and exits; its pid."""
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(requests), str(rejections)],
        env={"PROMETHEUS_MULTIPROC_DIR": str(folder), "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert (folder / f"counter_{process.pid}.db").exists()
    return process.pid


def totals(folder: MetricsFolder) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    metric: Metric
    for metric in folder.collect():
        for sample in metric.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def folder(tmp_path: Path) -> MetricsFolder:
    made = MetricsFolder(tmp_path / "ns.metrics")
    made.prepare()
    return made


def test_the_bulk_flush_equals_observing_every_value(folder: MetricsFolder) -> None:
    run_worker(folder.path, 40, 0)
    seen = totals(folder)
    for streamed in ("true", "false"):
        for le in [*(str(float(b)) for b in BUCKETS), "+Inf"]:
            ours = seen[
                (
                    "gateway_request_duration_seconds_bucket",
                    (("le", le), ("streamed", streamed)),
                )
            ]
            reference = seen[("reference_seconds_bucket", (("le", le), ("streamed", streamed)))]
            assert ours == reference, (streamed, le)
        for suffix in ("_count", "_sum"):
            assert seen[
                (f"gateway_request_duration_seconds{suffix}", (("streamed", streamed),))
            ] == (pytest.approx(seen[(f"reference_seconds{suffix}", (("streamed", streamed),))]))
    assert seen[("gateway_upstream_headers_seconds_count", ())] == 40
    assert seen[("gateway_requests_total", (("code", "200"), ("outcome", "ok")))] == 40
    assert seen[("gateway_requests_total", (("code", "401"), ("outcome", "auth_failed")))] == 1


def test_dead_workers_are_folded_without_a_count_lost_or_doubled(folder: MetricsFolder) -> None:
    first = run_worker(folder.path, 9, 2)
    second = run_worker(folder.path, 5, 3)
    before = totals(folder)
    rejected = (
        "gateway_rejections_total",
        (("scope", "credential"), ("user", "2f1b0c1e-0000-4000-8000-000000000001")),
    )
    assert before[rejected] == 5
    assert sorted(folder.fold_dead()) == sorted([first, second])
    assert totals(folder) == before
    names = sorted(p.name for p in folder.path.glob("*.db"))
    assert names == ["counter_archive.db", "histogram_archive.db"]
    # Another worker dies later: folded into the same archives, adding up.
    third = run_worker(folder.path, 4, 1)
    folder.workers_died([third])
    after = totals(folder)
    assert after[rejected] == 6
    assert after[("gateway_requests_total", (("code", "200"), ("outcome", "ok")))] == 18
    inf = ("gateway_request_duration_seconds_bucket", (("le", "+Inf"), ("streamed", "true")))
    assert after[inf] == before[inf] + 2
    assert sorted(p.name for p in folder.path.glob("*.db")) == names
    assert folder.fold_dead() == []


def test_a_live_worker_is_never_folded(folder: MetricsFolder) -> None:
    live = subprocess.Popen(
        [sys.executable, "-c", WORKER, "3", "1", "wait"],
        env={"PROMETHEUS_MULTIPROC_DIR": str(folder.path), "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "ready"
        before = totals(folder)
        assert folder.fold_dead() == []
        assert (folder.path / f"counter_{live.pid}.db").exists()
        assert totals(folder) == before
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait(30)
    assert folder.fold_dead() == [live.pid]
    assert totals(folder) == before


def test_reading_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        MetricsFolder(tmp_path / "nothing.metrics").collect()
