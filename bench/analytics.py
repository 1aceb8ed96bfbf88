"""`/stats/jobs?group_by=deployment_id&interval=day` against the same pipeline via the driver.

Generates jobs straight into the service's database (insert_many, storage shape), then
times the endpoint and `job_stats_pipeline(...)` run directly with the driver, alternately.
The service's memory is read after answering on a tenth of the jobs and on all of them:
it must not grow with the number of jobs, since only one row per group reaches Python.

Sizes: 1,000,000 jobs timed 3 times each (20,000 with --quick, 5 times each), the side
going first alternating, the table has the medians; BENCH_ANALYTICS_JOBS and
BENCH_ANALYTICS_REPEATS override.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pymongo
from pymongo.asynchronous.collection import AsyncCollection

from service.settings import Settings
from service.stats import StatsQuery, job_stats_pipeline

from .common import BUSY_SERVER_MS, BenchEnv, Row

ANALYTICS_TIMEOUT_S = Settings.model_fields["mongodb_analytics_timeout_ms"].default / 1000

Doc = dict[str, Any]
BASE = datetime(2026, 1, 1, tzinfo=UTC)
DAYS, DEPLOYMENTS, USERS = 30, 50, 20  # 1,500 groups, whatever the number of jobs
BATCH = 10_000
PARAMS = {"group_by": "deployment_id", "interval": "day"}
QUERY = StatsQuery({}, ("deployment_id",), "day")


def make_jobs(first_id: int, count: int, rnd: random.Random) -> list[Doc]:
    """Jobs in the storage shape, in every lifecycle state, spread over DAYS days."""
    docs = []
    for job_id in range(first_id, first_id + count):
        started = BASE + timedelta(milliseconds=rnd.randrange(DAYS * 86_400_000))
        history = [{"task_status": "PENDING", "at": started}]
        roll = rnd.random()
        if roll > 0.1:
            running = started + timedelta(milliseconds=rnd.randrange(1, 600_000))
            history.append({"task_status": "RUNNING", "at": running})
            if roll > 0.2:
                end = running + timedelta(milliseconds=rnd.randrange(1, 7_200_000))
                history.append({"task_status": "FINISHED" if roll > 0.35 else "ERROR", "at": end})
        status = history[-1]["task_status"]
        docs.append(
            {
                "_id": job_id,
                "job_name": None,
                "user_id": f"user-{job_id % USERS}",
                "deployment_id": 1 + job_id % DEPLOYMENTS,
                "started_at": started,
                "finished_at": history[-1]["at"] if len(history) == 3 else None,
                "parameters": "--shots 1000",
                "data": {"shots": 1000, "backend": "sim"},
                "task_status": status,
                "results": [],
                "history": history,
                "revision": len(history),
            }
        )
    return docs


async def fill(jobs: AsyncCollection[Doc], first_id: int, count: int, rnd: random.Random) -> None:
    """One writer, big batches: SecantusDB collapses concurrent writes to one collection."""
    for start in range(first_id, first_id + count, BATCH):
        size = min(BATCH, first_id + count - start)
        await jobs.insert_many(make_jobs(start, size, rnd), ordered=False)


async def time_service(session: aiohttp.ClientSession, url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with session.get(f"{url}/stats/jobs", params=PARAMS) as resp:
        if resp.status != 200:
            raise RuntimeError(f"/stats/jobs answered {resp.status}: {await resp.text()}")
        body = await resp.json()
    return (time.perf_counter() - t0) * 1000, len(body["groups"])


async def time_driver(jobs: AsyncCollection[Doc]) -> tuple[float, int]:
    t0 = time.perf_counter()
    with pymongo.timeout(ANALYTICS_TIMEOUT_S):  # as the service does (it also sends maxTimeMS)
        rows = await (await jobs.aggregate(job_stats_pipeline(QUERY))).to_list(None)
    return (time.perf_counter() - t0) * 1000, len(rows[0]["groups"])


def log(message: str) -> None:
    print(f"   analytics: {message}", file=sys.stderr, flush=True)


async def run(env: BenchEnv) -> list[Row]:
    total = int(os.environ.get("BENCH_ANALYTICS_JOBS", 20_000 if env.quick else 1_000_000))
    small = total // 10
    repeats = int(os.environ.get("BENCH_ANALYTICS_REPEATS", 5 if total <= 100_000 else 3))
    rnd = random.Random(4)
    db_name = env.db_name("analytics")
    async with (
        env.service(db_name, MONGODB_TIMEOUT_MS=str(BUSY_SERVER_MS)) as service,
        env.client(
            connectTimeoutMS=BUSY_SERVER_MS, serverSelectionTimeoutMS=BUSY_SERVER_MS
        ) as client,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
    ):
        jobs = client[db_name].jobs
        t0 = time.perf_counter()
        await fill(jobs, 1, small, rnd)
        await time_service(session, service.url)  # warm up both paths
        await time_driver(jobs)
        rss_small = service.rss_mb()
        await fill(jobs, small + 1, total - small, rnd)
        log(f"inserted {total:,} jobs in {time.perf_counter() - t0:.0f} s")
        await time_driver(jobs)  # the database's caches hold the jobs for both

        service_ms, driver_ms = [], []
        for n in range(repeats):  # back to back, who goes first alternating
            if n % 2 == 0:
                ms, groups = await time_service(session, service.url)
                d_ms, driver_groups = await time_driver(jobs)
            else:
                d_ms, driver_groups = await time_driver(jobs)
                ms, groups = await time_service(session, service.url)
            service_ms.append(ms)
            driver_ms.append(d_ms)
            assert groups == driver_groups <= DAYS * DEPLOYMENTS, (groups, driver_groups)
        rss_big = service.rss_mb()
        log(f"service {service_ms} ms, driver {driver_ms} ms")

    label = f"{total:,} jobs"
    return [
        Row(
            "analytics",
            f"/stats/jobs by deployment and day, {label} (median of {repeats}, ms)",
            statistics.median(service_ms),
            statistics.median(driver_ms),
            unit="ms",
            target="<= 1.30",
            higher_is_better=False,
        ),
        Row("analytics", f"service RSS after {small:,} jobs", rss_small, unit="MB"),
        Row("analytics", f"service RSS after {label}", rss_big, unit="MB"),
        Row(
            "analytics",
            f"service RSS growth, {small:,} → {label}",
            rss_big - rss_small,
            unit="MB",
            target="< 20",
            higher_is_better=False,
        ),
    ]
