"""Every metric the gateway exports: names, help, labels and buckets, in one place.

The worker tallies (``gateway.metrics.tally``), the launcher's collector
(``gateway.metrics.exporter``), ``gateway caps --watch`` and the test of the Grafana
dashboard all read them from here.
"""

from __future__ import annotations

from typing import Final

# Slot gauges, read from the semaphores at scrape time by the launcher.
IN_FLIGHT: Final = "gateway_in_flight"
GLOBAL_CAP: Final = "gateway_global_cap"
CREDENTIAL_IN_FLIGHT: Final = "gateway_credential_in_flight"
CREDENTIAL_CAP: Final = "gateway_credential_cap"
WORKERS: Final = "gateway_workers"
REAPED_PERMITS: Final = "gateway_reaped_permits"  # a counter: exported with ``_total``
CAP_REPAIRS: Final = "gateway_cap_repairs"  # a counter, read from the audit's counts
QUEUE_WAITING: Final = "gateway_queue_waiting"  # read from the waiting rooms' semaphores

# Counted by the workers (prometheus_client's multiprocess mode). prometheus_client names
# a counter's family without ``_total`` and its sample with it.
REJECTIONS: Final = "gateway_rejections"
REQUESTS: Final = "gateway_requests"
REQUEST_DURATION: Final = "gateway_request_duration_seconds"
UPSTREAM_HEADERS: Final = "gateway_upstream_headers_seconds"
QUEUE_WAIT: Final = "gateway_queue_wait_seconds"
QUEUE_TIMEOUTS: Final = "gateway_queue_timeouts"
TOKENS: Final = "gateway_tokens"  # a counter: exported with ``_total``

HELP: Final = {
    IN_FLIGHT: "Permits held now: on the global gate, or (no global cap) in every worker's ledger.",
    GLOBAL_CAP: "PROXY_MAX_GLOBAL_CONCURRENT (absent when no global cap is set).",
    CREDENTIAL_IN_FLIGHT: "Requests in flight per user with a stored key (read from its gate).",
    CREDENTIAL_CAP: "The concurrency cap in force per user with a stored key.",
    WORKERS: "Live Granian worker processes (those with a ledger).",
    REAPED_PERMITS: "Permits given back from dead workers' ledgers (one per gate a request held).",
    REJECTIONS: "Requests refused with a 429 over a cap, by the cap that refused them.",
    REQUESTS: "Proxied requests by outcome and the HTTP status the client got.",
    REQUEST_DURATION: "Admitted requests, from admission to the last byte sent.",
    UPSTREAM_HEADERS: "From sending a request upstream to the upstream's response head.",
    CAP_REPAIRS: "Gates whose count the launcher's audit found drifted and restored.",
    QUEUE_WAITING: "Requests waiting in line for a slot now (GATEWAY_QUEUE_TIMEOUT), by gate.",
    QUEUE_WAIT: "Time requests spent in line for a slot, served or refused.",
    QUEUE_TIMEOUTS: "Requests refused after waiting their whole GATEWAY_QUEUE_TIMEOUT in line.",
    TOKENS: "Tokens the upstream reported in /v1/messages answers, by user, model and kind.",
}

REJECTION_SCOPES: Final = ("global", "credential", "worker")
# The ``kind`` label of gateway_tokens_total, in the order of ``RequestTally.tokens``' lists.
TOKEN_KINDS: Final = ("input", "output", "cache_creation_input", "cache_read_input")
OUTCOMES: Final = (
    "ok",
    "client_disconnected",
    "upstream_cut",
    "upstream_timeout",
    "upstream_unavailable",
    "rejected",
    "auth_failed",
    "invalid_request",
    "internal_error",
)
# nginx's convention: the client left before any status was sent to it.
CLIENT_CLOSED_STATUS: Final = 499

# LLM traffic: a cached answer in milliseconds, a long agent turn streams for minutes.
BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip


def exported_names() -> frozenset[str]:
    """Every sample name a scrape can show (a histogram's ``_bucket``, ``_sum``, ``_count``)."""
    names = {IN_FLIGHT, GLOBAL_CAP, CREDENTIAL_IN_FLIGHT, CREDENTIAL_CAP, WORKERS, QUEUE_WAITING}
    names |= {f"{REAPED_PERMITS}_total", f"{REJECTIONS}_total", f"{REQUESTS}_total"}
    names |= {f"{CAP_REPAIRS}_total", f"{QUEUE_TIMEOUTS}_total", f"{TOKENS}_total"}
    for histogram in (REQUEST_DURATION, UPSTREAM_HEADERS, QUEUE_WAIT):
        names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    return frozenset(names)
