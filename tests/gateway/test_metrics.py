"""Prometheus metrics of a real `gateway serve` with two workers, scraped as Prometheus does.

The gauges must equal what is held (read from the semaphores), the counters must move by
exactly what happened, and a killed worker's permits and counts must be accounted for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics.catalog import BUCKETS, exported_names
from ipc.naming import metrics_dir
from tests.fixtures.gateway import ROOT, GatewayProcess, free_port
from tests.gateway.test_caps import held_per_worker, held_streams, one_request, wait_for

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gateway: GatewayProcess) -> Samples:
    """One scrape, parsed by prometheus_client's own parser (which fails on bad text)."""
    assert gateway.metrics_url is not None
    response = httpx.get(gateway.metrics_url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def until(
    gateway: GatewayProcess, check: Callable[[Samples], bool], what: str, timeout: float = 5.0
) -> Samples:
    """Scrape until ``check`` holds (the workers flush their counts every second)."""
    last: Samples = {}

    def ok() -> bool:
        nonlocal last
        last = scrape(gateway)
        return check(last)

    try:
        await wait_for(ok, timeout, what)
    except AssertionError:
        shown = {
            k: v for k, v in last.items() if k[0].startswith("gateway_") and "_bucket" not in k[0]
        }
        raise AssertionError(f"timed out waiting for {what}; last scrape: {shown}") from None
    return last


async def held_through_both_workers(
    gateway: GatewayProcess, token: str, count: int
) -> tuple[Any, dict[int, int]]:
    """``count`` held streams, opened until they are spread over both workers."""
    for _attempt in range(8):
        holder = held_streams(gateway, token, count)
        await holder.__aenter__()
        spread = held_per_worker(gateway)
        if len(spread) == 2:
            return holder, spread
        await holder.__aexit__(None, None, None)
        await wait_for(lambda: held_per_worker(gateway) == {}, 5, "permits back")
    raise AssertionError("the streams never reached both workers")


async def test_in_flight_gauges_equal_the_streams_held_through_both_workers(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="20")
    token, _ = gateway.user_with_key("alice", cap=8)
    gateway.user_with_key("bob", cap=3)  # a key, never used: its gauges show it at 0
    idle = scrape(gateway)
    assert value(idle, "gateway_global_cap") == 20
    assert value(idle, "gateway_in_flight", scope="global") == 0
    assert value(idle, "gateway_credential_cap", user="bob") == 3
    assert value(idle, "gateway_credential_in_flight", user="bob") == 0
    assert value(idle, "gateway_workers") == 2
    for held in (6, 3):
        holder, spread = await held_through_both_workers(gateway, token, held)
        try:
            assert sum(spread.values()) == held
            samples = scrape(gateway)
            assert value(samples, "gateway_in_flight", scope="global") == held
            assert value(samples, "gateway_credential_in_flight", user="alice") == held
            assert value(samples, "gateway_credential_cap", user="alice") == 8
            assert value(samples, "gateway_credential_in_flight", user="bob") == 0
        finally:
            await holder.__aexit__(None, None, None)
        await until(
            gateway,
            lambda s: (
                value(s, "gateway_in_flight", scope="global") == 0
                and value(s, "gateway_credential_in_flight", user="alice") == 0
            ),
            "the gauges back at 0",
        )


async def test_without_a_global_cap_in_flight_is_the_workers_ledgers(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2)
    token, _ = gateway.user_with_key("carol", cap=8)
    holder, _spread = await held_through_both_workers(gateway, token, 5)
    try:
        samples = scrape(gateway)
        assert value(samples, "gateway_global_cap") is None  # absent: no global cap
        assert value(samples, "gateway_in_flight", scope="global") == 5
        assert value(samples, "gateway_credential_in_flight", user="carol") == 5
    finally:
        await holder.__aexit__(None, None, None)
    await until(
        gateway, lambda s: value(s, "gateway_in_flight", scope="global") == 0, "in flight 0"
    )


async def test_rejections_move_by_exactly_the_429s_by_scope_and_user(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="4")
    alice, _ = gateway.user_with_key("alice", cap=2)
    bob, _ = gateway.user_with_key("bob", cap=4)
    before = await until(
        gateway,
        lambda s: value(s, "gateway_rejections_total", scope="credential", user="alice") == 0,
        "alice's rejection series at 0",
    )
    assert value(before, "gateway_rejections_total", scope="global", user="bob") == 0
    assert value(before, "gateway_requests_total", outcome="rejected", code="429") is None
    statuses: list[int] = []
    async with held_streams(gateway, alice, 2):
        # alice is at her own cap: the credential gate refuses her.
        statuses += [(await one_request(gateway, alice)).status_code for _ in range(3)]
        async with held_streams(gateway, bob, 2):
            # Four in flight: the global gate refuses both of them, whoever they are.
            statuses += [(await one_request(gateway, bob)).status_code for _ in range(2)]
            statuses += [(await one_request(gateway, alice)).status_code for _ in range(1)]
    assert statuses == [429] * 6
    expected = {
        ("credential", "alice"): 3,
        ("global", "bob"): 2,
        ("global", "alice"): 1,
        ("credential", "bob"): 0,
        ("worker", "alice"): 0,
        ("worker", "bob"): 0,
    }

    def moved(samples: Samples) -> bool:
        # The held streams ended as the client closed them (counted as their relays end).
        closed = value(samples, "gateway_requests_total", outcome="client_disconnected", code="200")
        return closed == 4 and all(
            value(samples, "gateway_rejections_total", scope=scope, user=user) == count
            for (scope, user), count in expected.items()
        )

    samples = await until(gateway, moved, "rejections to match the 429s")
    assert value(samples, "gateway_requests_total", outcome="rejected", code="429") == 6
    # Nothing else was refused, nor counted twice.
    assert {
        labels: n for (name, labels), n in samples.items() if name == "gateway_requests_total"
    } == {
        frozenset({("outcome", "rejected"), ("code", "429")}): 6,
        frozenset({("outcome", "client_disconnected"), ("code", "200")}): 4,
    }


async def test_requests_are_counted_by_outcome_and_status(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, GATEWAY_UPSTREAM_READ_TIMEOUT="1")
    token, _ = gateway.user_with_key("dave", cap=4)
    for _ in range(3):
        assert (await one_request(gateway, token)).status_code == 200
    assert (await one_request(gateway, token, "?status=500")).status_code == 500
    assert (await one_request(gateway, token, "?stall_before_headers=5")).status_code == 504
    with pytest.raises(httpx.RemoteProtocolError):
        await one_request(gateway, token, "?cut_after=1")
    async with httpx.AsyncClient(timeout=30) as client:
        bad = await client.post(
            f"{gateway.url}/v1/messages", json={}, headers={"x-api-key": "gwt_nobody"}
        )
        assert bad.status_code == 401
        streamed = await client.post(
            f"{gateway.url}/v1/messages?events=3",
            json={"model": "m", "max_tokens": 1, "stream": True, "messages": []},
            headers={"x-api-key": token},
        )
        assert streamed.status_code == 200
        with pytest.raises(httpx.ReadTimeout):  # the client leaves before any status
            await client.post(
                f"{gateway.url}/v1/messages?stall_before_headers=5",
                json={},
                headers={"x-api-key": token},
                timeout=0.3,
            )
    expected = {
        ("ok", "200"): 4,
        ("ok", "500"): 1,  # the upstream's own error passes through: the relay was whole
        ("upstream_timeout", "504"): 1,
        ("upstream_cut", "200"): 1,
        ("auth_failed", "401"): 1,
        ("client_disconnected", "499"): 1,
    }
    samples = await until(
        gateway,
        lambda s: all(
            value(s, "gateway_requests_total", outcome=o, code=c) == n
            for (o, c), n in expected.items()
        ),
        "the requests counted by outcome and status",
    )
    # Admitted requests have a duration; the one that stalled has no upstream head.
    unary = value(samples, "gateway_request_duration_seconds_count", streamed="false")
    assert unary == 7
    assert value(samples, "gateway_request_duration_seconds_count", streamed="true") == 1
    assert value(samples, "gateway_upstream_headers_seconds_count") == 6
    inf = value(samples, "gateway_request_duration_seconds_bucket", streamed="false", le="+Inf")
    assert inf == unary
    bounds = [float(le) for (name, labels) in samples for key, le in labels if key == "le"
              and name == "gateway_upstream_headers_seconds_bucket" and le != "+Inf"]  # fmt: skip
    assert sorted(bounds) == list(BUCKETS)
    # The stalled request took at least its 1 s timeout, admission to last byte.
    assert value(samples, "gateway_request_duration_seconds_sum", streamed="false") >= 1.0


async def test_a_killed_worker_returns_its_permits_and_the_reaper_counts_them(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="20")
    token, _ = gateway.user_with_key("erin", cap=8)
    for _ in range(4):
        assert (await one_request(gateway, token)).status_code == 200
    counted = await until(
        gateway,
        lambda s: value(s, "gateway_requests_total", outcome="ok", code="200") == 4,
        "four requests counted",
    )
    assert value(counted, "gateway_reaped_permits_total") == 0
    holder, spread = await held_through_both_workers(gateway, token, 6)
    try:
        victim, victim_holds = max(spread.items(), key=lambda item: item[1])
        survivor_holds = 6 - victim_holds
        os.kill(victim, signal.SIGKILL)
        # Its permits come back: the gauges show only the survivor's streams, and the
        # reaper counted two permits per killed stream (the global gate's and alice's).
        samples = await until(
            gateway,
            lambda s: (
                value(s, "gateway_in_flight", scope="global") == survivor_holds
                and value(s, "gateway_credential_in_flight", user="erin") == survivor_holds
                and value(s, "gateway_reaped_permits_total") == 2 * victim_holds
            ),
            "the dead worker's permits back and counted",
        )
        assert value(samples, "gateway_requests_total", outcome="ok", code="200") == 4
    finally:
        await holder.__aexit__(None, None, None)
    samples = await until(
        gateway,
        lambda s: (
            value(s, "gateway_in_flight", scope="global") == 0
            and value(s, "gateway_credential_in_flight", user="erin") == 0
            and value(s, "gateway_workers") == 2
        ),
        "the gauges back at 0 and a respawned worker",
    )
    # Counts survive their worker: folded into the archive, not lost, not doubled.
    assert value(samples, "gateway_requests_total", outcome="ok", code="200") == 4
    assert value(samples, "gateway_reaped_permits_total") == 2 * victim_holds
    files = sorted(p.name for p in metrics_dir(gateway.namespace).iterdir())
    assert not any(name.endswith(f"_{victim}.db") for name in files), files


def test_metrics_are_not_on_the_proxy_port_and_port_0_turns_them_off(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=1)
    assert gateway.metrics_url is not None
    assert f":{gateway.port}/" not in gateway.metrics_url
    on_proxy = httpx.get(f"{gateway.url}/metrics", timeout=10)
    assert on_proxy.status_code == 404
    assert "gateway_" not in on_proxy.text
    assert (
        httpx.get(gateway.metrics_url.replace("/metrics", "/other"), timeout=10).status_code == 404
    )
    for pid in gateway.worker_pids():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"PROMETHEUS_MULTIPROC_DIR={metrics_dir(gateway.namespace)}".encode() in environ

    assert gateway.stop() == 0  # the fixture's namespace is one launcher's at a time
    off = start_gateway(workers=1, GATEWAY_METRICS_PORT="0")
    assert off.metrics_url is None
    assert not metrics_dir(off.namespace).exists()
    for pid in off.worker_pids():
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"PROMETHEUS_MULTIPROC_DIR=" not in environ
    token, _ = off.user_with_key("frank", cap=2)
    assert (
        httpx.post(f"{off.url}/v1/messages", json={}, headers={"x-api-key": token}).status_code
        == 200
    )
    assert not metrics_dir(off.namespace).exists()  # the workers count nothing


def test_a_taken_metrics_port_stops_the_start_with_a_clear_message(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = start_gateway(workers=1, wait=False, GATEWAY_METRICS_PORT=str(port))
        assert gateway.process.wait(60) != 0
    logs = gateway.logs()
    assert f"cannot serve metrics on 127.0.0.1:{port}" in logs
    assert "GATEWAY_METRICS_PORT" in logs
    assert not metrics_dir(gateway.namespace).exists()


def test_metrics_folder_is_removed_at_exit(start_gateway: Callable[..., GatewayProcess]) -> None:
    gateway = start_gateway(workers=1)
    folder = metrics_dir(gateway.namespace)
    assert folder.is_dir() and oct(folder.stat().st_mode & 0o777) == "0o700"
    assert gateway.stop() == 0
    assert not folder.exists()


def test_serve_metrics_port_flag_overrides_the_environment(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    port, proxy_port = free_port(), free_port()
    env = {**gateway_env, "GATEWAY_METRICS_PORT": "0"}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(proxy_port), "--workers", "1",
         "--metrics-port", str(port), "--worker-kill-timeout", "5"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "no metrics endpoint on the --metrics-port"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            assert "gateway_workers" in response.text
            break
        # Stopped once its worker serves: Granian holds a SIGTERM that lands while a worker
        # is still starting until the worker kill timeout (a loaded machine starts slowly).
        while not _answers(f"http://127.0.0.1:{proxy_port}/healthz"):
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the worker never served"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- the deploy files --------------------------------------------------------------------

DEPLOY = ROOT / "deploy"


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    queries = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                queries.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(dashboard)
    return queries


async def test_every_dashboard_query_names_a_metric_the_gateway_exports(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 6
    gateway = start_gateway(workers=2, PROXY_MAX_GLOBAL_CONCURRENT="4")
    token, _ = gateway.user_with_key("gina", cap=1)
    async with held_streams(gateway, token, 1):
        assert (await one_request(gateway, token)).status_code == 429
    samples = await until(
        gateway,
        lambda s: value(s, "gateway_rejections_total", scope="credential", user="gina") == 1
        # the held stream's tokens: their series exists once its relay has ended
        and any(name == "gateway_tokens_total" for name, _ in s),
        "a rejection and the held stream's tokens counted",
    )
    scraped = {name for name, _ in samples if name.startswith("gateway_")}
    assert scraped == exported_names()  # every metric of the catalog, and no other
    for query in queries:
        named = set(re.findall(r"\bgateway_[a-z_]+\b", query))
        assert named, f"a query that names no gateway metric: {query}"
        assert named <= scraped, f"{query} names {named - scraped}, which the gateway lacks"


def test_the_prometheus_snippet_scrapes_the_default_endpoint() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = config["scrape_configs"]
    gateway_job = next(job for job in jobs if job["job_name"] == "llm-gateway")
    targets = [t for group in gateway_job["static_configs"] for t in group["targets"]]
    assert "127.0.0.1:9464" in targets
    assert gateway_job.get("metrics_path", "/metrics") == "/metrics"


def test_the_systemd_unit_has_what_a_real_host_needs() -> None:
    unit = (DEPLOY / "gateway.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["User"] == "gateway"
    assert settings["LimitNOFILE"] == "65536"
    assert settings["KillSignal"] == "SIGTERM"
    assert settings["EnvironmentFile"] == "/etc/gateway/env"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert "/var/lib/gateway" in settings["ReadWritePaths"]
    # Above the workers' kill timeout, so systemd never SIGKILLs a launcher that is
    # still waiting for its workers (and would leave their permits to nobody).
    kill_timeout = int(re.search(r"--worker-kill-timeout (\d+)", settings["ExecStart"]).group(1))
    assert int(settings["TimeoutStopSec"].rstrip("s")) > kill_timeout
    # A private /dev would hide the semaphores from `gateway caps` and from a restart.
    assert settings.get("PrivateDevices", "no") == "no"
