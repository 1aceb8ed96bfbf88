"""This instance's one change stream of the database, fanned out in memory.

One `watch` of the jobs and deployments collections (never one per client) feeds:
- the backlog: the latest job changes, each encoded once as a server-sent event frame.
  Every /events stream reads it at its own pace through its own position (a sequence
  number), so a slow stream costs memory only for the backlog, shared by all; one that
  falls out of the backlog is dropped (service/events.py);
- the waiters: a GET with `wait_s` waits on `changed((collection, id))`;
- the claims: a new PENDING job calls `on_pending` (the waiting claims' wake-up).

An event's id is the change stream's resume token, so a client can resume on any
instance: from the backlog when the token is in it, else through a short-lived catch-up
stream of its own (`catch_up`) until it reaches the backlog.

Deletes carry no document; whose job it was comes from the pre-image, which needs
`changeStreamPreAndPostImages` on the jobs collection (MongoDB 6.0+; switched on at start).
Without it a delete is shown to admins only. Where the database cannot watch at all (a
standalone mongod), `available` is False: /events answers 503 and waiters poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure, PyMongoError

from .database import Doc
from .errors import RETRY_AFTER_S, BadRequest, Gone, Overloaded
from .schemas import public_job
from .settings import Settings

log = logging.getLogger(__name__)

POLL_S = 1.0  # where nothing can be watched, a waiter looks again this often
AWAIT_MS = 1000  # each read of the stream returns within this, so stopping is prompt
RETRY_S = 1.0  # after the stream failed (the database is down), open it again after this
NO_REPLICA_SET = 40573  # "The $changeStream stage is only supported on replica sets"
CATCH_UPS = 4  # catch-up streams at once (each holds a connection while it waits)
CATCH_UP_WAIT_S = 10.0  # a resume waits this long for its turn, then is 503
HISTORY_LOST = {286, 280}  # ChangeStreamHistoryLost; ChangeStreamFatalError (token not found)
Key = tuple[str, int]  # (collection, _id)

PIPELINE: list[Doc] = [
    {
        "$match": {
            "ns.coll": {"$in": ["jobs", "deployments"]},
            "operationType": {"$in": ["insert", "update", "replace", "delete"]},
        }
    },
    # Of a pre-image, only what a delete event needs: whose job it was.
    {
        "$addFields": {
            "fullDocumentBeforeChange": {
                "$cond": [
                    {"$eq": ["$operationType", "delete"]},
                    {
                        "user_id": "$fullDocumentBeforeChange.user_id",
                        "deployment_id": "$fullDocumentBeforeChange.deployment_id",
                    },
                    "$$REMOVE",
                ]
            }
        }
    },
]


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One change of one job, as /events sends it."""

    id: str  # the change's resume token
    job_id: int
    user_id: str | None  # None: not known (a delete without a pre-image): admins only
    deployment_id: int | None
    frame: bytes  # the whole server-sent event


def job_event(change: Doc) -> JobEvent | None:
    """The event of a change of a job; None for other collections and for an update whose
    job was deleted before it could be read (its delete event follows)."""
    if change["ns"].get("coll") != "jobs":
        return None
    token: str = change["_id"]["_data"]
    job_id = change["documentKey"]["_id"]
    if change["operationType"] == "delete":
        owner = change.get("fullDocumentBeforeChange") or {}
        user_id, deployment_id = owner.get("user_id"), owner.get("deployment_id")
        data: Doc = {"job_id": job_id, "deleted": True}
    else:
        doc = change.get("fullDocument")
        if doc is None:
            return None
        user_id, deployment_id = doc.get("user_id"), doc.get("deployment_id")
        try:
            data = public_job(doc)
        except Exception:  # a job document the service did not write: skip, keep watching
            log.exception("cannot show the change of job %r", job_id)
            return None
    frame = b"id: %s\nevent: job\ndata: %s\n\n" % (token.encode(), orjson.dumps(data))
    return JobEvent(token, job_id, user_id, deployment_id, frame)


class ChangeFeed:
    def __init__(self, db: AsyncDatabase[Doc], settings: Settings) -> None:
        self._db = db
        self._max_events = settings.events_backlog
        self._max_bytes = settings.events_backlog_mib * 1024 * 1024
        self.available = False
        self.cannot_watch = False  # the database refused to stream changes (no replica set)
        self.reason = "the service is still starting to watch the database"
        self.closing = False  # the service is stopping: every wait ends now
        self.generation = 0  # +1 when the stream had to start afresh: positions before mean nothing
        self.on_pending: Callable[[], None] = lambda: None
        self._pre_images = False
        # The backlog: _events[i] has sequence number _base + i; those before _start are
        # already evicted (kept until the list is compacted).
        self._events: list[JobEvent] = []
        self._base = self._start = self._bytes = 0
        self._index: dict[str, int] = {}  # event id -> sequence number
        self._new: asyncio.Future[None] | None = None  # resolved when events arrive
        self._wake_soon = False
        self._waiters: dict[Key, set[asyncio.Future[None]]] = {}
        self._stop = asyncio.Event()
        self.catch_ups = asyncio.Semaphore(CATCH_UPS)
        self.started = asyncio.Event()  # set once the stream was first opened (or refused)

    # --- the backlog, for /events ------------------------------------------------------

    @property
    def first(self) -> int:
        """Sequence number of the oldest event still in the backlog."""
        return self._base + self._start

    @property
    def end(self) -> int:
        """Sequence number the next event will get."""
        return self._base + len(self._events)

    def position(self, event_id: str) -> int | None:
        """Sequence number of the event with that id, if it is in the backlog."""
        return self._index.get(event_id)

    def read(
        self, seq: int, wanted: Callable[[JobEvent], bool], max_bytes: int
    ) -> tuple[bytes, int]:
        """Frames of the wanted events from `seq` on, up to about `max_bytes`; and the
        sequence number to read from next."""
        frames, size = [], 0
        i = seq - self._base
        while i < len(self._events) and size < max_bytes:
            event = self._events[i]
            i += 1
            if wanted(event):
                frames.append(event.frame)
                size += len(event.frame)
        return b"".join(frames), self._base + i

    async def wait_new(self, seq: int, seconds: float) -> bool:
        """Until there is an event at `seq` (True), `seconds` passed or the feed stops."""
        if self.end > seq or self.closing:
            return True
        if self._new is None:
            self._new = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._new), seconds)
        return self.end > seq

    def _append(self, event: JobEvent) -> None:
        self._index[event.id] = self.end
        self._events.append(event)
        self._bytes += len(event.frame)
        while self.end - self.first > self._max_events or self._bytes > self._max_bytes:
            old = self._events[self._start]
            del self._index[old.id]
            self._bytes -= len(old.frame)
            self._start += 1
        if self._start > 1024 and self._start * 2 > len(self._events):
            del self._events[: self._start]
            self._base += self._start
            self._start = 0

    def _wake_streams(self) -> None:
        self._wake_soon = False
        if self._new is not None and not self._new.done():
            self._new.set_result(None)
        self._new = None

    # --- waiters -----------------------------------------------------------------------

    def changed(self, key: Key) -> asyncio.Future[None]:
        """Resolved at the next change of that record; `forget` it when done waiting."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(future)
        return future

    def forget(self, key: Key, future: asyncio.Future[None]) -> None:
        waiting = self._waiters.get(key)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiters[key]

    async def wait_changed(self, future: asyncio.Future[None], seconds: float) -> None:
        """Until the change `future` stands for, or `seconds` (POLL_S when nothing is watched)."""
        if not self.available:
            seconds = min(seconds, POLL_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), seconds)

    def _wake_waiters(self, key: Key) -> None:
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(None)

    # --- the stream --------------------------------------------------------------------

    def _options(self) -> Doc:
        options: Doc = {"full_document": "updateLookup", "max_await_time_ms": AWAIT_MS}
        if self._pre_images:
            options["full_document_before_change"] = "whenAvailable"
        return options

    async def run(self) -> None:
        """Read the stream until `stop()`; reopened after a failure where it left off."""
        with contextlib.suppress(PyMongoError):
            pre_images = {"changeStreamPreAndPostImages": {"enabled": True}}
            await self._db.command({"collMod": "jobs", **pre_images})
            self._pre_images = True
        if not self._pre_images:
            log.warning("no pre-images on this database: deleted jobs are shown to admins only")
        token: Mapping[str, Any] | None = None
        while not self._stop.is_set():
            exc_code = None
            try:
                # start_after, unlike resume_after, also goes on after an invalidate event.
                async with await self._db.watch(
                    PIPELINE, start_after=token, **self._options()
                ) as stream:
                    self.available, self.cannot_watch = True, False
                    self.started.set()
                    while not self._stop.is_set():
                        change = await stream.try_next()
                        token = stream.resume_token
                        if change is not None:
                            self._publish(change)
                        elif not stream.alive:  # the server closed it (e.g. invalidated)
                            log.warning("change stream closed by the database; reopening")
                            break
            except OperationFailure as exc:
                exc_code, token = exc.code, self._failed(exc, token)
            except PyMongoError as exc:
                log.warning("change stream interrupted (%s); reopening", exc.__class__.__name__)
            self.started.set()
            await self._pause(RETRY_S if exc_code != NO_REPLICA_SET else 30 * RETRY_S)

    def _failed(
        self, exc: OperationFailure, token: Mapping[str, Any] | None
    ) -> Mapping[str, Any] | None:
        if exc.code == NO_REPLICA_SET:
            self.available, self.cannot_watch = False, True
            self.reason = "this database cannot stream changes (it is not a replica set)"
            log.warning("%s: /events answers 503, waiting GETs poll", self.reason)
            return None
        if exc.code in HISTORY_LOST:
            log.warning("change stream fell out of the database's history; starting afresh")
            self._reset()
            return None
        log.error("change stream failed: %s", exc)
        return token

    def _reset(self) -> None:
        """Start a new backlog: streams reading the old one end with a `reset` event."""
        self.generation += 1
        self._base, self._events, self._start, self._bytes = self.end, [], 0, 0
        self._index.clear()
        self._wake_streams()
        for key in list(self._waiters):
            self._wake_waiters(key)

    def _publish(self, change: Doc) -> None:
        key = (change["ns"].get("coll", ""), change["documentKey"]["_id"])
        self._wake_waiters(key)
        doc = change.get("fullDocument") or {}
        # A new PENDING job (created, retried, imported): not every change of one, or each
        # PATCH of a PENDING job would send every waiting claim to look again.
        is_new = change["operationType"] in ("insert", "replace")
        if key[0] == "jobs" and is_new and doc.get("task_status") == "PENDING":
            self.on_pending()
        event = job_event(change)
        if event is not None:
            self._append(event)
            if not self._wake_soon:  # once per batch the stream read, not once per event
                self._wake_soon = True
                asyncio.get_running_loop().call_soon(self._wake_streams)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def open_catch_up(self, event_id: str) -> AsyncChangeStream[Doc]:
        """A stream of the changes after `event_id`, for a client resuming from a point no
        longer (or not yet) in the backlog; `end_catch_up` it once it reached the backlog.
        At most CATCH_UPS at once: 503 after waiting CATCH_UP_WAIT_S for a turn; 410 when
        the database no longer has the changes after that point."""
        try:
            await asyncio.wait_for(self.catch_ups.acquire(), CATCH_UP_WAIT_S)
        except TimeoutError:
            raise Overloaded(
                f"{CATCH_UPS} streams are catching up from a Last-Event-ID already; try again.",
                headers={"Retry-After": RETRY_AFTER_S},
            ) from None
        try:
            return await self._db.watch(
                PIPELINE, resume_after={"_data": event_id}, **self._options()
            )
        except OperationFailure as exc:
            self.catch_ups.release()
            if exc.code in HISTORY_LOST:
                raise Gone(
                    "Last-Event-ID is older than the changes the database keeps: reload what "
                    "you show, then open /events without Last-Event-ID."
                ) from None
            why = (exc.details or {}).get("errmsg", exc.code)
            raise BadRequest(f"Last-Event-ID is not an event id of this service: {why}") from None
        except BaseException:
            self.catch_ups.release()
            raise

    async def end_catch_up(self, stream: AsyncChangeStream[Doc]) -> None:
        try:
            await stream.close()
        finally:
            self.catch_ups.release()

    def close(self) -> None:
        """The service is stopping: end every wait and stream now."""
        self.closing = True
        self._wake_streams()
        for key in list(self._waiters):
            self._wake_waiters(key)

    def stop(self) -> None:
        self._stop.set()


CHANGES = web.AppKey("changes", ChangeFeed)
