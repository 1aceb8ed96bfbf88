"""Problem types (RFC 9457) and the one middleware that renders every error.

Code anywhere raises a `Problem` (or lets aiohttp raise its HTTP errors, or lets the
driver fail); this module is the only place that turns them into responses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
    WTimeoutError,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
Loc = Sequence[str | int]


class Problem(Exception):
    """An error the client can act on; rendered as problem+json."""

    status = 500
    slug = "internal-error"
    title = "Internal server error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


class MalformedJSON(Problem):
    status, slug, title = 400, "malformed-json", "Malformed JSON"


class BadRequest(Problem):
    status, slug, title = 400, "bad-request", "Bad request"


class Unauthorized(Problem):
    status, slug, title = 401, "unauthorized", "Unauthorized"


class Forbidden(Problem):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(Problem):
    status, slug, title = 404, "not-found", "Not found"


class MethodNotAllowed(Problem):
    status, slug, title = 405, "method-not-allowed", "Method not allowed"


class Conflict(Problem):
    status, slug, title = 409, "conflict", "Conflict"


class RequestTimeout(Problem):
    status, slug, title = 408, "request-timeout", "Request timeout"


class PreconditionFailed(Problem):
    status, slug, title = 412, "precondition-failed", "Precondition failed"


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class RangeNotSatisfiable(Problem):
    status, slug, title = 416, "range-not-satisfiable", "Range not satisfiable"


class UnsupportedMediaType(Problem):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class ValidationFailed(Problem):
    status, slug, title = 422, "validation-error", "Validation failed"


class TooManyRequests(Problem):
    status, slug, title = 429, "too-many-requests", "Too many requests"


class DatabaseUnavailable(Problem):
    status, slug, title = 503, "database-unavailable", "Database unavailable"


class Overloaded(Problem):
    """This instance has as many waiting requests as it allows (a setting); try later."""

    status, slug, title = 503, "overloaded", "Too many waiting requests"


class Gone(Problem):
    """A resume point this service can no longer resume from: reload, then watch anew."""

    status, slug, title = 410, "history-lost", "Resume point no longer available"


class CannotWatch(Problem):
    """The database cannot stream changes (e.g. a standalone mongod): no /events here."""

    status, slug, title = 503, "cannot-watch", "Change events unavailable"


def invalid(loc: Loc, msg: str) -> ValidationFailed:
    """A 422 for one field, e.g. `invalid(["body", "deployment_id"], "no such deployment")`."""
    return ValidationFailed(f"{'.'.join(map(str, loc))}: {msg}", errors=[error(loc, msg)])


def bad_query(name: str, msg: str) -> BadRequest:
    return BadRequest(f"query parameter {name!r}: {msg}", errors=[error(["query", name], msg)])


def error(loc: Loc, msg: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg}


RETRY_AFTER_S = "5"
_DB_DOWN = (ConnectionFailure, AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError)
_DB_SLOW = (ExecutionTimeout, WTimeoutError)


def problem_response(problem: Problem) -> web.Response:
    body: dict[str, Any] = {
        "type": f"/problems/{problem.slug}",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if problem.errors is not None:
        body["errors"] = problem.errors
    response = web.Response(
        status=problem.status,
        body=orjson.dumps(body),
        content_type=PROBLEM_JSON,
        headers=problem.headers,
    )
    if problem.headers.get("Connection") == "close":
        response.force_close()  # e.g. after a body that never arrived
    return response


def _from_http(exc: web.HTTPException) -> Problem:
    """Map aiohttp's own errors (no route, bad method, body too large) to problem types."""
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("No such resource.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(
            f"{exc.method} is not allowed here; allowed: {allowed}.", headers={"Allow": allowed}
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("The request body is larger than the 2 MiB limit.")
    generic = Problem(exc.reason)
    generic.status, generic.title, generic.slug = exc.status, exc.reason, "http-error"
    return generic


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(problem)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            raise
        return problem_response(_from_http(exc))
    except _DB_DOWN + _DB_SLOW as exc:
        log.warning("database unavailable: %s", exc.__class__.__name__)
        return problem_response(
            DatabaseUnavailable(
                "The database did not answer; try again shortly.",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        )
    except OperationFailure as exc:
        if exc.code in {50, 262}:  # MaxTimeMSExpired, ExceededTimeLimit
            return problem_response(
                DatabaseUnavailable(
                    "The database took too long; try again shortly.",
                    headers={"Retry-After": RETRY_AFTER_S},
                )
            )
        log.exception("database error on %s %s", request.method, request.path)
        return problem_response(Problem("The database rejected the operation."))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(Problem("An unexpected error occurred; it has been logged."))
