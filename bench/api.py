"""The HTTP API against the raw driver doing the same work, side by side in one run.

The service runs as its own process (env.service); the load comes from this process
(aiohttp client sessions), and the driver side runs here too, on its own collection with
the same indexes as `models.Job`, in the same database. Phases alternate service and
driver in short rounds so a busy neighbour on a shared machine hurts both alike.
"""

from __future__ import annotations

import collections
import functools
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
from multidict import MultiDict
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from service.database import Doc, next_ids
from service.models import Job
from service.pagination import JOB_FILTERS, JOB_SORTS, ListQuery, encode_cursor, parse_list_query

from .common import (
    BenchEnv,
    Exhausted,
    LoadResult,
    Row,
    ServiceProcess,
    alternate,
    closed_loop,
    median,
)

BENCH = "api"
CURSOR_SECRET = "bench-cursor-secret"  # given to the service, so deep cursors can be made here
JSON_HEADERS = {"Content-Type": "application/json"}
PATCH_HEADERS = {"Content-Type": "application/merge-patch+json"}
PAGE = 50
# secantusd-py scanning 200,000 jobs for one page takes ~12 s and can stall its heartbeat
# replies past the service's default 5 s; PyMongo then cancels every operation in flight
# (a 503). The bench gives the service the driver's own defaults instead: 30 s to find a
# server, no limit on a reply (README: caveats).
SERVICE_TIMEOUTS = {"MONGODB_TIMEOUT_MS": "30000", "MONGODB_OPERATION_TIMEOUT_MS": "0"}
MEMORY_TARGET_REQUESTS = 100_000  # the memory target holds after this many requests


@dataclass
class Sizes:
    post_clients: tuple[int, ...] = (1, 8, 64)
    seconds: float = 5.0  # per side, per round, per measured point
    rounds: int = 3  # service/driver alternations; the median round is reported
    get_requests: int = 1000  # sequential GETs per side per round
    patch_clients: int = 8
    patch_sizes: tuple[int, ...] = (1_000, 30_000, 100_000)  # jobs in each collection
    list_depth: int = 200_000  # at most; each filter's deep page is its last full page
    list_total: int = 100_000  # jobs in the collection the pages are read from
    list_reps: int = 5
    memory_requests: int = MEMORY_TARGET_REQUESTS  # requests served before reading resident memory

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            seconds=2.0,
            rounds=3,
            get_requests=300,
            list_reps=1,
            memory_requests=0,
        )


def log(msg: str) -> None:
    print(f"   api: {msg}", file=sys.stderr, flush=True)


class Bench:
    """Shared state of one run: the service, its database, the driver's collection."""

    def __init__(self, svc: ServiceProcess, db: AsyncDatabase[Doc], sizes: Sizes) -> None:
        self.svc, self.db, self.sizes = svc, db, sizes
        self.driver_jobs: AsyncCollection[Doc] = db["driver_jobs"]
        self.requests = 0  # served by the service in this run, for the memory figure
        self.service_ids: list[int] = []
        self.driver_ids: list[int] = []
        self.deployment_id = 0
        self.body: dict[str, Any] = {
            "user_id": "bench",
            "job_name": "bell-pair",
            "parameters": "--shots 1000",
            "data": {"shots": 1000, "qubits": [0, 1], "tags": {"team": "bench"}},
        }

    def session(self, clients: int) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=clients, force_close=False)
        return aiohttp.ClientSession(self.svc.url, connector=connector)

    async def setup(self) -> None:
        await self.driver_jobs.create_indexes(Job.Settings.indexes)
        await self.db.counters.update_one(
            {"_id": "driver_jobs"}, {"$setOnInsert": {"seq": 0}}, upsert=True
        )
        async with self.session(1) as http:
            body = orjson.dumps({"user_id": "bench", "deployment_name": "bench"})
            async with http.post("/deployments", data=body, headers=JSON_HEADERS) as resp:
                assert resp.status == 201, await resp.text()
                self.deployment_id = (await resp.json())["deployment_id"]
        self.body["deployment_id"] = self.deployment_id
        self.requests += 1

    # --- POST /jobs ---------------------------------------------------------------------

    async def post_service(self, clients: int, seconds: float) -> LoadResult:
        body = orjson.dumps(self.body)
        async with self.session(clients) as http:

            async def op(_: int) -> None:
                async with http.post("/jobs", data=body, headers=JSON_HEADERS) as resp:
                    await resp.read()
                    if resp.status != 201:
                        raise RuntimeError(f"POST /jobs: {resp.status} {await resp.text()}")
                    self.service_ids.append(int(resp.headers["Location"].rsplit("/", 1)[1]))

            result = await self.on_service(closed_loop(clients, op, seconds=seconds))
        self.requests += result.ops
        return result

    async def post_driver(self, clients: int, seconds: float) -> LoadResult:
        """The same work without the service: take an id with `$inc`, insert the record."""
        counters = self.db.counters

        async def op(_: int) -> None:
            counter = await counters.find_one_and_update(
                {"_id": "driver_jobs"}, {"$inc": {"seq": 1}}, return_document=ReturnDocument.AFTER
            )
            assert counter is not None
            started = now()
            await self.driver_jobs.insert_one(
                {
                    "_id": counter["seq"],
                    **self.body,
                    "started_at": started,
                    "finished_at": None,
                    "task_status": "PENDING",
                    "results": [],
                    "history": [{"task_status": "PENDING", "at": started}],
                    "revision": 1,
                }
            )
            self.driver_ids.append(counter["seq"])

        return await on_driver(closed_loop(clients, op, seconds=seconds))

    async def post(self) -> list[Row]:
        rows = []
        for clients in self.sizes.post_clients:
            svc, drv = await alternate(
                self.sizes.rounds,
                functools.partial(self.post_service, clients, self.sizes.seconds),
                functools.partial(self.post_driver, clients, self.sizes.seconds),
            )
            s, d = median([r.rate for r in svc]), median([r.rate for r in drv])
            log(f"POST /jobs x{clients}: service {s:.0f} req/s, driver {d:.0f} ops/s")
            rows.append(
                Row(
                    BENCH,
                    f"POST /jobs, {clients} client{'s' * (clients > 1)}",
                    s,
                    d,
                    "req/s",
                    ">= 1.00" if clients > 1 else "",
                )
            )
            if clients == max(self.sizes.post_clients):
                rows.append(cpu_row(f"POST /jobs, {clients} clients", svc, drv))
        return rows

    # --- GET /jobs/{id} -----------------------------------------------------------------

    async def get_service(self, ids: list[int]) -> LoadResult:
        todo = iter(ids)
        async with self.session(1) as http:

            async def op(_: int) -> None:
                async with http.get(f"/jobs/{next(todo)}") as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"GET /jobs/id: {resp.status}")

            result = await self.on_service(closed_loop(1, op, total=len(ids)))
        self.requests += result.ops
        return result

    async def get_driver(self, ids: list[int]) -> LoadResult:
        todo = iter(ids)

        async def op(_: int) -> None:
            if await self.driver_jobs.find_one({"_id": next(todo)}) is None:
                raise RuntimeError("driver find_one: no such job")

        return await on_driver(closed_loop(1, op, total=len(ids)))

    async def get(self) -> list[Row]:
        rng = random.Random(8)
        n = self.sizes.get_requests
        svc, drv = await alternate(
            self.sizes.rounds,
            lambda: self.get_service(rng.choices(self.service_ids, k=n)),
            lambda: self.get_driver(rng.choices(self.driver_ids, k=n)),
        )
        rows = []
        for p in (50, 99):
            s = median([r.percentile_ms(p) for r in svc])
            d = median([r.percentile_ms(p) for r in drv])
            log(f"GET /jobs/id p{p}: service {s:.2f} ms, driver {d:.2f} ms")
            target = "<= 2.0" if p == 50 else ""
            rows.append(Row(BENCH, f"GET /jobs/{{id}} p{p}, 1 client", s, d, "ms", target, False))
        rows.append(cpu_row("GET /jobs/{id}, 1 client", svc, drv))
        return rows

    # --- PATCH /jobs/{id} ---------------------------------------------------------------

    async def patch_service(self, work: collections.deque[tuple[int, str]]) -> LoadResult:
        clients = self.sizes.patch_clients
        bodies = {s: orjson.dumps({"task_status": s}) for s in ("RUNNING", "FINISHED")}
        async with self.session(clients) as http:

            async def op(_: int) -> None:
                job_id, status = take(work)
                target = "RUNNING" if status == "PENDING" else "FINISHED"
                url = f"/jobs/{job_id}"
                async with http.patch(url, data=bodies[target], headers=PATCH_HEADERS) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"PATCH /jobs/id: {resp.status} {await resp.text()}")
                if target == "RUNNING":
                    work.append((job_id, target))

            result = await self.on_service(closed_loop(clients, op, seconds=self.sizes.seconds))
        self.requests += result.ops
        return result

    async def patch_driver(self, work: collections.deque[tuple[int, str]]) -> LoadResult:
        """The shape the service sends, done directly: read the job by `_id`, then one
        `update_one` conditioned on the revision read (equality filters only: an index
        lookup on MongoDB and on secantusd-py alike)."""

        async def op(_: int) -> None:
            job_id, status = take(work)
            target = "RUNNING" if status == "PENDING" else "FINISHED"
            stored = await self.driver_jobs.find_one({"_id": job_id})
            if stored is None or stored["task_status"] != status:
                raise RuntimeError(f"driver update: job {job_id} was not {status}")
            at = now()
            fields: dict[str, Any] = {"task_status": target}
            if target == "FINISHED":
                fields["finished_at"] = at
            flt = {"_id": job_id, "revision": stored["revision"]}
            update = {
                "$set": fields,
                "$push": {"history": {"task_status": target, "at": at}},
                "$inc": {"revision": 1},
            }
            if (await self.driver_jobs.update_one(flt, update)).matched_count != 1:
                raise RuntimeError(f"driver update: job {job_id} changed meanwhile")
            if target == "RUNNING":
                work.append((job_id, target))

        return await on_driver(
            closed_loop(self.sizes.patch_clients, op, seconds=self.sizes.seconds)
        )

    async def equal_sizes(self, at_least: int = 0) -> int:
        """Top `jobs` and `driver_jobs` up to the larger one's size (and `at_least`) with
        PENDING jobs (insert_many, ids from their own counter), and return that size.

        The POST phase leaves the faster side with more documents: unequal collections
        would compare unequal work.
        """
        sides = (("jobs", self.service_ids), ("driver_jobs", self.driver_ids))
        sizes = {name: await self.db[name].count_documents({}) for name, _ in sides}
        size = max(at_least, *sizes.values())
        for name, ids in sides:
            if missing := size - sizes[name]:
                first = await next_ids(self.db, name, missing)
                await self.insert_jobs(name, range(first, first + missing), lambda _: now())
                ids.extend(range(first, first + missing))
        return size

    async def patch(self) -> list[Row]:
        """PATCH at each of `patch_sizes` jobs per collection, the pending jobs newest first
        (both sides alike), so that a later size does not reuse the earlier jobs."""
        rows = []
        for wanted in self.sizes.patch_sizes:
            log(f"PATCH: topping both collections up to {wanted:,} jobs")
            size = await self.equal_sizes(wanted)
            svc_work = collections.deque((i, "PENDING") for i in reversed(self.service_ids))
            drv_work = collections.deque((i, "PENDING") for i in reversed(self.driver_ids))
            svc, drv = await alternate(
                self.sizes.rounds,
                functools.partial(self.patch_service, svc_work),
                functools.partial(self.patch_driver, drv_work),
            )
            # What was moved is no longer PENDING: later sizes take fresh jobs.
            self.service_ids = [i for i, st in svc_work if st == "PENDING"][::-1]
            self.driver_ids = [i for i, st in drv_work if st == "PENDING"][::-1]
            s, d = (median([r.rate for r in side]) for side in (svc, drv))
            c = self.sizes.patch_clients
            log(f"PATCH x{c} on {size:,} jobs: service {s:.0f}/s, driver read+update_one {d:.0f}/s")
            metric = f"PATCH /jobs/{{id}} task_status, {c} clients, {size:,} jobs"
            target = ">= 0.50" if wanted == max(self.sizes.patch_sizes) else ""
            rows += [
                Row(BENCH, f"{metric} vs read + update_one", s, d, "changes/s", target),
                cpu_row(metric, svc, drv),
            ]
        first, last = rows[0].service, rows[-2].service
        rows.append(
            Row(
                BENCH,
                "PATCH rate at the largest size / at the smallest",
                last / first,
                None,
                "x",
                ">= 0.7",
            )
        )
        return rows

    # --- listing --------------------------------------------------------------------------

    async def generate(self, count: int) -> None:
        """`count` more jobs, written directly with insert_many (ids from the same counter)."""
        first = await next_ids(self.db, "jobs", count)
        base = datetime(2026, 1, 1, tzinfo=UTC)
        await self.insert_jobs(
            "jobs", range(first, first + count), lambda i: base + timedelta(seconds=i)
        )

    async def insert_jobs(
        self, collection: str, ids: range, started: Callable[[int], datetime]
    ) -> None:
        """PENDING jobs in the storage shape, like those POST /jobs makes, in batches."""
        batch = 5000
        for start in range(ids.start, ids.stop, batch):
            docs = []
            for job_id in range(start, min(start + batch, ids.stop)):
                at = started(job_id)
                docs.append(
                    {
                        "_id": job_id,
                        **self.body,
                        "user_id": f"user{job_id % 100}",
                        "started_at": at,
                        "finished_at": None,
                        "task_status": "PENDING",
                        "results": [],
                        "history": [{"task_status": "PENDING", "at": at}],
                        "revision": 1,
                    }
                )
            await self.db[collection].insert_many(docs, ordered=False)

    async def listing(self) -> list[Row]:
        """First and deep page of each filter and sort, on `list_total` jobs (topped up)."""
        existing = await self.db.jobs.count_documents({})
        if (missing := self.sizes.list_total - existing) > 0:
            log(f"listing: inserting {missing:,} jobs (the collection has {existing:,})")
            await self.generate(missing)
        filters: list[dict[str, str]] = [
            {},
            {"user_id": "user7"},  # 1% of the generated jobs
            {"task_status": "PENDING"},
            {"deployment_id": str(self.deployment_id)},
        ]
        rows = []
        for flt in filters:
            for sort in ("id", "started_at"):
                rows += await self.list_pages(flt, sort)
        return rows

    async def list_pages(self, flt: dict[str, str], sort: str) -> list[Row]:
        key = CURSOR_SECRET.encode()
        params = MultiDict({**flt, "limit": str(PAGE), "sort": sort})
        first = parse_list_query(params, JOB_FILTERS, JOB_SORTS, key)
        # The deep page: the last full page of the matches (at most list_depth deep). The
        # record just before it, found once, and a cursor pointing past it.
        matches = await self.db.jobs.count_documents(first.filter)
        depth = min(self.sizes.list_depth, matches - PAGE - 1)
        found = (
            await self.db.jobs.find(first.filter)
            .sort(first.reads()[0][1])
            .skip(depth - 1)
            .limit(1)
            .to_list(None)
        )
        cursor = encode_cursor(first, found[0], key)
        deep_params = MultiDict({**params, "cursor": cursor})
        deep = parse_list_query(deep_params, JOB_FILTERS, JOB_SORTS, key)

        async with self.session(1) as http:

            async def page(query: MultiDict[str]) -> float:
                result = await closed_loop(1, lambda _: self.list_once(http, query), total=1)
                self.requests += 1
                return result.latencies[0] * 1000

            async def driver(query: ListQuery) -> float:
                result = await closed_loop(1, lambda _: read_page(self.db.jobs, query), total=1)
                return result.latencies[0] * 1000

            times: dict[str, list[float]] = collections.defaultdict(list)
            for _ in range(self.sizes.list_reps):
                times["svc first"].append(await page(params))
                times["drv first"].append(await driver(first))
                times["svc deep"].append(await page(deep_params))
                times["drv deep"].append(await driver(deep))
        t = {k: median(v) for k, v in times.items()}
        examined = {
            name: await docs_examined(self.db.jobs, q)
            for name, q in (("first", first), ("deep", deep))
        }
        # Both pages reading the whole collection (secantusd-py's planner): their ratio
        # says nothing about keyset pagination, so it is n/a rather than "met".
        total = matches
        scans_all = min(examined.values()) >= total
        log(
            f"GET /jobs?{flt} sort={sort}: first {t['svc first']:.1f} ms, "
            f"deep {t['svc deep']:.1f} ms; "
            f"docs examined {examined['first']} / {examined['deep']} of {total}"
            + (" (both pages scan everything: deep/first n/a)" if scans_all else "")
        )
        label = "GET /jobs?" + "&".join(f"{k}={v}" for k, v in {**flt, "sort": sort}.items())
        deep_label = f"{label} {depth:,} deep of {matches:,}"
        return [
            Row(BENCH, f"{label} first page", t["svc first"], t["drv first"], "ms", "", False),
            Row(BENCH, deep_label, t["svc deep"], t["drv deep"], "ms", "", False),
            Row(
                BENCH,
                f"{label} deep/first time",
                t["svc deep"] / t["svc first"],
                None,
                "x",
                "<= 1.5",
                False,
                na=scans_all,
            ),
            Row(BENCH, f"{label} first page docs examined", examined["first"], None, "docs"),
            Row(BENCH, f"{label} deep page docs examined", examined["deep"], None, "docs"),
            Row(
                BENCH,
                f"{label} deep/first docs examined",
                examined["deep"] / max(examined["first"], 1),
                None,
                "x",
                "<= 1.5",
                False,
                na=scans_all,
            ),
        ]

    async def list_once(self, http: aiohttp.ClientSession, query: MultiDict[str]) -> None:
        async with http.get("/jobs", params=query) as resp:
            body = await resp.read()
            if resp.status != 200 or len(orjson.loads(body)["items"]) != PAGE:
                raise RuntimeError(f"GET /jobs: {resp.status} {body[:200]!r}")

    # --- memory ---------------------------------------------------------------------------

    async def memory(self, start_mb: float) -> list[Row]:
        """Serve the rest of `memory_requests` (reads and creates), then read the RSS."""
        missing = self.sizes.memory_requests - self.requests
        if missing > 0:
            log(f"memory: {missing:,} more requests to reach {self.sizes.memory_requests:,}")
            rng = random.Random(9)
            ids = self.service_ids
            body = orjson.dumps(self.body)
            async with self.session(64) as http:

                async def op(_: int) -> None:
                    if rng.random() < 0.2:
                        async with http.post("/jobs", data=body, headers=JSON_HEADERS) as resp:
                            await resp.read()
                            ok = resp.status == 201
                    else:
                        async with http.get(f"/jobs/{rng.choice(ids)}") as resp:
                            await resp.read()
                            ok = resp.status == 200
                    if not ok:
                        raise RuntimeError(f"memory load: {resp.status}")

                result = await closed_loop(64, op, total=missing)
            self.requests += result.ops
        rss, peak = self.svc.rss_mb(), self.svc.peak_rss_mb()
        log(f"memory after {self.requests:,} requests: {rss:.0f} MB (peak {peak:.0f} MB)")
        return [
            Row(BENCH, "service resident memory at start", start_mb, None, "MB"),
            Row(
                BENCH,
                f"service resident memory after {self.requests:,} requests",
                rss,
                None,
                "MB",
                "< 150" if self.requests >= MEMORY_TARGET_REQUESTS else "",
                False,
            ),
            Row(BENCH, "service peak resident memory", peak, None, "MB"),
        ]

    # --- helpers --------------------------------------------------------------------------

    async def on_service(self, run: Awaitable[LoadResult]) -> LoadResult:
        """Record the service process's CPU time per request while `run` runs."""
        before = self.svc.cpu_seconds()
        result = await run
        result.cpu_ms = (self.svc.cpu_seconds() - before) * 1000 / max(result.ops, 1)
        return result


def cpu_row(what: str, svc: list[LoadResult], drv: list[LoadResult]) -> Row:
    """CPU per request of the service process against the driver's caller per operation.

    Unlike throughput and latency, CPU time barely moves when neighbours load the machine.
    """
    s, d = median([r.cpu_ms for r in svc]), median([r.cpu_ms for r in drv])
    return Row(BENCH, f"{what}: CPU per request", s, d, "ms CPU", "", False)


async def on_driver(run: Awaitable[LoadResult]) -> LoadResult:
    """Record this process's CPU time per operation (the driver's caller) while `run` runs."""
    before = time.process_time()
    result = await run
    result.cpu_ms = (time.process_time() - before) * 1000 / max(result.ops, 1)
    return result


async def read_page(collection: AsyncCollection[Doc], query: ListQuery) -> list[Doc]:
    """The reads of store.fetch_page, through the driver alone."""
    docs: list[Doc] = []
    for flt, order in query.reads():
        if (wanted := query.limit + 1 - len(docs)) > 0:
            docs += await collection.find(flt).sort(order).limit(wanted).to_list(None)
    return docs


async def docs_examined(collection: AsyncCollection[Doc], query: ListQuery) -> int:
    """What the database reads for the service's page query: the figure MongoDB scales by."""
    examined = 0
    for flt, order in query.reads():
        plan = await collection.find(flt).sort(order).limit(query.limit + 1).explain()
        examined += int(plan["executionStats"]["totalDocsExamined"])
    return examined


def take(work: collections.deque[tuple[int, str]]) -> tuple[int, str]:
    if not work:
        raise Exhausted
    return work.popleft()


def now() -> datetime:
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


async def run(env: BenchEnv) -> list[Row]:
    sizes = Sizes.quick() if env.quick else Sizes()
    db_name = env.db_name(BENCH)
    async with (
        env.service(db_name, CURSOR_SECRET=CURSOR_SECRET, **SERVICE_TIMEOUTS) as svc,
        env.client() as mongo,
    ):
        start_mb = svc.rss_mb()
        bench = Bench(svc, mongo[db_name], sizes)
        await bench.setup()
        rows = await bench.patch()  # first: its smallest size needs a small collection
        rows += await bench.post()
        rows += await bench.get()
        rows += await bench.listing()
        rows += await bench.memory(start_mb)
    return rows
