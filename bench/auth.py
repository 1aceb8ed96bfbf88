"""What authentication costs a request: the same read with AUTH=disabled and with a key.

A key is verified from the in-process cache (no database round trip) after its first use.
Each mode is its own service; the three run at once and are measured in alternating
rounds, so that load from elsewhere on the machine falls on all of them alike. Each row
compares like with like: requests/s with a key against requests/s without auth, and the
service process's CPU time per request (from /proc) with a key against without. The
in-process cost of verifying a cached key is printed on its own, with no counterpart.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from datetime import UTC, datetime

import aiohttp

from service.auth import Authenticator
from service.keys import create_key, new_key
from service.settings import Settings

from .common import BenchEnv, Row, closed_loop

MODES = {"disabled": None, "admin key": True, "user key": False}  # mode -> admin key?


async def _seed(env: BenchEnv, db_name: str, admin: bool) -> str:
    """One deployment of user `bench`, and a key."""
    async with env.client() as client:
        db = client[db_name]
        key, _ = await create_key(db, "bench", admin=admin)
        await db.deployments.insert_one(
            {"_id": 1, "user_id": "bench", "deployment_name": None, "parameters": ""}
            | {"data": {}, "created": datetime.now(UTC), "revision": 1}
        )
    return key


async def _round(session: aiohttp.ClientSession, url: str, total: int, workers: int) -> float:
    """Seconds for `total` GETs of one record by `workers` concurrent clients."""

    async def get(_: int) -> None:
        async with session.get(f"{url}/deployments/1") as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()

    return (await closed_loop(workers, get, total=total)).seconds


async def _verify_us(calls: int) -> float:
    """Microseconds to verify a cached key in-process: the CPU cost auth adds to a request."""
    authenticator = Authenticator(Settings(auth="enabled"))
    key, doc = new_key("bench", False, None)
    authenticator.keys.put(doc["_id"], doc, time.monotonic())
    db = None  # a cached key needs no database
    start = time.perf_counter()
    for _ in range(calls):
        assert await authenticator.verify(db, key) is not None  # type: ignore[arg-type]
    return (time.perf_counter() - start) / calls * 1e6


async def run(env: BenchEnv) -> list[Row]:
    per_round, rounds = (200, 3) if env.quick else (500, 6)
    seconds = dict.fromkeys(MODES, 0.0)
    cpu = dict.fromkeys(MODES, 0.0)  # the service process's CPU seconds over the rounds
    async with contextlib.AsyncExitStack() as stack:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-auth-"))
        sides = {}
        for mode, admin in MODES.items():
            db_name = env.db_name("auth")
            key = await _seed(env, db_name, bool(admin))
            auth = "disabled" if admin is None else "enabled"
            svc = await stack.enter_async_context(
                env.service(db_name, AUTH=auth, DATA_DIR=data_dir)
            )
            headers = {} if admin is None else {"Authorization": f"Bearer {key}"}
            session = await stack.enter_async_context(aiohttp.ClientSession(headers=headers))
            sides[mode] = (session, svc)
            await _round(session, svc.url, 50, 4)  # warm up (and fill the key cache)
        for n in range(rounds):
            order = list(sides)
            for mode in order[n % len(order) :] + order[: n % len(order)]:
                session, svc = sides[mode]
                before = svc.cpu_seconds()
                seconds[mode] += await _round(session, svc.url, per_round, 16)
                cpu[mode] += svc.cpu_seconds() - before
    total = per_round * rounds
    rate = {mode: total / s for mode, s in seconds.items()}
    cpu_ms = {mode: c * 1000 / total for mode, c in cpu.items()}
    verify = await _verify_us(2000 if env.quick else 20000)
    rows = []
    for mode in ("user key", "admin key"):
        rows.append(
            Row(
                "auth",
                f"GET one record, {mode} (service) vs AUTH=disabled (driver column)",
                rate[mode],
                rate["disabled"],
                "req/s",
                ">= 0.85",
            )
        )
        rows.append(
            Row(
                "auth",
                f"CPU per GET, {mode} (service) vs AUTH=disabled (driver column)",
                cpu_ms[mode],
                cpu_ms["disabled"],
                "ms CPU",
                "<= 1.05",
                higher_is_better=False,
            )
        )
    rows.append(Row("auth", "verify a cached key in-process", verify, None, "us", "", False))
    return rows
