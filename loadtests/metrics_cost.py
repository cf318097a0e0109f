"""The request path's metrics cost, per request: prometheus_client directly vs the tallies.

    python -m loadtests.metrics_cost            # prints µs per request, side by side

Runs in a fresh folder as ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client picks its
multiprocess values when first imported, so this process sets the variable before it
imports anything of it). One request's updates are what the proxy records for an admitted
request: one ``gateway_requests_total`` count, one duration and one upstream-headers
observation. Figures are printed, never asserted.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import timeit


def measure(number: int = 200_000) -> dict[str, float]:
    """µs per call of each way of recording one request (needs PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import Counter, Histogram

    from gateway.metrics.catalog import BUCKETS
    from gateway.metrics.tally import WorkerMetrics

    requests = Counter("bench_requests", "x", ["outcome", "code"], registry=None)
    duration = Histogram("bench_duration", "x", ["streamed"], buckets=BUCKETS, registry=None)
    headers = Histogram("bench_headers", "x", buckets=BUCKETS, registry=None)

    def direct() -> None:
        requests.labels("ok", "200").inc()
        duration.labels("true").observe(1.7)
        headers.observe(0.3)

    metrics = WorkerMetrics()
    tally = metrics.tally

    def tallied() -> None:
        tally.relayed(
            "ok", 200, streamed=True, admitted_at=9.9, sent_at=10.0, headers_at=10.3, ended=11.7
        )

    def flush_100() -> None:  # what the worker's task does each second, at 100 requests/s
        for _ in range(100):
            tallied()
        metrics.flush()

    results = {}
    for label, work, count in (
        ("prometheus_client directly", direct, number // 10),
        ("tally (request path)", tallied, number),
        ("tally + flush each 100 requests", flush_100, number // 100),
    ):
        work()  # warm: label children and file entries exist
        seconds = min(timeit.repeat(work, number=count, repeat=3))
        per = 100 if work is flush_100 else 1
        results[label] = seconds / (count * per) * 1e6
    results["empty call (the floor)"] = (
        min(timeit.repeat(lambda: None, number=number)) / number * 1e6
    )
    return results


def main() -> None:
    folder = tempfile.mkdtemp(prefix="gw-metrics-cost-")
    try:
        if "prometheus_client" in sys.modules:  # too late: it chose in-process values
            raise SystemExit("prometheus_client was imported before this could set it up")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        print("# metrics cost per request (µs), prometheus_client in multiprocess mode")
        for label, micros in measure().items():
            print(f"  {label:<34} {micros:7.2f} µs")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
