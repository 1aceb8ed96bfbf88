"""Executors: claims, the wait for a job, and the lease sweep, against the raw driver.

- **claims/s at 1 and 16 executors**: `POST /jobs/claim` (no wait) in a closed loop until
  K PENDING jobs are claimed, vs the driver doing what `claims.claim_job` does on its own
  collection of the same size with the same indexes: `find` the oldest due PENDING
  candidates (same filter, sort and limit, CANDIDATES), then `update_one({_id,
  revision})` with the same operators (`$set` task_status, status_reason and lease,
  `$push` the history entry, `$inc` revision) on the first, then on the others in random
  order, reading again when all were taken. K fresh jobs are inserted on each side
  before each round, so both sides always claim from collections of the same size.
- **creation to a waiting claim's answer** (p50, p99): a claim waits (`wait_s`) with
  no job due; `POST /jobs` creates one; the time from sending the create to the claim's
  answer. Driver side: the same work done back to back without waiting, the `$inc` +
  `insert_one` of a create and then the claim's `find` + `update_one`: the floor. A
  second, service-only row inserts the job with the driver instead (as another service
  instance would): no local wakeup reaches the waiting claim; the instance's change
  stream does (service/changes.py), else the next poll would (wakeups.POLL_S).
- **sweep at M jobs** (100,000; 10,000 with --quick): one `claims.sweep` pass, called in
  this process on a database no service watches, with N leases expired (N = SWEEP_BATCH,
  1,000; 100 with --quick) and with none; mostly ended jobs, 1% RUNNING with live
  leases. Driver side, on a copy of the same jobs: the two index queries (full
  documents) and one conditional `update_one({_id, revision})` per expired job. The
  sweep reads each job again before its update (`store.update_record`), so it makes
  1 + 2N round trips to the driver's 1 + N.

Each round runs the service and the driver alternately, the side going first alternating;
rows are medians of the rounds (3; 1 with --quick); a sweep with none expired is the
median of 5 passes in each round.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from service.claims import CANDIDATES, MAX_ROUNDS, SWEEP_BATCH, sweep
from service.database import Doc, next_ids
from service.models import Job, job_document
from service.settings import Settings
from service.wakeups import POLL_S

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

BENCH = "claims"
JSON_HEADERS = {"Content-Type": "application/json"}
LEASE_S = 3600  # no lease runs out during the bench: the service's own sweeper stays idle
DUE = {"task_status": "PENDING"}
ORDER = [("started_at", 1), ("_id", 1)]


@dataclass
class Sizes:
    executors: tuple[int, ...] = (1, 16)
    claims: int = 1000  # jobs claimed per side, per round, per executor count
    waits: int = 100  # waiting claims answered per side, per round
    polls: int = 30  # waiting claims answered by their poll (a job the driver inserted)
    sweep_jobs: int = 100_000
    expired: int = SWEEP_BATCH
    rounds: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(claims=200, waits=30, polls=10, sweep_jobs=10_000, expired=100, rounds=1)


def log(msg: str) -> None:
    print(f"   claims: {msg}", file=sys.stderr, flush=True)


def now() -> datetime:
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def pending_jobs(first: int, count: int, deployment_id: int) -> list[Doc]:
    """`count` due PENDING jobs as stored, oldest first, ids from `first`."""
    base = now() - timedelta(seconds=count)
    template = job_document(_id=0, user_id="bench", deployment_id=deployment_id, started_at=base)
    docs = []
    for n in range(count):
        at = base + timedelta(milliseconds=n)
        docs.append(
            {**template, "_id": first + n, "started_at": at}
            | {"history": [{"task_status": "PENDING", "at": at}]}
        )
    return docs


async def driver_claim(jobs: AsyncCollection[Doc], executor: str) -> Doc | None:
    """claims.claim_job through the driver alone: the same reads, the same update."""
    for _ in range(MAX_ROUNDS):
        at = now()
        due = {**DUE, "started_at": {"$lte": at}}
        candidates = await jobs.find(due).sort(ORDER).limit(CANDIDATES).to_list(None)
        if not candidates:
            return None
        rest = candidates[1:]
        random.shuffle(rest)
        for stored in [candidates[0], *rest]:
            update = {
                "$inc": {"revision": 1},
                "$set": {
                    "task_status": "RUNNING",
                    "status_reason": None,
                    "lease": {"executor": executor, "expires_at": at + timedelta(seconds=LEASE_S)},
                },
                "$push": {"history": {"task_status": "RUNNING", "at": at, "executor": executor}},
            }
            flt = {"_id": stored["_id"], "revision": stored["revision"]}
            if (await jobs.update_one(flt, update)).matched_count:
                return stored
    raise RuntimeError("driver claim: every candidate taken, time and again")


class Bench:
    def __init__(self, svc: ServiceProcess, db: AsyncDatabase[Doc], sizes: Sizes) -> None:
        self.svc, self.db, self.sizes = svc, db, sizes
        self.driver_jobs: AsyncCollection[Doc] = db["driver_jobs"]
        self.deployment_id = 0

    def session(self, clients: int) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(self.svc.url, connector=aiohttp.TCPConnector(limit=clients))

    async def setup(self) -> None:
        await self.driver_jobs.create_indexes(Job.Settings.indexes)
        await self.db.counters.update_one(
            {"_id": "driver_jobs"}, {"$setOnInsert": {"seq": 0}}, upsert=True
        )
        async with (
            self.session(1) as http,
            http.post("/deployments", json={"user_id": "bench"}) as resp,
        ):
            assert resp.status == 201, await resp.text()
            self.deployment_id = (await resp.json())["deployment_id"]

    async def add_pending(self, collection: str, count: int) -> None:
        first = await next_ids(self.db, collection, count)
        for start in range(0, count, 5000):
            batch = pending_jobs(first + start, min(5000, count - start), self.deployment_id)
            await self.db[collection].insert_many(batch, ordered=False)

    # --- claims per second ----------------------------------------------------------------

    async def claims_service(self, executors: int) -> LoadResult:
        await self.add_pending("jobs", self.sizes.claims)
        bodies = [
            orjson.dumps({"executor": f"ex-{n}", "lease_s": LEASE_S}) for n in range(executors)
        ]
        async with self.session(executors) as http:

            async def op(n: int) -> None:
                async with http.post("/jobs/claim", data=bodies[n], headers=JSON_HEADERS) as resp:
                    body = await resp.read()
                    if resp.status == 204:
                        raise Exhausted
                    if resp.status != 200:
                        raise RuntimeError(f"claim: {resp.status} {body[:200]!r}")

            before = self.svc.cpu_seconds()
            result = await closed_loop(executors, op, total=self.sizes.claims)
            result.cpu_ms = (self.svc.cpu_seconds() - before) * 1000 / max(result.ops, 1)
        return self.checked("service", result)

    async def claims_driver(self, executors: int) -> LoadResult:
        await self.add_pending("driver_jobs", self.sizes.claims)

        async def op(n: int) -> None:
            if await driver_claim(self.driver_jobs, f"ex-{n}") is None:
                raise Exhausted

        before = time.process_time()
        result = await closed_loop(executors, op, total=self.sizes.claims)
        result.cpu_ms = (time.process_time() - before) * 1000 / max(result.ops, 1)
        return self.checked("driver", result)

    def checked(self, side: str, result: LoadResult) -> LoadResult:
        if result.ops != self.sizes.claims:  # a claim found nothing while jobs were due
            log(f"{side}: {result.ops} of {self.sizes.claims} claims got a job")
        return result

    async def claims(self) -> list[Row]:
        rows = []
        for executors in self.sizes.executors:
            svc, drv = await alternate(
                self.sizes.rounds,
                functools.partial(self.claims_service, executors),
                functools.partial(self.claims_driver, executors),
            )
            s, d = median([r.rate for r in svc]), median([r.rate for r in drv])
            size = await self.db.jobs.count_documents({})
            log(
                f"{executors} executors: service {s:.0f} claims/s, driver {d:.0f}/s ({size:,} jobs)"
            )
            plural = "s" * (executors > 1)
            metric = f"claims, {executors} executor{plural}, {self.sizes.claims:,} a round"
            rows.append(Row(BENCH, metric, s, d, "claims/s"))
            if executors == max(self.sizes.executors):
                cpu_s, cpu_d = median([r.cpu_ms for r in svc]), median([r.cpu_ms for r in drv])
                metric = f"claims, {executors} executors: CPU per claim"
                rows.append(Row(BENCH, metric, cpu_s, cpu_d, "ms CPU", "", False))
        return rows

    # --- creation to a waiting claim's answer ---------------------------------------------

    async def drain(self, collection: str) -> None:
        """Claim what is left PENDING (none, unless a claim above came back empty)."""
        while await driver_claim(self.db[collection], "drain") is not None:
            pass

    async def insert_one(self, collection: str) -> int:
        """A create through the driver: `$inc` the counter, `insert_one` the job."""
        counter = await self.db.counters.find_one_and_update(
            {"_id": collection}, {"$inc": {"seq": 1}}, return_document=ReturnDocument.AFTER
        )
        assert counter is not None
        await self.db[collection].insert_one(pending_jobs(counter["seq"], 1, self.deployment_id)[0])
        return int(counter["seq"])

    async def wait_service(self, by_driver: bool) -> LoadResult:
        """A claim waits with no job due; a job is created; the time until the claim's
        answer. `by_driver`: the job is inserted by the driver (as by another instance),
        timed from the end of its insert; else by POST /jobs, timed from its sending."""
        claim = orjson.dumps({"executor": "waiter", "lease_s": LEASE_S, "wait_s": 30})
        create = orjson.dumps({"user_id": "bench", "deployment_id": self.deployment_id})
        latencies, rng = [], random.Random(14)
        async with self.session(2) as http:

            async def waiting() -> tuple[int, float]:
                async with http.post("/jobs/claim", data=claim, headers=JSON_HEADERS) as resp:
                    body = await resp.json()
                    answered = time.perf_counter()
                    assert resp.status == 200, body
                    return int(body["job_id"]), answered

            for _ in range(self.sizes.polls if by_driver else self.sizes.waits):
                claim_task = asyncio.ensure_future(waiting())
                # At the service and waiting; by the driver, at a random point of the poll
                # interval (the claim looks again POLL_S after its last attempt).
                await asyncio.sleep(0.1 + (rng.uniform(0, POLL_S) if by_driver else 0))
                assert not claim_task.done()
                if by_driver:
                    job_id = await self.insert_one("jobs")
                    created = time.perf_counter()
                else:
                    created = time.perf_counter()
                    async with http.post("/jobs", data=create, headers=JSON_HEADERS) as resp:
                        assert resp.status == 201, await resp.text()
                        job_id = (await resp.json())["job_id"]
                claimed, answered = await asyncio.wait_for(claim_task, 60)
                assert claimed == job_id, (claimed, job_id)
                latencies.append(answered - created)
        return LoadResult(len(latencies), sum(latencies), latencies)

    async def wait_driver(self) -> LoadResult:
        """The floor: the create's `$inc` + `insert_one`, then the claim, back to back."""
        latencies = []
        for _ in range(self.sizes.waits):
            created = time.perf_counter()
            job_id = await self.insert_one("driver_jobs")
            claimed = await driver_claim(self.driver_jobs, "waiter")
            assert claimed is not None and claimed["_id"] == job_id
            latencies.append(time.perf_counter() - created)
        return LoadResult(len(latencies), sum(latencies), latencies)

    async def waits(self) -> list[Row]:
        await self.drain("jobs")
        await self.drain("driver_jobs")
        svc, drv = await alternate(
            self.sizes.rounds, functools.partial(self.wait_service, False), self.wait_driver
        )
        polled = [await self.wait_service(True) for _ in range(self.sizes.rounds)]
        rows = []
        for p in (50, 99):
            s, d = (median([r.percentile_ms(p) for r in side]) for side in (svc, drv))
            o = median([r.percentile_ms(p) for r in polled])
            log(f"creation to claim p{p}: service {s:.1f} ms (driver floor {d:.1f}), other {o:.0f}")
            rows.append(
                Row(BENCH, f"POST /jobs to a waiting claim's answer p{p}", s, d, "ms", "", False)
            )
            metric = f"job of another instance to a waiting claim's answer p{p}"
            rows.append(Row(BENCH, metric, o, None, "ms", "", False))
        return rows


# --- the sweep ----------------------------------------------------------------------------


def sweep_jobs(count: int, expired_every: int) -> list[Doc]:
    """`count` jobs, mostly ended; every `expired_every`-th (from 1) RUNNING, the one to
    expire; 1% more RUNNING with a live lease."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    template = job_document(_id=0, user_id="bench", deployment_id=1, started_at=base)
    live = {"executor": "alive", "expires_at": now() + timedelta(days=1)}
    docs = []
    for n in range(1, count + 1):
        at = base + timedelta(seconds=n)
        doc = {**template, "_id": n, "user_id": f"user{n % 50}", "started_at": at}
        if n % expired_every == 1 % expired_every or n % 100 == 50:
            doc |= running_fields(at, live)
        else:
            status = "FINISHED" if n % 2 else "ERROR"
            end = at + timedelta(seconds=30)
            doc |= {
                "task_status": status,
                "finished_at": end,
                "revision": 3,
                "history": [
                    {"task_status": "PENDING", "at": at},
                    {"task_status": "RUNNING", "at": at, "executor": "ex"},
                    {"task_status": status, "at": end},
                ],
            }
        docs.append(doc)
    return docs


def running_fields(started: datetime, lease: Doc) -> Doc:
    return {
        "task_status": "RUNNING",
        "lease": lease,
        "finished_at": None,
        "status_reason": None,
        "history": [
            {"task_status": "PENDING", "at": started},
            {"task_status": "RUNNING", "at": started, "executor": lease["executor"]},
        ],
    }


async def driver_sweep(jobs: AsyncCollection[Doc], grace_s: float) -> int:
    """What claims.sweep does, through the driver: the two index queries, then one
    conditional update per job found (without reading each job again)."""
    at = now()
    grace = at - timedelta(seconds=grace_s)
    kinds = [
        ("lease expired", {"task_status": "RUNNING", "lease.expires_at": {"$lte": at}}),
        ("cancelled", {"task_status": "RUNNING", "cancel_requested_at": {"$lte": grace}}),
    ]
    ended = 0
    for reason, flt in kinds:
        for doc in await jobs.find(flt).limit(SWEEP_BATCH).to_list(None):
            end = max(at, doc["lease"]["expires_at"]) if doc.get("lease") else at
            update = {
                "$inc": {"revision": 1},
                "$set": {
                    "task_status": "ERROR",
                    "status_reason": reason,
                    "finished_at": end,
                    "lease": None,
                },
                "$push": {"history": {"task_status": "ERROR", "at": end, "reason": reason}},
            }
            ended += (
                await jobs.update_one({"_id": doc["_id"], "revision": doc["revision"]}, update)
            ).matched_count
    return ended


async def sweep_rows(env: BenchEnv, sizes: Sizes) -> list[Row]:
    """One sweep pass over `sweep_jobs` jobs, with `expired` leases run out and with none."""
    name = env.db_name("claims_sweep")  # no service sweeps this database
    settings = Settings(mongodb_url=env.mongodb_url, mongodb_db=name)
    every = sizes.sweep_jobs // sizes.expired
    chosen = list(range(1, sizes.sweep_jobs + 1, every))[: sizes.expired]
    times: dict[str, list[float]] = {"svc none": [], "drv none": [], "svc some": [], "drv some": []}
    async with env.client() as client:
        db = client[name]
        docs = sweep_jobs(sizes.sweep_jobs, every)
        for collection in ("jobs", "driver_jobs"):
            await db[collection].create_indexes(Job.Settings.indexes)
            for start in range(0, len(docs), 5000):
                await db[collection].insert_many(docs[start : start + 5000], ordered=False)
        log(f"sweep: {sizes.sweep_jobs:,} jobs on each side, {len(chosen):,} to expire")

        async def one(side: str, expired: bool) -> float:
            jobs = db["jobs" if side == "svc" else "driver_jobs"]
            at = now()
            lease = {"executor": "gone", "expires_at": at + timedelta(hours=-1 if expired else 1)}
            reset = running_fields(at - timedelta(hours=2), lease)
            await jobs.update_many(
                {"_id": {"$in": chosen}}, {"$set": reset, "$inc": {"revision": 1}}
            )
            started = time.perf_counter()
            if side == "svc":
                ended = await sweep(db, settings)
            else:
                ended = await driver_sweep(jobs, settings.cancel_grace_s)
            elapsed = (time.perf_counter() - started) * 1000
            assert ended == (len(chosen) if expired else 0), (side, expired, ended)
            return elapsed

        for n in range(sizes.rounds):
            for side in ("svc", "drv") if n % 2 == 0 else ("drv", "svc"):
                times[f"{side} none"].append(median([await one(side, False) for _ in range(5)]))
                times[f"{side} some"].append(await one(side, True))
        await client.drop_database(name)
    t = {key: median(values) for key, values in times.items()}
    log(
        f"sweep: none {t['svc none']:.1f} ms (driver {t['drv none']:.1f}), "
        f"{len(chosen):,} expired {t['svc some']:.0f} ms (driver {t['drv some']:.0f})"
    )
    jobs = f"{sizes.sweep_jobs:,} jobs"
    return [
        Row(
            BENCH, f"sweep, no lease expired, {jobs}", t["svc none"], t["drv none"], "ms", "", False
        ),
        Row(
            BENCH,
            f"sweep, {len(chosen):,} leases expired, {jobs}",
            t["svc some"],
            t["drv some"],
            "ms",
            "",
            False,
        ),
    ]


async def run(env: BenchEnv) -> list[Row]:
    sizes = Sizes.quick() if env.quick else Sizes()
    db_name = env.db_name(BENCH)
    async with env.service(db_name) as svc, env.client() as mongo:
        bench = Bench(svc, mongo[db_name], sizes)
        await bench.setup()
        rows = await bench.claims()
        rows += await bench.waits()
    rows += await sweep_rows(env, sizes)
    return rows
