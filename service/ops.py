"""The operational endpoints: `/healthz`, `/readyz`, `/openapi.yaml` and `/metrics`.

The first three need no credential (auth.PUBLIC_PATHS); `/metrics` is for admins, and
counts the jobs by status when it is scraped (bounded by a short timeout; when the
database does not answer the gauge is left out and `jobservice_database_up` is 0).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pymongo
from aiohttp import web
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from .auth import require_admin
from .database import DB, Doc
from .errors import RETRY_AFTER_S, DatabaseUnavailable
from .http import json_response
from .lifecycle import STATUS_NAMES
from .metrics import CONTENT_TYPE, DATABASE_UP, JOBS, exposition

log = logging.getLogger(__name__)

SPEC_PATHS = [
    Path(__file__).resolve().parent.parent / "openapi.yaml",  # source checkout
    Path("openapi.yaml").resolve(),  # container: WORKDIR holds it
]
JOBS_COUNT_TIMEOUT_S = 2.0

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    database = request.app[DB]
    if database.embedded is not None and database.embedded.exit_code is not None:
        raise DatabaseUnavailable(
            f"The embedded database exited (code {database.embedded.exit_code}); "
            "restart the service, its data is kept.",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    try:
        await database.client.admin.command("ping")
    except Exception as exc:
        log.warning("readiness check failed: %s", exc.__class__.__name__)
        raise DatabaseUnavailable(
            "The database does not answer.", headers={"Retry-After": RETRY_AFTER_S}
        ) from None
    return json_response({"status": "ready"})


@routes.get("/openapi.yaml")
async def openapi(request: web.Request) -> web.Response:
    for path in SPEC_PATHS:
        if path.exists():
            return web.Response(body=path.read_bytes(), content_type="application/yaml")
    raise web.HTTPNotFound()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    require_admin(request)  # the figures cover every user's records
    await count_jobs(request.app[DB].db)
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE})


async def count_jobs(db: AsyncDatabase[Doc]) -> bool:
    """Set the jobs-by-status gauge; False when the database did not answer.

    One count per status, each an equality on `task_status`, so each reads that index (a
    `$group` over the collection reads every job; on SecantusDB so does an `$in`).
    """
    try:
        with pymongo.timeout(JOBS_COUNT_TIMEOUT_S):
            counts = {s: await db.jobs.count_documents({"task_status": s}) for s in STATUS_NAMES}
    except PyMongoError as exc:
        log.warning("could not count jobs for /metrics: %s", exc.__class__.__name__)
        JOBS.clear()
        DATABASE_UP.set(0)
        return False
    for status, n in counts.items():
        JOBS.labels(status).set(n)
    DATABASE_UP.set(1)
    return True
