"""Executors: claiming a job, keeping its lease alive, and the sweeper that ends dead ones.

A claim takes the oldest due PENDING job (by `started_at`, then id) and makes it RUNNING
with a lease, by an update conditioned on the revision it read: of concurrent claims
each job goes to exactly one. A heartbeat extends the lease. The sweeper, one task in
every instance, makes ERROR what nobody keeps alive: expired leases ("lease expired") and
cancels past CANCEL_GRACE_S ("cancelled"); each by a conditional update too, so however
many instances sweep, each job ends once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from .auth import owner_filter
from .changes import CHANGES
from .database import DB, Doc
from .errors import Conflict, NotFound
from .http import client_gone, json_response, path_id, read_body, record_response
from .jobs import enter_status
from .lifecycle import LEASE_EXPIRED, TaskStatus, cancelled, lease_problem
from .metrics import CLAIMS, JOBS_ENDED_BY_SWEEPER
from .schemas import ClaimBody, HeartbeatBody, public_job, public_lease
from .settings import SETTINGS, Settings
from .store import Change, now, update_record
from .wakeups import WAKEUPS, Wakeups

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

CANDIDATES = 64  # due jobs read per claim attempt; concurrent claims spread over them
MAX_ROUNDS = 50  # reads of the due jobs per claim attempt
SWEEP_BATCH = 1000  # jobs one sweep ends at most per kind; the next sweep takes the rest
STOP_TIMEOUT_S = 5.0  # at shutdown, for the sweep under way


# --- data layer -----------------------------------------------------------------------


def _lease(executor: str, lease_s: int, at: datetime) -> Doc:
    return {"executor": executor, "expires_at": at + timedelta(seconds=lease_s)}


async def claim_job(db: AsyncDatabase[Doc], body: ClaimBody, owner: Doc) -> Doc | None:
    """Make the oldest due PENDING job `owner` may see RUNNING under `body.executor`'s
    lease; None when there is none."""
    scope = dict(owner)
    if body.user_id is not None:
        if scope.get("user_id", body.user_id) != body.user_id:
            return None  # another user's jobs: none the caller may see
        scope["user_id"] = body.user_id
    if body.deployment_id is not None:
        scope["deployment_id"] = body.deployment_id
    for _ in range(MAX_ROUNDS):
        at = now()
        due = {**scope, "task_status": TaskStatus.PENDING.value, "started_at": {"$lte": at}}
        order = [("started_at", 1), ("_id", 1)]
        candidates = await db.jobs.find(due).sort(order).limit(CANDIDATES).to_list(None)
        if not candidates:
            return None
        # The oldest first; when another claim took it, the others in random order, so
        # that concurrent claims do not all queue up behind each other.
        rest = candidates[1:]
        random.shuffle(rest)
        for stored in [candidates[0], *rest]:
            change = Change(stored)
            enter_status(change, TaskStatus.RUNNING, at, executor=body.executor)
            change.set("lease", _lease(body.executor, body.lease_s, at))
            flt = {"_id": stored["_id"], "revision": stored["revision"]}
            if (await db.jobs.update_one(flt, change.update())).matched_count:
                CLAIMS.inc()
                return change.after
        # Every candidate was taken or changed meanwhile: read the due jobs again.
    return None  # a crowd took every due job we saw, time and again: the caller retries


async def heartbeat(db: AsyncDatabase[Doc], job_id: int, body: HeartbeatBody, owner: Doc) -> Doc:
    """Extend the lease of `body.executor`'s RUNNING job; 409 saying why when it is not."""

    def decide(change: Change) -> None:
        stored, at = change.stored, now()
        why = lease_problem(stored.get("task_status"), stored.get("lease"), body.executor, at)
        if why is not None:
            raise Conflict(f"Job {job_id}: {why}.")
        change.set("lease", _lease(body.executor, body.lease_s, at))

    return await update_record(db.jobs, job_id, decide, None, "job", owner)


async def sweep(db: AsyncDatabase[Doc], settings: Settings) -> int:
    """End the RUNNING jobs past their lease or their cancel grace period; how many ended."""
    at = now()
    grace = at - timedelta(seconds=settings.cancel_grace_s)
    running = TaskStatus.RUNNING.value
    kinds: list[tuple[str, Doc]] = [
        ("lease_expired", {"task_status": running, "lease.expires_at": {"$lte": at}}),
        ("cancelled", {"task_status": running, "cancel_requested_at": {"$lte": grace}}),
    ]
    ended = 0
    for why, flt in kinds:
        found = db.jobs.find(flt, {"_id": 1}).limit(SWEEP_BATCH)
        for job_id in [doc["_id"] async for doc in found]:
            if await _end(db, job_id, why, grace):
                JOBS_ENDED_BY_SWEEPER.labels(why).inc()
                ended += 1
    return ended


async def _end(db: AsyncDatabase[Doc], job_id: int, why: str, grace: datetime) -> bool:
    """Make one job ERROR for `why`, if it still qualifies (a heartbeat or its executor may
    have come first, here or in another instance); whether this call ended it."""
    ended = False

    def decide(change: Change) -> None:
        nonlocal ended
        ended = False  # decided anew on every attempt
        stored, at = change.stored, now()
        lease: dict[str, Any] | None = stored.get("lease")
        asked: datetime | None = stored.get("cancel_requested_at")
        if stored.get("task_status") != TaskStatus.RUNNING:
            change.unchanged = True
        elif why == "lease_expired" and lease is not None and lease["expires_at"] <= at:
            ended = True  # never before the lease's end
            enter_status(change, TaskStatus.ERROR, max(at, lease["expires_at"]), LEASE_EXPIRED)
        elif why == "cancelled" and asked is not None and asked <= grace:
            ended = True
            enter_status(change, TaskStatus.ERROR, at, cancelled(stored.get("cancel_reason")))
        else:
            change.unchanged = True

    with contextlib.suppress(NotFound):  # deleted meanwhile
        await update_record(db.jobs, job_id, decide, None, "job", {})
    return ended


async def run_sweeper(db: AsyncDatabase[Doc], settings: Settings, stop: asyncio.Event) -> None:
    """Sweep every LEASE_SWEEP_S / 2 (so each deadline is met within LEASE_SWEEP_S), with
    some jitter so that instances started together do not sweep in step, until `stop`."""
    while not stop.is_set():
        try:
            await sweep(db, settings)
        except (PyMongoError, Conflict) as exc:  # the database is away: next time
            log.warning("lease sweep failed: %s", exc.__class__.__name__)
        with contextlib.suppress(TimeoutError):
            pause = settings.lease_sweep_s / 2 * random.uniform(0.8, 1.0)
            await asyncio.wait_for(stop.wait(), pause)


async def executors_ctx(app: web.Application) -> AsyncIterator[None]:
    """The waiters' registry and this instance's sweeper; after the database's context.

    The sweeper is stopped by an event, not by cancelling it: the driver may turn a
    cancellation in the middle of a command into a network error, which the sweeper
    survives by design.
    """
    app[WAKEUPS] = Wakeups(app[SETTINGS].max_waiters)
    app[CHANGES].on_pending = app[WAKEUPS].notify  # a PENDING job, from any instance
    stop = asyncio.Event()
    sweeper = asyncio.create_task(run_sweeper(app[DB].db, app[SETTINGS], stop))
    yield
    stop.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sweeper, STOP_TIMEOUT_S)  # cancels it when it takes longer


# --- handlers -------------------------------------------------------------------------


@routes.post("/jobs/claim")
async def claim(request: web.Request) -> web.Response:
    body = await read_body(request, ClaimBody)
    db, owner = request.app[DB].db, owner_filter(request)
    job = await claim_job(db, body, owner)
    if job is None and body.wait_s > 0:
        wakeups = request.app[WAKEUPS]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + body.wait_s
        async with wakeups.slot():
            while job is None and (left := deadline - loop.time()) > 0:
                await wakeups.wait(left)
                if client_gone(request):  # aiohttp runs on for a client that left: take nothing
                    return web.Response(status=204)
                if request.app[CHANGES].closing:  # SIGTERM: no job now; claim elsewhere
                    return web.Response(status=204)
                job = await claim_job(db, body, owner)
    if job is None:
        return web.Response(status=204)
    return record_response(public_job(job))


@routes.post("/jobs/{job_id}/heartbeat")
async def extend(request: web.Request) -> web.Response:
    job_id = path_id(request, "job_id", "job")
    body = await read_body(request, HeartbeatBody)
    job = await heartbeat(request.app[DB].db, job_id, body, owner_filter(request))
    cancel_requested = job.get("cancel_requested_at") is not None
    lease = public_lease(job["lease"])
    return json_response({"job_id": job_id, "lease": lease, "cancel_requested": cancel_requested})
