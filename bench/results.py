"""Result files: a large file up and down through the service vs the driver's GridFS bucket.

Same bytes, same database server, in the same run: each round uploads the file through
each side and downloads it again, the side going first alternating from round to round,
and the table has the median round (3 rounds, 2 with --quick; BENCH_RESULTS_ROUNDS
overrides). The service runs as its own process, so its peak resident memory (VmHWM)
covers exactly its own work.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
from gridfs import AsyncGridFSBucket

from .common import BenchEnv, Row, median

MiB = 1024 * 1024
BLOCK = MiB


def blocks(count: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    """`count` distinct MiB blocks (a counter over one random block), hashed as produced."""
    seed = os.urandom(BLOCK)

    async def gen() -> AsyncIterator[bytes]:
        for i in range(count):
            block = i.to_bytes(8, "big") + seed[8:]
            digest.update(block)
            yield block

    return gen()


class Sides:
    """Upload and download the same file through the service and through the bucket."""

    def __init__(
        self, http: aiohttp.ClientSession, path: str, bucket: AsyncGridFSBucket, count: int
    ) -> None:
        self.http, self.path, self.bucket, self.count = http, path, bucket, count
        self.size = count * BLOCK
        self.file_id: object = None  # the driver's file in the bucket
        self.sent = self.direct = ""  # the sha256 each side uploaded

    async def service_up(self) -> float:
        sent = hashlib.sha256()
        t = time.perf_counter()
        headers = {"Content-Length": str(self.size), "Content-Type": "application/octet-stream"}
        async with self.http.put(self.path, data=blocks(self.count, sent), headers=headers) as resp:
            entry = await resp.json()
            assert resp.status in (200, 201), entry  # 200: it replaced the last round's
        rate = self.size / (time.perf_counter() - t) / 1e6
        assert entry["sha256"] == sent.hexdigest()
        self.sent = sent.hexdigest()
        return rate

    async def driver_up(self) -> float:
        if self.file_id is not None:  # as the service replaces its file, so does this
            await self.bucket.delete(self.file_id)
        direct = hashlib.sha256()
        t = time.perf_counter()
        stream = self.bucket.open_upload_stream("big.bin")
        async for block in blocks(self.count, direct):
            await stream.write(block)
        await stream.close()
        rate = self.size / (time.perf_counter() - t) / 1e6
        self.file_id, self.direct = stream._id, direct.hexdigest()
        return rate

    async def service_down(self) -> float:
        got = hashlib.sha256()
        t = time.perf_counter()
        async with self.http.get(self.path) as resp:
            async for piece in resp.content.iter_chunked(BLOCK):
                got.update(piece)
        rate = self.size / (time.perf_counter() - t) / 1e6
        assert got.hexdigest() == self.sent
        return rate

    async def driver_down(self) -> float:
        back = hashlib.sha256()
        t = time.perf_counter()
        out = await self.bucket.open_download_stream(self.file_id)
        while chunk := await out.readchunk():
            back.update(chunk)
        rate = self.size / (time.perf_counter() - t) / 1e6
        assert back.hexdigest() == self.direct
        return rate


async def run(env: BenchEnv) -> list[Row]:
    count = 64 if env.quick else 1024
    rounds = int(os.environ.get("BENCH_RESULTS_ROUNDS", 2 if env.quick else 3))
    label = f"{count} MiB" if count < 1024 else f"{count // 1024} GiB"
    db_name = env.db_name("results")
    rates: dict[str, list[float]] = {"svc up": [], "drv up": [], "svc down": [], "drv down": []}
    async with env.service(db_name) as svc, aiohttp.ClientSession(svc.url) as http:
        start_rss = svc.rss_mb()
        async with http.post("/deployments", json={"user_id": "bench"}) as resp:
            deployment_id = (await resp.json())["deployment_id"]
        async with http.post(
            "/jobs", json={"user_id": "bench", "deployment_id": deployment_id}
        ) as r:
            job_id = (await r.json())["job_id"]
        async with env.client() as client:
            sides = Sides(
                http,
                f"/jobs/{job_id}/results/big.bin",
                AsyncGridFSBucket(client[db_name], "bench"),
                count,
            )
            for n in range(rounds):  # each pair back to back; who goes first alternates
                sides_first = ["svc", "drv"] if n % 2 == 0 else ["drv", "svc"]
                moves = {
                    "svc up": sides.service_up,
                    "drv up": sides.driver_up,
                    "svc down": sides.service_down,
                    "drv down": sides.driver_down,
                }
                for direction in ("up", "down"):
                    for side in sides_first:
                        key = f"{side} {direction}"
                        rates[key].append(await moves[key]())
                print(
                    f"   results: round {n + 1}: up service {rates['svc up'][-1]:.1f} / driver "
                    f"{rates['drv up'][-1]:.1f} MB/s, down service {rates['svc down'][-1]:.1f} / "
                    f"driver {rates['drv down'][-1]:.1f} MB/s",
                    file=sys.stderr,
                    flush=True,
                )
        peak_rss = svc.peak_rss_mb()
    m = {k: median(v) for k, v in rates.items()}
    return [
        Row(
            "results",
            f"upload {label}, median of {rounds}",
            m["svc up"],
            m["drv up"],
            "MB/s",
            ">= 0.50",
        ),
        Row(
            "results",
            f"download {label}, median of {rounds}",
            m["svc down"],
            m["drv down"],
            "MB/s",
            ">= 0.50",
        ),
        Row("results", "service RSS at start", start_rss, None, "MB", "", False),
        Row("results", "service peak RSS", peak_rss, None, "MB", "< 150", False),
    ]
