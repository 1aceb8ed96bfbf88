"""What every benchmark shares: a database, the service as a separate process, the table.

Each benchmark module exposes `async def run(env: BenchEnv) -> list[Row]`. It measures
the service and the driver side by side, in the same run, on the same database, and
reports ratios, never pass/fail timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient

from service.embedded import free_port, secantusd_process

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    bench: str
    metric: str
    service: float
    driver: float | None = None  # the same work done directly with the driver
    unit: str = ""
    target: str = ""  # e.g. ">= 0.50" on the ratio, or "< 150" on the service figure
    higher_is_better: bool = True
    # The figure says nothing about what the row names in this run (e.g. a deep/first
    # ratio where both pages read the whole collection): printed as n/a, target unjudged.
    na: bool = False

    @property
    def ratio(self) -> float | None:
        if not self.driver or self.na:
            return None
        return self.service / self.driver

    @property
    def met(self) -> str:
        if self.na:
            return "n/a"
        if not self.target:
            return ""
        op, bound = self.target.split()
        value = self.ratio if self.driver is not None else self.service
        if value is None:
            return "?"
        ok = {"<=": value <= float(bound), ">=": value >= float(bound), "<": value < float(bound)}
        return "yes" if ok[op] else "NO"


def print_table(rows: list[Row]) -> str:
    header = ("bench", "metric", "service", "driver", "unit", "ratio", "target", "met")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r.bench,
                r.metric,
                "n/a" if r.na else f"{r.service:,.1f}",
                "" if r.driver is None else f"{r.driver:,.1f}",
                r.unit,
                "" if r.ratio is None else f"{r.ratio:.2f}",
                r.target,
                r.met,
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append(
            "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        )
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(out)
    print(text, flush=True)
    return text


@dataclass
class ServiceProcess:
    url: str
    proc: subprocess.Popen[bytes]

    def rss_mb(self) -> float:
        """Resident memory of the service process now, from /proc (Linux)."""
        return self._status_mb("VmRSS")

    def peak_rss_mb(self) -> float:
        """The most resident memory the service process has had."""
        return self._status_mb("VmHWM")

    def cpu_seconds(self) -> float:
        """User + system CPU time the service process has used, from /proc (Linux)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _status_mb(self, key: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
        return float("nan")


# How long both sides of a bench wait for a busy server. A heartbeat unanswered within
# the connect timeout interrupts the operations in flight, and secantusd-py answers none
# while it runs one long aggregation or sorts a whole collection for a cursor: the
# service's default 5 s (MONGODB_TIMEOUT_MS) would turn such a bench into 503s.
BUSY_SERVER_MS = 120_000


@dataclass
class BenchEnv:
    mongodb_url: str
    quick: bool = False  # smaller sizes, for a smoke run
    extra: dict[str, Any] = field(default_factory=dict)

    def db_name(self, label: str) -> str:
        return f"bench_{label}_{uuid.uuid4().hex[:8]}"

    def client(self, **kwargs: Any) -> AsyncMongoClient[dict[str, Any]]:
        return AsyncMongoClient(self.mongodb_url, tz_aware=True, **kwargs)

    @contextlib.asynccontextmanager
    async def service(self, db_name: str, **env: str) -> AsyncIterator[ServiceProcess]:
        """The service as its own process (so load never shares its event loop)."""
        port = free_port()
        proc_env = {
            **os.environ,
            "MONGODB_URL": self.mongodb_url,
            "MONGODB_DB": db_name,
            "LOG_LEVEL": "WARNING",
            "AUTH": "disabled",  # benches that measure authentication turn it on
            **env,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=proc_env,
            cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await _wait_http(f"{url}/readyz", proc)
            yield ServiceProcess(url, proc)
        finally:
            if proc.poll() is not None:  # a crash, or a signal from outside the bench
                print(f"the service exited early with code {proc.returncode}", file=sys.stderr)
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            async with self.client() as c:
                await c.drop_database(db_name)


class Exhausted(Exception):
    """Raised by a load operation that has no work left (e.g. no PENDING job to move)."""


@dataclass
class LoadResult:
    """What a closed loop did: operations completed, wall time, each one's latency."""

    ops: int
    seconds: float
    latencies: list[float]
    cpu_ms: float = float("nan")  # CPU per operation of the side measured, when recorded

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile_ms(self, p: float) -> float:
        """The p-th percentile latency in ms (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return ordered[rank] * 1000


async def closed_loop(
    clients: int,
    op: Callable[[int], Awaitable[object]],
    *,
    seconds: float | None = None,
    total: int | None = None,
) -> LoadResult:
    """`clients` workers each run `op(worker)` back to back until the time or count is up.

    A closed loop: a worker sends its next request only when the previous one answered,
    so `clients` is the concurrency the server sees. An `op` raising Exhausted stops its
    worker; any other exception ends the whole run (a failed request is a bench bug).
    """
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else float("inf")
    left = [total if total is not None else -1]

    async def worker(n: int) -> None:
        while time.perf_counter() < deadline and left[0] != 0:
            left[0] -= 1
            t = time.perf_counter()
            try:
                await op(n)
            except Exhausted:
                return
            latencies.append(time.perf_counter() - t)

    async with asyncio.TaskGroup() as group:
        for n in range(clients):
            group.create_task(worker(n))
    return LoadResult(len(latencies), time.perf_counter() - start, latencies)


async def alternate(
    rounds: int, *sides: Callable[[], Awaitable[LoadResult]]
) -> list[list[LoadResult]]:
    """Run every side `rounds` times, rotating which goes first each round (so neither
    side always meets the database warm or cold)."""
    results: list[list[LoadResult]] = [[] for _ in sides]
    for n in range(rounds):
        for k in range(len(sides)):
            i = (k + n) % len(sides)
            results[i].append(await sides[i]())
    return results


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


async def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the service exited at start")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError("the service did not become ready")


@contextlib.contextmanager
def database() -> Iterator[str]:
    """MONGODB_URL if set, else a fresh secantusd-py on disk (as in production)."""
    if url := os.environ.get("MONGODB_URL"):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="bench-db-") as tmp, secantusd_process(tmp) as url:
        yield url
