"""How MONGODB_POOL_SIZE shapes throughput at 64 clients: the measurement behind its default.

`python -m bench pool [--quick]`. One service process per pool size, each on its own
fresh database, all started together; then many short rounds, each measuring every size
in a rotated order, so a busy neighbour on a shared machine spreads over all sizes
instead of spoiling one. Not in the default `make bench` list: run it when the service's
database access changes.
"""

from __future__ import annotations

import contextlib
import random
import sys

from .api import Bench, Sizes
from .common import BenchEnv, LoadResult, Row, closed_loop, median

SIZES = (4, 8, 16, 32, 100)
CLIENTS = 64


async def get_many(bench: Bench, seconds: float) -> LoadResult:
    rng = random.Random(4)
    ids = bench.service_ids
    async with bench.session(CLIENTS) as http:

        async def op(_: int) -> None:
            async with http.get(f"/jobs/{rng.choice(ids)}") as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"GET /jobs/id: {resp.status}")

        return await closed_loop(CLIENTS, op, seconds=seconds)


async def run(env: BenchEnv) -> list[Row]:
    seconds, rounds = (1.0, 2) if env.quick else (2.0, 6)
    posts: dict[int, list[float]] = {s: [] for s in SIZES}
    gets: dict[int, list[float]] = {s: [] for s in SIZES}
    async with contextlib.AsyncExitStack() as stack:
        mongo = await stack.enter_async_context(env.client())
        benches: dict[int, Bench] = {}
        for size in SIZES:
            db_name = env.db_name(f"pool{size}")
            svc = await stack.enter_async_context(env.service(db_name, MONGODB_POOL_SIZE=str(size)))
            benches[size] = Bench(svc, mongo[db_name], Sizes())
            await benches[size].setup()
            await benches[size].post_service(CLIENTS, 1.0)  # warm up: connections, ids
        for n in range(rounds):
            for k in range(len(SIZES)):
                size = SIZES[(k + n) % len(SIZES)]
                posts[size].append((await benches[size].post_service(CLIENTS, seconds)).rate)
                gets[size].append((await get_many(benches[size], seconds)).rate)
            done = ", ".join(f"{s}: {posts[s][-1]:.0f}/{gets[s][-1]:.0f}" for s in SIZES)
            print(f"   pool round {n + 1} (POST/GET req/s) {done}", file=sys.stderr, flush=True)
    best = max(SIZES, key=lambda s: median(posts[s]))
    rows = []
    for size in SIZES:
        mark = " (best)" if size == best else ""
        metric = f"POST /jobs, 64 clients, pool {size}{mark}"
        rows.append(Row("pool", metric, median(posts[size]), None, "req/s"))
    for size in SIZES:
        metric = f"GET /jobs/{{id}}, 64 clients, pool {size}"
        rows.append(Row("pool", metric, median(gets[size]), None, "req/s"))
    return rows
