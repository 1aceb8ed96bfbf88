"""Bulk import and export against the driver, on the same database, in one run.

- import: N jobs streamed (from a file, by a streaming aiohttp upload) through
  `POST /import/jobs`, vs a plain `insert_many` loop (batches of the same size) writing
  the same documents into a collection with the same indexes;
- the service's peak resident memory over its life, read right after the import;
- export: `GET /export/jobs` read to the end, vs a driver cursor dumped to NDJSON (three
  rounds in alternating order, the best of each: exports are cheap to repeat, imports not).

N is 1,000,000 (20,000 with --quick); BENCH_BULK_JOBS=N overrides it. Both sides wait
BUSY_SERVER_MS for heartbeats: secantusd-py sorts the whole collection before an export's
first batch and answers nothing else meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from service.bulk_export import EXPORT_BATCH
from service.bulk_import import BATCH_RECORDS
from service.models import Job
from service.schemas import public_job

from .common import BUSY_SERVER_MS, BenchEnv, Row, ServiceProcess

FULL, QUICK = 1_000_000, 20_000
EXPORT_ROUNDS = 3
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CHUNK = 256 * 1024


def job_doc(n: int) -> dict[str, Any]:
    """A historical job as stored: about 450 bytes of JSON, statuses mixed."""
    started = T0 + timedelta(seconds=n)
    status = ("PENDING", "RUNNING", "FINISHED", "ERROR")[n % 4]
    history = [{"task_status": "PENDING", "at": started}]
    finished = started + timedelta(seconds=30) if status in ("FINISHED", "ERROR") else None
    if status in ("RUNNING", "FINISHED"):
        history.append({"task_status": "RUNNING", "at": started + timedelta(seconds=1)})
    if finished is not None:
        history.append({"task_status": status, "at": finished})
    return {
        "_id": n,
        "job_name": f"job-{n}",
        "user_id": f"user-{n % 50}",
        "deployment_id": 1 + n % 10,
        "started_at": started,
        "finished_at": finished,
        "parameters": "--shots 1000 --optimize 3",
        "data": {"shots": 1000, "seed": n, "backend": "sim", "tags": ["bench", "bulk"]},
        "task_status": status,
        "results": [],
        "history": history,
        "revision": len(history),
    }


def write_ndjson(path: Path, n: int) -> None:
    with path.open("wb") as out:
        for start in range(1, n + 1, 10_000):
            stop = min(start + 10_000, n + 1)
            out.write(
                b"".join(orjson.dumps(public_job(job_doc(i))) + b"\n" for i in range(start, stop))
            )


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


async def driver_import(env: BenchEnv, n: int) -> float:
    """docs/s of insert_many batches into a collection with the service's indexes."""
    name = env.db_name("bulk_driver")
    async with env.client(connectTimeoutMS=BUSY_SERVER_MS) as client:
        collection = client[name]["jobs"]
        await collection.create_indexes(Job.Settings.indexes)
        started = time.perf_counter()
        for start in range(1, n + 1, BATCH_RECORDS):
            docs = [job_doc(i) for i in range(start, min(start + BATCH_RECORDS, n + 1))]
            await collection.insert_many(docs, ordered=False)
        elapsed = time.perf_counter() - started
        assert await collection.count_documents({}) == n
        await client.drop_database(name)
    return n / elapsed


async def service_import(service: ServiceProcess, source: Path, n: int) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        deployments = b"".join(
            orjson.dumps({"deployment_id": i, "user_id": "bench"}) + b"\n" for i in range(1, 11)
        )
        headers = {"Content-Type": "application/x-ndjson"}
        async with session.post(
            f"{service.url}/import/deployments", data=deployments, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
        started = time.perf_counter()
        async with session.post(
            f"{service.url}/import/jobs", data=file_chunks(source), headers=headers
        ) as resp:
            report = await resp.json()
        elapsed = time.perf_counter() - started
    assert report["inserted"] == n and report["failed"] == 0, report
    return n / elapsed


async def service_export(service: ServiceProcess, n: int) -> float:
    lines = 0
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
        session.get(f"{service.url}/export/jobs") as resp,
    ):
        async for chunk in resp.content.iter_chunked(CHUNK):
            lines += chunk.count(b"\n")
    elapsed = time.perf_counter() - started
    assert lines == n, lines
    return n / elapsed


async def driver_export(env: BenchEnv, db_name: str, n: int) -> float:
    """docs/s of a cursor in _id order dumped as NDJSON (to /dev/null)."""
    async with env.client(connectTimeoutMS=BUSY_SERVER_MS) as client:
        started = time.perf_counter()
        lines = 0
        with open(os.devnull, "wb") as out:  # noqa: ASYNC230
            cursor = client[db_name]["jobs"].find({}).sort("_id", 1).batch_size(EXPORT_BATCH)
            async for doc in cursor:
                out.write(orjson.dumps(doc) + b"\n")
                lines += 1
        elapsed = time.perf_counter() - started
    assert lines == n, lines
    return n / elapsed


def log(message: str) -> None:
    print(f"   bulk: {message}", file=sys.stderr, flush=True)


async def run(env: BenchEnv) -> list[Row]:
    n = int(os.environ.get("BENCH_BULK_JOBS", QUICK if env.quick else FULL))
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        source = Path(tmp) / "jobs.ndjson"
        await asyncio.to_thread(write_ndjson, source, n)
        log(f"{n:,} jobs, {source.stat().st_size / 2**20:,.0f} MiB of NDJSON")
        driver_in = await driver_import(env, n)
        log(f"driver insert_many: {driver_in:,.0f} docs/s")
        db_name = env.db_name("bulk")
        async with env.service(db_name, MONGODB_TIMEOUT_MS=str(BUSY_SERVER_MS)) as service:
            service_in = await service_import(service, source, n)
            peak_mb = service.peak_rss_mb()
            log(f"service import: {service_in:,.0f} docs/s, peak RSS {peak_mb:,.0f} MB")
            # Exports are cheap enough to repeat: alternate the order, keep the best of each.
            service_out = driver_out = 0.0
            for round_ in range(EXPORT_ROUNDS):
                first, second = (service_export(service, n), driver_export(env, db_name, n))
                if round_ % 2:
                    d, s = await second, await first
                else:
                    s, d = await first, await second
                log(f"export round {round_ + 1}: service {s:,.0f} docs/s, driver {d:,.0f} docs/s")
                service_out, driver_out = max(service_out, s), max(driver_out, d)
    return [
        Row("bulk", f"import {n:,} jobs", service_in, driver_in, "docs/s", ">= 0.70"),
        Row("bulk", "service peak RSS (import)", peak_mb, None, "MB", "< 250", False),
        Row("bulk", f"export {n:,} jobs", service_out, driver_out, "docs/s", ">= 0.80"),
    ]
