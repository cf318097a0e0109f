"""The capacity check's judgement: ground-truth samples in, checks and a summary table out.

Pure functions over plain data, so each rule is unit-tested without a gateway or Locust.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    """What the fake upstream had in flight at one moment (monotonic seconds)."""

    at: float
    total: int
    keys: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Window:
    """The steady part of a phase: ramp-up and wind-down are left out."""

    start: float
    end: float

    def holds(self, at: float) -> bool:
        return self.start <= at <= self.end


@dataclass(frozen=True, slots=True)
class Check:
    title: str
    passed: bool
    detail: str


def in_flight(samples: Iterable[Sample], window: Window, key: str | None) -> list[int]:
    """In-flight counts of ``key`` (or of all keys together) inside ``window``."""
    return [(s.total if key is None else s.keys.get(key, 0)) for s in samples if window.holds(s.at)]


def never_above(title: str, *, observed: int, cap: int, what: str) -> Check:
    return Check(title, observed <= cap, f"{what}: most in flight {observed}, cap {cap}")


def held_at_cap(
    title: str, *, counts: Sequence[int], observed: int, cap: int, offered: int, most: float
) -> Check:
    """The cap is used, not just respected: the most in flight is the cap, and the counts
    sampled while ``offered`` clients pressed on it sat at the cap in at least ``most``."""
    if not counts:
        return Check(title, False, "no samples in the steady window (run longer)")
    at_cap = sum(1 for c in counts if c >= cap) / len(counts)
    mean = statistics.fmean(counts)
    detail = (
        f"{offered} clients on cap {cap}: most in flight {observed}, at the cap in "
        f"{at_cap:.0%} of {len(counts)} samples (needs {most:.0%}), mean {mean:.1f}"
    )
    return Check(title, observed == cap and at_cap >= most, detail)


def cap_after_changes(
    title: str,
    *,
    samples: Iterable[Sample],
    window: Window,
    key: str,
    changes: Sequence[tuple[float, int]],
    initial_cap: int,
    grace: float,
    observed: int,
) -> Check:
    """The upstream never exceeds the cap in force, counting requests admitted under an
    earlier cap.

    A lowered cap admits nothing until the requests still in flight are below it, so the
    key's in-flight count may stay above the new cap only while it falls: each sample is
    held to a ceiling that starts at the cap in force, becomes the count when a lowering
    finds more in flight (never more than the ceiling before it), and comes down with the
    count to the cap. A change binds ``grace`` seconds after its PUT returned (requests
    admitted just before it are still on their way to the upstream). The most ever in
    flight is at most the largest cap ever in force.
    """
    caps = sorted({initial_cap, *(cap for _, cap in changes)})
    pending = sorted(changes)
    cap = ceiling = initial_cap
    over: list[str] = []
    checked = 0
    for sample in sorted(samples, key=lambda s: s.at):
        count = sample.keys.get(key, 0)
        while pending and pending[0][0] + grace <= sample.at:
            _, cap = pending.pop(0)
            ceiling = max(cap, min(ceiling, count))
        if pending and pending[0][0] <= sample.at:
            continue  # a change under way: its requests in transit are not judged
        ceiling = max(cap, min(ceiling, count))
        if not window.holds(sample.at):
            continue
        checked += 1
        if count > ceiling:
            over.append(f"{count} > {ceiling} (cap {cap})")
    passed = not over and observed <= caps[-1]
    examples = f" ({', '.join(over[:3])})" if over else ""
    detail = (
        f"{len(changes)} changes among {caps}; {checked} samples, {len(over)} above the cap "
        f"in force counting old requests{examples}; most in flight {observed} "
        f"(largest cap {caps[-1]})"
    )
    return Check(title, passed, detail)


def rejections_well_formed(*, by_scope: Mapping[str, int], malformed: Sequence[str]) -> Check:
    total = sum(by_scope.values()) + len(malformed)
    scopes = ", ".join(f"{scope} {n}" for scope, n in sorted(by_scope.items())) or "none"
    wanted = {"credential", "global"}
    missing = sorted(wanted - {s for s, n in by_scope.items() if n})
    detail = f"{total} 429s ({scopes}); {len(malformed)} malformed"
    if malformed:
        detail += f": {malformed[0]}"
    if missing:
        detail += f"; no {' or '.join(missing)} rejections seen (the load never went over?)"
    return Check(
        "every rejection a well-formed 429 overloaded_error with retry-after",
        not malformed and not missing,
        detail,
    )


def nothing_else_failed(failures: Mapping[str, int]) -> Check:
    total = sum(failures.values())
    worst = sorted(failures.items(), key=lambda item: -item[1])[:3]
    detail = f"{total} failures" + "".join(f"; {n}x {message}" for message, n in worst)
    return Check("nothing else failed", total == 0, detail)


def gates_released(rows: Sequence[Mapping[str, object]], *, global_cap: int | None) -> Check:
    """After the load every semaphore is back to its cap and no live worker records a permit."""
    leaked = [
        row
        for row in rows
        if row.get("in_use") != 0
        or row.get("free") != row.get("cap")
        or row.get("held_by_live_workers", 0) != 0
    ]
    has_global = any(row.get("scope") == "global" for row in rows)
    detail = f"{len(rows)} semaphores, {len(leaked)} not back to their cap"
    if leaked:
        first = leaked[0]
        detail += (
            f" (e.g. {first.get('scope')} {first.get('user_id') or ''} cap {first.get('cap')}: "
            f"in_use {first.get('in_use')}, free {first.get('free')}, "
            f"held {first.get('held_by_live_workers')})"
        )
    if global_cap is not None and not has_global:
        detail += "; the global semaphore is missing"
    passed = bool(rows) and not leaked and (global_cap is None or has_global)
    return Check("every semaphore back to its cap after the load", passed, detail)


Scraped = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_agree(scraped: Scraped | None, *, rejected_by_scope: Mapping[str, int]) -> Check:
    """The gateway's /metrics, after the load: every 429 the clients saw counted once, by
    the cap that refused it, and nothing left in flight."""
    title = "the gateway's metrics count every 429 the clients saw, and 0 in flight after"
    if scraped is None:
        return Check(title, False, "no metrics endpoint answered")
    counted: dict[str, float] = {}
    rejected_total = 0.0
    in_flight_left = 0.0
    for (name, labels), value in scraped.items():
        label = dict(labels)
        if name == "gateway_rejections_total":
            counted[label.get("scope", "")] = counted.get(label.get("scope", ""), 0.0) + value
        elif name == "gateway_requests_total" and label.get("outcome") == "rejected":
            rejected_total += value
        elif name in ("gateway_in_flight", "gateway_credential_in_flight"):
            in_flight_left += value
    wanted = {scope: n for scope, n in rejected_by_scope.items() if scope != "upstream"}
    got = {scope: round(counted.get(scope, 0.0)) for scope in sorted({*wanted, *counted})}
    expected = {scope: wanted.get(scope, 0) for scope in got}
    passed = got == expected and rejected_total == sum(wanted.values()) and in_flight_left == 0
    detail = (
        f"rejections by scope {got} (clients saw {expected}); "
        f"requests_total rejected {rejected_total:.0f}; in flight {in_flight_left:.0f}"
    )
    return Check(title, passed, detail)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def render(
    *, heading: Sequence[str], figures: Sequence[tuple[str, str]], checks: Sequence[Check]
) -> str:
    width = max(len(label) for label, _ in figures) if figures else 0
    lines = [*heading, "", "figures"]
    lines += [f"  {label:<{width}}  {value}" for label, value in figures]
    lines += ["", "checks"]
    for check in checks:
        lines.append(f"  {'PASS' if check.passed else 'FAIL'}  {check.title}")
        lines.append(f"        {check.detail}")
    failed = sum(1 for c in checks if not c.passed)
    verdict = "PASS" if failed == 0 else "FAIL"
    lines += ["", f"RESULT: {verdict} ({len(checks) - failed}/{len(checks)} checks passed)"]
    return "\n".join(lines)
