"""First page against a deep page for every list shape (tests/list_shapes.py).

`python -m bench.pages [--jobs 100000] [--deployments 20000] [--page 20]`: loads the data
into a fresh database with the service's indexes (secantusd-py on disk, or MONGODB_URL),
then times the reads `store.fetch_page` makes for each shape's first page and for its page
`--page` (a cursor after the item that ends the page before), median of three, and prints
a Markdown table. Not part of `make bench`: it is a measurement for the index choices.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from service.database import Doc
from service.models import Deployment, Job
from service.pagination import ListQuery, encode_cursor
from service.store import fetch_page
from tests.list_shapes import list_shapes, shape_data

from .common import database

KEY = b"bench-pages-cursor-key-000000000"
BATCH = 5000


async def page_ms(collection: AsyncCollection[Doc], query: ListQuery) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        await fetch_page(collection, query, KEY)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def main(jobs: int, deployments: int, page: int) -> None:
    with database() as url:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(url, tz_aware=True)
        db = client["bench_pages"]
        await client.drop_database(db.name)
        await db.jobs.create_indexes(Job.Settings.indexes)
        await db.deployments.create_indexes(Deployment.Settings.indexes)
        deps, made = shape_data(jobs=jobs, deployments=deployments)
        for name, docs in (("deployments", deps), ("jobs", made)):
            for i in range(0, len(docs), BATCH):
                await db[name].insert_many(docs[i : i + BATCH])
        print(f"{jobs:,} jobs, {deployments:,} deployments; page 1 and page {page}, ms\n")
        print("| shape | page 1 | deep | deep / first |\n|---|---|---|---|")
        for shape in list_shapes():
            collection = db[shape.collection]
            first = shape.query(KEY)
            flt, order = first.reads()[0]
            skip = (page - 1) * first.limit - 1
            last = await collection.find(flt).sort(order).skip(skip).limit(1).to_list(None)
            if not last:
                print(f"| {shape} | too few matches | | |", flush=True)
                continue
            deep = shape.query(KEY, encode_cursor(first, last[0], KEY))
            a, b = await page_ms(collection, first), await page_ms(collection, deep)
            print(f"| {shape} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |", flush=True)
        await client.drop_database(db.name)
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.pages")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--deployments", type=int, default=20_000)
    parser.add_argument("--page", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.deployments, args.page))
