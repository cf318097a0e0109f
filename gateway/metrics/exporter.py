"""The launcher's ``/metrics``: slot gauges read from the semaphores, the workers' counts.

Served on its own address (``GATEWAY_METRICS_HOST``:``GATEWAY_METRICS_PORT``), never on
the proxy's listener. Everything about slots is read at scrape time from the gates
themselves (cap - free), so it is exact and costs the request path nothing; counters and
histograms are the workers' files (``gateway.metrics.folder``). Workers know users by id:
the ``user`` label gets each user's name here, at scrape time, from the database (through
the launcher's database thread), so the request path's token lookup stays as it is.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import BaseServer
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, make_server

import msgspec
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.metrics.catalog import (
    CAP_REPAIRS,
    CREDENTIAL_CAP,
    CREDENTIAL_IN_FLIGHT,
    GLOBAL_CAP,
    HELP,
    IN_FLIGHT,
    QUEUE_WAITING,
    REAPED_PERMITS,
    REJECTION_SCOPES,
    REJECTIONS,
    TOKENS,
    WORKERS,
)
from gateway.metrics.folder import MetricsFolder
from ipc.audit import repairs_made
from ipc.errors import GatesUnavailable
from ipc.leases import CapReading
from ipc.namespace import held_by_ledgers, live_workers, usage, waiting_by_scope
from ipc.reaper import Reaped
from storage import repository

log = logging.getLogger("gateway.metrics")

METRICS_PATH: Final = "/metrics"


class UserDirectory(msgspec.Struct, frozen=True):
    """Who is who at one scrape: every user's name by id, and every stored key's cap."""

    names: dict[str, str]
    keys: list[repository.KeyCap]


async def read_directory() -> UserDirectory:
    users = await repository.list_users()
    keys = await repository.list_key_caps()
    return UserDirectory(names={str(user.id): user.name for user in users}, keys=keys)


class SharedReadings(msgspec.Struct, frozen=True):
    """Redis gates at one scrape: the global cap in force (None: unset) and the readings,
    the global gate's first, then one per user asked for."""

    global_cap: int | None
    readings: list[CapReading]


class ReapedPermits:
    """``gateway_reaped_permits_total``: counted by the launcher, which outlives workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self, reaped: Iterable[Reaped]) -> None:
        count = sum(sum(item.returned.values()) for item in reaped)
        if count:
            with self._lock:
                self.total += count


class GatewayCollector(Collector):
    """Collected at every scrape: the gates, the workers, and the workers' counts."""

    def __init__(
        self,
        namespace: str,
        *,
        folder: MetricsFolder,
        reaped: ReapedPermits,
        directory: Callable[[], UserDirectory],
        queue_places: int = 0,
        shared: Callable[[list[repository.KeyCap]], SharedReadings] | None = None,
    ) -> None:
        self.namespace = namespace
        # With Redis gates: the slots are every host's live leases, read from Redis.
        self._shared = shared
        self._shared_down = False
        self.queue_places = queue_places  # places per line; 0 when the queue is off
        self.folder = folder
        self.reaped = reaped
        self._directory = directory
        self._last = UserDirectory(names={}, keys=[])
        self._directory_down = False

    def _users(self) -> UserDirectory:
        """The database's answer now; the last one when the database does not answer
        (slot gauges then still come from the semaphores, named as they last were)."""
        try:
            directory = self._directory()
        except Exception as exc:
            if not self._directory_down:
                log.warning("metrics: user names unavailable, using the last known: %s", exc)
            self._directory_down = True
            return self._last
        if self._directory_down:
            log.info("metrics: user names available again")
        self._directory_down = False
        # Names of users deleted since are kept: their counters still carry their ids.
        self._last = UserDirectory(
            names={**self._last.names, **directory.names}, keys=directory.keys
        )
        return self._last

    def collect(self) -> Iterator[Metric]:
        directory = self._users()
        names = directory.names
        yield from self._slots(directory)
        workers = GaugeMetricFamily(WORKERS, HELP[WORKERS])
        workers.add_metric([], len(live_workers(self.namespace)))
        yield workers
        reaped = CounterMetricFamily(REAPED_PERMITS, HELP[REAPED_PERMITS])
        reaped.add_metric([], self.reaped.total)
        yield reaped
        repairs = CounterMetricFamily(CAP_REPAIRS, HELP[CAP_REPAIRS], labels=["scope"])
        for scope, count in repairs_made(self.namespace).items():
            repairs.add_metric([scope], count)
        yield repairs
        waiting = GaugeMetricFamily(QUEUE_WAITING, HELP[QUEUE_WAITING], labels=["scope"])
        for scope, count in waiting_by_scope(self.namespace, self.queue_places).items():
            waiting.add_metric([scope], count)
        yield waiting
        try:
            counted = self.folder.collect()
        except FileNotFoundError:
            counted = []
        rejections: Metric | None = None
        for metric in counted:
            if metric.name == REJECTIONS:
                rejections = metric
            elif metric.name == TOKENS:
                yield _named_tokens(metric, names)
            else:
                yield metric
        yield _named_rejections(rejections, names, [key.user_name for key in directory.keys])

    def _slots(self, directory: UserDirectory) -> Iterator[Metric]:
        if self._shared is not None:
            yield from self._shared_slots(directory)
            return
        gates = usage(self.namespace)
        in_flight = GaugeMetricFamily(IN_FLIGHT, HELP[IN_FLIGHT], labels=["scope"])
        global_gate = next((gate for gate in gates if gate.scope == "global"), None)
        if global_gate is not None:
            in_flight.add_metric(["global"], global_gate.in_use)
            cap = GaugeMetricFamily(GLOBAL_CAP, HELP[GLOBAL_CAP])
            cap.add_metric([], global_gate.cap)
            yield cap
        else:
            # No global gate: every admitted request holds exactly one permit (its
            # credential's), written in its worker's ledger.
            in_flight.add_metric(["global"], sum(held_by_ledgers(self.namespace).values()))
        yield in_flight

        opened = {gate.user_id: gate for gate in gates if gate.scope == "credential"}
        credential_in_flight = GaugeMetricFamily(
            CREDENTIAL_IN_FLIGHT, HELP[CREDENTIAL_IN_FLIGHT], labels=["user"]
        )
        credential_cap = GaugeMetricFamily(CREDENTIAL_CAP, HELP[CREDENTIAL_CAP], labels=["user"])
        for key in directory.keys:
            gate = opened.pop(str(key.user_id), None)
            credential_in_flight.add_metric([key.user_name], 0 if gate is None else gate.in_use)
            credential_cap.add_metric(
                [key.user_name], key.max_concurrent if gate is None else gate.cap
            )
        # A key deleted while its requests still run: they hold permits until they end.
        for user_id, gate in opened.items():
            if gate.in_use and user_id is not None:
                user = directory.names.get(user_id, user_id)
                credential_in_flight.add_metric([user], gate.in_use)
                credential_cap.add_metric([user], gate.cap)
        yield credential_in_flight
        yield credential_cap

    def _shared_slots(self, directory: UserDirectory) -> Iterator[Metric]:
        """Redis gates: every host's leases (the same figures on every host's scrape).
        While Redis does not answer the slot gauges are left out, not shown as 0."""
        assert self._shared is not None
        try:
            shared = self._shared(directory.keys)
        except GatesUnavailable as exc:
            if not self._shared_down:
                log.warning("metrics: slot gauges unavailable, Redis does not answer: %s", exc)
            self._shared_down = True
            return
        if self._shared_down:
            log.info("metrics: slot gauges available again")
        self._shared_down = False
        global_reading, *readings = shared.readings
        in_flight = GaugeMetricFamily(IN_FLIGHT, HELP[IN_FLIGHT], labels=["scope"])
        in_flight.add_metric(["global"], global_reading.in_use)
        yield in_flight
        if shared.global_cap is not None:
            cap = GaugeMetricFamily(GLOBAL_CAP, HELP[GLOBAL_CAP])
            cap.add_metric([], shared.global_cap)
            yield cap
        credential_in_flight = GaugeMetricFamily(
            CREDENTIAL_IN_FLIGHT, HELP[CREDENTIAL_IN_FLIGHT], labels=["user"]
        )
        credential_cap = GaugeMetricFamily(CREDENTIAL_CAP, HELP[CREDENTIAL_CAP], labels=["user"])
        for key, reading in zip(directory.keys, readings, strict=True):
            credential_in_flight.add_metric([key.user_name], reading.in_use)
            credential_cap.add_metric(
                [key.user_name], key.max_concurrent if reading.cap is None else reading.cap
            )
        yield credential_in_flight
        yield credential_cap


def _named_rejections(
    counted: Metric | None, names: dict[str, str], users_with_keys: list[str]
) -> Metric:
    """The workers count rejections by user id; the scrape shows names. Every user with
    a key has every scope's series from the start (at 0), so ``rate()`` and alerts work
    before the first refusal."""
    totals: dict[tuple[str, str], float] = {
        (scope, user): 0.0 for user in users_with_keys for scope in REJECTION_SCOPES
    }
    if counted is not None:
        for sample in counted.samples:
            if not sample.name.endswith("_total"):
                continue
            user_id = sample.labels.get("user", "")
            key = (sample.labels.get("scope", ""), names.get(user_id, user_id))
            totals[key] = totals.get(key, 0.0) + sample.value
    family = CounterMetricFamily(REJECTIONS, HELP[REJECTIONS], labels=["scope", "user"])
    for (scope, user), value in sorted(totals.items()):
        family.add_metric([scope, user], value)
    return family


def _named_tokens(counted: Metric, names: dict[str, str]) -> Metric:
    """The workers count tokens by user id; the scrape shows names (a deleted user's
    series keep the id)."""
    totals: dict[tuple[str, str, str], float] = {}
    for sample in counted.samples:
        if not sample.name.endswith("_total"):
            continue
        labels = sample.labels
        user_id = labels.get("user", "")
        key = (names.get(user_id, user_id), labels.get("model", ""), labels.get("kind", ""))
        totals[key] = totals.get(key, 0.0) + sample.value
    family = CounterMetricFamily(TOKENS, HELP[TOKENS], labels=["user", "model", "kind"])
    for (user, model, kind), value in sorted(totals.items()):
        family.add_metric([user, model, kind], value)
    return family


# ------------------------------------------------------------------------------- serving


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        return


class _Server(ThreadingWSGIServer):
    address_family = socket.AF_INET


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """``GET /metrics`` on its own address, on a thread of the launcher."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") not in (METRICS_PATH, "/"):
                start_response("404 Not Found", [("content-type", "text/plain")])
                return [b"not found: the metrics are at /metrics\n"]
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result

        server_class = _Server6 if ":" in host else _Server
        # Raises OSError when the address is taken: the launcher turns it into a message.
        self._server: BaseServer = make_server(
            host.strip("[]"), port, app, server_class=server_class, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def build_registry(collector: GatewayCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
