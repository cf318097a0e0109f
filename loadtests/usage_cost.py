"""What usage accounting costs a worker, by two measures steadier than CPU time A/B.

    python -m loadtests.usage_cost                   # both: sampled share and instructions
    python -m loadtests.usage_cost --only sampled --seconds 30
    python -m loadtests.usage_cost --only instructions --requests 500

Sampled share (py-spy, a dev dependency): one worker under wrk's streamed load; py-spy
samples its threads' stacks (400 a second, only while running) and the share of the
samples inside the usage code (``gateway/usage/``: the meter, the tally, the flush, and
``storage/usage.py``) is the share of the worker's CPU time they take. The binomial
error is printed. Granian's own Rust threads carry no Python stack and are not sampled:
the share is of the Python threads' time, an upper bound on the share of the whole
worker's.

Instructions (callgrind):

Worker CPU time on a shared machine moves by ±10% between identical runs (an A/A run of
the usage benchmark differed by 5.8%), so a 3% budget cannot be read off it. Valgrind's
callgrind counts the instructions a process runs instead: within 0.2% between runs here,
whatever else the machine is doing. Each gateway runs under
``valgrind --tool=callgrind --instr-atstart=no`` with one worker; after a warm-up the
worker's counters are zeroed, N sequential requests are sent (one keep-alive client),
and the counters dumped: instructions per request, user space only (the kernel's share
of the worker's CPU, its socket calls, is the same on both sides and not counted, so the
difference is an upper bound on the share of the worker's CPU).

The window holds no usage flush (``GATEWAY_USAGE_FLUSH_INTERVAL=3600`` in it); a flush,
which runs once per interval whatever the traffic, is counted apart: a third gateway
flushes every second through a window of known length, and the difference per flush is
printed with what it adds per request at a given rate.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

import loadtests.benchmark as bench
from loadtests.fake_upstream import FakeUpstream

PACED_DELTAS = 30
VALGRIND = ("valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no")


class Counted:
    """A gateway under callgrind, one worker, its counters read around a window."""

    def __init__(self, workdir: Path, upstream: str, *, usage: bool, flush: float) -> None:
        self.out = workdir / "callgrind"
        self.out.mkdir(parents=True)
        env = {"GATEWAY_USAGE_FLUSH_INTERVAL": str(flush)} if usage else {}
        self.gateway = bench.Gateway(
            workdir,
            upstream,
            workers=1,
            global_cap=100_000,
            usage=usage,
            wrapper=(*VALGRIND, f"--callgrind-out-file={self.out}/cg.%p"),
            env_extra=env,
        )
        token = self.gateway.user("counted")
        (self.worker,) = self.gateway.worker_pids()
        self.client = httpx.Client(
            base_url=self.gateway.url,
            headers={"x-api-key": token, "content-type": "application/json"},
            timeout=120,
        )
        self.dumps = 0

    def send(self, body: bytes, count: int, path: str = "/v1/messages") -> None:
        for _ in range(count):
            response = self.client.post(path, content=body)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

    def _control(self, *args: str) -> None:
        subprocess.run(
            ["callgrind_control", *args, str(self.worker)], check=True, capture_output=True
        )

    def start_counting(self) -> None:
        self._control("--instr=on")

    def window(self, body: bytes, count: int, path: str = "/v1/messages") -> int:
        """Instructions the worker ran while ``count`` requests of ``body`` were served."""
        self._control("--zero")
        self.send(body, count, path)
        self._control("--dump")
        self.dumps += 1
        deadline = time.monotonic() + 60
        dump = self.out / f"cg.{self.worker}.{self.dumps}"
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # written whole
        match = re.search(rb"^(?:summary|totals): (\d+)", dump.read_bytes(), re.M)
        if match is None:
            raise RuntimeError(f"no totals in {dump}")
        return int(match.group(1))

    def stop(self) -> None:
        self.client.close()
        # Under valgrind a graceful stop takes longer than the benchmark's 30 s before
        # SIGKILL (which would leave the namespace's semaphores in /dev/shm).
        self.gateway.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.gateway.process.wait(180)
        self.gateway.stop()


def measure(requests: int, warmup: int = 30) -> dict[str, float]:
    """Instructions per request, on and off, streamed and JSON, and per flush."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise click.ClickException("valgrind is not installed (apt-get install valgrind)")
    figures: dict[str, float] = {}
    # (path, body, share of ``requests``); paced: each text delta its own write, as
    # Anthropic streams arrive, so the meter reads a chunk per event.
    kinds = {
        "streamed": ("/v1/messages", bench.STREAM_MESSAGE, 1),
        "paced": (f"/v1/messages?events={PACED_DELTAS}&delay=0.005", bench.STREAM_MESSAGE, 5),
        "json": ("/v1/messages", bench.MESSAGE, 1),
    }
    with tempfile.TemporaryDirectory(prefix="gw-instr-") as tmp, FakeUpstream.start() as up:
        for state in ("on", "off"):
            counted = Counted(Path(tmp) / state, up.url, usage=state == "on", flush=3600)
            try:
                counted.start_counting()
                for kind, (path, body, share) in kinds.items():
                    count = max(20, requests // share)
                    counted.send(body, warmup // share, path)
                    used = counted.window(body, count, path)
                    figures[f"{kind} {state}"] = used / count
            finally:
                counted.stop()
        # A flush: the same traffic with a flush every second, over a window of known
        # length; its excess over the flush-free window, per flush.
        counted = Counted(Path(tmp) / "flushing", up.url, usage=True, flush=1)
        try:
            counted.start_counting()
            counted.send(bench.STREAM_MESSAGE, warmup)
            started = time.monotonic()
            used = counted.window(bench.STREAM_MESSAGE, requests)
            seconds = time.monotonic() - started
        finally:
            counted.stop()
        flushes = max(1.0, seconds)  # one a second
        figures["flush"] = (used - figures["streamed on"] * requests) / flushes
        figures["flush window s"] = seconds
    return figures


def report(figures: dict[str, float], requests: int) -> None:
    print(
        f"\n## usage: worker instructions per request, usage accounting on vs off "
        f"(callgrind, one worker,\n##   {requests} sequential requests after a warm-up; "
        "counted, not timed: within 0.2% between runs)"
    )
    print(f"  {'request':<9} {'usage on':>12} {'usage off':>12} {'difference':>11}")
    for kind in ("streamed", "paced", "json"):
        on, off = figures[f"{kind} on"], figures[f"{kind} off"]
        print(
            f"  {kind:<9} {on:12,.0f} {off:12,.0f} {on - off:+11,.0f} "
            f"({(on / off - 1) * 100:+.1f}%)"
        )
    print(
        f"  (streamed: the benchmark's 5 text deltas in one write; paced: {PACED_DELTAS} text\n"
        "   deltas, a write each, 5 ms apart, as an upstream streams them; json: not streamed)"
    )
    print(
        "  (user-space instructions, not time: the kernel's share of a worker's CPU, a third\n"
        "   under wrk here, is not counted, and instructions differ in what they cost; the\n"
        "   sampled share is the measure of time)"
    )
    flush = figures["flush"]
    print(
        f"  a usage flush (one per worker per interval, whatever the traffic): "
        f"{flush:,.0f} instructions\n"
        f"    (from a {figures['flush window s']:.0f} s window flushing every second); "
        f"at the default 2 s and 500 requests/s per worker: {flush / 1000:,.0f} per request"
    )


# Where a sampled stack is in the usage code (the first part that matches).
USAGE_CODE: dict[str, tuple[str, ...]] = {
    "meter (reading the events)": ("gateway/usage/meter.py",),
    "tally (adding up a request)": (
        "relayed (gateway/usage/recorder.py",
        "rejected (gateway/usage/recorder.py",
    ),
    "flush (writing the totals)": ("gateway/usage/recorder.py", "storage/usage.py"),
}


def sampled(
    seconds: int = 20, concurrency: int = 16, rate: int = 400, *, paced: bool = False
) -> dict[str, float]:
    """The share of a worker's sampled CPU time in the usage code, streamed requests (with
    ``paced``, each text delta its own write, as an upstream streams them)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise click.ClickException("py-spy is not installed (pip install -e '.[dev]')")
    if shutil.which("wrk") is None:
        raise click.ClickException("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="gw-spy-") as tmp, FakeUpstream.start() as up:
        gateway = bench.Gateway(Path(tmp), up.url, workers=1, global_cap=100_000)
        try:
            token = gateway.user("sampled")
            (worker,) = gateway.worker_pids()
            stacks = Path(tmp) / "stacks.txt"
            recorder = subprocess.Popen(
                [spy, "record", "--pid", str(worker), "--rate", str(rate),
                 "--duration", str(seconds), "--format", "raw", "--output", str(stacks),
                 "--nonblocking", "--threads"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            row = bench.wrk_json(
                gateway.url, token, concurrency=concurrency, seconds=seconds + 2,
                message=bench.STREAM_MESSAGE,
                path=f"/v1/messages?events={PACED_DELTAS}&delay=0.005" if paced
                else "/v1/messages",
            )  # fmt: skip
            recorder.wait(seconds + 60)
        finally:
            gateway.stop()
        counts: collections.Counter[str] = collections.Counter()
        total = 0
        for line in stacks.read_text().splitlines():
            stack, _, number = line.rpartition(" ")
            samples = int(number)
            total += samples
            for part, marks in USAGE_CODE.items():
                if any(mark in stack for mark in marks):
                    counts[part] += samples
                    break
    figures = {part: counts[part] / max(total, 1) for part in USAGE_CODE}
    figures["samples"] = total
    figures["requests"] = row["requests"]
    return figures


def report_sampled(figures: dict[str, float], seconds: int, *, paced: bool = False) -> None:
    total = int(figures["samples"])
    share = sum(figures[part] for part in USAGE_CODE)
    error = math.sqrt(share * (1 - share) / max(total, 1))
    kind = f"{PACED_DELTAS} text deltas a write each" if paced else "5 text deltas in a write"
    print(
        f"\n## usage: share of a worker's CPU time in the usage code, streamed requests, {kind} "
        f"(py-spy, one worker,\n##   {seconds} s of wrk at 400 samples a second: "
        f"{total:,} samples, {figures['requests']:,.0f} requests)"
    )
    for part in USAGE_CODE:
        print(f"  {part:<30} {figures[part] * 100:6.2f}%")
    print(f"  {'all of it':<30} {share * 100:6.2f}% ± {error * 100:.2f}  (budget: 3%)")


@click.command()
@click.option(
    "--only", type=click.Choice(["sampled", "instructions"]), multiple=True,
    help="One measure (both by default).",
)  # fmt: skip
@click.option("--requests", type=click.IntRange(min=20), default=300, show_default=True)
@click.option("--seconds", type=click.IntRange(min=5), default=20, show_default=True)
def main(only: tuple[str, ...], requests: int, seconds: int) -> None:
    parts = set(only) or {"sampled", "instructions"}
    if "sampled" in parts:
        report_sampled(sampled(seconds), seconds)
        report_sampled(sampled(seconds, concurrency=64, paced=True), seconds, paced=True)
    if "instructions" in parts:
        report(measure(requests), requests)


if __name__ == "__main__":
    main()
