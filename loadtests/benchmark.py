"""Benchmark the gateway against the fake upstream hit directly, side by side in one run.

    python -m loadtests.benchmark                 # everything, prints tables
    python -m loadtests.benchmark --quick         # smaller levels, for a smoke run
    python -m loadtests.benchmark --only gates    # one part: gates, json, ttfb, sse, memory
    python -m loadtests.benchmark --only json --transport h1 --transport aiohttp
    python -m loadtests.benchmark --only json --metrics both   # worker CPU, metrics on vs off
    python -m loadtests.benchmark --gates redis   # POSIX and Redis gates side by side
    python -m loadtests.benchmark --only usage    # worker CPU, usage accounting on vs off
    python -m loadtests.usage_cost                # its sampled share and instructions alone

It starts the fake upstream and a real ``gateway serve`` (all cores as workers, caps on:
a global cap and per-credential caps of 256 over several users), then measures:

- gates: acquire + release through ``Gatekeeper.admit`` / ``Permit.release`` (µs); with
  ``--gates redis`` also one admission round trip plus its release on Redis leases;
- json: non-streaming ``POST /v1/messages`` requests/s and p50/p99 at a fixed
  concurrency, through the gateway (with and without the global cap), through the bare
  pass-through floor (``loadtests.passthrough``: the same server and transport, nothing
  else) and direct, with
  ``wrk`` when installed (a Python client saturates before the gateway does), and the
  workers' CPU time per request (steadier than requests/s when everything shares the
  cores); with ``--transport`` given more than once, each upstream transport side by side;
  with ``--metrics both`` (the default), a gateway with its metrics endpoint on and one with
  it off (``--metrics-port 0``: the workers count nothing) side by side, and the difference
  in worker CPU per request (the issue's budget: at most 5% more);
  with ``--gates redis``, a gateway on Redis gates (``GATEWAY_GATES_URL``, ``--redis-url``)
  beside the POSIX one: requests/s and worker CPU per request;
- usage: worker CPU per streamed request (and per JSON request) with usage accounting on
  (the default) and off (``GATEWAY_USAGE_FLUSH_INTERVAL=0``), side by side, in alternating
  rounds (the medians); the issue's budget: at most 3% more per streamed request; then
  the two steadier measures of ``loadtests.usage_cost``: the share of a worker's sampled
  CPU time in the usage code (py-spy) and its instructions per request (callgrind);
- metrics: the request path's cost of recording one request, prometheus_client's
  multiprocess values called directly vs the workers' tallies (``loadtests.metrics_cost``);
- ttfb: added time to first byte at low load (sequential requests), median and p99; with
  ``--gates redis`` also through Redis gates, and what they add at the median;
- sse, steady: 100..8,000 streams open at every moment (a closed loop of N clients,
  each stream about a second), through the gateway and direct: time to the first text
  delta (which the fake sends at once) and whole-stream time; the largest level at which
  every stream completes with p99 stream time within 1.5x direct, and the largest with
  p99 first delta within 250 ms; and the workers' CPU per relayed SSE event at each level;
- sse, burst: 1,000 and 2,000 streams started at the same instant (the harshest case:
  the last one waits for every one before it);
- memory: resident memory per worker at idle and with 1,000, 2,000 and 4,000 open streams,
  and with 4,000 open streams whose requests carried 64 KiB bodies (an agent's long context).

Figures are printed, never asserted. Results of a run live in ``loadtests/RESULTS.md``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import click
import httpx
import uvloop

from loadtests.fake_upstream import FakeUpstream
from loadtests.procs import children, grandchildren, rss_mib

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = b'{"model":"claude-bench","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
T = TypeVar("T")
STREAM_MESSAGE = (
    b'{"model":"claude-bench","max_tokens":16,"stream":true,'
    b'"messages":[{"role":"user","content":"hi"}]}'
)


# -- processes --------------------------------------------------------------------------


class Gateway:
    def __init__(
        self,
        workdir: Path,
        upstream: str,
        *,
        workers: int,
        global_cap: int | None,
        transport: str = "h1",
        metrics: bool = True,
        gates_url: str | None = None,
        usage: bool = True,
        wrapper: tuple[str, ...] = (),
        env_extra: dict[str, str] | None = None,
    ):
        self.port = _free_port()
        self.metrics = metrics
        self.url = f"http://127.0.0.1:{self.port}"
        self.namespace = f"bench{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROXY_"))}
        env.update(
            GATEWAY_DATA_DIR=str(workdir / "data"),
            GATEWAY_UPSTREAM_URL=upstream,
            GATEWAY_IPC_NAMESPACE=self.namespace,
            # INFO: the access log on (a line per request into the gateway's log file), as
            # a gateway runs; WARNING would leave its cost out of every figure.
            GATEWAY_LOG_LEVEL="INFO",
            GATEWAY_UPSTREAM_TRANSPORT=transport,
            # On: its own free port (never a real gateway's 9464); off: the workers count nothing.
            GATEWAY_METRICS_PORT=str(_free_port()) if metrics else "0",
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if not usage:
            env["GATEWAY_USAGE_FLUSH_INTERVAL"] = "0"  # the workers count no usage
        if global_cap is not None:
            env["PROXY_MAX_GLOBAL_CONCURRENT"] = str(global_cap)
        env.update(env_extra or {})
        self.gates_prefix: str | None = None
        if gates_url is not None:
            self.gates_prefix = f"bench{uuid.uuid4().hex[:8]}:"
            env.update(GATEWAY_GATES_URL=gates_url, GATEWAY_GATES_PREFIX=self.gates_prefix)
        self.env = env
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = (workdir / f"gateway-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "gateway", "serve", "--port", str(self.port),
             "--workers", str(workers)],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # (a fresh Redis prefix waits one lease time, 15 s, before it admits)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"gateway did not start; see {self._log.name}")
            time.sleep(0.1)

    def user(self, name: str, cap: int = 256) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "users", "create", name],
            env=self.env, cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        token = out.strip().splitlines()[-1]
        response = httpx.put(
            f"{self.url}/api/v1/me/anthropic-key",
            json={"key": f"sk-ant-test-{name}", "max_concurrent": cap},
            headers={"authorization": f"Bearer {token}"},
        )
        response.raise_for_status()
        return token

    def worker_pids(self) -> list[int]:
        return grandchildren(self.process.pid)

    def worker_cpu_seconds(self) -> float:
        """User + system CPU the workers have used so far (Granian's parent idles)."""
        return cpu_seconds(self.worker_pids())

    def stop(self) -> None:
        _stop(self.process)
        self._log.close()
        if self.gates_prefix is not None:
            _delete_prefix(self.env["GATEWAY_GATES_URL"], self.gates_prefix)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU ``pids`` have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


class PassThroughFloor:
    """``loadtests.passthrough``: the same server and transport with nothing else."""

    def __init__(self, workdir: Path, upstream: str, *, workers: int, transport: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = (workdir / f"passthrough-{self.port}.log").open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROXY_"))}
        env["GATEWAY_UPSTREAM_TRANSPORT"] = transport  # the gateway's own, compared with it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loadtests.passthrough", "--port", str(self.port),
             "--upstream", upstream, "--workers", str(workers)],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.url}/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the pass-through did not start; see {self._log.name}")
            time.sleep(0.1)

    def worker_cpu_seconds(self) -> float:
        return cpu_seconds(children(self.process.pid))

    def stop(self) -> None:
        _stop(self.process)
        self._log.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _delete_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(
    workers: int, transport: str = "h1", metrics: bool = True
) -> Iterator[tuple[FakeUpstream, Gateway, Gateway, list[str]]]:
    """The fake upstream, a capped gateway and an uncapped one, and tokens for both."""
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp, FakeUpstream.start() as up:
        capped = Gateway(
            Path(tmp) / "capped", up.url, workers=workers, global_cap=100_000, transport=transport,
            metrics=metrics,
        )  # fmt: skip
        try:
            uncapped = Gateway(
                Path(tmp) / "uncapped", up.url, workers=workers, global_cap=None,
                transport=transport, metrics=metrics,
            )  # fmt: skip
            try:
                # 36 users of cap 256 (the most a key may have): 9,216 streams at once, above
                # the 8,000 level (ten users refused every stream past 2,560 with a 429).
                tokens = [capped.user(f"bench{i}") for i in range(36)]
                uncapped_token = uncapped.user("bench")
                yield up, capped, uncapped, [*tokens, uncapped_token]
            finally:
                uncapped.stop()
        finally:
            capped.stop()


# -- measurements -----------------------------------------------------------------------


def bench_gates(iterations: int) -> dict[str, float]:
    """Acquire + release through the project's own code, per admitted request."""
    from ipc.gates import Gatekeeper
    from ipc.ledger import Ledger
    from ipc.namespace import NamespaceClaim

    results: dict[str, float] = {}
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    for label, global_cap in (("credential gate only", None), ("global + credential", 1000)):
        with NamespaceClaim(namespace, global_cap=global_cap):
            ledger = Ledger(namespace)
            gatekeeper = Gatekeeper(namespace, global_cap=global_cap, ledger=ledger)
            gate = gatekeeper.credential_gate(uuid.uuid4(), 1, 8)
            for _ in range(1000):
                permit = gatekeeper.admit(gate)
                permit.release()  # type: ignore[union-attr]
            started = time.perf_counter()
            for _ in range(iterations):
                permit = gatekeeper.admit(gate)
                permit.release()  # type: ignore[union-attr]
            results[label] = (time.perf_counter() - started) / iterations * 1e6
            started = time.perf_counter()
            for _ in range(iterations):
                gatekeeper.generation()
            results["change-counter read"] = (time.perf_counter() - started) / iterations * 1e6
            gatekeeper.close()
            ledger.close()
    return results


def bench_redis_gates(url: str, iterations: int) -> dict[str, float]:
    """One admission round trip and its release on Redis leases, per admitted request
    (the release is sent on the next loop turn: timed until it is through)."""
    from ipc.redis_gates import LeasePermit, RedisGatekeeper

    prefix = f"bench{uuid.uuid4().hex[:8]}:"

    async def run() -> dict[str, float]:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        await client.set(f"{prefix}epoch", 0)  # a fresh prefix: no recovery wait
        await client.aclose()
        results: dict[str, float] = {}
        for label, global_cap in (
            ("Redis: credential only", None),
            ("Redis: global + cred.", 1000),
        ):
            keeper = RedisGatekeeper(url, prefix, global_cap=global_cap, lease_seconds=15)
            await keeper.open()
            try:
                user = uuid.uuid4()

                async def once(keeper: RedisGatekeeper = keeper, user: uuid.UUID = user) -> None:
                    gate = keeper.credential_gate(user, 1, 8)
                    permit = await keeper.admit(gate)
                    assert isinstance(permit, LeasePermit), permit
                    permit.release()
                    await keeper._send_releases()

                for _ in range(200):
                    await once()
                started = time.perf_counter()
                for _ in range(iterations):
                    await once()
                results[label] = (time.perf_counter() - started) / iterations * 1e6
            finally:
                await keeper.close()
        return results

    try:
        return run_client(run())
    finally:
        _delete_prefix(url, prefix)


def wrk_json(
    url: str,
    token: str,
    *,
    concurrency: int,
    seconds: int,
    message: bytes = MESSAGE,
    path: str = "/v1/messages",
) -> dict[str, float]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    body = message.decode().replace('"', '\\"')
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{body}"\n'
        'wrk.headers["content-type"] = "application/json"\n'
        'wrk.headers["anthropic-version"] = "2023-06-01"\n'
        f'wrk.headers["x-api-key"] = "{token}"\n'
    )
    try:
        out = subprocess.run(
            ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(script),
             f"{url}{path}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "requests": float(done),
        "p50_ms": _wrk_latency(out, "50%"),
        "p99_ms": _wrk_latency(out, "99%"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def _wrk_latency(out: str, pct: str) -> float:
    match = re.search(rf"{re.escape(pct)}\s+([\d.]+)(us|ms|s)\b", out)
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def python_json(
    url: str, token: str, *, concurrency: int, seconds: int, message: bytes = MESSAGE
) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + seconds
    headers = {"x-api-key": token, "content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def loop() -> None:
            nonlocal failures
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with session.post(f"{url}/v1/messages", data=message, headers=headers) as r:
                    await r.read()
                    failures += r.status != 200
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {
        "rps": len(latencies) / elapsed,
        "requests": float(len(latencies)),
        "p50_ms": _pct(latencies, 50) * 1000,
        "p99_ms": _pct(latencies, 99) * 1000,
        "non_2xx": float(failures),
    }


async def sequential_ttfb(url: str, token: str, count: int) -> list[float]:
    """Time to the first byte of the response body, one request at a time."""
    out = []
    headers = {"x-api-key": token, "content-type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(
                f"{url}/v1/messages?events=3", data=STREAM_MESSAGE, headers=headers
            ) as response:
                await response.content.readany()
                out.append(time.perf_counter() - started)
                await response.read()
    return out


class _SseTally:
    """What one SSE level saw, stream by stream."""

    def __init__(self) -> None:
        self.first: list[float] = []
        self.first_delta: list[float] = []
        self.whole: list[float] = []
        self.failed = 0
        self.done = 0  # every stream that completed, timed or not

    def row(self, streams: int, seconds: float | None = None) -> dict[str, float]:
        return {
            "streams": streams,
            "completed": len(self.whole),
            "done": self.done,
            "failed": self.failed,
            "per_s": len(self.whole) / seconds if seconds else float("nan"),
            "first_p50_ms": _pct(self.first, 50) * 1000,
            "first_p99_ms": _pct(self.first, 99) * 1000,
            "delta_p50_ms": _pct(self.first_delta, 50) * 1000,
            "delta_p99_ms": _pct(self.first_delta, 99) * 1000,
            "stream_p50_ms": _pct(self.whole, 50) * 1000,
            "stream_p99_ms": _pct(self.whole, 99) * 1000,
        }


async def _one_stream(
    session: aiohttp.ClientSession, url: str, token: str, tally: _SseTally, *, record: bool
) -> None:
    """One streamed message, read as it arrives; times to first event, first delta, end."""
    headers = {"x-api-key": token, "content-type": "application/json"}
    started = time.perf_counter()
    first = first_delta = 0.0
    tail = b""
    try:
        async with session.post(url, data=STREAM_MESSAGE, headers=headers) as response:
            if response.status != 200:
                tally.failed += 1
                await response.read()
                return
            async for chunk in response.content.iter_any():
                if not first:
                    first = time.perf_counter() - started
                if not first_delta and b"content_block_delta" in tail[-32:] + chunk:
                    first_delta = time.perf_counter() - started
                tail = (tail + chunk)[-64:]
    except (aiohttp.ClientError, TimeoutError):
        tally.failed += 1
        return
    if not tail.rstrip().endswith(b'{"type":"message_stop"}'):
        tally.failed += 1
        return
    tally.done += 1
    if record:
        tally.first.append(first)
        tally.first_delta.append(first_delta)
        tally.whole.append(time.perf_counter() - started)


def _sse_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    )


async def sse_steady(
    url: str, tokens: list[str], *, streams: int, seconds: float, query: str, length: float
) -> dict[str, float]:
    """About ``streams`` SSE streams open at every moment, for ``seconds``.

    A closed loop, as ``wrk -c N`` is for requests: ``streams`` clients, each starting its
    next stream when the last one ends, on a kept-alive connection. Their first starts are
    spread over one stream ``length``, so the load is steady rather than one herd; only
    streams started after that ramp are timed, and every stream must complete.
    """
    tally = _SseTally()
    target = f"{url}/v1/messages{query}"
    async with _sse_session() as session:
        began = time.perf_counter()
        measure_from, stop_at = began + length, began + length + seconds

        async def client(index: int) -> None:
            await asyncio.sleep(length * index / streams)
            token = tokens[index % len(tokens)]
            while (now := time.perf_counter()) < stop_at:
                await _one_stream(session, target, token, tally, record=now >= measure_from)

        await asyncio.gather(*(client(i) for i in range(streams)))
    return tally.row(streams, seconds)


async def sse_burst(url: str, tokens: list[str], *, streams: int, query: str) -> dict[str, float]:
    """``streams`` SSE streams started at the same instant, each on its own connection."""
    tally = _SseTally()
    target = f"{url}/v1/messages{query}"
    gate = asyncio.Event()
    async with _sse_session() as session:

        async def one(index: int) -> None:
            await gate.wait()
            await _one_stream(session, target, tokens[index % len(tokens)], tally, record=True)

        tasks = [asyncio.create_task(one(i)) for i in range(streams)]
        await asyncio.sleep(0.2)
        gate.set()
        await asyncio.gather(*tasks)
    return tally.row(streams)


def run_client(coroutine: Coroutine[Any, Any, T]) -> T:
    """The load generator on uvloop, as the workers are: the client is not the bottleneck."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def memory_at(
    gateway: Gateway, tokens: list[str], streams: int, body: bytes, settle: float = 7.0
) -> tuple[list[float], list[float]]:
    """Resident MiB per worker with ``streams`` streams opened at once (each sent ``body``):
    just after the last one opened, and ``settle`` seconds later."""
    held = asyncio.Event()
    all_open = asyncio.Event()
    opened = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def hold(index: int) -> None:
            nonlocal opened
            headers = {"x-api-key": tokens[index % len(tokens)], "content-type": "application/json"}
            async with session.post(
                f"{gateway.url}/v1/messages?events=1&stall=30",
                data=body,
                headers=headers,
            ) as response:
                await response.content.readany()
                opened += 1
                if opened == streams:
                    all_open.set()
                await held.wait()

        tasks = [asyncio.create_task(hold(i)) for i in range(streams)]
        try:
            await asyncio.wait_for(all_open.wait(), 60)
        except TimeoutError:
            print(f"  only {opened} of {streams} streams opened within 60 s")
        burst = [rss_mib(pid) for pid in gateway.worker_pids()]
        # Held a while longer: past heap trims (GATEWAY_HEAP_TRIM_INTERVAL, 1 s), what
        # the open streams themselves hold.
        await asyncio.sleep(settle)
        settled = [rss_mib(pid) for pid in gateway.worker_pids()]
        held.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return burst, settled


def fresh_rss(gateway: Gateway) -> list[float]:
    return [rss_mib(pid) for pid in gateway.worker_pids()]


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


# -- the command ------------------------------------------------------------------------


@click.command(help=__doc__)
@click.option("--workers", type=int, default=os.cpu_count() or 1, show_default="cores")
@click.option("--quick", is_flag=True, help="Small levels and short runs (a smoke run).")
@click.option(
    "--only",
    type=click.Choice(["gates", "metrics", "json", "usage", "ttfb", "sse", "memory"]),
    multiple=True,
    help="Run only these parts (repeatable).",
)
@click.option("--concurrency", type=int, default=64, show_default=True, help="For json.")
@click.option("--seconds", type=int, default=10, show_default=True, help="For json.")
@click.option(
    "--transport",
    "transports",
    type=click.Choice(["h1", "aiohttp", "httpx"]),
    multiple=True,
    help="Upstream transport (repeatable). The first serves every part; json also measures "
    "the others side by side.  [default: h1]",
)
@click.option(
    "--metrics",
    "metrics_mode",
    type=click.Choice(["on", "off", "both"]),
    default="both",
    show_default=True,
    help="The gateways' metrics endpoint (off: --metrics-port 0, the workers count nothing). "
    "both: every part runs with metrics on, and json also measures a gateway with them off, "
    "side by side.",
)
@click.option(
    "--gates",
    "gates",
    type=click.Choice(["posix", "redis"]),
    multiple=True,
    help="Gate backends to measure side by side (POSIX is always measured; redis adds a "
    "gateway on Redis gates).  [default: posix]",
)
@click.option(
    "--redis-url",
    default="redis://127.0.0.1:6379/0",
    show_default=True,
    help="The Redis for --gates redis (a key prefix of its own, deleted after).",
)
def main(
    workers: int,
    quick: bool,
    only: tuple[str, ...],
    concurrency: int,
    seconds: int,
    transports: tuple[str, ...],
    metrics_mode: str,
    gates: tuple[str, ...],
    redis_url: str,
) -> None:
    import resource

    # 8,000 streams: the client's sockets, and (inherited) the fake's and the gateway's.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    transports = transports or ("h1",)
    shared_gates_url = redis_url if "redis" in gates else None
    parts = set(only) or {"gates", "metrics", "json", "usage", "ttfb", "sse", "memory"}
    if quick:
        seconds = min(seconds, 3)
    print(
        f"# benchmark on {os.cpu_count()} cores, {workers} gateway workers, python {sys.version.split()[0]}"
    )
    if "gates" in parts:
        print("\n## gates: acquire + release through Gatekeeper.admit / Permit.release")
        for label, micros in bench_gates(20_000 if quick else 200_000).items():
            print(f"  {label:<24} {micros:7.2f} µs")
        if shared_gates_url is not None:
            for label, micros in bench_redis_gates(
                shared_gates_url, 500 if quick else 5000
            ).items():
                print(f"  {label:<24} {micros:7.2f} µs  (a round trip to Redis and a ZREM)")
    if "metrics" in parts:
        # Its own process: prometheus_client picks multiprocess values when first imported.
        print()
        subprocess.run([sys.executable, "-m", "loadtests.metrics_cost"], cwd=ROOT, check=True)
    if parts & {"json", "ttfb", "sse"}:
        measure_traffic(
            parts,
            workers=workers,
            quick=quick,
            concurrency=concurrency,
            seconds=seconds,
            transports=transports,
            metrics=metrics_mode != "off",
            compare_metrics=metrics_mode == "both",
            shared_gates_url=shared_gates_url,
        )
    if "usage" in parts:
        measure_usage(
            workers=workers,
            concurrency=concurrency,
            seconds=seconds,
            rounds=1 if quick else 3,
            transport=transports[0],
            metrics=metrics_mode != "off",
        )
    if "memory" in parts:
        measure_memory(workers, quick=quick, transport=transports[0], metrics=metrics_mode != "off")


def measure_usage(
    *,
    workers: int,
    concurrency: int,
    seconds: int,
    rounds: int,
    transport: str,
    metrics: bool,
    states: tuple[str, str] = ("on", "off"),
) -> None:
    """Worker CPU per request with usage accounting on and off, streamed and JSON.

    Two gateways (caps on, as the capped one) over one fake upstream; rounds alternate
    on/off so a neighbour's load lands on both, and the medians are printed.
    """
    have_wrk = shutil.which("wrk") is not None
    tool = "wrk" if have_wrk else "python aiohttp client"
    print(
        f"\n## usage: worker CPU per request, usage accounting on vs off "
        f"(GATEWAY_USAGE_FLUSH_INTERVAL=0),\n##   concurrency {concurrency}, {seconds} s each, "
        f"{rounds} alternating round(s), medians, {tool}; streamed: 5 text deltas"
    )
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp, FakeUpstream.start() as up:
        gateways = {
            state: Gateway(
                Path(tmp) / state,
                up.url,
                workers=workers,
                global_cap=100_000,
                transport=transport,
                metrics=metrics,
                usage=state.startswith("on"),
            )
            for state in states
        }
        try:
            tokens = {state: gateway.user("usage") for state, gateway in gateways.items()}
            cpu: dict[tuple[str, str], list[float]] = {}
            rps: dict[tuple[str, str], list[float]] = {}
            for index in range(rounds):
                # Each round in the other order: a neighbour's load or a warming cache
                # must not always favour the same side.
                order = list(gateways.items())[:: 1 if index % 2 == 0 else -1]
                for kind, message in (("streamed", STREAM_MESSAGE), ("json", MESSAGE)):
                    for state, gateway in order:
                        before = gateway.worker_cpu_seconds()
                        if have_wrk:
                            row = wrk_json(
                                gateway.url, tokens[state], concurrency=concurrency,
                                seconds=seconds, message=message,
                            )  # fmt: skip
                        else:
                            row = run_client(
                                python_json(
                                    gateway.url, tokens[state], concurrency=concurrency,
                                    seconds=seconds, message=message,
                                )
                            )  # fmt: skip
                        used = gateway.worker_cpu_seconds() - before
                        cpu.setdefault((kind, state), []).append(
                            used / max(row["requests"], 1) * 1e6
                        )
                        rps.setdefault((kind, state), []).append(row["rps"])
        finally:
            for gateway in gateways.values():
                gateway.stop()
    path_cost = usage_path_cost()
    first, second = states
    print(f"  {'request':<9} {'usage ' + first:>16} {'usage ' + second:>16} {'difference':>11}")
    for kind in ("streamed", "json"):
        on = statistics.median(cpu[(kind, first)])
        off = statistics.median(cpu[(kind, second)])
        budget = "  (budget: +3%)" if kind == "streamed" else ""
        print(f"  {kind:<9} {on:13.0f} µs {off:13.0f} µs {(on / off - 1) * 100:+10.1f}%{budget}")
        rounds_text = ", ".join(
            f"{a:.0f}/{b:.0f}" for a, b in zip(cpu[(kind, first)], cpu[(kind, second)], strict=True)
        )
        print(
            f"  {'':<9} each round {first}/{second} µs: {rounds_text}; req/s {first} "
            f"{statistics.median(rps[(kind, first)]):.0f}, {second} "
            f"{statistics.median(rps[(kind, second)]):.0f}"
        )
        share = path_cost[kind] / off * 100
        print(
            f"  {'':<9} the code usage adds, timed in-process: {path_cost[kind]:.1f} µs "
            f"({share:.1f}% of the {second} figure)"
        )
    # Worker CPU A/B moves by more than the budget between identical runs here: the two
    # steadier measures (loadtests.usage_cost), when their tools are installed.
    from loadtests import usage_cost

    try:
        usage_cost.report_sampled(usage_cost.sampled(), 20)
    except click.ClickException as exc:
        print(f"\n## usage, sampled share: skipped ({exc.message})")
    try:
        usage_cost.report(usage_cost.measure(300), 300)
    except click.ClickException as exc:
        print(f"\n## usage, instructions: skipped ({exc.message})")


def usage_path_cost(iterations: int = 20_000) -> dict[str, float]:
    """µs the request path spends on usage, timed in this process (steadier than worker
    CPU on a shared machine): the meter over a whole stream as the fake sends it (one
    chunk holding every event: the most it ever reads at once) or over a JSON body, and
    the tally's update."""
    import timeit

    from gateway.usage.meter import Meter
    from gateway.usage.recorder import UsageTally
    from loadtests._fake_parts import message_body, stream_frames

    events = b"".join(
        stream_frames(msg_id="msg_bench", model="claude-bench", input_tokens=20, events=5)
    )
    body = message_body(
        msg_id="msg_bench", model="claude-bench", input_tokens=20, events=5, body_bytes=0
    )
    tally, user = UsageTally(), uuid.uuid4()

    def streamed() -> None:
        meter = Meter()
        meter.events(events)
        tally.relayed(user, meter)

    def unary() -> None:
        meter = Meter()
        meter.body(body)
        tally.relayed(user, meter)

    def best(work: Any) -> float:
        return min(timeit.repeat(work, number=iterations, repeat=5)) / iterations * 1e6

    return {"streamed": best(streamed), "json": best(unary)}


def measure_memory(workers: int, *, quick: bool, transport: str, metrics: bool) -> None:
    # A fresh gateway for each row: a worker's heap keeps its high-water mark.
    print(
        "\n## memory: resident MiB per worker (a fresh gateway each row), with N streams opened"
        "\n##   at once: just after the last opened, and settled (7 s later, past a heap trim)"
    )
    levels = [500] if quick else [1000, 2000, 4000]
    big = _padded_message(64 * 1024)
    rows = [(f"{n:>5} open", n, STREAM_MESSAGE) for n in levels]
    rows.append((f"{levels[-1]:>5} open, 64 KiB request bodies", levels[-1], big))
    print(f"  {'':<34} {'idle':>10} {'at once':>10} {'settled':>10}")
    for label, streams, body in rows:
        with running(workers, transport, metrics) as (_up, fresh, _uncapped, tokens):
            idle = fresh_rss(fresh)
            burst, settled = run_client(memory_at(fresh, tokens[:-1], streams, body))
            print(
                f"  {label:<34} "
                + " ".join(
                    f"{', '.join(f'{m:.0f}' for m in v):>10}" for v in (idle, burst, settled)
                )
            )


def _padded_message(size: int) -> bytes:
    """A streamed request about ``size`` bytes long, as an agent's long context is."""
    text = "x" * max(0, size - len(STREAM_MESSAGE))
    return STREAM_MESSAGE.replace(b'"content":"hi"', f'"content":"{text}"'.encode())


def measure_traffic(
    parts: set[str],
    *,
    workers: int,
    quick: bool,
    concurrency: int,
    seconds: int,
    transports: tuple[str, ...],
    metrics: bool,
    compare_metrics: bool,
    shared_gates_url: str | None = None,
) -> None:
    with (
        running(workers, transports[0], metrics) as (up, capped, uncapped, tokens),
        _shared(up, workers, transports[0], shared_gates_url) as shared,
    ):
        token, uncapped_token = tokens[0], tokens[-1]
        capped_tokens = tokens[:-1]
        if "json" in parts:
            have_wrk = shutil.which("wrk") is not None
            tool = "wrk" if have_wrk else "python aiohttp client (install wrk for truer figures)"
            print(
                f"\n## json: POST /v1/messages, concurrency {concurrency}, {seconds} s each, {tool}"
            )

            def measure(
                url: str, tok: str, gateway: Gateway | PassThroughFloor | None = None
            ) -> dict[str, float]:
                cpu = gateway.worker_cpu_seconds() if gateway else 0.0
                if have_wrk:
                    row = wrk_json(url, tok, concurrency=concurrency, seconds=seconds)
                else:
                    row = run_client(
                        python_json(url, tok, concurrency=concurrency, seconds=seconds)
                    )
                if gateway is not None:
                    used = gateway.worker_cpu_seconds() - cpu
                    row["cpu_us"] = used / max(row["requests"], 1) * 1e6
                return row

            direct = measure(up.url, "sk-ant-test-direct")
            with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
                floor = PassThroughFloor(
                    Path(tmp), up.url, workers=workers, transport=transports[0]
                )
                try:
                    bare = measure(floor.url, "sk-ant-test-direct", floor)
                finally:
                    floor.stop()
            first = transports[0]
            state = "metrics on" if metrics else "metrics off"
            rows = [
                ("direct (fake upstream)", direct),
                ("bare pass-through (the floor)", bare),
                (f"gateway {first}, caps on, {state}", measure(capped.url, token, capped)),
                (
                    f"gateway {first}, no global cap, {state}",
                    measure(uncapped.url, uncapped_token, uncapped),
                ),
            ]
            if compare_metrics:
                # The same gateway with its metrics endpoint off, measured right after.
                with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
                    gateway = Gateway(
                        Path(tmp), up.url, workers=workers, global_cap=100_000,
                        transport=first, metrics=not metrics,
                    )  # fmt: skip
                    try:
                        other = "metrics off" if metrics else "metrics on"
                        rows.append(
                            (
                                f"gateway {first}, caps on, {other}",
                                measure(gateway.url, gateway.user("t"), gateway),
                            )
                        )
                    finally:
                        gateway.stop()
            if shared is not None:
                rows.append(
                    (f"gateway {first}, Redis gates", measure(shared[0].url, shared[1], shared[0]))
                )
            for other in transports[1:]:
                with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
                    gateway = Gateway(
                        Path(tmp), up.url, workers=workers, global_cap=100_000, transport=other,
                        metrics=metrics,
                    )  # fmt: skip
                    try:
                        rows.append(
                            (
                                f"gateway {other}, caps on, {state}",
                                measure(gateway.url, gateway.user("t"), gateway),
                            )
                        )
                    finally:
                        gateway.stop()
            print(
                f"  {'target':<42} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7} "
                f"{'ratio':>5} {'worker CPU/req':>14}"
            )
            for label, row in rows:
                cpu = f"{row['cpu_us']:11.0f} µs" if "cpu_us" in row else ""
                print(
                    f"  {label:<42} {row['rps']:7.0f} {row['p50_ms']:7.2f} {row['p99_ms']:7.2f} "
                    f"{row['non_2xx']:7.0f} {row['rps'] / direct['rps']:5.2f} {cpu:>14}"
                )
            capped_cpu = rows[2][1]["cpu_us"]
            print(
                f"  worker CPU per request, gateway (caps on) vs the bare pass-through: "
                f"{capped_cpu:.0f} µs vs {bare['cpu_us']:.0f} µs; the gateway's own share "
                f"{capped_cpu - bare['cpu_us']:.0f} µs"
            )
            if compare_metrics:
                cpu_of = {label: row["cpu_us"] for label, row in rows if "cpu_us" in row}
                on = cpu_of[f"gateway {first}, caps on, metrics on"]
                off = cpu_of[f"gateway {first}, caps on, metrics off"]
                print(
                    f"  worker CPU per request, metrics on vs off: {on:.0f} µs vs {off:.0f} µs "
                    f"({(on / off - 1) * 100:+.1f}%; the budget is +5%)"
                )
        if "ttfb" in parts:
            count = 100 if quick else 400
            direct_t = run_client(sequential_ttfb(up.url, "sk-ant-test-direct", count))
            gateway_t = run_client(sequential_ttfb(capped.url, token, count))
            print(f"\n## ttfb: time to first byte at low load, {count} sequential SSE requests")
            print(
                f"  direct   median {statistics.median(direct_t) * 1000:6.2f} ms  p99 {_pct(direct_t, 99) * 1000:6.2f} ms"
            )
            print(
                f"  gateway  median {statistics.median(gateway_t) * 1000:6.2f} ms  p99 {_pct(gateway_t, 99) * 1000:6.2f} ms"
            )
            added = statistics.median(gateway_t) - statistics.median(direct_t)
            print(f"  added at the median: {added * 1000:.2f} ms")
            if shared is not None:
                shared_t = run_client(sequential_ttfb(shared[0].url, shared[1], count))
                print(
                    f"  Redis gates  median {statistics.median(shared_t) * 1000:6.2f} ms  p99 {_pct(shared_t, 99) * 1000:6.2f} ms"
                )
                more = statistics.median(shared_t) - statistics.median(gateway_t)
                print(
                    f"  added by Redis gates over POSIX gates at the median: {more * 1000:.2f} ms"
                )
        if "sse" in parts:
            measure_sse(up.url, capped, capped_tokens, quick=quick)


@contextmanager
def _shared(
    up: FakeUpstream, workers: int, transport: str, gates_url: str | None
) -> Iterator[tuple[Gateway, str] | None]:
    """With --gates redis: a gateway on Redis gates (caps on, as the capped one), and a token."""
    if gates_url is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        gateway = Gateway(
            Path(tmp), up.url, workers=workers, global_cap=100_000, transport=transport,
            gates_url=gates_url,
        )  # fmt: skip
        try:
            yield gateway, gateway.user("shared")
        finally:
            gateway.stop()


def measure_sse(direct_url: str, gateway: Gateway, tokens: list[str], *, quick: bool) -> None:
    gateway_url = gateway.url
    events, delay = 5, 0.25
    # eager: the first text delta leaves the fake with message_start, so "first delta" is
    # what the path adds; the four later deltas are paced, a stream lasts about a second.
    query, length = f"?events={events}&delay={delay}&eager=1", (events - 1) * delay
    sample = httpx.post(
        f"{direct_url}/v1/messages{query}",
        content=STREAM_MESSAGE,
        headers={"x-api-key": "sk-ant-test-direct", "content-type": "application/json"},
        timeout=30,
    )
    per_stream = sample.content.count(b"event: ")  # SSE events relayed per stream
    cpu_per_event: list[tuple[int, float]] = []
    seconds = 3.0 if quick else 6.0
    header = (
        f"  {'target':<8} {'streams':>7} {'done':>6} {'failed':>6} {'per s':>6} "
        f"{'delta p50':>10} {'delta p99':>10} {'stream p50':>11} {'stream p99':>11}"
    )

    def line(label: str, row: dict[str, float]) -> str:
        return (
            f"  {label:<8} {row['streams']:7.0f} {row['completed']:6.0f} {row['failed']:6.0f} "
            f"{row['per_s']:6.0f} {row['delta_p50_ms']:8.0f}ms {row['delta_p99_ms']:8.0f}ms "
            f"{row['stream_p50_ms']:9.0f}ms {row['stream_p99_ms']:9.0f}ms"
        )

    print(
        f"\n## sse, steady: N streams open at every moment for {seconds:g} s (a closed loop of N "
        f"clients,\n##   first starts spread over {length:g} s); each stream {events} deltas, the "
        f"first at once, then {delay} s apart"
    )
    print(header)
    best_stream = best_delta = 0
    for level in [100, 500] if quick else [100, 500, 1000, 2000, 4000, 8000]:
        rows = []
        for label, url, toks in (
            ("direct", direct_url, ["sk-ant-test-direct"]),
            ("gateway", gateway_url, tokens),
        ):
            cpu = gateway.worker_cpu_seconds()
            row = run_client(
                sse_steady(url, toks, streams=level, seconds=seconds, query=query, length=length)
            )
            if label == "gateway" and row["done"]:
                used = gateway.worker_cpu_seconds() - cpu
                cpu_per_event.append((level, used / (row["done"] * per_stream) * 1e6))
            rows.append((label, row))
        for label, row in rows:
            print(line(label, row))
        (_, d), (_, g) = rows
        clean = g["failed"] == 0 and g["completed"] > 0
        if clean and g["stream_p99_ms"] <= 1.5 * d["stream_p99_ms"]:
            best_stream = level
        if clean and g["delta_p99_ms"] <= 250:
            best_delta = level
    print(f"  largest level, every stream complete, p99 stream within 1.5x direct: {best_stream}")
    print(f"  largest level, every stream complete, p99 first delta within 250 ms: {best_delta}")
    print(
        f"  worker CPU per relayed SSE event ({per_stream} events a stream, streams set up "
        "included): " + ", ".join(f"{us:.1f} µs at {level}" for level, us in cpu_per_event)
    )

    print("\n## sse, burst: N streams started at the same instant, each on a new connection")
    print(header)
    for level in [500] if quick else [1000, 2000]:
        for label, url, toks in (
            ("direct", direct_url, ["sk-ant-test-direct"]),
            ("gateway", gateway_url, tokens),
        ):
            print(line(label, run_client(sse_burst(url, toks, streams=level, query=query))))


if __name__ == "__main__":
    main()
