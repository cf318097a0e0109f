"""One-command capacity check: real gateway, fake upstream, Locust, ground-truth verdict.

    python -m loadtests.capacity                      # 2 workers, 60 s, 281 users
    python -m loadtests.capacity --duration 8 --users 24 --credentials 8 --cap 4 \\
        --global-cap 16 --hot-users 12 --churn-users 4 --change-users 8 --cap-change 2,4
    python -m loadtests.capacity --expect-cap 7       # a wrong expectation: exits 1
    python -m loadtests.capacity --help

It starts the fake upstream and a real ``gateway serve`` (``--workers``) on a free port,
with a fresh SQLite database in a temporary directory and a fresh IPC namespace; creates
the users with ``gateway users create`` and stores their keys and caps through the
settings API; then runs the scenarios of ``loadtests/locustfile.py`` in this process for
``--duration`` seconds in two phases:

1. per credential: ``--hot-users`` streamers on one key (cap ``--cap``), churn on keys of
   their own, and ``--change-users`` streamers on a key whose cap ``CapChanger`` cycles
   through ``--cap-change``; together well under the global cap;
2. global: ``--users`` streamers over ``--credentials`` keys, each key under its cap,
   all of them over ``--global-cap``.

Meanwhile it samples the fake upstream's in-flight counts every ``--sample-every``
seconds. The checks use the upstream's own ground truth, not the gateway's word: no key
above its cap, the total never above the global cap, each cap held (not just respected)
while over it, a changed cap binding once the old streams ended, every rejection a
well-formed 429 ``overloaded_error`` with ``retry-after``, nothing else failed, and every
semaphore back to its cap afterwards (``gateway caps --json``). It prints figures and
checks, and exits 0 when every check passed, 1 when one failed, 2 when the stack did not
start. Everything it started is stopped on the way out, Ctrl-C or SIGTERM included.
"""

from __future__ import annotations

# Locust monkey-patches the standard library for gevent: before anything imports ssl.
import locust  # isort: split

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import gevent
import gevent.event
import gevent.pool
from locust import argument_parser
from locust.env import Environment

from ipc.audit import repairs_made
from loadtests import locustfile as scenarios
from loadtests._capacity_stack import Credential, GatewayServer, StackError
from loadtests._capacity_verdict import (
    Check,
    Sample,
    Window,
    cap_after_changes,
    gates_released,
    held_at_cap,
    in_flight,
    metrics_agree,
    never_above,
    nothing_else_failed,
    percentile,
    rejections_well_formed,
    render,
)
from loadtests.fake_upstream import FakeUpstream, FakeUpstreamError

log = logging.getLogger("loadtests.capacity")

STEADY_AFTER = 1.0  # seconds into a phase before its samples count
STEADY_UNTIL = 0.3  # seconds before a phase ends after which they no longer do
# Seconds after a cap change's PUT returned before it binds at the upstream: a request
# admitted just before the change is still on its way there (0.25 s was passed by one such
# request in a CI run on a loaded machine: 3 in flight under a new cap of 2, once).
CHANGE_GRACE = 0.5
AUDIT_INTERVAL = 2.0  # the gateway's default GATEWAY_CAP_AUDIT_INTERVAL
# The churn phase's streams: upstream errors and cuts among them (the fake upstream picks
# by the query; the locustfile adds it to every request).
CHURN_QUERY = "fail_rate=0.1&cut_rate=0.1"


@dataclass(frozen=True, kw_only=True)
class Plan:
    duration: float
    workers: int
    users: int
    credentials: int
    hot_users: int
    churn_users: int
    change_users: int
    cap: int
    global_cap: int
    cap_change: tuple[int, ...]
    cap_change_every: float
    events: int
    delay: float
    drop_after: int
    max_retry_wait: float
    sample_every: float
    most: float
    expect_cap: int
    churn: float = 0.0
    kill_every: float = 8.0
    queue_timeout: float = 0.0

    @property
    def stream_seconds(self) -> float:
        return self.events * self.delay

    @property
    def gap(self) -> float:
        """Between the phases: the first phase's last streams end before the second starts."""
        return max(1.5, self.stream_seconds + 1.0)

    @property
    def phase_seconds(self) -> float:
        return (self.duration - self.gap) / 2

    @property
    def churn_credentials(self) -> int:
        return math.ceil(self.churn_users / max(1, self.cap // 2))

    def problems(self) -> list[str]:
        """Why this plan would not put the caps under the load the checks assume."""
        found = []
        shortest = STEADY_AFTER + STEADY_UNTIL + 0.5
        if self.phase_seconds < shortest:
            found.append(f"--duration must be at least {2 * shortest + self.gap:g} s")
        if self.hot_users <= self.cap:
            found.append("--hot-users must exceed --cap (the hot key must be over its cap)")
        if self.users <= self.global_cap:
            found.append("--users must exceed --global-cap (the global phase must be over it)")
        if math.ceil(self.users / self.credentials) >= self.cap:
            found.append("--users / --credentials must stay under --cap (each key under it)")
        if self.cap + self.churn_users + max(self.cap_change) > self.global_cap:
            found.append(
                "--cap + --churn-users + the largest --cap-change value must not "
                "exceed --global-cap (the first phase must stay under the global cap)"
            )
        if self.change_users <= max(self.cap_change):
            found.append("--change-users must exceed the largest --cap-change value")
        if any(not 1 <= c <= 256 for c in (self.cap, *self.cap_change)):
            found.append("caps are 1..256")
        return found


@dataclass(frozen=True, kw_only=True)
class Credentials:
    hot: Credential
    change: Credential
    churn: tuple[Credential, ...]
    spread: tuple[Credential, ...]


@dataclass(kw_only=True)
class Tally:
    """What Locust saw, from its request events."""

    statuses: Counter[int] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    first_event_ms: list[float] = field(default_factory=list)
    streams: int = 0
    dropped: int = 0
    short: int = 0
    changes: list[tuple[float, int]] = field(default_factory=list)
    cpu_peak: float = 0.0

    def on_request(
        self,
        request_type: str,
        name: str,
        response_time: float,
        response_length: int,
        exception: BaseException | None = None,
        context: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        context = context or {}
        if name == scenarios.FIRST_EVENT:
            self.first_event_ms.append(response_time)
            return
        if name == scenarios.CAP_CHANGE:
            if exception is None:
                self.changes.append((time.monotonic(), int(context["cap"])))
            else:
                self.failures[f"{request_type} {name}: {exception}"[:200]] += 1
            return
        self.statuses[int(context.get("status", 0))] += 1
        if request_type == scenarios.REJECTED:
            if exception is None:
                self.rejections[str(context.get("scope") or "upstream")] += 1
            else:
                self.malformed.append(str(exception)[:200])
            return
        if exception is not None:
            self.failures[f"{request_type} {name}: {exception}"[:200]] += 1
        elif name == scenarios.WHOLE_STREAM:
            self.streams += 1
        elif name == scenarios.DROPPED_STREAM:
            self.dropped += 1
        elif name == scenarios.SHORT_MESSAGE:
            self.short += 1

    def on_usage(self, cpu_usage: float, **_: Any) -> None:
        self.cpu_peak = max(self.cpu_peak, cpu_usage)


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    tally: Tally
    samples: list[Sample]
    credential_window: Window
    global_window: Window
    load_seconds: float


def create_credentials(gateway: GatewayServer, plan: Plan) -> Credentials:
    """Every user through the real command line and settings API, one per core at a time."""
    wanted = [("hot", plan.cap), ("change", plan.cap_change[-1])]
    wanted += [(f"churn-{i}", plan.cap) for i in range(plan.churn_credentials)]
    wanted += [(f"spread-{i}", plan.cap) for i in range(plan.credentials)]
    pool = gevent.pool.Pool(os.cpu_count() or 2)
    made: list[Credential] = pool.map(
        lambda item: gateway.create_credential(item[0], cap=item[1]), wanted
    )
    by_name = {c.name: c for c in made}
    return Credentials(
        hot=by_name["hot"],
        change=by_name["change"],
        churn=tuple(c for c in made if c.name.startswith("churn-")),
        spread=tuple(c for c in made if c.name.startswith("spread-")),
    )


def locust_options(
    plan: Plan, url: str, creds: Credentials, *, upstream_query: str = "", queue_token: str = ""
) -> Any:
    """The locustfile's options, as its own command-line parser reads them."""
    args = [
        "--host", url,
        "--headless",
        "--gateway-tokens", ",".join(c.token for c in creds.spread),
        "--gateway-model", "claude-capacity-check",
        "--hot-token", creds.hot.token,
        "--churn-tokens", ",".join(c.token for c in creds.churn),
        "--cap-change-token", creds.change.token,
        "--queue-token", queue_token,
        "--cap-change-values", ",".join(map(str, plan.cap_change)),
        "--cap-change-every", str(plan.cap_change_every),
        "--stream-events", str(plan.events),
        "--stream-delay", str(plan.delay),
        "--upstream-query", upstream_query,
        "--drop-after", str(plan.drop_after),
        "--max-retry-wait", str(plan.max_retry_wait),
    ]  # fmt: skip
    return argument_parser.get_parser().parse_args(args)


def drive_load(
    plan: Plan, gateway: GatewayServer, fake: FakeUpstream, creds: Credentials
) -> LoadResult:
    classes = [
        scenarios.HotStreamer,
        scenarios.SpreadStreamer,
        scenarios.ChurnUser,
        scenarios.CapChangeStreamer,
        scenarios.CapChanger,
    ]
    for user_class in classes:
        user_class.host = gateway.url  # what Runner.start would do; we spawn by phase
    env = Environment(
        user_classes=list(classes),
        events=locust.events,
        host=gateway.url,
        parsed_options=locust_options(plan, gateway.url, creds),
    )
    tally = Tally()
    hooks: Any = env.events  # Locust's EventHook is untyped
    hooks.request.add_listener(tally.on_request)
    hooks.usage_monitor.add_listener(tally.on_usage)
    runner = env.create_local_runner()
    hooks.init.fire(environment=env, runner=runner, web_ui=None)

    samples: list[Sample] = []
    stop_sampling = gevent.event.Event()

    def sample_upstream() -> None:
        while not stop_sampling.is_set():
            at = time.monotonic()
            try:
                stats = fake.stats()
            except FakeUpstreamError as exc:
                log.warning("sampling the fake upstream failed: %s", exc)
            else:
                keys = {key: int(c["in_flight"]) for key, c in stats["keys"].items()}
                samples.append(Sample(at=at, total=int(stats["in_flight"]), keys=keys))
            stop_sampling.wait(max(0.0, plan.sample_every - (time.monotonic() - at)))

    sampler = gevent.spawn(sample_upstream)
    phase = plan.phase_seconds
    # Users are spawned per phase rather than through runner.start(): start() spreads a
    # count over the classes by weight and clears the stats whenever it starts again,
    # where each phase needs exact counts per class and the run one set of figures.
    try:
        started = time.monotonic()
        runner.spawn_users(
            {
                "HotStreamer": plan.hot_users,
                "ChurnUser": plan.churn_users,
                "CapChangeStreamer": plan.change_users,
                "CapChanger": 1,
            }
        )
        gevent.sleep(max(0.0, started + phase - time.monotonic()))
        runner.stop_users(dict(runner.user_classes_count))
        second = started + phase + plan.gap
        gevent.sleep(max(0.0, second - time.monotonic()))
        runner.spawn_users({"SpreadStreamer": plan.users})
        gevent.sleep(max(0.0, second + phase - time.monotonic()))
        runner.stop_users(dict(runner.user_classes_count))
    finally:
        runner.quit()
        stop_sampling.set()
        sampler.join(timeout=2.0)
        hooks.request.remove_listener(tally.on_request)
        hooks.usage_monitor.remove_listener(tally.on_usage)

    return LoadResult(
        tally=tally,
        samples=samples,
        credential_window=Window(started + STEADY_AFTER, started + phase - STEADY_UNTIL),
        global_window=Window(second + STEADY_AFTER, second + phase - STEADY_UNTIL),
        load_seconds=2 * phase,
    )


@dataclass(frozen=True, kw_only=True)
class ChurnResult:
    kills: int
    revoked: int
    requests: int
    repairs_before: dict[str, int]


def drive_churn(plan: Plan, gateway: GatewayServer, creds: Credentials) -> ChurnResult:
    """The churn phase: short messages, dropped streams, upstream errors and cuts, cap
    changes and a hot key, while a worker is SIGKILLed every ``--kill-every`` seconds and
    tokens are issued, used and revoked. Requests may fail here (their worker was
    killed); what is judged is the state at rest afterwards."""
    repairs_before = repairs_made(gateway.namespace)
    classes = [scenarios.HotStreamer, scenarios.ChurnUser, scenarios.CapChanger]
    for user_class in classes:
        user_class.host = gateway.url
    env = Environment(
        user_classes=list(classes),
        events=locust.events,
        host=gateway.url,
        parsed_options=locust_options(plan, gateway.url, creds, upstream_query=CHURN_QUERY),
    )
    tally = Tally()
    hooks: Any = env.events
    hooks.request.add_listener(tally.on_request)
    runner = env.create_local_runner()
    hooks.init.fire(environment=env, runner=runner, web_ui=None)
    kills = revoked = 0
    stop = gevent.event.Event()

    def killer() -> None:
        nonlocal kills
        while not stop.wait(plan.kill_every):
            workers = gateway.worker_pids()
            if workers:
                os.kill(workers[kills % len(workers)], signal.SIGKILL)
                kills += 1

    def revoker() -> None:
        nonlocal revoked
        owner = creds.churn[0] if creds.churn else creds.hot
        while not stop.wait(2.0):
            try:
                token_id, token = gateway.issue_token(owner.name)
                gateway.probe(token)  # cached by a worker, then revoked under it
                gateway.cli("tokens", "revoke", str(token_id))
                revoked += 1
            except StackError as exc:
                log.warning("token churn step failed: %s", exc)

    helpers = [gevent.spawn(killer), gevent.spawn(revoker)]
    try:
        runner.spawn_users(
            {"HotStreamer": plan.hot_users, "ChurnUser": max(4, plan.churn_users), "CapChanger": 1}
        )
        gevent.sleep(plan.churn)
        runner.stop_users(dict(runner.user_classes_count))
    finally:
        stop.set()
        gevent.joinall(helpers, timeout=15)
        runner.quit()
        hooks.request.remove_listener(tally.on_request)
    return ChurnResult(
        kills=kills,
        revoked=revoked,
        requests=sum(tally.statuses.values()),
        repairs_before=repairs_before,
    )


def judge_churn(churn: ChurnResult, gates: Check, repairs_after: dict[str, int]) -> list[Check]:
    made = {
        scope: count - churn.repairs_before.get(scope, 0) for scope, count in repairs_after.items()
    }
    return [
        Check(
            "no drift repaired while no worker was killed",
            sum(churn.repairs_before.values()) == 0,
            f"repairs before the churn: {churn.repairs_before}",
        ),
        Check(
            f"every cap exact at rest after {churn.kills} worker kills",
            gates.passed and churn.kills > 0,
            f"{gates.detail}; {churn.requests} requests, {churn.revoked} tokens revoked, "
            f"drift repaired by the audit: {made}",
        ),
    ]


@dataclass(frozen=True, kw_only=True)
class QueueResult:
    statuses: Counter[int]
    failures: Counter[str]
    most_in_flight: int
    counts: list[int]
    waits_ms: list[float]
    refused_waits_ms: list[float]
    order: list[int]


def drive_queue(plan: Plan, fake: FakeUpstream, workdir: Path) -> QueueResult:
    """The queue phase, on a gateway of its own with GATEWAY_QUEUE_TIMEOUT set: three times
    a key's cap of streamers on it for a phase. Each request is numbered as sent; the
    upstream's record gives the order they were admitted in."""
    workdir.mkdir(parents=True, exist_ok=True)
    gateway = GatewayServer(
        workdir=workdir,
        upstream_url=fake.url,
        workers=plan.workers,
        global_cap=None,
        log_level="INFO",  # the access log's waited_ms
        extra_env={
            "GATEWAY_QUEUE_TIMEOUT": f"{plan.queue_timeout:g}",
            "GATEWAY_QUEUE_MAX_WAITERS": str(4 * plan.cap),
        },
    )
    try:
        gateway.start()
        cred = gateway.create_credential("queue", cap=plan.cap)
        fake.reset()
        scenarios.QueueStreamer.host = gateway.url
        creds = Credentials(hot=cred, change=cred, churn=(), spread=(cred,))
        env = Environment(
            user_classes=[scenarios.QueueStreamer],
            events=locust.events,
            host=gateway.url,
            parsed_options=locust_options(plan, gateway.url, creds, queue_token=cred.token),
        )
        tally = Tally()
        hooks: Any = env.events
        hooks.request.add_listener(tally.on_request)
        runner = env.create_local_runner()
        hooks.init.fire(environment=env, runner=runner, web_ui=None)
        counts: list[int] = []
        stop = gevent.event.Event()

        def sample() -> None:
            while not stop.wait(plan.sample_every):
                with contextlib.suppress(FakeUpstreamError):
                    stats = fake.stats()["keys"].get(cred.upstream_key, {})
                    counts.append(int(stats.get("in_flight", 0)))

        sampler = gevent.spawn(sample)
        try:
            runner.spawn_users({"QueueStreamer": 3 * plan.cap})
            gevent.sleep(plan.phase_seconds)
            # The order: the last requests the upstream saw, before the phase winds down.
            recent = [s for s in fake.stats()["recent"] if s["key"] == cred.upstream_key]
            runner.stop_users(dict(runner.user_classes_count))
        finally:
            stop.set()
            sampler.join(timeout=2)
            runner.quit()
            hooks.request.remove_listener(tally.on_request)
        wait_until_idle(fake, within=10.0 + plan.queue_timeout)
        final = fake.stats()["keys"].get(cred.upstream_key, {})
        mine = [r for r in gateway.access_records() if r.get("user_id") == cred.user_id]
        order = [
            int(part.removeprefix("seq="))
            for seen in recent
            for part in str(seen["query"]).split("&")
            if part.startswith("seq=")
        ]
        return QueueResult(
            statuses=tally.statuses,
            failures=tally.failures,
            most_in_flight=int(final.get("max_in_flight", 0)),
            counts=counts,
            waits_ms=[float(r.get("waited_ms", 0)) for r in mine if r.get("status") == 200],
            refused_waits_ms=[float(r.get("waited_ms", 0)) for r in mine if r.get("status") == 429],
            order=order,
        )
    finally:
        gateway.stop()


def fifo_inversions(order: Sequence[int]) -> tuple[int, int]:
    """(pairs admitted out of the order they were sent, the most places one went early)."""
    pairs = sum(1 for i, a in enumerate(order) for b in order[i + 1 :] if a > b)
    ranks = {seq: rank for rank, seq in enumerate(sorted(order))}
    early = max((ranks[seq] - place for place, seq in enumerate(order)), default=0)
    return pairs, max(0, early)


def judge_queue(plan: Plan, queue: QueueResult) -> tuple[list[Check], list[tuple[str, str]]]:
    others = {s: n for s, n in queue.statuses.items() if s not in (200, 429)}
    late = [w for w in queue.refused_waits_ms if w < plan.queue_timeout * 1000 * 0.9]
    pairs, early = fifo_inversions(queue.order)
    checks = [
        Check(
            "with the queue on, every request served or refused after its whole wait",
            not others and not late and not queue.failures and queue.statuses[200] > 0,
            f"{queue.statuses[200]} served, {queue.statuses[429]} refused after waiting "
            f"(the shortest wait of a refusal {min(queue.refused_waits_ms, default=0):.0f} ms; "
            f"timeout {plan.queue_timeout:g} s); other statuses {others or 'none'}; "
            f"failures {dict(queue.failures) or 'none'}",
        ),
        never_above(
            "with the queue on, the upstream never above the cap",
            observed=queue.most_in_flight,
            cap=plan.cap,
            what=f"{3 * plan.cap} streamers in line",
        ),
    ]
    waits = queue.waits_ms
    p50, p99 = percentile(waits, 0.5) or 0.0, percentile(waits, 0.99) or 0.0
    figures = [
        (
            "queue waits (served)",
            f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, {len(waits)} requests" if waits else "-",
        ),
        (
            "queue order",
            f"{pairs} pairs of {len(queue.order) * (len(queue.order) - 1) // 2} admitted out of "
            f"the order sent, none more than {early} places early "
            f"({len(queue.order)} most recent requests)",
        ),
    ]
    return checks, figures


def wait_until_idle(fake: FakeUpstream, *, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        stats = fake.stats()
        if stats["in_flight"] == 0 or time.monotonic() > deadline:
            return stats
        gevent.sleep(0.1)


def settled_caps(gateway: GatewayServer, plan: Plan, *, within: float) -> Check:
    deadline = time.monotonic() + within
    while True:
        check = gates_released(gateway.caps(), global_cap=plan.global_cap)
        if check.passed or time.monotonic() > deadline:
            return check
        gevent.sleep(0.2)


def settled_metrics(gateway: GatewayServer, tally: Tally, *, within: float) -> Check:
    """The workers write their counts every second: give them a moment to agree."""
    deadline = time.monotonic() + within
    while True:
        check = metrics_agree(gateway.metrics(), rejected_by_scope=tally.rejections)
        if check.passed or time.monotonic() > deadline:
            return check
        gevent.sleep(0.3)


def judge(
    plan: Plan,
    result: LoadResult,
    final: dict[str, Any],
    creds: Credentials,
    gates: Check,
    metrics: Check,
) -> list[Check]:
    keys: dict[str, dict[str, int]] = final["keys"]

    def most(cred: Credential) -> int:
        return int(keys.get(cred.upstream_key, {}).get("max_in_flight", 0))

    others = [*creds.churn, *creds.spread]
    worst = max(others, key=lambda c: most(c) - c.cap)
    tally = result.tally
    changed_initial = plan.cap_change[-1]
    return [
        never_above(
            "the hot key never above its cap at the upstream",
            observed=most(creds.hot),
            cap=plan.expect_cap,
            what=f"{plan.hot_users} clients",
        ),
        never_above(
            "no other key above its cap at the upstream",
            observed=most(worst),
            cap=worst.cap,
            what=f"{len(others)} keys, the closest ({worst.name})",
        ),
        never_above(
            "the upstream's total never above the global cap",
            observed=int(final["max_in_flight"]),
            cap=plan.global_cap,
            what="all keys",
        ),
        held_at_cap(
            "the hot key held at its cap while over it",
            counts=in_flight(result.samples, result.credential_window, creds.hot.upstream_key),
            observed=most(creds.hot),
            cap=plan.expect_cap,
            offered=plan.hot_users,
            most=plan.most,
        ),
        held_at_cap(
            "the global cap held while over it",
            counts=in_flight(result.samples, result.global_window, None),
            observed=int(final["max_in_flight"]),
            cap=plan.global_cap,
            offered=plan.users,
            most=plan.most,
        ),
        cap_after_changes(
            "a cap changed under load: the upstream never above the cap in force, "
            "counting old requests",
            samples=result.samples,
            window=result.credential_window,
            key=creds.change.upstream_key,
            changes=tally.changes,
            initial_cap=changed_initial,
            grace=CHANGE_GRACE,
            observed=most(creds.change),
        ),
        rejections_well_formed(by_scope=tally.rejections, malformed=tally.malformed),
        nothing_else_failed(tally.failures),
        Check(
            "the upstream saw every request end",
            final["in_flight"] == 0,
            f"in flight after the load: {final['in_flight']}; "
            f"{final['closed_early']} ended early (dropped, or cut off as a phase ended)",
        ),
        gates,
        metrics,
    ]


def figures(plan: Plan, result: LoadResult, final: dict[str, Any]) -> list[tuple[str, str]]:
    tally = result.tally
    median = percentile(tally.first_event_ms, 0.5)
    p99 = percentile(tally.first_event_ms, 0.99)
    scopes = ", ".join(f"{s} {n}" for s, n in sorted(tally.rejections.items())) or "-"
    ok = tally.statuses.get(200, 0)
    return [
        ("requests", f"{sum(tally.statuses.values())}"),
        ("streams", f"{tally.streams} whole, {tally.dropped} dropped by the client"),
        ("short messages", f"{tally.short}"),
        ("200s", f"{ok}"),
        ("429s", f"{tally.statuses.get(429, 0)} ({scopes})"),
        (
            "time to first event",
            "-" if median is None or p99 is None else f"median {median:.1f} ms, p99 {p99:.1f} ms",
        ),
        ("streams per second", f"{tally.streams / result.load_seconds:.1f}"),
        ("cap changes", f"{len(tally.changes)} (every {plan.cap_change_every:g} s)"),
        ("upstream requests", f"{final['total']}"),
        ("samples", f"{len(result.samples)} (every {plan.sample_every:g} s)"),
        ("locust CPU peak", f"{tally.cpu_peak:.0f}% of one core"),
    ]


def heading(plan: Plan) -> list[str]:
    lo, hi = min(plan.cap_change), max(plan.cap_change)
    return [
        f"gateway capacity check: {plan.workers} workers, {plan.duration:g} s; streams of "
        f"{plan.events} events x {plan.delay:g} s",
        f"  phase 1 ({plan.phase_seconds:.1f} s): {plan.hot_users} streamers on one key "
        f"(cap {plan.cap}), {plan.churn_users} churn on {plan.churn_credentials} keys, "
        f"{plan.change_users} streamers on a key cycled {lo}..{hi}",
        f"  phase 2 ({plan.phase_seconds:.1f} s): {plan.users} streamers on "
        f"{plan.credentials} keys (cap {plan.cap} each), global cap {plan.global_cap}",
        *(
            [
                f"  churn ({plan.churn:g} s): mixed traffic, upstream errors and cuts, cap "
                f"changes, token revocations, a worker SIGKILLed every {plan.kill_every:g} s"
            ]
            if plan.churn
            else []
        ),
        *(
            [
                f"  queue ({plan.phase_seconds:.1f} s, a gateway of its own with "
                f"GATEWAY_QUEUE_TIMEOUT={plan.queue_timeout:g}): {3 * plan.cap} streamers "
                f"on one key (cap {plan.cap})"
            ]
            if plan.queue_timeout
            else []
        ),
    ]


def run(plan: Plan) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-capacity-"))
    fake: FakeUpstream | None = None
    gateway: GatewayServer | None = None
    try:
        fake = FakeUpstream.start(events=plan.events, delay=plan.delay)
        gateway = GatewayServer(
            workdir=workdir,
            upstream_url=fake.url,
            workers=plan.workers,
            global_cap=plan.global_cap,
        )
        gateway.start()
        creds = create_credentials(gateway, plan)
        fake.reset()
        result = drive_load(plan, gateway, fake, creds)
        final = wait_until_idle(fake, within=10.0)
        gates = settled_caps(gateway, plan, within=10.0)
        metrics = settled_metrics(gateway, result.tally, within=5.0)
        checks = judge(plan, result, final, creds, gates, metrics)
        if plan.churn:
            churned = drive_churn(plan, gateway, creds)
            wait_until_idle(fake, within=10.0)
            # The reaper, then the audit (an interval of quiet) settle every count.
            gevent.sleep(2 * AUDIT_INTERVAL)
            settled = settled_caps(gateway, plan, within=10.0 + 2 * AUDIT_INTERVAL)
            checks += judge_churn(churned, settled, repairs_made(gateway.namespace))
        shown = figures(plan, result, final)
        if plan.queue_timeout:
            gateway.stop()
            queue_checks, queue_figures = judge_queue(
                plan, drive_queue(plan, fake, workdir / "queue")
            )
            checks += queue_checks
            shown += queue_figures
        click.echo(render(heading=heading(plan), figures=shown, checks=checks))
        if not all(c.passed for c in checks):
            click.echo(f"\ngateway log (last lines):\n{gateway.log_tail()}")
            return 1
        return 0
    except (StackError, FakeUpstreamError) as exc:
        click.echo(f"capacity check could not run: {exc}", err=True)
        if gateway is not None:
            click.echo(f"gateway log (last lines):\n{gateway.log_tail()}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted; stopping what was started", err=True)
        return 130
    finally:
        if gateway is not None:
            gateway.stop()
        if fake is not None:
            fake.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _caps_list(_ctx: Any, _param: Any, value: str) -> tuple[int, ...]:
    try:
        caps = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 4,12") from None
    if not caps:
        raise click.BadParameter("at least one cap")
    return caps


EXAMPLES = """\b
Examples:
  python -m loadtests.capacity
  python -m loadtests.capacity --duration 8 --users 24 --credentials 8 --cap 4 \\
      --global-cap 16 --hot-users 12 --churn-users 4 --change-users 8 --cap-change 2,4
  python -m loadtests.capacity --expect-cap 7    # a wrong expectation: exits 1
"""


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXAMPLES)
@click.option(
    "--duration",
    type=click.FloatRange(min=5),
    default=60.0,
    show_default=True,
    help="Seconds of load in all (two phases and a short gap).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Gateway worker processes.",
)
@click.option(
    "--users",
    type=click.IntRange(min=2),
    default=200,
    show_default=True,
    help="Streamers in the global phase.",
)
@click.option(
    "--credentials",
    type=click.IntRange(min=1),
    default=None,
    help="Keys they spread over [default: --users / (--cap / 2)].",
)
@click.option(
    "--hot-users",
    type=click.IntRange(min=2),
    default=None,
    help="Streamers on the one hot key [default: 5 x --cap].",
)
@click.option(
    "--churn-users",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Users sending short requests and dropping streams.",
)
@click.option(
    "--change-users",
    type=click.IntRange(min=1),
    default=None,
    help="Streamers on the key whose cap changes [default: 2 x its largest cap].",
)
@click.option(
    "--cap",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="max_concurrent of every key but the cap-change one.",
)
@click.option(
    "--global-cap",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="PROXY_MAX_GLOBAL_CONCURRENT.",
)
@click.option(
    "--cap-change",
    default="4,12",
    show_default=True,
    callback=_caps_list,
    help="Caps the cap-change key cycles through (settings API).",
)
@click.option(
    "--cap-change-every",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Seconds between cap changes.",
)
@click.option(
    "--events",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Text deltas per stream (fake upstream).",
)
@click.option(
    "--delay",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    help="Seconds before each delta (fake upstream).",
)
@click.option(
    "--drop-after",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Churn users hang up a stream after this many events.",
)
@click.option(
    "--max-retry-wait",
    type=click.FloatRange(min=0),
    default=0.25,
    show_default=True,
    help="Clients wait retry-after x U(0.5, 1), at most this.",
)
@click.option(
    "--sample-every",
    type=click.FloatRange(min=0.02),
    default=0.1,
    show_default=True,
    help="Seconds between samples of the upstream's in flight.",
)
@click.option(
    "--most",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Share of samples a cap must be held at while over it.",
)
@click.option(
    "--expect-cap",
    type=click.IntRange(min=1),
    default=None,
    help="The hot key's cap the checks expect [default: --cap]; a wrong one fails.",
)
@click.option(
    "--churn",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds of a churn phase after the others (0: none): mixed traffic with upstream "
    "errors and cuts, cap changes and token revocations while a worker is SIGKILLed every "
    "--kill-every seconds; then every cap must be exact at rest.",
)
@click.option(
    "--queue-timeout",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds of waiting line (0: no queue phase): after the others, a gateway of its "
    "own with GATEWAY_QUEUE_TIMEOUT set takes 3 x --cap streamers on one key; every request "
    "must be served or refused after its whole wait, the upstream never above the cap; the "
    "wait distribution and the FIFO order are reported.",
)
@click.option(
    "--kill-every",
    type=click.FloatRange(min=6.0),
    default=8.0,
    show_default=True,
    help="Seconds between worker kills in the churn phase (Granian takes a worker that "
    "dies within ~5.5 s of its respawn for a crash loop).",
)
def main(**given: Any) -> None:
    """Check the gateway's concurrency caps under load against the upstream's ground truth."""
    cap: int = given["cap"]
    cap_change: tuple[int, ...] = given["cap_change"]
    users: int = given["users"]
    plan = Plan(
        duration=given["duration"],
        workers=given["workers"],
        users=users,
        credentials=given["credentials"] or math.ceil(users / max(1, cap // 2)),
        hot_users=given["hot_users"] or 5 * cap,
        churn_users=given["churn_users"],
        change_users=given["change_users"] or 2 * max(cap_change),
        cap=cap,
        global_cap=given["global_cap"],
        cap_change=cap_change,
        cap_change_every=given["cap_change_every"],
        events=given["events"],
        delay=given["delay"],
        drop_after=given["drop_after"],
        max_retry_wait=given["max_retry_wait"],
        sample_every=given["sample_every"],
        most=given["most"],
        expect_cap=given["expect_cap"] or cap,
        churn=given["churn"],
        kill_every=given["kill_every"],
        queue_timeout=given["queue_timeout"],
    )
    if problems := plan.problems():
        raise click.UsageError("; ".join(problems))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _interrupt_on_sigterm()
    sys.exit(run(plan))


def _interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so that everything started is stopped."""
    main_greenlet = gevent.getcurrent()
    gevent.signal_handler(signal.SIGTERM, gevent.kill, main_greenlet, KeyboardInterrupt)


if __name__ == "__main__":
    main()
