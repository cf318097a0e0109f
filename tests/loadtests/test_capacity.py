"""The one-command capacity check: its verdict rules, and short real runs of the command.

``loadtests.capacity`` imports Locust (which monkey-patches the standard library with
gevent), so the command runs in a subprocess, as an operator runs it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from ipc.naming import SHM_DIR
from loadtests._capacity_verdict import (
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
from tests.fixtures.gateway import ROOT

# Small enough for the suite, still over every cap: 12 streamers on a cap-4 key, 24 over
# 8 keys (3 each) against a global cap of 16, a key whose cap flips between 2 and 4.
SHORT_RUN = [
    "--duration", "8",
    "--workers", "2",
    "--users", "24",
    "--credentials", "8",
    "--cap", "4",
    "--global-cap", "16",
    "--hot-users", "12",
    "--churn-users", "4",
    "--change-users", "8",
    "--cap-change", "2,4",
    "--cap-change-every", "2",
    "--events", "10",
]  # fmt: skip
CHECK_LINE = re.compile(r"^  (PASS|FAIL)  (.+)$", re.MULTILINE)
NAMESPACE_OBJECT = re.compile(r"^(sem\.)?cap[0-9a-f]{12}\.")


def capacity(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtests.capacity", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def capacity_objects() -> set[str]:
    return {p.name for p in SHM_DIR.iterdir() if NAMESPACE_OBJECT.match(p.name)}


# The verdict rules -----------------------------------------------------------------------


def samples(*counts: int, key: str = "k") -> list[Sample]:
    return [Sample(at=float(i), total=c, keys={key: c}) for i, c in enumerate(counts)]


def test_above_the_cap_fails_and_at_it_passes() -> None:
    assert never_above("t", observed=8, cap=8, what="x").passed
    assert not never_above("t", observed=9, cap=8, what="x").passed


def test_a_cap_must_be_held_not_just_respected() -> None:
    window = Window(0, 100)
    held = in_flight(samples(8, 8, 8, 7, 8), window, "k")
    assert held_at_cap("t", counts=held, observed=8, cap=8, offered=40, most=0.5).passed
    idle = in_flight(samples(3, 4, 8, 2, 5), window, "k")
    check = held_at_cap("t", counts=idle, observed=8, cap=8, offered=40, most=0.5)
    assert not check.passed and "20%" in check.detail
    assert not held_at_cap("t", counts=held, observed=7, cap=8, offered=40, most=0.5).passed
    assert not held_at_cap("t", counts=[], observed=8, cap=8, offered=40, most=0.5).passed


def test_samples_outside_the_window_do_not_count() -> None:
    assert in_flight(samples(1, 2, 3, 4), Window(1, 2), "k") == [2, 3]
    assert in_flight(samples(1, 2, 3, 4), Window(1, 2), None) == [2, 3]


def test_a_changed_cap_counts_the_requests_still_in_flight() -> None:
    def trace(*points: tuple[float, int]) -> list[Sample]:
        return [Sample(at=t, total=c, keys={"k": c}) for t, c in points]

    common = {"window": Window(0, 20), "key": "k", "initial_cap": 12, "grace": 0.25}
    lowered = [(10.0, 4)]
    # Lowered 12 -> 4 with 12 in flight: the count may only fall until it is under 4.
    draining = trace((9, 12), (10.5, 12), (11, 9), (12, 4), (13, 3), (14, 4))
    assert cap_after_changes("t", samples=draining, changes=lowered, observed=12, **common).passed
    rising = trace((9, 12), (10.5, 9), (11, 10))
    check = cap_after_changes("t", samples=rising, changes=lowered, observed=12, **common)
    assert not check.passed and "10 > 9 (cap 4)" in check.detail
    again = trace((9, 12), (11, 4), (12, 3), (13, 5))
    check = cap_after_changes("t", samples=again, changes=lowered, observed=12, **common)
    assert not check.passed and "5 > 4" in check.detail
    # Within the grace a request admitted before the change may still arrive.
    transit = trace((9, 11), (10.1, 12), (10.5, 12))
    check = cap_after_changes(
        "t", samples=transit, changes=[(10.0, 4)], observed=12, **{**common, "initial_cap": 12}
    )
    assert check.passed
    # Raised: the new cap binds at once; never above the largest cap ever in force.
    raised = trace((9, 4), (10.5, 12))
    assert cap_after_changes(
        "t", samples=raised, changes=[(10.0, 12)], observed=12, **{**common, "initial_cap": 4}
    ).passed
    beyond = cap_after_changes("t", samples=draining, changes=lowered, observed=13, **common)
    assert not beyond.passed and "largest cap 12" in beyond.detail


def test_rejections_must_be_well_formed_and_of_both_scopes() -> None:
    assert rejections_well_formed(by_scope={"credential": 3, "global": 2}, malformed=[]).passed
    assert not rejections_well_formed(
        by_scope={"credential": 3, "global": 2}, malformed=["no retry-after header"]
    ).passed
    missing = rejections_well_formed(by_scope={"credential": 3}, malformed=[])
    assert not missing.passed and "global" in missing.detail


def test_any_other_failure_fails() -> None:
    assert nothing_else_failed({}).passed
    assert not nothing_else_failed({"SSE whole stream: HTTP 502": 1}).passed


def test_every_gate_must_be_back_to_its_cap() -> None:
    free = {"scope": "global", "cap": 16, "in_use": 0, "free": 16, "held_by_live_workers": 0}
    key = {"scope": "credential", "cap": 4, "in_use": 0, "free": 4, "held_by_live_workers": 0}
    assert gates_released([free, key], global_cap=16).passed
    assert not gates_released([free, {**key, "in_use": 1, "free": 3}], global_cap=16).passed
    assert not gates_released([free, {**key, "held_by_live_workers": 1}], global_cap=16).passed
    assert not gates_released([key], global_cap=16).passed
    assert not gates_released([], global_cap=None).passed


def test_the_metrics_must_count_exactly_the_429s_seen() -> None:
    def scraped(credential: float, global_: float, rejected: float, left: float = 0.0) -> Any:
        def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
            return (name, frozenset(labels.items()))

        return {
            key("gateway_rejections_total", scope="credential", user="a"): credential,
            key("gateway_rejections_total", scope="global", user="a"): global_,
            key("gateway_rejections_total", scope="worker", user="a"): 0.0,
            key("gateway_requests_total", outcome="rejected", code="429"): rejected,
            key("gateway_requests_total", outcome="ok", code="200"): 50.0,
            key("gateway_in_flight", scope="global"): left,
            key("gateway_credential_in_flight", user="a"): 0.0,
        }

    seen = {"credential": 3, "global": 2, "upstream": 1}  # the upstream's own 429s are not ours
    assert metrics_agree(scraped(3, 2, 5), rejected_by_scope=seen).passed
    assert not metrics_agree(scraped(3, 1, 4), rejected_by_scope=seen).passed
    assert not metrics_agree(scraped(3, 2, 6), rejected_by_scope=seen).passed
    assert not metrics_agree(scraped(3, 2, 5, left=1), rejected_by_scope=seen).passed
    assert not metrics_agree(None, rejected_by_scope=seen).passed


def test_percentiles_and_the_verdict_line() -> None:
    assert percentile([], 0.5) is None
    assert percentile([float(v) for v in range(1, 101)], 0.99) == 99.0
    assert percentile([5.0, 1.0, 3.0], 0.5) == 3.0
    check = never_above("t", observed=1, cap=2, what="x")
    text = render(heading=["h"], figures=[("requests", "3")], checks=[check])
    assert text.endswith("RESULT: PASS (1/1 checks passed)")


# The command ------------------------------------------------------------------------------


def test_help_lists_the_flags() -> None:
    result = capacity("--help", timeout=60)
    assert result.returncode == 0
    for flag in ("--duration", "--users", "--workers", "--cap", "--global-cap", "--expect-cap"):
        assert flag in result.stdout


def test_a_plan_that_cannot_load_the_caps_is_refused() -> None:
    result = capacity("--users", "10", "--global-cap", "64", timeout=60)
    assert result.returncode == 2
    assert "--users must exceed --global-cap" in result.stderr


@pytest.mark.slow
def test_a_short_run_passes_every_check() -> None:
    before = capacity_objects()
    result = capacity(*SHORT_RUN)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = CHECK_LINE.findall(result.stdout)
    assert len(checks) == 11 and all(verdict == "PASS" for verdict, _ in checks), result.stdout
    assert "RESULT: PASS (11/11 checks passed)" in result.stdout
    assert "PASS  the gateway's metrics count every 429 the clients saw" in result.stdout
    for figure in ("requests", "streams", "200s", "429s", "time to first event", "per second"):
        assert figure in result.stdout
    assert capacity_objects() <= before  # its gateway stopped and freed its namespace


@pytest.mark.slow
def test_a_wrong_expectation_fails_the_run() -> None:
    result = capacity(
        "--duration", "5.5",
        "--workers", "1",
        "--users", "9",
        "--credentials", "3",
        "--cap", "4",
        "--global-cap", "8",
        "--hot-users", "12",
        "--churn-users", "0",
        "--change-users", "3",
        "--cap-change", "1,2",
        "--events", "10",
        "--expect-cap", "3",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  the hot key never above its cap at the upstream" in result.stdout
    assert "RESULT: FAIL" in result.stdout
