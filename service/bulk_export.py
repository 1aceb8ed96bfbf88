"""GET /export/{kind}: every matching record in its public shape, one a line, by id.

Streamed from one driver cursor (the next batch is read while this one is written), so
memory stays constant; the lines are records (records.py), so an export re-imports
exactly.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from .auth import owner_filter
from .database import DB, Doc, analytics_source, analytics_time_limit
from .errors import bad_query
from .pagination import DEPLOYMENT_FILTERS, JOB_FILTERS, PAGING, FilterKind, parse_filters
from .records import NDJSON
from .schemas import public_deployment, public_job
from .settings import SETTINGS
from .store import alongside

log = logging.getLogger(__name__)

EXPORT_BATCH = 1000  # documents a cursor batch, read while the last one is written
EXPORT_SLICE = 100  # documents a write


@dataclass(frozen=True)
class Export:
    public: Callable[[Doc], Doc]  # the line written for each stored document
    filters: dict[str, tuple[str, FilterKind]]  # those of the list endpoint


EXPORTS = {  # by collection
    "deployments": Export(public_deployment, DEPLOYMENT_FILTERS),
    "jobs": Export(public_job, JOB_FILTERS),
}


async def export_records(request: web.Request, kind: str) -> web.StreamResponse:
    """The list filters, sorted by id, streamed from one cursor with backpressure."""
    export = EXPORTS[kind]
    for name in request.query:
        if name in PAGING:
            raise bad_query(name, "unknown query parameter (an export is neither paged nor sorted)")
    flt = parse_filters(request.query, export.filters, fixed=owner_filter(request))
    settings = request.app[SETTINGS]
    source = await analytics_source(request.app[DB].db, settings)  # may be a secondary
    cursor = source[kind].find(flt).sort("_id", 1).batch_size(EXPORT_BATCH)
    try:
        # Each read has MONGODB_ANALYTICS_TIMEOUT_MS: the first may sort the whole collection.
        with analytics_time_limit(settings):
            batch = await cursor.to_list(EXPORT_BATCH)  # a database that is down is a 503
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)
        try:
            while batch:  # the next batch is read while this one is written
                with analytics_time_limit(settings):
                    batch, _ = await alongside(
                        cursor.to_list(EXPORT_BATCH), write_lines(response, export, batch)
                    )
            await response.write_eof()
        except ConnectionError:
            log.info("export of %s: the client went away", kind)
        except Exception:
            # The status is sent: break the stream off so the client sees it incomplete.
            log.exception("export of %s failed mid-stream", kind)
            if request.transport is not None:
                request.transport.close()
        return response
    finally:
        await cursor.close()


async def write_lines(response: web.StreamResponse, export: Export, docs: list[Doc]) -> None:
    """In slices, so that the read of the next batch gets going early."""
    dumps, public = orjson.dumps, export.public
    for start in range(0, len(docs), EXPORT_SLICE):
        slice_ = docs[start : start + EXPORT_SLICE]
        await response.write(b"".join([dumps(public(doc)) + b"\n" for doc in slice_]))


routes = [
    # HEAD would run the whole export to throw it away: not offered (405).
    web.get(f"/export/{kind}", functools.partial(export_records, kind=kind), allow_head=False)
    for kind in EXPORTS
]
