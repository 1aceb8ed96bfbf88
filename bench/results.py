"""Result files: a large file up and down through the service vs the driver's GridFS bucket.

Same bytes, same database server, one after the other in the same run. The service runs
as its own process, so its peak resident memory (VmHWM) covers exactly its own work.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator

import aiohttp
from gridfs import AsyncGridFSBucket

from .common import BenchEnv, Row

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


async def run(env: BenchEnv) -> list[Row]:
    count = 64 if env.quick else 1024
    size = count * BLOCK
    label = f"{count} MiB" if count < 1024 else f"{count // 1024} GiB"
    db_name = env.db_name("results")
    async with env.service(db_name) as svc, aiohttp.ClientSession(svc.url) as http:
        start_rss = svc.rss_mb()
        async with http.post("/deployments", json={"user_id": "bench"}) as resp:
            deployment_id = (await resp.json())["deployment_id"]
        async with http.post(
            "/jobs", json={"user_id": "bench", "deployment_id": deployment_id}
        ) as r:
            job_id = (await r.json())["job_id"]
        path = f"/jobs/{job_id}/results/big.bin"

        async with env.client() as client:
            bucket = AsyncGridFSBucket(client[db_name], "bench")

            # Each pair runs back to back, so both sides see the same machine load.
            sent = hashlib.sha256()
            t = time.perf_counter()
            headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
            async with http.put(path, data=blocks(count, sent), headers=headers) as resp:
                entry = await resp.json()
                assert resp.status == 201, entry
            service_up = size / (time.perf_counter() - t) / 1e6
            assert entry["sha256"] == sent.hexdigest()

            direct = hashlib.sha256()
            t = time.perf_counter()
            stream = bucket.open_upload_stream("big.bin")
            async for block in blocks(count, direct):
                await stream.write(block)
            await stream.close()
            driver_up = size / (time.perf_counter() - t) / 1e6

            got = hashlib.sha256()
            t = time.perf_counter()
            async with http.get(path) as resp:
                async for piece in resp.content.iter_chunked(BLOCK):
                    got.update(piece)
            service_down = size / (time.perf_counter() - t) / 1e6
            assert got.hexdigest() == sent.hexdigest()

            back = hashlib.sha256()
            t = time.perf_counter()
            out = await bucket.open_download_stream(stream._id)
            while chunk := await out.readchunk():
                back.update(chunk)
            driver_down = size / (time.perf_counter() - t) / 1e6
            assert back.hexdigest() == direct.hexdigest()
        peak_rss = svc.peak_rss_mb()

    return [
        Row("results", f"upload {label}", service_up, driver_up, "MB/s", ">= 0.50"),
        Row("results", f"download {label}", service_down, driver_down, "MB/s", ">= 0.50"),
        Row("results", "service RSS at start", start_rss, None, "MB", "", False),
        Row("results", "service peak RSS", peak_rss, None, "MB", "< 150", False),
    ]
