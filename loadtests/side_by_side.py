"""Two checkouts of the gateway measured side by side: worker CPU per request, A/B.

    python -m loadtests.side_by_side /path/to/before /path/to/after --rounds 8 --seconds 4

Both gateways run at once over one fake upstream (caps on, the benchmark's own
``Gateway``), and wrk bursts alternate between them (A then B, B then A, ...), so slow
periods of a shared machine fall on both. Prints each round and the medians. The other
checkout runs with this one's virtual environment (its imports come from its own folder).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import click

import loadtests.benchmark as bench
from loadtests.fake_upstream import FakeUpstream


def _start(root: Path, workdir: Path, upstream: str) -> tuple[bench.Gateway, str]:
    bench.ROOT = root  # the checkout the gateway (and its command line) runs from
    gateway = bench.Gateway(workdir, upstream, workers=2, global_cap=100_000)
    return gateway, gateway.user("bench")


@click.command()
@click.argument("before", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("after", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rounds", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seconds", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True)
def main(before: Path, after: Path, rounds: int, seconds: int, concurrency: int) -> None:
    own_root = bench.ROOT
    with (
        tempfile.TemporaryDirectory(prefix="gw-ab-") as tmp,
        FakeUpstream.start() as up,
    ):
        a, token_a = _start(before.resolve(), Path(tmp) / "a", up.url)
        try:
            b, token_b = _start(after.resolve(), Path(tmp) / "b", up.url)
            try:
                pairs = {"A": (a, token_a), "B": (b, token_b)}
                for gateway, token in pairs.values():
                    bench.wrk_json(gateway.url, token, concurrency=concurrency, seconds=1)
                cpu: dict[str, list[float]] = {"A": [], "B": []}
                for index in range(rounds):
                    for name in ("A", "B") if index % 2 == 0 else ("B", "A"):
                        gateway, token = pairs[name]
                        used = gateway.worker_cpu_seconds()
                        row = bench.wrk_json(
                            gateway.url, token, concurrency=concurrency, seconds=seconds
                        )
                        used = gateway.worker_cpu_seconds() - used
                        if row["non_2xx"]:
                            raise click.ClickException(f"{name}: {row['non_2xx']:.0f} non-2xx")
                        cpu[name].append(used / max(row["requests"], 1) * 1e6)
                for name, root in (("A", before), ("B", after)):
                    rounds_text = " ".join(f"{x:.0f}" for x in cpu[name])
                    print(
                        f"{name} {root}: median {statistics.median(cpu[name]):.1f} µs of worker "
                        f"CPU per request (rounds: {rounds_text})"
                    )
            finally:
                b.stop()
        finally:
            a.stop()
            bench.ROOT = own_root


if __name__ == "__main__":
    main()
