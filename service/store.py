"""The data layer's shared machinery: conditional updates, list pages, and `alongside`
for the bulk paths (a database round trip while the stream is read or written).

Every change reads the record, decides in Python what it becomes (the rules see exactly
what is stored), and writes that with one `update_one` conditioned on the revision it
read. A concurrent change makes the condition fail; the record is then read again and the
change decided anew, so nothing is lost and two requests never both win a transition.
Both queries are equality lookups by `_id`, which every planner, SecantusDB's included,
answers from the index (SecantusDB's findAndModify scans the whole collection).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pymongo.asynchronous.collection import AsyncCollection

from .database import Doc
from .errors import Conflict, NotFound, PreconditionFailed, ValidationFailed
from .merge_patch import apply_merge_patch, merge_operations, merged_data_errors
from .pagination import ListQuery, encode_cursor

# Each failed attempt means another request's change landed, so n concurrent changes of
# one record need at most n attempts; past this many, the client is told to try again.
MAX_ATTEMPTS = 64
A = TypeVar("A")
B = TypeVar("B")


def now() -> datetime:
    """The current time at BSON's millisecond precision."""
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


@dataclass
class Change:
    """What one update does to a stored record: the record after it, and the operators."""

    stored: Doc
    after: Doc = field(init=False)
    sets: Doc = field(default_factory=dict)
    unsets: list[str] = field(default_factory=list)
    pushes: Doc = field(default_factory=dict)
    unchanged: bool = False  # set by a decision to leave the record as it is

    def __post_init__(self) -> None:
        self.after = {**self.stored, "revision": self.stored["revision"] + 1}

    def set(self, name: str, value: Any) -> None:
        self.after[name] = self.sets[name] = value

    def push(self, name: str, value: Any) -> None:
        self.after[name] = [*self.stored.get(name, []), value]
        self.pushes[name] = value

    def merge(self, name: str, patch: Any) -> None:
        """RFC 7396 merge of `patch` into the field, written as the paths it changes."""
        stored = self.stored.get(name)
        merged = apply_merge_patch(stored, patch)
        if errors := merged_data_errors(merged, ["body", name]):
            raise ValidationFailed(errors[0]["msg"], errors=errors)
        sets, unsets = merge_operations(stored, patch, name)
        self.after[name] = merged
        self.sets.update(sets)
        self.unsets.extend(unsets)

    def update(self) -> Doc:
        operators: Doc = {"$inc": {"revision": 1}}
        if self.sets:
            operators["$set"] = self.sets
        if self.unsets:
            operators["$unset"] = dict.fromkeys(self.unsets, "")
        if self.pushes:
            operators["$push"] = self.pushes
        return operators


def field_changes(change: Change, changes: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Apply a validated merge patch of plain fields and `data` to `change`.

    `null` resets a field to its default; an object for `data` is merged into it.
    """
    for name, value in changes.items():
        if name == "data" and isinstance(value, dict):
            change.merge(name, value)
        elif value is None and name in defaults:
            change.set(name, defaults[name])
        else:
            change.set(name, value)


async def update_record(
    collection: AsyncCollection[Doc],
    record_id: int,
    decide: Callable[[Change], None],
    revision: int | None,
    what: str,
    owner: Doc,
) -> Doc:
    """Change one record as `decide(change)` says, given the record as stored; return it.

    `decide` raises the domain error (409, 422) when the stored record does not allow the
    change. `revision` is the client's If-Match (412 when it differs). `owner`
    (auth.owner_filter) hides other users' records: they are 404 like missing ones.
    """
    for attempt in range(MAX_ATTEMPTS):
        stored = await get_checked(collection, record_id, revision, what, owner)
        change = Change(stored)
        decide(change)
        if change.unchanged:
            return stored
        flt = {"_id": record_id, "revision": stored["revision"]}
        if (await collection.update_one(flt, change.update())).matched_count:
            return change.after
        if attempt >= 4:  # a crowd on one record: spread the retries out
            await asyncio.sleep(random.uniform(0, 0.002 * attempt))
    raise Conflict(f"The {what} changed too often to update; try again.")


async def get_checked(
    collection: AsyncCollection[Doc],
    record_id: int,
    revision: int | None,
    what: str,
    owner: Doc,
) -> Doc:
    doc = await collection.find_one({**owner, "_id": record_id})
    if doc is None:
        raise NotFound(f"No {what} with id {record_id}.")
    if revision is not None and doc.get("revision") != revision:
        raise PreconditionFailed(
            f"If-Match requires revision {revision}, the {what} is at {doc.get('revision')}."
        )
    return doc


@dataclass
class Page:
    items: list[Doc]
    next_cursor: str | None
    total: int | None


async def fetch_page(
    collection: AsyncCollection[Doc],
    query: ListQuery,
    key: bytes,
    projection: dict[str, Any] | None = None,
) -> Page:
    """One page in index order; one extra document tells whether there is a next page."""
    docs: list[Doc] = []
    for flt, order in query.reads():
        wanted = query.limit + 1 - len(docs)
        if wanted <= 0:
            break
        docs += await collection.find(flt, projection).sort(order).limit(wanted).to_list(None)
    more = len(docs) > query.limit
    items = docs[: query.limit]
    next_cursor = encode_cursor(query, items[-1], key) if more else None
    total = await collection.count_documents(query.filter) if query.count else None
    return Page(items, next_cursor, total)


async def alongside(first: Coroutine[Any, Any, A], second: Coroutine[Any, Any, B]) -> tuple[A, B]:
    """Run both at once (`first` starts first); if one fails, the other is cancelled and
    the error is raised as it is.
    """
    try:
        async with asyncio.TaskGroup() as group:
            one, two = group.create_task(first), group.create_task(second)
    except BaseExceptionGroup as exc:
        raise exc.exceptions[0] from None
    return one.result(), two.result()
