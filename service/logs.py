"""Structured logs: one JSON object a line, each carrying the id of the request it serves.

The request id is the client's `X-Request-ID` when that is printable ASCII of at most 200
characters, else a new uuid4 hex. It is returned in the `X-Request-ID` response header (on
every response, errors and 404s included) and is on every line logged while the request is
handled, through a context variable, so one grep finds everything about one request.

The access log replaces aiohttp's: one line per request with the method, the route template
(`/jobs/{job_id}`, never the raw path), the status and the duration; the same middleware
feeds those figures to the HTTP metrics. Never log bodies, headers or settings that may
hold secrets; `install_log_redaction` keeps aiohttp from logging the start of a malformed
header (which may be an Authorization header).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .metrics import HTTP_IN_FLIGHT, observe_request

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 200
UNMATCHED = "unmatched"  # the route label of requests no route matched (404, 405)
CANCELLED = 499  # the status logged when a request was cancelled before it was answered

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
REQUEST_ID = web.RequestKey("request_id", str)

access_log = logging.getLogger("service.access")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id", ...extra, "exception"?}`."""

    _second = -1
    _prefix = ""

    def _time(self, created: float) -> str:
        """RFC 3339 UTC with milliseconds; the part up to the second is formatted once."""
        second = int(created)
        if second != self._second:
            stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._second, self._prefix = second, stamp
        return f"{self._prefix}{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stderr (stdout stays free for command output such as exports)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The JSON lines show none of these; not collecting them saves ~10 us per line (the
    # access log writes one per request). `_srcfile = None` is logging's documented switch
    # for skipping the caller lookup.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # pymongo's DEBUG command log carries whole documents, i.e. request bodies.
    logging.getLogger("pymongo").setLevel(max(logging.INFO, logging.getLevelName(level)))


class RedactParseErrors(logging.Filter):
    """aiohttp logs a malformed or oversized request line or header with its start, which
    may be an Authorization header: keep the log line, drop the quoted bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.msg}: {exc.__class__.__name__} (its text is not logged)"
            record.exc_info, record.exc_text = None, None
        return True


def install_log_redaction() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RedactParseErrors) for f in logger.filters):
        logger.addFilter(RedactParseErrors())


def valid_request_id(value: str) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable()


def route_template(request: web.Request) -> str:
    """`/jobs/{job_id}` for `/jobs/7`: a bounded set of names for logs and metric labels."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: set the request id; at the end, the access line and metrics."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if valid_request_id(given) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    token = request_id_var.set(request_id)
    start = time.perf_counter()
    status = 500
    HTTP_IN_FLIGHT.inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # only what the problem middleware lets through
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = CANCELLED
        raise
    finally:
        HTTP_IN_FLIGHT.dec()
        seconds = time.perf_counter() - start
        route = route_template(request)
        observe_request(request.method, route, status, seconds)
        duration_ms = round(seconds * 1000, 3)
        access_log.info(
            "%s %s %d %.1fms",
            request.method,
            route,
            status,
            duration_ms,
            extra={
                "method": request.method,
                "route": route,
                "status": status,
                "duration_ms": duration_ms,
            },
        )
        request_id_var.reset(token)


async def add_request_id_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """`on_response_prepare`: right before headers go out, also for streamed responses."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
