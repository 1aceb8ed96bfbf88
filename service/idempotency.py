"""`Idempotency-Key` on the creates: a retried request answers its first record again.

The same key from the same user with the same request within 24 hours
(models.IDEMPOTENCY_TTL_S, a TTL index) gets the first answer again, with
`Idempotent-Replayed: true`, and creates nothing; with another request it is 422. The key
is taken by inserting its record before the create runs, so of concurrent requests with
one key exactly one creates; the others wait for its answer. A create that fails frees
the key again, so a corrected request may use it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pydantic_core
from aiohttp import web
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from .auth import principal
from .database import DB, Doc
from .errors import BadRequest, Conflict, invalid
from .models import IDEMPOTENCY_TTL_S
from .store import now

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY = 200
WAIT_S = 10.0  # how long a duplicate waits for the first request's answer before 409
POLL_S = 0.05
STALE_S = 60.0  # a first request unanswered this long has died with its instance
KEPT_HEADERS = ("ETag", "Location")


async def idempotent(
    request: web.Request, make: Callable[[], Awaitable[web.Response]]
) -> web.Response:
    """`make()` the response, unless this request's Idempotency-Key was answered already."""
    key = request.headers.get(HEADER)
    if key is None:
        return await make()
    if not 1 <= len(key) <= MAX_KEY:
        raise BadRequest(f"{HEADER} must be 1 to {MAX_KEY} characters.")
    records: AsyncCollection[Doc] = request.app[DB].db.idempotency_keys
    user = principal(request).user_id
    record_id = _digest(f"{user}\x00{key}")
    fingerprint = _digest(f"{request.method} {request.path}\x00{_canonical(await request.read())}")
    replay = await _take(records, record_id, user, key, fingerprint)
    if replay is not None:
        return replay
    try:
        response = await make()
    except BaseException:
        await records.delete_one({"_id": record_id})  # failed: the key is free again
        raise
    headers = {h: response.headers[h] for h in KEPT_HEADERS if h in response.headers}
    answer = {"status": response.status, "body": response.body, "headers": headers}
    await records.update_one({"_id": record_id}, {"$set": answer})
    return response


async def _take(
    records: AsyncCollection[Doc], record_id: str, user: str | None, key: str, fingerprint: str
) -> web.Response | None:
    """Take the key (None), or the first answer to replay once there is one."""
    deadline = time.monotonic() + WAIT_S
    while True:
        started = now()
        record = {"_id": record_id, "user_id": user, "key": key, "request": fingerprint}
        try:
            await records.insert_one({**record, "created": started, "status": None})
            return None
        except DuplicateKeyError:
            pass
        found = await records.find_one({"_id": record_id})
        if found is None:
            continue  # freed meanwhile: take it
        age = started - found["created"]
        if age > timedelta(seconds=IDEMPOTENCY_TTL_S) or (
            found["status"] is None and age > timedelta(seconds=STALE_S)
        ):  # expired (the TTL monitor runs once a minute), or its first request died
            await records.delete_one({"_id": record_id, "created": found["created"]})
            continue
        if found["request"] != fingerprint:
            raise invalid(
                ["header", HEADER],
                "this key was used for another request (another body or endpoint) in the "
                "last 24 hours; use a new key",
            )
        if found["status"] is not None:
            body = bytes(found["body"])
            headers = {**found.get("headers", {}), REPLAYED: "true"}
            return web.Response(
                body=body, status=found["status"], content_type="application/json", headers=headers
            )
        if time.monotonic() > deadline:
            raise Conflict(f"A request with this {HEADER} is still being answered; try again.")
        await asyncio.sleep(POLL_S)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _canonical(raw: bytes) -> str:
    """The body as one spelling of its JSON (key order and spacing do not matter). No body
    is `{}`: where a body may be left out (a retry), the two mean the same."""
    if not raw.strip():
        return "{}"
    return json.dumps(pydantic_core.from_json(raw), sort_keys=True, separators=(",", ":"))
