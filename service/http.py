"""Small request/response helpers shared by the resource modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from .auth import body_deadline
from .errors import BadRequest, NotFound, UnsupportedMediaType, bad_query
from .schemas import M, validate_body
from .store import Page

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
MAX_JSON_BODY = 2 * 1024 * 1024


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
