"""The data layer's shared machinery: one-round-trip conditional updates and list pages.

Every change is one `find_one_and_update` whose filter states all its preconditions
(revision, status, sizes). When it matches nothing, the record is read once to say
precisely why; if the record changed in between so that the update would now apply,
it is tried again. A size the database cannot measure exactly (JSON) is bounded in the
filter; past the bound it is checked on the record as read, and the update then applies
only to that revision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection

from .database import Doc
from .errors import Conflict, NotFound, PreconditionFailed, Problem, invalid
from .merge_patch import merge_expression, merged_size_guard, merged_size_problem
from .pagination import ListQuery, encode_cursor

MAX_ATTEMPTS = 5


def now() -> datetime:
    """The current time at BSON's millisecond precision."""
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


@dataclass
class Update:
    """One atomic pipeline update under construction."""

    filter: dict[str, Any]
    set: dict[str, Any]
    checks: list[dict[str, Any]]  # `$expr` conditions the stored record must meet
    # The exact rule that `checks` only bound (they are sufficient, not necessary), for a
    # stored record that fails them: a Problem, or None to apply the update to it after all.
    recheck: Callable[[Doc], Problem | None] | None = None


def field_updates(changes: dict[str, Any], defaults: dict[str, Any]) -> Update:
    """Translate a validated merge patch of plain fields and `data` into one update.

    `null` resets a field to its default; `data` is merged in the database.
    """
    update = Update(filter={}, set={}, checks=[])
    for name, value in changes.items():
        if name == "data" and isinstance(value, dict):
            merged = merge_expression("$data", value)
            update.set["data"] = merged
            update.checks.append(merged_size_guard(merged))
            update.recheck = functools.partial(_data_size, value)
        elif value is None and name in defaults:
            update.set[name] = {"$literal": defaults[name]}
        else:
            update.set[name] = {"$literal": value}
    return update


async def apply_update(
    collection: AsyncCollection[Doc],
    record_id: int,
    update: Update,
    revision: int | None,
    explain: Callable[[Doc], Problem | None],
    what: str,
    owner: Doc,
) -> Doc:
    """Run `update` on one record (bumping its revision) and return the new record.

    `explain(stored)` names the precondition a stored record fails, or None if none.
    `owner` (auth.owner_filter) hides other users' records: they are 404 like missing ones.
    """
    flt: dict[str, Any] = {**update.filter, **owner, "_id": record_id}
    if revision is not None:
        flt["revision"] = revision
    if update.checks:
        flt["$expr"] = {"$and": update.checks}
    stage = {**update.set, "revision": {"$add": ["$revision", 1]}}
    for _ in range(MAX_ATTEMPTS):
        doc = await collection.find_one_and_update(
            flt, [{"$set": stage}], return_document=ReturnDocument.AFTER
        )
        if doc is not None:
            return doc
        stored = await get_checked(collection, record_id, revision, what, owner)
        problem = explain(stored)
        if problem is not None:
            raise problem
        if update.recheck is not None:
            if (problem := update.recheck(stored)) is not None:
                raise problem
            exact = {k: v for k, v in flt.items() if k != "$expr"}
            doc = await collection.find_one_and_update(
                {**exact, "revision": stored["revision"]},
                [{"$set": stage}],
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                return doc
    raise Conflict(f"The {what} changed too often to update; try again.")


def _data_size(patch: Any, stored: Doc) -> Problem | None:
    msg = merged_size_problem(stored.get("data"), patch)
    return None if msg is None else invalid(["body", "data"], f"{msg}; nothing changed")


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
    cursor = collection.find(query.mongo_filter(), projection)
    cursor = cursor.sort(query.mongo_sort()).limit(query.limit + 1)
    docs = await cursor.to_list(None)
    more = len(docs) > query.limit
    items = docs[: query.limit]
    next_cursor = encode_cursor(query, items[-1], key) if more else None
    total = await collection.count_documents(query.filter) if query.count else None
    return Page(items, next_cursor, total)
