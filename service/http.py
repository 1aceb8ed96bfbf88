"""Small request/response helpers shared by the resource modules, and the limits every
request is read within.

- `body_deadline(request)`: around every read of a whole request body (a slow body is 408);
  for streamed bodies, where a total deadline would cut off large uploads, each read must
  finish within it: `read_deadline(request, read)` or `deadline_stream(request)`;
- `HEADER_LIMITS`: the request line and header sizes aiohttp's parser accepts;
- `conditional_get`: GET of one record with If-None-Match, and `wait_s` to wait for a change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import orjson
from aiohttp import StreamReader, web

from .changes import CHANGES, Key
from .errors import BadRequest, NotFound, RequestTimeout, UnsupportedMediaType, bad_query
from .schemas import M, validate_body
from .settings import SETTINGS
from .store import Page
from .wakeups import WAKEUPS

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
MAX_JSON_BODY = 2 * 1024 * 1024
# aiohttp's parser answers 400 (plain text, before any middleware) beyond these.
HEADER_LIMITS = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 100}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def record_response(
    record: dict[str, Any], status: int = 200, location: str | None = None
) -> web.Response:
    headers = {"ETag": f'"{record["revision"]}"'}
    if location:
        headers["Location"] = location
    return json_response(record, status, headers)


async def read_body(request: web.Request, model: type[M], *, patch: bool = False) -> M:
    check_query(request)
    allowed = (JSON, MERGE_PATCH) if patch else (JSON,)
    if request.content_type not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type must be {' or '.join(allowed)}, not {request.content_type or 'empty'!r}."
        )
    async with body_deadline(request):
        raw = await request.read()
    return validate_body(model, raw)


async def read_optional_body(request: web.Request, model: type[M]) -> M:
    """`read_body` where the body may be left out entirely (then every field's default)."""
    if not request.body_exists:
        check_query(request)
        return validate_body(model, b"{}")
    return await read_body(request, model)


def path_id(request: web.Request, name: str, what: str) -> int:
    """Ids are positive 64-bit integers; any other spelling names no record (404)."""
    raw = request.match_info[name]
    if raw.isascii() and raw.isdigit() and len(raw) <= 19 and 0 < int(raw) < 2**63:
        return int(raw)
    raise NotFound(f"No {what} with id {raw!r}.")


def if_match(request: web.Request) -> int | None:
    """The revision an `If-Match: "<revision>"` header requires; None when absent or `*`."""
    header = request.headers.get("If-Match")
    if header is None or header.strip() == "*":
        return None
    tag = header.strip()
    digits = tag[1:-1]
    malformed = len(tag) < 3 or tag[0] != '"' or tag[-1] != '"'
    if malformed or not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        raise BadRequest(f'If-Match must be "<revision>" or *, not {header!r}.')
    return int(digits)


def if_none_match(request: web.Request) -> set[int] | None:
    """Revisions an `If-None-Match` header names (`"3"`, `W/"3"`, a list; `*`: any, as
    {-1}); None when absent."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return None
    if header.strip() == "*":
        return {-1}
    revisions = set()
    for tag in header.split(","):
        digits = tag.strip().removeprefix("W/")
        if len(digits) < 3 or digits[0] != '"' or digits[-1] != '"':
            digits = ""
        digits = digits[1:-1]
        if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
            raise BadRequest(f'If-None-Match must list "<revision>" tags or be *, not {header!r}.')
        revisions.add(int(digits))
    return revisions


def wait_param(request: web.Request) -> float:
    """`wait_s`, the one query parameter of a GET of one record: 0-60 seconds, default 0."""
    check_query(request, "wait_s")
    values = request.query.getall("wait_s", ["0"])
    try:
        seconds = float(values[0])
    except ValueError:
        seconds = -1.0
    if len(values) > 1 or not 0 <= seconds <= 60:
        raise bad_query("wait_s", "must be given once, as a number of seconds from 0 to 60")
    return seconds


GONE_CHECK_S = 1.0  # a waiting request looks this often whether its client went away


def client_gone(request: web.Request) -> bool:
    """Whether the client closed the connection (aiohttp does not cancel the handler then):
    a request waiting for it must stop, and free its place."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def conditional_get(
    request: web.Request,
    read: Callable[[], Awaitable[dict[str, Any]]],
    key: Key,
    render: Callable[[dict[str, Any]], dict[str, Any]],
) -> web.Response:
    """The record `read()` returns, or 304 when If-None-Match names its revision; with
    `wait_s`, a 304 only after waiting that long for the revision to change (answered as
    soon as it does: the instance's change stream wakes the wait)."""
    seconds, known = wait_param(request), if_none_match(request)

    def unchanged(doc: dict[str, Any]) -> bool:
        return known is not None and (doc["revision"] in known or -1 in known)

    loop, feed = asyncio.get_running_loop(), request.app[CHANGES]
    deadline = loop.time() + seconds
    # Taken before reading, so that no change slips in between the read and the wait.
    changed = feed.changed(key) if known is not None and seconds > 0 else None
    try:
        doc = await read()
        if changed is not None and unchanged(doc):
            async with request.app[WAKEUPS].slot():
                while unchanged(doc) and (left := deadline - loop.time()) > 0:
                    if feed.closing or client_gone(request):
                        break
                    await feed.wait_changed(changed, min(left, GONE_CHECK_S))
                    if feed.available and not changed.done():
                        continue  # no change: it only woke to see if the client is there
                    feed.forget(key, changed)
                    changed = feed.changed(key)
                    doc = await read()
    finally:
        if changed is not None:
            feed.forget(key, changed)
    if unchanged(doc):
        return web.Response(status=304, headers={"ETag": f'"{doc["revision"]}"'})
    return record_response(render(doc))


def page_response(
    request: web.Request, page: Page, render: Callable[[dict[str, Any]], dict[str, Any]]
) -> web.Response:
    """`{"items", "next_cursor"[, "total"]}` and an RFC 8288 `Link` to the next page."""
    body: dict[str, Any] = {
        "items": [render(doc) for doc in page.items],
        "next_cursor": page.next_cursor,
    }
    if page.total is not None:
        body["total"] = page.total
    headers = {}
    if page.next_cursor is not None:
        query = request.rel_url.query.copy()
        query["cursor"] = page.next_cursor
        headers["Link"] = f'<{request.rel_url.with_query(query)}>; rel="next"'
    return json_response(body, headers=headers)


def check_query(request: web.Request, *allowed: str) -> None:
    """Endpoints refuse query parameters they do not know (400) rather than ignore them."""
    for name in request.query:
        if name not in allowed:
            raise bad_query(name, "unknown query parameter")


def query_flag(request: web.Request, name: str) -> bool:
    """The one boolean query parameter an endpoint takes (`true`/`false`); anything else: 400."""
    check_query(request, name)
    values = request.query.getall(name, ["false"])
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise bad_query(name, "must be given once, as true or false")
    return values[0] == "true"


# --- body deadlines ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def body_deadline(request: web.Request) -> AsyncIterator[None]:
    """A body not received within BODY_TIMEOUT_S is a 408 (and the connection closes)."""
    deadline = asyncio.timeout(request.app[SETTINGS].body_timeout_s)
    try:
        async with deadline:
            yield
    except TimeoutError:
        if not deadline.expired():
            raise
        raise RequestTimeout(
            "The request body did not arrive in time.", headers={"Connection": "close"}
        ) from None


def read_deadline(
    request: web.Request, read: Callable[[int], Awaitable[bytes]]
) -> Callable[[int], Awaitable[bytes]]:
    """For streamed bodies (no total deadline: files may be large): each read must finish
    within BODY_TIMEOUT_S, so a stalled upload ends in 408 instead of holding on forever."""

    async def timed(n: int) -> bytes:
        async with body_deadline(request):
            return await read(n)

    return timed


class _DeadlineStream:
    """`request.content`, for readers that use `readany` (bulk imports), with a deadline
    on each read."""

    def __init__(self, request: web.Request) -> None:
        self.request = request

    async def readany(self) -> bytes:
        async with body_deadline(self.request):
            return await self.request.content.readany()


def deadline_stream(request: web.Request) -> StreamReader:
    """The request body as a stream whose every `readany` must finish within
    BODY_TIMEOUT_S (only `readany` is offered)."""
    return cast(StreamReader, _DeadlineStream(request))
