"""GET /events: server-sent events of job changes, from this instance's change feed.

A stream reads the feed's backlog (service/changes.py) from its own position and sends
the events its caller may see and asked for, in the order of the changes. It ends with a
last event saying why:
- `dropped`: it fell out of the backlog (the client reads too slowly); reconnect with
  Last-Event-ID and nothing is lost, as long as the database still has the changes;
- `end`: it was open EVENTS_MAX_S, or the service is stopping; reconnect likewise;
- `reset`: the feed had to start afresh, or the resume point is gone: reload, then watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from aiohttp import web
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.errors import OperationFailure

from .auth import owner_filter
from .changes import CATCH_UPS, CHANGES, HISTORY_LOST, ChangeFeed, JobEvent, job_event
from .database import DB, Doc, make_client
from .errors import RETRY_AFTER_S, BadRequest, CannotWatch
from .http import GONE_CHECK_S, client_gone
from .metrics import EVENT_STREAMS, EVENT_STREAMS_DROPPED
from .pagination import FilterKind, parse_filters
from .settings import SETTINGS, Settings
from .wakeups import WAKEUPS, Limit

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

EVENT_FILTERS: dict[str, tuple[str, FilterKind]] = {
    "user_id": ("user_id", "str"),
    "deployment_id": ("deployment_id", "int"),
    "job_id": ("job_id", "int"),
}
EVENT_ID = re.compile(r"[0-9A-Fa-f]{2,4096}")  # a resume token's hex string
CHUNK_BYTES = 64 * 1024  # one write holds about this much, so a stuck one holds no more
FINAL_WRITE_S = 1.0  # a last event that cannot be sent by then is not sent
STREAMS = web.AppKey("event_streams", Limit)


class Ended(Exception):
    """The stream ends with this final event."""

    def __init__(self, event: str, reason: str) -> None:
        super().__init__(reason)
        self.frame = b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps({"reason": reason}))


@dataclass(frozen=True)
class Scope:
    """Which events a stream sends: those matching every filter (the caller's own user's,
    unless an admin). An event whose owner is unknown matches no user filter."""

    fields: dict[str, object]
    nothing: bool = False

    def __call__(self, event: JobEvent) -> bool:
        return not self.nothing and all(getattr(event, k) == v for k, v in self.fields.items())


def event_scope(request: web.Request) -> Scope:
    flt = parse_filters(request.query, EVENT_FILTERS, fixed=owner_filter(request))
    # A filter that clashes with what the caller may see matches nothing (as in the lists).
    return Scope({}, nothing=True) if "$and" in flt else Scope(flt)


# --- writing --------------------------------------------------------------------------


class Sender:
    """Writes to one stream. A write the client does not take is given up (the client is
    too slow) once the stream fell out of the backlog meanwhile, or, for a write with no
    backlog position (a heartbeat, a catch-up event), after EVENTS_HEARTBEAT_S; so a stuck
    client holds at most one chunk, and its place, only that long."""

    def __init__(
        self, request: web.Request, response: web.StreamResponse, feed: ChangeFeed, end: float
    ) -> None:
        self.request, self.response, self.feed, self.end = request, response, feed, end
        self.heartbeat_s = request.app[SETTINGS].events_heartbeat_s
        self.last_write = asyncio.get_running_loop().time()

    async def send(self, data: bytes, needed: int | None = None) -> None:
        """Write `data`; `needed`: the backlog position the stream reads next."""
        loop = asyncio.get_running_loop()
        self.last_write = loop.time()
        if not self.request.protocol.writing_paused:
            await self.response.write(data)  # does not wait: the socket takes it
            return
        write = asyncio.ensure_future(self.response.write(data))
        while not write.done():
            await asyncio.wait({write}, timeout=self.heartbeat_s)
            behind = needed is None or needed < self.feed.first
            if not write.done() and (behind or self.feed.closing or loop.time() > self.end):
                write.cancel()
                raise too_slow()
        write.result()

    async def heartbeat_if_due(self) -> None:
        if asyncio.get_running_loop().time() - self.last_write >= self.heartbeat_s:
            await self.send(b": keep-alive\n\n")

    async def final(self, ended: Ended) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.response.write(ended.frame), FINAL_WRITE_S)


def too_slow() -> Ended:
    EVENT_STREAMS_DROPPED.inc()
    return Ended(
        "dropped",
        "this stream fell too far behind the changes (EVENTS_BACKLOG); reconnect with "
        "Last-Event-ID to go on where it stopped",
    )


# --- reading --------------------------------------------------------------------------


async def catch_up(
    sender: Sender, stream: AsyncChangeStream[Doc], scope: Scope, deadline: float
) -> int:
    """Send the changes of a private stream until one is in the backlog; its position."""
    feed, loop = sender.feed, asyncio.get_running_loop()
    generation, last = feed.generation, None
    while True:
        if last is not None and (seq := feed.position(last)) is not None:
            return seq + 1
        check_open(feed, generation, deadline, loop.time())
        try:
            change = await stream.try_next()
        except OperationFailure as exc:
            if exc.code in HISTORY_LOST:
                raise lost() from None
            raise
        if change is None and not stream.alive:
            raise lost()  # closed by the database: it cannot go on from there
        event = None if change is None else job_event(change)
        if event is None:
            await sender.heartbeat_if_due()
            continue
        if (seq := feed.position(event.id)) is not None:
            return seq
        if scope(event):
            await sender.send(event.frame)
        last = event.id


async def follow(sender: Sender, seq: int, scope: Scope, deadline: float) -> None:
    """Send the backlog's events from `seq` on, as they come, until the stream ends."""
    feed, loop = sender.feed, asyncio.get_running_loop()
    generation = feed.generation
    while True:
        check_open(feed, generation, deadline, loop.time())
        if seq < feed.first:
            raise too_slow()
        data, seq = feed.read(seq, scope, CHUNK_BYTES)
        if data:
            await sender.send(data, needed=seq)
            continue
        wait = min(sender.heartbeat_s, deadline - loop.time(), GONE_CHECK_S)
        if not await feed.wait_new(seq, wait):
            if client_gone(sender.request):
                return  # its place frees now, not at the next heartbeat
            await sender.heartbeat_if_due()


def check_open(feed: ChangeFeed, generation: int, deadline: float, now: float) -> None:
    if feed.closing:
        raise Ended("end", "the service is stopping; reconnect with Last-Event-ID")
    if feed.generation != generation:
        raise lost()
    if now >= deadline:
        raise Ended("end", "streams last EVENTS_MAX_S; reconnect with Last-Event-ID")


def lost() -> Ended:
    return Ended(
        "reset",
        "the changes since this stream's position are no longer available: reload what you "
        "show, then open /events without Last-Event-ID",
    )


def start_point(feed: ChangeFeed, last_id: str | None) -> int | None:
    """Where a stream starts in the backlog: now, or after the event `last_id`; None when
    that event is not in the backlog (then a catch-up stream starts there)."""
    if last_id is None:
        return feed.end
    if not EVENT_ID.fullmatch(last_id):
        raise BadRequest("Last-Event-ID must be the id of an event of /events.")
    seq = feed.position(last_id)
    return None if seq is None else seq + 1


# --- handler, and the feed's life -----------------------------------------------------


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    scope = event_scope(request)
    feed, settings = request.app[CHANGES], request.app[SETTINGS]
    if not feed.available:
        retry = {} if feed.cannot_watch else {"Retry-After": RETRY_AFTER_S}  # it may start yet
        raise CannotWatch(f"/events is unavailable: {feed.reason}.", headers=retry)
    async with request.app[STREAMS].slot():
        last_id = request.headers.get("Last-Event-ID", "").strip() or None
        start = start_point(feed, last_id)
        private = (
            None if start is not None or last_id is None else await feed.open_catch_up(last_id)
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # proxies such as nginx: pass each event on at once
            }
        )
        response.force_close()  # the connection ends with the stream: no reuse after it
        deadline = asyncio.get_running_loop().time() + settings.events_max_s
        sender = Sender(request, response, feed, deadline)
        EVENT_STREAMS.inc()
        try:
            await response.prepare(request)
            await sender.send(b": connected\n\n")
            if private is not None:
                stream, private = private, None
                try:
                    start = await catch_up(sender, stream, scope, deadline)
                finally:
                    await feed.end_catch_up(stream)  # its turn ends once it joined the backlog
            assert start is not None
            await follow(sender, start, scope, deadline)
        except Ended as ended:
            await sender.final(ended)
        except ConnectionResetError:
            pass  # the client went away
        finally:
            EVENT_STREAMS.dec()
            if private is not None:
                await feed.end_catch_up(private)
    return response


async def changes_ctx(app: web.Application) -> AsyncIterator[None]:
    """This instance's change feed and its reader; after the database's context."""
    settings: Settings = app[SETTINGS]
    # Its own connections: a change stream holds one in every wait for changes, which must
    # not take the requests' (MONGODB_POOL_SIZE). One for the feed, one per catch-up.
    pool = settings.model_copy(update={"mongodb_pool_size": CATCH_UPS + 1})
    client = make_client(app[DB].url, pool, timed=False)
    feed = app[CHANGES] = ChangeFeed(client[settings.mongodb_db], settings)
    app[STREAMS] = Limit(settings.max_streams, "event streams are open", "MAX_STREAMS")
    reader = asyncio.create_task(feed.run())
    with contextlib.suppress(TimeoutError):  # the first requests find it watching
        await asyncio.wait_for(feed.started.wait(), settings.mongodb_timeout_ms / 1000)
    yield
    feed.stop()  # by an event: the driver may swallow a cancellation mid-command
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(reader, 5)
    await client.close()


async def end_waits(app: web.Application) -> None:
    """On SIGTERM, before in-flight requests are waited for: streams and waits end now."""
    app[CHANGES].close()
    app[WAKEUPS].notify()  # waiting claims see `closing` and answer 204
