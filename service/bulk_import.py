"""POST /import/{kind}: NDJSON in, bulk writes out, every bad line reported and skipped.

The body is read line by line (never the whole body, LineReader), each line validated
with the rules of the rest of the API (records.py), and batches are written with
unordered bulk writes. While one batch is written, the next is read and validated.

A client that disconnects (or a database that fails) mid-import leaves the batches
already written in place: an import is not a transaction. Retrying the same file with
`?on_conflict=skip` inserts exactly what is missing, because records that carry their
ids are recognised as already there. (Records without ids get new ids each time, so only
imports that give ids are safely retryable; an export always gives them.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import logging
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pymongo import ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, OperationFailure

from .auth import ANONYMOUS_ADMIN, OwnerRequired, Principal, principal
from .database import DB, Doc, next_ids, raise_counter
from .errors import BadRequest, UnsupportedMediaType, bad_query
from .http import check_query, deadline_stream, json_response
from .jobs import confirm_deployments
from .metrics import IMPORT_ROWS
from .records import NDJSON, DeploymentRecord, JobRecord, Record, RecordError, parse_record
from .store import alongside, now
from .wakeups import WAKEUPS

log = logging.getLogger(__name__)

BATCH_RECORDS = 1000  # records per bulk write
BATCH_BYTES = 8 * 1024 * 1024  # ... or fewer, when the lines are large
MAX_LINE = 16 * 1024 * 1024  # MongoDB's largest document: no valid record is longer
MAX_ERRORS = 1000  # errors listed in the answer; `failed` counts them all
KNOWN_PARENTS_CACHE = 100_000
OnConflict = Literal["fail", "skip", "replace"]
ON_CONFLICT: tuple[OnConflict, ...] = ("fail", "skip", "replace")
DUPLICATE_KEY, BAD_VALUE = 11000, 2  # server error codes


@dataclass(frozen=True)
class Kind:
    name: str  # the collection and the counter
    id_field: str
    model: type[Record]
    has_parent: bool  # jobs must name an existing deployment


KINDS = {
    "deployments": Kind("deployments", "deployment_id", DeploymentRecord, has_parent=False),
    "jobs": Kind("jobs", "job_id", JobRecord, has_parent=True),
}


# --- reading lines ---------------------------------------------------------------------


class LineReader:
    """Numbered lines from a byte stream, holding at most one line (of at most `max_line`
    bytes) and one network chunk. A longer line is skipped and comes out as None.
    """

    def __init__(self, stream: StreamReader, max_line: int = MAX_LINE) -> None:
        self.stream = stream
        self.max_line = max_line
        self.number = 0  # of the last line returned
        self.ready: deque[bytes | None] = deque()  # complete lines not yet returned
        self.head: list[bytes] = []  # the start of an unfinished line
        self.head_size = 0
        self.overflow = False  # the unfinished line is already too long
        self.eof = False

    async def read(self, max_records: int, max_bytes: int) -> list[tuple[int, bytes | None]]:
        """The next lines, up to either limit; an empty list at the end of the stream."""
        lines: list[tuple[int, bytes | None]] = []
        size = 0
        while len(lines) < max_records and size < max_bytes:
            if not self.ready:
                if self.eof:
                    break
                await self._fill()
                continue
            line = self.ready.popleft()
            self.number += 1
            lines.append((self.number, line))
            size += len(line) if line is not None else self.max_line
        return lines

    async def _fill(self) -> None:
        chunk = await self.stream.readany()
        if not chunk:
            self.eof = True
            if self.head_size or self.overflow:  # a last line without a newline
                self.ready.append(self._take())
            return
        *complete, rest = chunk.split(b"\n")
        for part in complete:
            self._extend(part)
            self.ready.append(self._take())
        self._extend(rest)

    def _extend(self, piece: bytes) -> None:
        if self.overflow or not piece:
            return
        self.head_size += len(piece)
        if self.head_size > self.max_line:
            self.head, self.overflow = [], True
        else:
            self.head.append(piece)

    def _take(self) -> bytes | None:
        line = None if self.overflow else b"".join(self.head).removesuffix(b"\r")
        self.head, self.head_size, self.overflow = [], 0, False
        return line


# --- importing -------------------------------------------------------------------------


class IdSet:
    """The ids of one import: recent ones in a set, older ones folded into sorted runs, so
    ids in order (an export) cost almost nothing and any ids at most 16 bytes each.
    """

    FOLD = 65536

    def __init__(self) -> None:
        self.recent: set[int] = set()
        self.starts, self.ends = array("q"), array("q")  # inclusive runs, sorted

    def __contains__(self, n: int) -> bool:
        i = bisect_right(self.starts, n)
        return n in self.recent or (i > 0 and n <= self.ends[i - 1])

    def add(self, n: int) -> bool:
        """Remember `n`; False if it was there already."""
        if n in self:
            return False
        self.recent.add(n)
        if len(self.recent) >= self.FOLD:
            self._fold()
        return True

    def _fold(self) -> None:
        starts, ends = array("q"), array("q")
        runs = heapq.merge(
            zip(self.starts, self.ends, strict=True), ((n, n) for n in sorted(self.recent))
        )
        for start, end in runs:
            if ends and start == ends[-1] + 1:
                ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
        self.starts, self.ends, self.recent = starts, ends, set()


@dataclass
class Batch:
    """Up to BATCH_RECORDS lines on their way in, and what became of them."""

    lines: list[int] = field(default_factory=list)  # the line of each document
    docs: list[Doc] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    received: int = 0
    inserted: int = 0
    replaced: int = 0
    skipped: int = 0

    def fail(self, line: int, detail: str) -> None:
        self.errors.append((line, detail))


@dataclass
class Report:
    received: int = 0
    inserted: int = 0
    replaced: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, batch: Batch) -> None:
        """Batches are added in order, so `errors` holds the first errors by line."""
        self.received += batch.received
        self.inserted += batch.inserted
        self.replaced += batch.replaced
        self.skipped += batch.skipped
        self.failed += len(batch.errors)
        for line, detail in sorted(batch.errors)[: MAX_ERRORS - len(self.errors)]:
            self.errors.append({"line": line, "detail": detail})


class Importer:
    """One import: batches are read and validated while the previous one is written."""

    def __init__(
        self,
        db: AsyncDatabase[Doc],
        kind: Kind,
        on_conflict: OnConflict,
        stream: StreamReader,
        caller: Principal = ANONYMOUS_ADMIN,
    ) -> None:
        self.db = db
        self.kind = kind
        self.on_conflict = on_conflict
        self.caller = caller  # whose records these may be (403 at the first that is not)
        self.reader = LineReader(stream)
        self.given, self.assigned = IdSet(), IdSet()  # ids of this import
        self.known_parents: dict[int, str] = {}  # deployments known to exist, their owners
        self.report = Report()

    async def run(self) -> Report:
        writing: Batch | None = None
        while True:
            _, reading = await alongside(self.write(writing), self.prepare())
            if writing is not None:
                self.report.add(writing)
                count_rows(self.kind.name, writing)
            writing = reading
            if writing is None:
                return self.report

    async def prepare(self) -> Batch | None:
        """Read, parse and check the next lines; give the valid ones their ids."""
        lines = await self.reader.read(BATCH_RECORDS, BATCH_BYTES)
        if not lines:
            return None
        batch, records, at = Batch(), [], now()
        for number, line in lines:
            if line is not None and (not line or line.isspace()):
                continue  # blank lines are allowed and not counted
            batch.received += 1
            if line is None:
                batch.fail(number, f"longer than {MAX_LINE} bytes")
                continue
            try:
                record = parse_record(self.kind.model, line)
                record.user_id = self.caller.claim(record.user_id, [f"line {number}", "user_id"])
                record.complete(at)
            except RecordError as exc:
                batch.fail(number, exc.detail)
                continue
            except OwnerRequired:  # no user_id, and auth disabled: nobody to default to
                batch.fail(number, "user_id: Field required")
                continue
            record_id = record.record_id()
            if record_id is not None and (problem := self.duplicate(record_id)):
                batch.fail(number, f"{self.kind.id_field}: {record_id} {problem}")
                continue
            records.append((number, record))
        if self.kind.has_parent:
            records = await self.check_parents(records, batch)
        await self.assign_ids(records, batch)
        return batch

    def duplicate(self, record_id: int) -> str | None:
        """Each id at most once per import, whether given or handed out by the import."""
        if record_id in self.assigned:
            return (
                "was already handed out to an earlier record without an id in this import "
                "(give ids to all records or to none)"
            )
        return None if self.given.add(record_id) else "appears earlier in this import"

    async def check_parents(
        self, records: list[tuple[int, Record]], batch: Batch
    ) -> list[tuple[int, Record]]:
        """Jobs must name existing deployments: one `$in` query per batch, and a cache."""
        ids = {i for _, record in records if (i := record.parent_id()) is not None}
        missing = ids - self.known_parents.keys()
        found = await self.existing_parents(missing) if missing else {}
        owners = {i: self.known_parents[i] for i in ids & self.known_parents.keys()} | found
        if len(self.known_parents) + len(found) > KNOWN_PARENTS_CACHE:
            self.known_parents.clear()
        self.known_parents |= found
        kept = []
        for number, record in records:
            parent = record.parent_id()
            assert parent is not None and record.user_id is not None  # a job, claimed above
            # The deployment must match auth.same_owner (its owner is the job's, when auth
            # is on); another user's reads exactly like a missing one.
            required = self.caller.same_owner(record.user_id)
            if parent in owners and required.items() <= {"user_id": owners[parent]}.items():
                kept.append((number, record))
            else:
                batch.fail(number, f"deployment_id: no deployment with id {record.parent_id()}")
        return kept

    async def existing_parents(self, ids: set[int]) -> dict[int, str]:
        """The deployments among `ids` that exist, with their owners."""
        cursor = self.db.deployments.find({"_id": {"$in": sorted(ids)}}, {"user_id": 1})
        return {doc["_id"]: doc["user_id"] async for doc in cursor}

    async def assign_ids(self, records: list[tuple[int, Record]], batch: Batch) -> None:
        """Explicit ids first move the counter past them (before they are written, so a
        crash can never leave them ahead of it); the others get ids from one `$inc`.
        """
        given = [i for _, record in records if (i := record.record_id()) is not None]
        if given:
            await raise_counter(self.db, self.kind.name, max(given))
        missing = len(records) - len(given)
        next_id: int | None = None
        if missing:
            try:
                next_id = await next_ids(self.db, self.kind.name, missing)
            except OperationFailure as exc:
                if exc.code != BAD_VALUE:
                    raise
                # Given ids took the counter so close to 2**63 - 1 that `$inc` overflows.
        for number, record in records:
            record_id = record.record_id()
            if record_id is None:
                if next_id is None:
                    batch.fail(number, f"{self.kind.id_field}: no ids are left to hand out")
                    continue
                record_id, next_id = next_id, next_id + 1
                self.assigned.add(record_id)
            batch.lines.append(number)
            batch.docs.append(record.document(record_id))

    async def write(self, batch: Batch | None) -> None:
        """One unordered bulk write; each refused document becomes an error or a skip."""
        if batch is None or not batch.docs:
            return
        collection = self.db[self.kind.name]
        replace = self.on_conflict == "replace"
        result: Mapping[str, Any]
        try:
            if replace:
                # Only the caller's own records are replaced: another user's id is a
                # duplicate key, reported like any record that exists ("already exists").
                owner = self.caller.owner_filter()
                ops = [ReplaceOne({**owner, "_id": d["_id"]}, d, upsert=True) for d in batch.docs]
                result = (await collection.bulk_write(ops, ordered=False)).bulk_api_result
            else:
                await collection.insert_many(batch.docs, ordered=False)
                result = {"writeErrors": [], "upserted": []}
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            result = exc.details
        refused = self.refused(batch, result["writeErrors"])
        upserted = {u["index"] for u in result["upserted"]} if replace else None
        written = [i for i in range(len(batch.docs)) if i not in refused]
        if self.kind.has_parent:
            written = await self.recheck_parents(batch, written, collection)
        for i in written:
            if upserted is None or i in upserted:
                batch.inserted += 1
            else:
                batch.replaced += 1

    def refused(self, batch: Batch, write_errors: list[dict[str, Any]]) -> set[int]:
        refused = set()
        for error in write_errors:
            i = error["index"]
            refused.add(i)
            record_id = f"{self.kind.id_field}: {batch.docs[i]['_id']}"
            if error["code"] != DUPLICATE_KEY:
                batch.fail(batch.lines[i], f"not written: {error.get('errmsg', 'refused')}")
            elif self.on_conflict == "skip":
                batch.skipped += 1
            elif self.on_conflict == "fail" or self.caller.owner_filter():
                batch.fail(batch.lines[i], f"{record_id} already exists")
            else:
                batch.fail(batch.lines[i], f"{record_id} was written concurrently; retry")
        return refused

    async def recheck_parents(
        self, batch: Batch, written: list[int], collection: AsyncCollection[Doc]
    ) -> list[int]:
        """A deployment deleted while its jobs were written takes them back out (as
        jobs.insert_jobs does), so no import leaves a job without its deployment.
        """
        ids: set[int] = {batch.docs[i]["deployment_id"] for i in written}
        gone = ids - set(await confirm_deployments(self.db, ids))
        if not gone:
            return written
        for parent in gone:
            self.known_parents.pop(parent, None)
        orphans = [i for i in written if batch.docs[i]["deployment_id"] in gone]
        await collection.delete_many(
            {
                "_id": {"$in": [batch.docs[i]["_id"] for i in orphans]},
                "deployment_id": {"$in": list(gone)},
            }
        )
        for i in orphans:
            detail = f"deployment_id: deployment {batch.docs[i]['deployment_id']} was deleted"
            batch.fail(batch.lines[i], f"{detail} during the import")
        gone = set(orphans)
        return [i for i in written if i not in gone]


def count_rows(kind: str, batch: Batch) -> None:
    """/metrics, batch by batch, so a long import shows its progress."""
    outcomes = {
        "inserted": batch.inserted,
        "replaced": batch.replaced,
        "skipped": batch.skipped,
        "failed": len(batch.errors),
    }
    for outcome, rows in outcomes.items():
        if rows:
            IMPORT_ROWS.labels(kind=kind, outcome=outcome).inc(rows)


async def import_records(request: web.Request, kind_name: str) -> web.Response:
    check_query(request, "on_conflict")
    kind = KINDS[kind_name]
    values = request.query.getall("on_conflict", ["fail"])
    if len(values) > 1 or values[0] not in ON_CONFLICT:
        raise bad_query("on_conflict", f"must be given once, as one of {', '.join(ON_CONFLICT)}")
    on_conflict: OnConflict = values[0]
    if request.content_type != NDJSON:
        raise UnsupportedMediaType(
            f"Content-Type must be {NDJSON}, not {request.content_type or 'empty'!r}."
        )
    stream = deadline_stream(request)  # each read within BODY_TIMEOUT_S
    importer = Importer(request.app[DB].db, kind, on_conflict, stream, principal(request))
    started = asyncio.get_running_loop().time()
    try:
        report = await importer.run()
    except (ConnectionError, HttpProcessingError) as exc:
        log.warning(
            "import of %s stopped at line %d, the request body broke off (%s); "
            "batches already written stay, a retry with on_conflict=skip completes it",
            kind.name,
            importer.reader.number,
            exc.__class__.__name__,
        )
        raise BadRequest("The request body broke off before its end.") from None
    except Exception:
        log.warning(
            "import of %s failed at line %d; batches already written stay, "
            "a retry with on_conflict=skip completes it",
            kind.name,
            importer.reader.number,
        )
        raise
    log.info(
        "import of %s: %d received, %d inserted, %d replaced, %d skipped, %d failed in %.1fs",
        kind.name,
        report.received,
        report.inserted,
        report.replaced,
        report.skipped,
        report.failed,
        asyncio.get_running_loop().time() - started,
    )
    if kind.name == "jobs" and report.inserted + report.replaced:
        request.app[WAKEUPS].notify()  # waiting claims may take the new jobs
    return json_response(dataclasses.asdict(report))


routes = [
    web.post(f"/import/{name}", functools.partial(import_records, kind_name=name)) for name in KINDS
]
