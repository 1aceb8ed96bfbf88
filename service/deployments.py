"""/deployments: a user's prepared program with its parameters."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from aiohttp import web
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from .auth import claim_owner, owner_filter
from .batching import Batcher
from .database import DB, Doc, next_ids
from .errors import Conflict
from .http import (
    conditional_get,
    if_match,
    page_response,
    path_id,
    query_flag,
    read_body,
    record_response,
)
from .idempotency import idempotent
from .jobs import DELETING, delete_jobs
from .models import deployment_document
from .pagination import DEPLOYMENT_FILTERS, DEPLOYMENT_SORTS, parse_list_query
from .schemas import DeploymentCreate, DeploymentPatch, public_deployment
from .store import MAX_ATTEMPTS, fetch_page, field_changes, get_checked, now, update_record

routes = web.RouteTableDef()
DEFAULTS: dict[str, Any] = {"parameters": "", "data": {}}


# --- data layer -----------------------------------------------------------------------


async def insert_deployments(
    db: AsyncDatabase[Doc], bodies: list[DeploymentCreate]
) -> list[Doc | Exception]:
    """Insert deployments with one `$inc` of the counter and one `insert_many` (group
    commit, batching.py); one outcome per body, in order: its document or its own error."""
    first, at = await next_ids(db, "deployments", len(bodies)), now()
    docs = [
        deployment_document(_id=first + k, created=at, **body.model_dump())
        for k, body in enumerate(bodies)
    ]
    outcomes: list[Doc | Exception] = list(docs)
    try:
        await db.deployments.insert_many(docs, ordered=False)
    except BulkWriteError as exc:  # these failed alone; the others are written
        for error in exc.details.get("writeErrors", []):
            outcomes[error["index"]] = exc
    return outcomes


# The batcher of POST /deployments (batching.py), one per application.
DEPLOYMENT_CREATES = web.AppKey("deployment_creates", Batcher[DeploymentCreate, Doc])


async def creates_ctx(app: web.Application) -> AsyncIterator[None]:
    db = app[DB].db
    batcher = Batcher[DeploymentCreate, Doc](lambda bodies: insert_deployments(db, bodies))
    app[DEPLOYMENT_CREATES] = batcher
    yield
    await batcher.aclose()


async def patch_deployment(
    db: AsyncDatabase[Doc],
    deployment_id: int,
    patch: DeploymentPatch,
    revision: int | None,
    owner: Doc,
) -> Doc:
    changes = patch.model_dump(exclude_unset=True)
    if not changes:
        return await get_checked(db.deployments, deployment_id, revision, "deployment", owner)
    return await update_record(
        db.deployments,
        deployment_id,
        lambda change: field_changes(change, changes, DEFAULTS),
        revision,
        "deployment",
        owner,
    )


async def delete_deployment(
    db: AsyncDatabase[Doc], deployment_id: int, cascade: bool, revision: int | None, owner: Doc
) -> None:
    """Delete; with `cascade`, its jobs too. Without, refuse while it has jobs.

    A refusal changes nothing at any instant: with no jobs found, the deployment is marked
    with this DELETE's token (a field no response shows), checked for jobs once more, and
    deleted only if it still carries the token. A job created meanwhile is inserted before
    its creator confirms the deployment, and confirming removes a mark (jobs.insert_jobs,
    jobs.confirm_deployments): either the second check sees the job, or the conditional
    delete misses and this looks again. Only jobs `owner` may see are looked at or deleted.
    """
    jobs = {**owner, "deployment_id": deployment_id}
    for _ in range(MAX_ATTEMPTS):
        doc = await get_checked(db.deployments, deployment_id, revision, "deployment", owner)
        flt: dict[str, Any] = {**owner, "_id": deployment_id, "revision": doc["revision"]}
        if cascade:
            if (await db.deployments.delete_one(flt)).deleted_count:
                await delete_jobs(db, jobs)
                return
            continue  # changed or deleted meanwhile
        if await _has_jobs(db, jobs):
            raise Conflict(_has_jobs_msg(deployment_id))
        token = secrets.token_hex(8)
        if not (await db.deployments.update_one(flt, {"$set": {DELETING: token}})).matched_count:
            continue
        deleted = False
        try:
            if await _has_jobs(db, jobs):
                raise Conflict(_has_jobs_msg(deployment_id))
            deleted = (await db.deployments.delete_one({**flt, DELETING: token})).deleted_count > 0
        finally:  # (a mark left behind by a crash is removed by the next job creation)
            if not deleted:
                unmark = {"_id": deployment_id, DELETING: token}
                await db.deployments.update_one(unmark, {"$unset": {DELETING: ""}})
        if deleted:
            return
    raise Conflict(f"Deployment {deployment_id} changed too often to delete; try again.")


async def _has_jobs(db: AsyncDatabase[Doc], jobs: Doc) -> bool:
    return await db.jobs.find_one(jobs, {"_id": 1}) is not None


def _has_jobs_msg(deployment_id: int) -> str:
    return f"Deployment {deployment_id} still has jobs; delete them first or use ?cascade=true."


# --- handlers -------------------------------------------------------------------------


@routes.post("/deployments")
async def create(request: web.Request) -> web.Response:
    body = await read_body(request, DeploymentCreate)
    body.user_id = claim_owner(request, body.user_id)

    async def make() -> web.Response:
        doc = await request.app[DEPLOYMENT_CREATES].submit(body)
        return record_response(public_deployment(doc), 201, f"/deployments/{doc['_id']}")

    return await idempotent(request, make)


@routes.get("/deployments")
async def list_all(request: web.Request) -> web.Response:
    database = request.app[DB]
    query = parse_list_query(
        request.query,
        DEPLOYMENT_FILTERS,
        DEPLOYMENT_SORTS,
        database.cursor_key,
        owner_filter(request),
    )
    page = await fetch_page(database.db.deployments, query, database.cursor_key)
    return page_response(request, page, public_deployment)


@routes.get("/deployments/{deployment_id}")
async def get_one(request: web.Request) -> web.Response:
    deployment_id = path_id(request, "deployment_id", "deployment")
    collection, owner = request.app[DB].db.deployments, owner_filter(request)
    read = partial(get_checked, collection, deployment_id, None, "deployment", owner)
    return await conditional_get(request, read, ("deployments", deployment_id), public_deployment)


@routes.patch("/deployments/{deployment_id}")
async def patch(request: web.Request) -> web.Response:
    deployment_id = path_id(request, "deployment_id", "deployment")
    body = await read_body(request, DeploymentPatch, patch=True)
    revision, owner = if_match(request), owner_filter(request)
    doc = await patch_deployment(request.app[DB].db, deployment_id, body, revision, owner)
    return record_response(public_deployment(doc))


@routes.delete("/deployments/{deployment_id}")
async def delete(request: web.Request) -> web.Response:
    deployment_id = path_id(request, "deployment_id", "deployment")
    cascade = query_flag(request, "cascade")
    revision, owner = if_match(request), owner_filter(request)
    await delete_deployment(request.app[DB].db, deployment_id, cascade, revision, owner)
    return web.Response(status=204)
