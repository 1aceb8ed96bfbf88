"""The database client: its lifecycle, read preferences, time limits, and id counters."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import pymongo
from aiohttp import web
from beanie import init_beanie
from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError
from pymongo.read_preferences import (
    Nearest,
    Primary,
    PrimaryPreferred,
    Secondary,
    SecondaryPreferred,
    _ServerMode,
)

from .embedded import EmbeddedDatabase, EmbeddedDatabaseError, embedded_server, running_embedded
from .metrics import COMMAND_METRICS
from .models import DOCUMENT_MODELS, GRIDFS_INDEXES
from .settings import ReadPreferenceName, Settings

Doc = dict[str, Any]
INIT_TIMEOUT_S = 600.0  # index builds at start (see init_database)


def make_client(url: str, settings: Settings, *, timed: bool = True) -> AsyncMongoClient[Doc]:
    """The one client per process. Every wait is bounded, so no request hangs on the database:
    finding a server and connecting (MONGODB_TIMEOUT_MS), and each reply
    (MONGODB_OPERATION_TIMEOUT_MS as socketTimeoutMS: a frozen database does not hang us).

    Not timeoutMS: with it pymongo waits the whole timeoutMS, not serverSelectionTimeoutMS,
    for an unreachable database. Code with a longer wait in mind (a big aggregation) wraps
    it in `pymongo.timeout(seconds)`, which takes precedence. Every command is timed for
    /metrics (`timed`; not a change stream's, whose reads wait for changes on purpose).
    """
    return AsyncMongoClient(
        url,
        tz_aware=True,
        maxPoolSize=settings.mongodb_pool_size,
        serverSelectionTimeoutMS=settings.mongodb_timeout_ms,
        connectTimeoutMS=settings.mongodb_timeout_ms,
        socketTimeoutMS=settings.mongodb_operation_timeout_ms or None,
        appname="jobservice",
        event_listeners=[COMMAND_METRICS] if timed else [],
    )


READ_PREFERENCES: dict[ReadPreferenceName, _ServerMode] = {
    "primary": Primary(),
    "primaryPreferred": PrimaryPreferred(),
    "secondary": Secondary(),
    "secondaryPreferred": SecondaryPreferred(),
    "nearest": Nearest(),
}


def analytics_time_limit(settings: Settings) -> AbstractContextManager[Any]:
    """MONGODB_ANALYTICS_TIMEOUT_MS for the reads inside: `pymongo.timeout` replaces the
    socketTimeoutMS of MONGODB_OPERATION_TIMEOUT_MS, which would cut off a statistics
    aggregation or an export's first batch while the database still reads the collection."""
    return pymongo.timeout(settings.mongodb_analytics_timeout_ms / 1000)


def analytics_db(db: AsyncDatabase[Doc], settings: Settings) -> AsyncDatabase[Doc]:
    """`db` reading with MONGODB_ANALYTICS_READ_PREFERENCE: for statistics and exports, which
    tolerate slightly stale data and so can be served by secondaries instead of the primary."""
    mode = READ_PREFERENCES[settings.mongodb_analytics_read_preference]
    return db.with_options(read_preference=mode)


async def analytics_source(db: AsyncDatabase[Doc], settings: Settings) -> AsyncDatabase[Doc]:
    """`analytics_db`, once a server for its read preference answers a ping.

    Inside `analytics_time_limit` the driver would spend the whole (long) limit waiting for
    a server when none is selectable (an election, an outage, `secondary` on a set without
    one): the ping selects it first, under MONGODB_TIMEOUT_MS, so that is a quick 503.
    """
    source = analytics_db(db, settings)
    await source.command("ping", read_preference=source.read_preference)
    return source


async def init_database(db: AsyncDatabase[Doc]) -> None:
    """Register the documents with Beanie; create their indexes, and GridFS's.

    Building an index on a large existing collection can take minutes, longer than
    MONGODB_OPERATION_TIMEOUT_MS allows one reply: `pymongo.timeout` lifts that limit here,
    after a ping has shown, within MONGODB_TIMEOUT_MS, that the database answers at all.
    """
    await db.command("ping")
    with pymongo.timeout(INIT_TIMEOUT_S):
        await init_beanie(database=db, document_models=DOCUMENT_MODELS)
        # Beanie keeps one index per set of fields (it sorts them): `created, _id` and
        # `_id, created` are both wanted, so the declared lists are created as they are.
        for model in DOCUMENT_MODELS:
            if indexes := getattr(model.Settings, "indexes", None):
                await db[model.Settings.name].create_indexes(indexes)
        for collection, indexes in GRIDFS_INDEXES.items():
            await db[collection].create_indexes(indexes)
        for kind in ("deployments", "jobs"):
            await ensure_counter(db, kind)


async def next_ids(db: AsyncDatabase[Doc], kind: str, count: int = 1) -> int:
    """Reserve `count` consecutive ids for `kind` with one atomic `$inc`; return the first.

    One shared counter document per kind keeps ids increasing across requests, restarts,
    instances and bulk imports.
    """
    while True:
        doc = await db.counters.find_one_and_update(
            {"_id": kind}, {"$inc": {"seq": count}}, return_document=ReturnDocument.AFTER
        )
        if doc is not None:
            return int(doc["seq"]) - count + 1
        await ensure_counter(db, kind)  # first use on this database


async def ensure_counter(db: AsyncDatabase[Doc], kind: str) -> None:
    """Create the counter at 0 unless it exists; two instances may race here, both fine."""
    with contextlib.suppress(DuplicateKeyError):
        await db.counters.update_one({"_id": kind}, {"$setOnInsert": {"seq": 0}}, upsert=True)


async def raise_counter(db: AsyncDatabase[Doc], kind: str, value: int) -> None:
    """Move the id counter to at least `value`, so ids handed out later never collide."""
    while not (await db.counters.update_one({"_id": kind}, {"$max": {"seq": value}})).matched_count:
        await ensure_counter(db, kind)


async def cursor_secret(db: AsyncDatabase[Doc], configured: str | None) -> bytes:
    """The key for signing cursors: configured, or one random key kept in the database."""
    if configured:
        return configured.encode()
    while (doc := await db.meta.find_one({"_id": "cursor_secret"})) is None:
        with contextlib.suppress(DuplicateKeyError):  # another instance won the race
            await db.meta.insert_one({"_id": "cursor_secret", "value": secrets.token_hex(32)})
    return str(doc["value"]).encode()


@dataclass
class Database:
    """What handlers need from the database: the client, the database, the cursor key."""

    client: AsyncMongoClient[Doc]
    db: AsyncDatabase[Doc]
    cursor_key: bytes
    url: str = field(default="", repr=False)  # may hold a password
    embedded: EmbeddedDatabase | None = None  # set when the service runs its own database


DB = web.AppKey("db", Database)


def run_database_command(work: Coroutine[Any, Any, int]) -> int:
    """Run a command that talks to the database itself: unreachable is exit 1, one line."""
    try:
        return asyncio.run(work)
    except (EmbeddedDatabaseError, PyMongoError) as exc:
        print(f"cannot reach the database: {exc}", file=sys.stderr)
        return 1


@contextlib.asynccontextmanager
async def cli_database(settings: Settings) -> AsyncIterator[AsyncDatabase[Doc]]:
    """MONGODB_URL; else the running service's embedded server; else one just for this."""
    async with contextlib.AsyncExitStack() as stack:
        url = settings.mongodb_url or await running_embedded(settings.data_dir)
        if url is None:
            embedded = await stack.enter_async_context(
                embedded_server(settings.data_dir, settings.embedded_start_timeout_s)
            )
            url = embedded.url
        client: AsyncMongoClient[Doc] = AsyncMongoClient(
            url, tz_aware=True, serverSelectionTimeoutMS=settings.mongodb_timeout_ms
        )
        stack.push_async_callback(client.close)
        yield client[settings.mongodb_db]
