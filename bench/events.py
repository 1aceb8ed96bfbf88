"""Event streams: many SSE clients on one instance while jobs change at a steady rate.

- **PATCH to event latency** (p50, p99): N clients (1,000; 100 with --quick) hold
  `GET /events` open, each receiving every event (the worst case: one admin view of
  everything), while one writer PATCHes jobs at RATE per second, each PATCH carrying a
  sequence number in `data`. A client's latency for an event is the time from sending
  the PATCH to reading that event's `data:` line; p50 and p99 over all clients and
  events. Driver floor: the same PATCH rate as `update_one` with one driver change
  stream (`updateLookup`) on the same database, measured the same way.
- **service RSS** with the streams open, at the end (and its peak, VmHWM).
- **PATCH rate with and without the streams**: PATCH in a closed loop (PATCH_CLIENTS
  clients, SECONDS) with no stream open, then with the N streams open and reading
  (every PATCH is then fanned out to N clients): the ratio with / without.

Rounds alternate which side goes first; rows are medians of the rounds (3; 1 with --quick).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from dataclasses import dataclass

import aiohttp
import orjson
from pymongo.asynchronous.database import AsyncDatabase

from service.database import Doc
from service.http import GONE_CHECK_S

from .common import BenchEnv, LoadResult, Row, ServiceProcess, alternate, closed_loop, median

BENCH = "events"
JOBS = 100
SEQ = re.compile(rb'"seq":(\d+)')
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Sizes:
    clients: int = 1000
    rate: float = 20.0  # PATCHes per second during the latency run
    seconds: float = 20.0
    patch_clients: int = 8
    rounds: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(clients=100, seconds=5.0, rounds=1)


def log(msg: str) -> None:
    print(f"   {msg}", file=sys.stderr, flush=True)


class Streams:
    """N open /events streams; each records (receive time - send time) per event."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.dropped = 0
        self.ready = 0
        self._tasks: list[asyncio.Task[None]] = []
        connector = aiohttp.TCPConnector(limit=0)
        self.http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout())

    async def open(self) -> None:
        gate = asyncio.Semaphore(50)  # connect a few at a time, as real clients would
        self._tasks = [asyncio.create_task(self._client(gate)) for _ in range(self.n)]
        deadline = time.monotonic() + 120
        while self.ready < self.n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.ready} of {self.n} streams opened")
            await asyncio.sleep(0.1)

    async def _client(self, gate: asyncio.Semaphore) -> None:
        async with gate:
            resp = await self.http.get(f"{self.url}/events")
            assert resp.status == 200, await resp.text()
            await resp.content.readline()  # ": connected": from now on nothing is missed
        self.ready += 1
        sent, latencies = self.sent, self.latencies
        try:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    now = time.perf_counter()
                    if (match := SEQ.search(line)) is not None:
                        seq = int(match.group(1))
                        if seq in sent:
                            latencies.append(now - sent[seq])
                elif line.startswith(b"event: dropped"):
                    self.dropped += 1
        finally:
            resp.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task
        await self.http.close()
        # The service frees a stream's place once it sees the client gone (GONE_CHECK_S):
        # the next run's streams should not find them still taken.
        await asyncio.sleep(2 * GONE_CHECK_S)


async def steady_patches(
    http: aiohttp.ClientSession, url: str, sent: dict[int, float], sizes: Sizes, first: int
) -> int:
    """PATCH job (seq % JOBS) + 1 at `sizes.rate` per second for `sizes.seconds`."""
    interval, count = 1 / sizes.rate, int(sizes.rate * sizes.seconds)
    start = time.perf_counter()
    pending = []
    for n in range(count):
        seq = first + n
        await asyncio.sleep(max(0.0, start + n * interval - time.perf_counter()))
        sent[seq] = time.perf_counter()
        body = orjson.dumps({"data": {"seq": seq}})
        pending.append(
            asyncio.create_task(
                http.patch(f"{url}/jobs/{seq % JOBS + 1}", data=body, headers=JSON_HEADERS)
            )
        )
    for resp in await asyncio.gather(*pending):
        assert resp.status == 200, await resp.text()
        resp.close()
    return count


async def driver_latency(db: AsyncDatabase[Doc], sizes: Sizes) -> LoadResult:
    """The floor: update_one at the same rate, one driver change stream reading it."""
    jobs = db.driver_jobs
    sent: dict[int, float] = {}
    latencies: list[float] = []
    count = int(sizes.rate * sizes.seconds)
    async with await jobs.watch(full_document="updateLookup", max_await_time_ms=100) as stream:

        async def read() -> None:
            while len(latencies) < count:
                change = await stream.try_next()
                if change is not None and (doc := change.get("fullDocument")):
                    seq = doc["data"]["seq"]
                    latencies.append(time.perf_counter() - sent[seq])

        reader = asyncio.create_task(read())
        start, interval = time.perf_counter(), 1 / sizes.rate
        for n in range(count):
            await asyncio.sleep(max(0.0, start + n * interval - time.perf_counter()))
            sent[n] = time.perf_counter()
            await jobs.update_one({"_id": n % JOBS + 1}, {"$set": {"data": {"seq": n}}})
        await asyncio.wait_for(reader, 60)
    return LoadResult(len(latencies), sizes.seconds, latencies)


async def run(env: BenchEnv) -> list[Row]:
    sizes = Sizes.quick() if env.quick else Sizes()
    db_name = env.db_name(BENCH)
    env_vars = {"MAX_STREAMS": str(sizes.clients + 100)}
    async with env.service(db_name, **env_vars) as svc, env.client() as mongo:
        db = mongo[db_name]
        return await Bench(svc, db, sizes).rows()


class Bench:
    def __init__(self, svc: ServiceProcess, db: AsyncDatabase[Doc], sizes: Sizes) -> None:
        self.svc, self.db, self.sizes = svc, db, sizes
        self.seq = 0

    async def rows(self) -> list[Row]:
        async with aiohttp.ClientSession() as http:
            self.http = http
            await self.setup()
            latency_svc, latency_drv = await alternate(
                self.sizes.rounds, self.latency_service, lambda: driver_latency(self.db, self.sizes)
            )
            rss, peak = self.svc.rss_mb(), self.svc.peak_rss_mb()
            without, with_streams = await alternate(
                self.sizes.rounds,
                lambda: self.patch_rate(0),
                lambda: self.patch_rate(self.sizes.clients),
            )
        n = self.sizes.clients
        rows = []
        for p in (50, 99):
            s = median([r.percentile_ms(p) for r in latency_svc])
            d = median([r.percentile_ms(p) for r in latency_drv])
            log(f"PATCH to event p{p}: {s:.1f} ms with {n} streams (driver, 1 stream: {d:.1f})")
            target = "< 1000" if p == 99 else ""
            metric = f"PATCH to event at {n} streams, {self.sizes.rate:g}/s p{p}"
            rows.append(Row(BENCH, metric, s, None, "ms", target, False))
            rows.append(
                Row(BENCH, f"driver: update to change event p{p}", d, None, "ms", "", False)
            )
        log(f"service RSS with {n} streams: {rss:.0f} MB (peak {peak:.0f} MB)")
        rows.append(Row(BENCH, f"service RSS with {n} streams", rss, None, "MB", "< 250", False))
        rows.append(Row(BENCH, "service peak RSS", peak, None, "MB", "< 250", False))
        w, o = median([r.rate for r in with_streams]), median([r.rate for r in without])
        log(f"PATCH/s with {n} streams {w:.0f}, without {o:.0f}")
        rows.append(Row(BENCH, f"PATCH/s with {n} streams / without", w, o, "/s"))
        return rows

    async def setup(self) -> None:
        dep = await self.call("POST", "/deployments", {"user_id": "bench"})
        for _ in range(JOBS):
            await self.call(
                "POST", "/jobs", {"user_id": "bench", "deployment_id": dep["deployment_id"]}
            )
        docs = [{"_id": n, "data": {"seq": -1}, "user_id": "bench"} for n in range(1, JOBS + 1)]
        await self.db.driver_jobs.insert_many(docs)

    async def call(self, method: str, path: str, body: Doc) -> Doc:
        async with self.http.request(method, self.svc.url + path, json=body) as resp:
            assert resp.status in (200, 201), await resp.text()
            result: Doc = await resp.json()
            return result

    async def latency_service(self) -> LoadResult:
        streams = Streams(self.svc.url, self.sizes.clients)
        try:
            await streams.open()
            count = await steady_patches(
                self.http, self.svc.url, streams.sent, self.sizes, self.seq
            )
            self.seq += count
            expected = count * self.sizes.clients
            deadline = time.monotonic() + 60
            # The readers only append to a list: polling its length is the cheap way.
            while len(streams.latencies) < expected and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if len(streams.latencies) < expected or streams.dropped:
                log(f"received {len(streams.latencies)} of {expected}, {streams.dropped} dropped")
            return LoadResult(len(streams.latencies), self.sizes.seconds, streams.latencies)
        finally:
            await streams.close()

    async def patch_rate(self, n_streams: int) -> LoadResult:
        streams = Streams(self.svc.url, n_streams)
        try:
            await streams.open()

            async def patch(worker: int) -> None:
                self.seq += 1
                body = orjson.dumps({"data": {"seq": self.seq}})
                url = f"{self.svc.url}/jobs/{self.seq % JOBS + 1}"
                async with self.http.patch(url, data=body, headers=JSON_HEADERS) as resp:
                    assert resp.status == 200, await resp.text()

            return await closed_loop(
                self.sizes.patch_clients, patch, seconds=self.sizes.seconds / 2
            )
        finally:
            await streams.close()
