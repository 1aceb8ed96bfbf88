"""Bulk import and export against the driver, on the same database, in one run.

- import: N jobs streamed (from a file, by a streaming aiohttp upload) through
  `POST /import/jobs`, vs `insert_many` batches of the same size writing the same
  documents, read as prepared BSON from a file (as the service's NDJSON is prepared
  before its clock starts: neither side's time includes making the records), into a
  collection with the same indexes;
- the service's peak resident memory over its life, read right after the import;
- export: `GET /export/jobs` read to the end, vs a driver cursor dumped to NDJSON.

Each round imports into a fresh database on both sides and then exports, the order of
the two sides alternating from round to round; the table has the median of the rounds
(the peak RSS: the highest). N is 1,000,000 (20,000 with --quick), rounds 3 (2 with
--quick); BENCH_BULK_JOBS and BENCH_BULK_ROUNDS override them. Both sides wait
BUSY_SERVER_MS for heartbeats: secantusd-py sorts the whole collection before an export's
first batch and answers nothing else meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import bson
import orjson
from bson.raw_bson import RawBSONDocument

from service.bulk_export import EXPORT_BATCH
from service.bulk_import import BATCH_RECORDS
from service.models import Job
from service.schemas import public_job

from .common import BUSY_SERVER_MS, BenchEnv, Row, ServiceProcess, median

FULL, QUICK = 1_000_000, 20_000
RAW = bson.CodecOptions(document_class=RawBSONDocument)
Doc = dict[str, Any]
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


def write_files(ndjson: Path, raw: Path, n: int) -> None:
    """The same N jobs twice: NDJSON as an export spells them, and BSON as stored."""
    with ndjson.open("wb") as text, raw.open("wb") as binary:
        for start in range(1, n + 1, 10_000):
            docs = [job_doc(i) for i in range(start, min(start + 10_000, n + 1))]
            text.write(b"".join(orjson.dumps(public_job(d)) + b"\n" for d in docs))
            binary.write(b"".join(bson.encode(d) for d in docs))


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


async def driver_import(env: BenchEnv, source: Path, n: int) -> float:
    """docs/s of insert_many batches of prepared BSON documents, read from `source`, into a
    collection with the service's indexes."""
    name = env.db_name("bulk_driver")
    async with env.client(connectTimeoutMS=BUSY_SERVER_MS) as client:
        collection = client[name]["jobs"].with_options(codec_options=RAW)
        await collection.create_indexes(Job.Settings.indexes)
        started = time.perf_counter()
        with source.open("rb") as stream:  # read as it goes, as the service side reads its file
            docs = bson.decode_file_iter(stream, codec_options=RAW)
            while batch := list(itertools.islice(docs, BATCH_RECORDS)):
                await collection.insert_many(batch, ordered=False)
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


async def service_round(env: BenchEnv, source: Path, n: int, export_first: bool) -> Doc:
    """Import into a fresh service and database, then one export by each side."""
    db_name = env.db_name("bulk")
    async with env.service(db_name, MONGODB_TIMEOUT_MS=str(BUSY_SERVER_MS)) as svc:
        result: Doc = {"import": await service_import(svc, source, n), "rss": svc.peak_rss_mb()}
        exports: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            ("service", lambda: service_export(svc, n)),
            ("driver", lambda: driver_export(env, db_name, n)),
        ]
        for side, export in exports if export_first else exports[::-1]:
            result[side] = await export()
    return result


async def run(env: BenchEnv) -> list[Row]:
    n = int(os.environ.get("BENCH_BULK_JOBS", QUICK if env.quick else FULL))
    rounds = int(os.environ.get("BENCH_BULK_ROUNDS", 2 if env.quick else 3))
    results: dict[str, list[float]] = {k: [] for k in ("svc in", "drv in", "svc out", "drv out")}
    peak_mb = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        source, raw = Path(tmp) / "jobs.ndjson", Path(tmp) / "jobs.bson"
        await asyncio.to_thread(write_files, source, raw, n)
        log(f"{n:,} jobs, {source.stat().st_size / 2**20:,.0f} MiB of NDJSON, {rounds} rounds")
        for round_ in range(rounds):  # the service first in even rounds, the driver in odd
            service_first = round_ % 2 == 0
            done: Doc = {}
            for side in ("service", "driver") if service_first else ("driver", "service"):
                if side == "driver":
                    done["driver"] = await driver_import(env, raw, n)
                else:
                    done["service"] = await service_round(env, source, n, service_first)
            svc = done["service"]
            results["svc in"].append(svc["import"])
            results["drv in"].append(done["driver"])
            results["svc out"].append(svc["service"])
            results["drv out"].append(svc["driver"])
            peak_mb = max(peak_mb, svc["rss"])
            log(
                f"round {round_ + 1} ({'service' if service_first else 'driver'} first): "
                f"import service {svc['import']:,.0f} / driver {done['driver']:,.0f} docs/s, "
                f"export service {svc['service']:,.0f} / driver {svc['driver']:,.0f} docs/s, "
                f"peak RSS {svc['rss']:,.0f} MB"
            )
    m = {k: median(v) for k, v in results.items()}
    label = f"{n:,} jobs, median of {rounds}"
    return [
        Row("bulk", f"import {label}", m["svc in"], m["drv in"], "docs/s", ">= 0.70"),
        Row("bulk", "service peak RSS (import, highest)", peak_mb, None, "MB", "< 250", False),
        Row("bulk", f"export {label}", m["svc out"], m["drv out"], "docs/s", ">= 0.80"),
    ]
