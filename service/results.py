"""/jobs/{job_id}/results: a job's output files, streamed into and out of GridFS.

The bytes live in the standard GridFS collections (`fs.files`, `fs.chunks`, 255 KiB
chunks), so `gridfs.AsyncGridFSBucket` and every other GridFS tool can read them; each
file's `metadata` names its `job_id` and result `name`. What analysts query is the job's
`results` list: one entry per name, pointing at its GridFS file by a private `file_id`.

An upload writes a new GridFS file first and only then swaps the job's entry to it in one
atomic update, so readers see the old file until the new one is complete; then the old
file is deleted. An upload that fails or is cut off deletes what it wrote.

Chunks are written here, in batches of 4 MiB, rather than through the bucket's upload
stream: that one buffers up to 48 MiB of chunk documents per upload before its first
insert, which with the encoded message took a process to ~240 MB peak RSS for one
64 MiB upload (measured once by hand; bench/results.py measures this module). Reading
goes through the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import quote

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError
from bson import Int64, ObjectId
from gridfs import DEFAULT_CHUNK_SIZE, AsyncGridFSBucket, NoFile
from gridfs.asynchronous.grid_file import AsyncGridOut
from pymongo.asynchronous.database import AsyncDatabase

from .auth import owner_filter
from .database import DB, Doc
from .errors import (
    BadRequest,
    Conflict,
    MalformedJSON,
    NotFound,
    PayloadTooLarge,
    Problem,
    RangeNotSatisfiable,
    UnsupportedMediaType,
    ValidationFailed,
    error,
    invalid,
)
from .http import check_query, json_response, path_id, read_deadline
from .merge_patch import data_errors
from .models import BUCKET, CHUNKS, FILES, ResultFile
from .schemas import (
    MAX_CONTENT_TYPE,
    MAX_METADATA,
    JSONError,
    check_result_name,
    error_summary,
    is_media_type,
    parse_json,
    public_result,
)
from .settings import SETTINGS, Settings
from .store import now

log = logging.getLogger(__name__)

routes = web.RouteTableDef()
CHUNK_SIZE = DEFAULT_CHUNK_SIZE  # 255 KiB, the GridFS default
BATCH_CHUNKS = 16  # chunks per insert (~4 MiB); two batches in memory per upload
MAX_SWAPS = 50  # compare-and-swap attempts; each failure means another writer got through
METADATA_HEADER = "X-Result-Metadata"
DEFAULT_CONTENT_TYPE = "application/octet-stream"
NAME_PATH = "/jobs/{job_id}/results/{name:[^/]+}"  # any name aiohttp can hand over

Read = Callable[[int], Awaitable[bytes]]  # up to n bytes; fewer only at the end


# --- validation -----------------------------------------------------------------------


def path_name(request: web.Request) -> str:
    """The result name in the path, by the rules of schemas.check_result_name (else 422)."""
    try:
        return check_result_name(request.match_info["name"])
    except ValueError as exc:
        raise invalid(["path", "name"], str(exc)) from None


def parse_content_type(header: str | None) -> str:
    """The media type to store and serve back; absent means application/octet-stream."""
    if header is None or not header.strip():
        return DEFAULT_CONTENT_TYPE
    value = header.strip()
    if not is_media_type(value):
        raise UnsupportedMediaType(
            f"Content-Type {value[:100]!r} is not a media type such as 'text/csv' "
            f"(at most {MAX_CONTENT_TYPE} characters)."
        )
    return value


def parse_metadata(header: str | None) -> dict[str, Any]:
    """`X-Result-Metadata`: a small JSON object, kept with the same rules as `data`."""
    if header is None:
        return {}
    loc = ["header", METADATA_HEADER]
    raw = header.encode("utf-8", "surrogateescape")  # aiohttp decodes headers that way
    if len(raw) > MAX_METADATA:
        raise invalid(loc, f"larger than {MAX_METADATA} bytes")
    try:
        value = parse_json(raw)
    except JSONError as exc:
        raise MalformedJSON(
            f"{METADATA_HEADER} is not valid JSON: {exc}", errors=[error(loc, "not valid JSON")]
        ) from None
    if not isinstance(value, dict):
        raise invalid(loc, "must be a JSON object")
    if errs := data_errors(value, loc):
        raise ValidationFailed(error_summary(errs), errors=errs)
    return value


# --- data layer -----------------------------------------------------------------------


async def list_results(db: AsyncDatabase[Doc], job_id: int, owner: Doc) -> list[Doc]:
    doc = await db.jobs.find_one({**owner, "_id": job_id}, {"results": 1})
    if doc is None:
        raise NotFound(f"No job with id {job_id}.")
    return list(doc.get("results") or [])


async def get_result(db: AsyncDatabase[Doc], job_id: int, name: str, owner: Doc) -> Doc:
    """`owner` (auth.owner_filter): another user's job is 404 exactly like a missing one."""
    flt = {**owner, "_id": job_id}
    doc = await db.jobs.find_one(flt, {"results": {"$elemMatch": {"name": name}}})
    if doc is None:
        raise NotFound(f"No job with id {job_id}.")
    if not doc.get("results"):
        raise NotFound(f"Job {job_id} has no result named {name!r}.")
    entry: Doc = doc["results"][0]
    return entry


async def open_result(
    db: AsyncDatabase[Doc], job_id: int, name: str, owner: Doc
) -> tuple[Doc, AsyncGridOut]:
    """The entry and its open GridFS file; a replace may delete the file just read: re-read."""
    bucket = AsyncGridFSBucket(db, BUCKET)
    for _ in range(3):
        entry = await get_result(db, job_id, name, owner)
        if entry.get("file_id") is None:  # listed by a bulk import, which moves no bytes
            raise NotFound(
                f"Result {name!r} of job {job_id} was imported without its bytes; "
                "upload them with PUT."
            )
        try:
            return entry, await bucket.open_download_stream(entry["file_id"])
        except NoFile:
            continue
    log.error("result %r of job %d points at a missing GridFS file", name, job_id)
    raise Problem(f"The file of result {name!r} is missing from the database.")


async def store_result(
    db: AsyncDatabase[Doc],
    job_id: int,
    name: str,
    content_type: str,
    metadata: dict[str, Any],
    read: Read,
    settings: Settings,
    owner: Doc,
) -> tuple[Doc, bool]:
    """Write the file, then point the job's entry at it; return (entry, replaced an old one)."""
    await _current(db, job_id, name, settings.max_results_per_job, owner)  # 404/409 before reading
    file_id, size, sha256 = await write_file(db, job_id, name, read, settings.max_result_bytes)
    entry = ResultFile(
        name=name,
        content_type=content_type,
        size=size,
        sha256=sha256,
        created=now(),
        metadata=metadata,
        file_id=file_id,
    ).document()
    try:
        replaced, old = await _swap_in(db, job_id, entry, settings.max_results_per_job, owner)
    except BaseException:
        await _cleanup(delete_files(db, [file_id]))
        raise
    if old is not None:
        await _cleanup(delete_files(db, [old]))
    return entry, replaced


async def write_file(
    db: AsyncDatabase[Doc], job_id: int, name: str, read: Read, max_bytes: int
) -> tuple[ObjectId, int, str]:
    """Stream `read` into a new GridFS file; return its id, size and sha256.

    One batch of chunks is being inserted while the next is read, so the network and
    the database work at the same time and memory stays at two batches. On any failure
    (too large, connection lost, cancelled) the insert in flight is let finish and
    everything written is deleted before the error goes on.
    """
    file_id = ObjectId()
    digest = hashlib.sha256()
    size = n = 0
    batch: list[Doc] = []
    inserting: asyncio.Future[Any] | None = None
    try:
        while True:
            data = await read(CHUNK_SIZE)
            size += len(data)
            if size > max_bytes:
                raise PayloadTooLarge(f"A result file may be at most {max_bytes} bytes.")
            if data:
                digest.update(data)
                batch.append({"files_id": file_id, "n": n, "data": data})
                n += 1
            last = len(data) < CHUNK_SIZE
            if batch and (last or len(batch) >= BATCH_CHUNKS):
                if inserting is not None:
                    await asyncio.shield(inserting)
                inserting = asyncio.ensure_future(db[CHUNKS].insert_many(batch))
                batch = []
            if last:
                break
        if inserting is not None:
            await asyncio.shield(inserting)
        await db[FILES].insert_one(
            {
                "_id": file_id,
                "length": Int64(size),
                "chunkSize": CHUNK_SIZE,
                "uploadDate": now(),
                "filename": name,
                "metadata": {"job_id": job_id, "name": name},
            }
        )
    except BaseException:
        await _cleanup(_abandon(db, file_id, inserting))
        raise
    return file_id, size, digest.hexdigest()


async def _abandon(db: AsyncDatabase[Doc], file_id: ObjectId, inserting: Any) -> None:
    """Delete a partial file, after its last insert has landed (or failed)."""
    if inserting is not None:
        with contextlib.suppress(Exception):
            await inserting
    await delete_files(db, [file_id])


async def _swap_in(
    db: AsyncDatabase[Doc], job_id: int, entry: Doc, max_results: int, owner: Doc
) -> tuple[bool, Any]:
    """Put `entry` in place of the one with its name (or append it); return whether it
    replaced one, and the old file id (None: none, or an imported entry without bytes).

    Compare-and-swap on the old entry's `file_id`, so the file replaced is known for
    certain (SecantusDB's findAndModify can return a stale pre-image under concurrency).
    """
    name = entry["name"]
    for _ in range(MAX_SWAPS):
        exists, old = await _current(db, job_id, name, max_results, owner)
        if not exists:
            flt = {
                **owner,
                "_id": job_id,
                "results.name": {"$ne": name},
                "$expr": {"$lt": [{"$size": {"$ifNull": ["$results", []]}}, max_results]},
            }
            update: Any = {"$push": {"results": entry}, "$inc": {"revision": 1}}
        else:
            flt = {
                **owner,
                "_id": job_id,
                "results": {"$elemMatch": {"name": name, "file_id": old}},
            }
            new = {"$literal": entry}
            # $literal: a client's name like "$x" or "$$x" would be a path or a variable here.
            same = {"$eq": ["$$this.name", {"$literal": name}]}
            swap = {"$cond": [same, new, "$$this"]}
            update = [
                {
                    "$set": {
                        "results": {"$map": {"input": "$results", "in": swap}},
                        "revision": {"$add": ["$revision", 1]},
                    }
                }
            ]
        if (await db.jobs.update_one(flt, update)).modified_count:
            return exists, old
    raise Conflict(f"Result {name!r} of job {job_id} changed too often to replace; try again.")


async def _current(
    db: AsyncDatabase[Doc], job_id: int, name: str, max_results: int, owner: Doc
) -> tuple[bool, Any]:
    """Whether `name` has an entry now and its file id (None for an imported entry without
    bytes); (False, None) when there is room for it as a new name."""
    flt = {**owner, "_id": job_id}
    doc = await db.jobs.find_one(flt, {"results.name": 1, "results.file_id": 1})
    if doc is None:
        raise NotFound(f"No job with id {job_id}.")
    entries = doc.get("results") or []
    for e in entries:
        if e["name"] == name:
            return True, e.get("file_id")
    if len(entries) >= max_results:
        raise Conflict(
            f"Job {job_id} already has {max_results} result files, the most it may have; "
            "delete one or replace one by its name."
        )
    return False, None


async def delete_result(db: AsyncDatabase[Doc], job_id: int, name: str, owner: Doc) -> None:
    """Remove the entry that points at the file read, then that file."""
    for _ in range(MAX_SWAPS):
        file_id = (await get_result(db, job_id, name, owner)).get("file_id")  # None: imported
        entry = {"$elemMatch": {"name": name, "file_id": file_id}}
        flt = {**owner, "_id": job_id, "results": entry}
        update = {"$pull": {"results": {"name": name}}, "$inc": {"revision": 1}}
        if (await db.jobs.update_one(flt, update)).modified_count:
            if file_id is not None:
                await _cleanup(delete_files(db, [file_id]))
            return
    raise Conflict(f"Result {name!r} of job {job_id} changed too often to delete; try again.")


async def delete_files(db: AsyncDatabase[Doc], file_ids: list[Any]) -> None:
    """Chunks first: a failure in between leaves a file document to find, never lost chunks."""
    if file_ids:
        await db[CHUNKS].delete_many({"files_id": {"$in": file_ids}})
        await db[FILES].delete_many({"_id": {"$in": file_ids}})


async def delete_job_files(db: AsyncDatabase[Doc], job_ids: list[int]) -> None:
    """Every GridFS file of these jobs, in batches."""
    flt = {"metadata.job_id": {"$in": job_ids}}
    while ids := [d["_id"] async for d in db[FILES].find(flt, {"_id": 1}).limit(1000)]:
        await delete_files(db, ids)


async def _cleanup(work: Coroutine[Any, Any, None]) -> None:
    """Finish a deletion even if the request is cancelled meanwhile; log, don't raise, a
    failure: the request's outcome is already decided and must not be masked by it."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except Exception:
        log.exception("could not delete a result file")


# --- HTTP helpers ---------------------------------------------------------------------


def body_reader(content: StreamReader) -> Read:
    """Exactly n bytes at a time from the request body; a cut-off body is a 400."""

    async def read(n: int) -> bytes:
        try:
            return await content.readexactly(n)
        except asyncio.IncompleteReadError as end:
            return end.partial
        except (ConnectionError, HttpProcessingError) as exc:
            raise BadRequest(f"The request body was cut off: {exc}") from None

    return read


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range asked for as (first, last), inclusive; None means the whole file.

    A malformed header, another unit, or several ranges are ignored (RFC 9110 14.2).
    """
    if header is None:
        return None
    unit, eq, spec = header.partition("=")
    match = re.fullmatch(r"[ \t]*(\d*)[ \t]*-[ \t]*(\d*)[ \t]*", spec)
    if not eq or unit.strip().lower() != "bytes" or not match or match[0].strip() == "-":
        return None
    first, last = (_number(g) for g in match.groups())
    if first is not None:
        if last is not None and last < first:
            return None
        if first >= size:
            raise _unsatisfiable(size)
        return first, size - 1 if last is None else min(last, size - 1)
    assert last is not None
    if last == 0 or size == 0:
        raise _unsatisfiable(size)
    return max(size - last, 0), size - 1


def _number(digits: str) -> int | None:
    return None if not digits else int(digits[:19]) if len(digits) <= 19 else 2**63


def _unsatisfiable(size: int) -> Problem:
    return RangeNotSatisfiable(
        f"The range lies outside the file of {size} bytes.",
        headers={"Content-Range": f"bytes */{size}"},
    )


def etag_matches(header: str | None, etag: str, weak: bool) -> bool:
    """Whether `If-None-Match` (weak comparison) or `If-Range` (strong) names `etag`."""
    if header is None:
        return False
    if header.strip() == "*":
        return weak
    tags = [t.strip() for t in header.split(",")] if weak else [header.strip()]
    return any((t.removeprefix("W/") if weak else t) == etag for t in tags)


def file_headers(entry: Doc) -> dict[str, str]:
    name: str = entry["name"]
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return {
        "ETag": f'"{entry["sha256"]}"',
        "Content-Disposition": (
            f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
        ),
        "Accept-Ranges": "bytes",
        "X-Content-Type-Options": "nosniff",
    }


def result_location(job_id: int, name: str) -> str:
    return f"/jobs/{job_id}/results/{quote(name, safe='')}"


# --- handlers -------------------------------------------------------------------------


@routes.get("/jobs/{job_id}/results")
async def list_all(request: web.Request) -> web.Response:
    job_id = path_id(request, "job_id", "job")
    check_query(request)
    entries = await list_results(request.app[DB].db, job_id, owner_filter(request))
    return json_response({"items": [public_result(e) for e in entries]})


@routes.put(NAME_PATH)
async def upload(request: web.Request) -> web.Response:
    job_id = path_id(request, "job_id", "job")
    name = path_name(request)
    check_query(request)
    content_type = parse_content_type(request.headers.get("Content-Type"))
    metadata = parse_metadata(request.headers.get(METADATA_HEADER))
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_result_bytes:
        raise PayloadTooLarge(f"A result file may be at most {settings.max_result_bytes} bytes.")
    entry, replaced = await store_result(
        request.app[DB].db,
        job_id,
        name,
        content_type,
        metadata,
        read_deadline(request, body_reader(request.content)),
        settings,
        owner_filter(request),
    )
    headers = {"ETag": f'"{entry["sha256"]}"'}
    if not replaced:
        headers["Location"] = result_location(job_id, name)
    return json_response(public_result(entry), 200 if replaced else 201, headers)


@routes.get(NAME_PATH)
async def download(request: web.Request) -> web.StreamResponse:
    job_id = path_id(request, "job_id", "job")
    name = path_name(request)
    check_query(request)
    entry, grid_out = await open_result(request.app[DB].db, job_id, name, owner_filter(request))
    try:
        headers = file_headers(entry)
        if etag_matches(request.headers.get("If-None-Match"), headers["ETag"], weak=True):
            return web.Response(status=304, headers=headers)
        return await _send(request, entry, grid_out, headers)
    finally:
        await grid_out.close()


async def _send(
    request: web.Request, entry: Doc, grid_out: AsyncGridOut, headers: dict[str, str]
) -> web.StreamResponse:
    """`headers`: the entry's `file_headers`."""
    size: int = entry["size"]
    headers = {**headers, "Content-Type": entry["content_type"]}
    wanted = parse_range(request.headers.get("Range"), size)
    if_range = request.headers.get("If-Range")
    if (
        wanted is not None
        and if_range is not None
        and not etag_matches(if_range, headers["ETag"], weak=False)
    ):
        wanted = None
    first, last = wanted or (0, size - 1)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    response = web.StreamResponse(status=206 if wanted else 200, headers=headers)
    response.content_length = last - first + 1
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    try:
        await grid_out.seek(first)
        remaining = last - first + 1
        while remaining > 0:
            chunk = await grid_out.readchunk()
            if not chunk:
                raise RuntimeError("the GridFS file ended early")
            await response.write(chunk[:remaining])
            remaining -= len(chunk)
    except Exception as exc:  # the status is sent: only closing the connection can tell
        log.warning("download of %r stopped: %s: %s", entry["name"], type(exc).__name__, exc)
        response.force_close()
        return response
    await response.write_eof()
    return response


@routes.delete(NAME_PATH)
async def delete(request: web.Request) -> web.Response:
    job_id = path_id(request, "job_id", "job")
    name = path_name(request)
    check_query(request)
    await delete_result(request.app[DB].db, job_id, name, owner_filter(request))
    return web.Response(status=204)
