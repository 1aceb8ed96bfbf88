"""List queries: filters, sorts, and keyset pagination with signed opaque cursors.

A page is `filter AND (sort key, _id) beyond the last item`, read in index order with a
limit, so a page deep in a large collection costs the same as the first (ListQuery.reads).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from multidict import MultiMapping

from .errors import bad_query
from .lifecycle import TaskStatus
from .schemas import parse_rfc3339

DEFAULT_LIMIT, MAX_LIMIT = 50, 1000
FilterKind = Literal["str", "int", "after", "before", "status"]

# query parameter -> (document field, kind)
DEPLOYMENT_FILTERS: dict[str, tuple[str, FilterKind]] = {
    "user_id": ("user_id", "str"),
    "created_after": ("created", "after"),
    "created_before": ("created", "before"),
}
JOB_FILTERS: dict[str, tuple[str, FilterKind]] = {
    "user_id": ("user_id", "str"),
    "deployment_id": ("deployment_id", "int"),
    "task_status": ("task_status", "status"),
    "started_after": ("started_at", "after"),
    "started_before": ("started_at", "before"),
    "finished_after": ("finished_at", "after"),
    "finished_before": ("finished_at", "before"),
}
DEPLOYMENT_SORTS = {"id": "_id"}
JOB_SORTS = {"id": "_id", "started_at": "started_at"}
PAGING = {"limit", "cursor", "sort", "count"}

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class ListQuery:
    filter: dict[str, Any] = field(default_factory=dict)
    sort_field: str = "_id"
    descending: bool = False
    limit: int = DEFAULT_LIMIT
    count: bool = False
    after: tuple[Any, int] | None = None  # (sort value, _id) of the previous page's last item
    fingerprint: str = ""  # what a cursor is bound to: the filters and the sort

    def reads(self) -> list[tuple[dict[str, Any], list[tuple[str, int]]]]:
        """The (filter, sort) pairs that read this page, in order, until it is full.

        Each filter is flat (the keyset bound beside the filters, no `$and`/`$or`): both
        MongoDB and SecantusDB turn that into index bounds, while SecantusDB scans every
        match of `{"$and": [filter, keyset]}` or an `$or` keyset. After a cursor, a
        `started_at` sort reads the rest of the last item's tie (same `started_at`,
        further `_id`s), then what lies beyond it. Equalities come first in each filter:
        one SecantusDB cannot plan whole (two ranges, say) it reads through the index of
        its first indexed condition.
        """
        direction = -1 if self.descending else 1
        order = [(self.sort_field, direction), ("_id", direction)]
        if self.sort_field == "_id":
            order = order[1:]
        reads = [(self.filter, order)]
        if self.after is not None:
            value, last_id = self.after
            op = "$lt" if self.descending else "$gt"
            reads = [(_bounded(self.filter, "_id", op, last_id), order)]
            if self.sort_field != "_id":
                tie = {self.sort_field: value, **reads[0][0]}  # its value first: the fewest
                tie[self.sort_field] = value  # within any window on the sort field
                beyond = _bounded(self.filter, self.sort_field, op, value)
                reads = [(tie, [("_id", direction)]), (beyond, order)]
        return [(_equalities_first(flt), sort) for flt, sort in reads]


def _equalities_first(flt: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(flt.items(), key=lambda item: isinstance(item[1], dict)))


def _bounded(flt: dict[str, Any], name: str, op: str, value: Any) -> dict[str, Any]:
    """`flt` with `name` also `op` (`$gt`/`$lt`) `value`, still one flat filter."""
    if "$and" in flt:  # a filter clashing with the owner scope: it matches nothing anyway
        return {"$and": [flt, {name: {op: value}}]}
    conditions = dict(flt.get(name, {}))
    if op in conditions:  # e.g. started_before's $lt: the tighter bound wins
        value = min(value, conditions[op]) if op == "$lt" else max(value, conditions[op])
    return {**flt, name: {**conditions, op: value}}


def parse_list_query(
    params: MultiMapping[str],
    filters: dict[str, tuple[str, FilterKind]],
    sorts: dict[str, str],
    key: bytes,
    fixed: dict[str, Any] | None = None,
) -> ListQuery:
    """Validate every query parameter; anything unknown, repeated or malformed is a 400.

    `fixed` conditions always apply (a deployment's jobs, auth.owner_filter); cursors are
    bound to them, so a cursor never crosses to another deployment or user.
    """
    query = ListQuery(filter=parse_filters(params, filters, PAGING, fixed))
    sort = params.get("sort", "id")
    if sort.removeprefix("-") not in sorts:
        raise bad_query("sort", f"must be one of {', '.join(_sort_names(sorts))}")
    query.sort_field, query.descending = sorts[sort.removeprefix("-")], sort.startswith("-")
    query.limit = _int_param(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    query.count = _bool_param(params, "count")
    query.fingerprint = _fingerprint(params, sort, fixed)
    if "cursor" in params:
        query.after = decode_cursor(params["cursor"], query, key)
    return query


def parse_filters(
    params: MultiMapping[str],
    filters: dict[str, tuple[str, FilterKind]],
    allowed: Collection[str] = (),
    fixed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The MongoDB filter the query asks for; a name neither a filter nor `allowed` is a 400.

    Shared by the lists and the statistics, so both select exactly the same jobs, within
    `fixed`.
    """
    for name in params:
        if name not in filters and name not in allowed:
            raise bad_query(name, "unknown query parameter")
        if name != "task_status" and len(params.getall(name)) > 1:
            raise bad_query(name, "given more than once")
    given: dict[str, Any] = {}
    for name, (doc_field, kind) in filters.items():
        if name in params:
            _add_filter(given, name, doc_field, kind, params.getall(name))
    fixed = fixed or {}
    # A filter never widens what `fixed` (e.g. auth.owner_filter: the caller's own records)
    # allows: `?user_id=someone-else` then matches nothing.
    clash = any(k in given and given[k] != v for k, v in fixed.items())
    return {"$and": [fixed, given]} if clash else {**given, **fixed}


def _sort_names(sorts: dict[str, str]) -> list[str]:
    return [n for s in sorts for n in (s, f"-{s}")]


def _add_filter(
    flt: dict[str, Any], name: str, doc_field: str, kind: FilterKind, values: list[str]
) -> None:
    value = values[0]
    if kind == "str":
        if not value or len(value) > 200:
            raise bad_query(name, "must be 1 to 200 characters")
        flt[doc_field] = value
    elif kind == "int":
        flt[doc_field] = _parse_int(name, value, 1, 2**63 - 1)
    elif kind == "status":
        allowed = [s.value for s in TaskStatus]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise bad_query(name, f"{bad[0]!r} is not one of {', '.join(allowed)}")
        statuses = sorted(set(values))
        # One status as an equality: SecantusDB scans for any `$in`, even of one value.
        flt[doc_field] = statuses[0] if len(statuses) == 1 else {"$in": statuses}
    else:
        op = "$gte" if kind == "after" else "$lt"
        flt.setdefault(doc_field, {})[op] = _parse_time(name, value)


def _parse_time(name: str, value: str) -> datetime:
    try:
        return parse_rfc3339(value)
    except ValueError as exc:
        raise bad_query(name, str(exc)) from None


def _parse_int(name: str, value: str, low: int, high: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise bad_query(name, f"must be an integer from {low} to {high}")
    number = int(value)
    if not low <= number <= high:
        raise bad_query(name, f"must be an integer from {low} to {high}")
    return number


def _int_param(params: MultiMapping[str], name: str, default: int, low: int, high: int) -> int:
    return _parse_int(name, params[name], low, high) if name in params else default


def _bool_param(params: MultiMapping[str], name: str) -> bool:
    value = params.get(name, "false")
    if value not in ("true", "false"):
        raise bad_query(name, "must be true or false")
    return value == "true"


def _fingerprint(params: MultiMapping[str], sort: str, fixed: dict[str, Any] | None) -> str:
    items = sorted((k, v) for k, v in params.items() if k not in PAGING)
    canon = orjson.dumps([sort, items, sorted((fixed or {}).items())])
    return base64.urlsafe_b64encode(hashlib.sha256(canon).digest()[:12]).decode()


# --- cursors --------------------------------------------------------------------------


def _sign(key: bytes, payload: bytes) -> str:
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def encode_cursor(query: ListQuery, last: dict[str, Any], key: bytes) -> str:
    value = last.get(query.sort_field) if query.sort_field != "_id" else None
    if isinstance(value, datetime):
        value = (value - EPOCH) // timedelta(milliseconds=1)
    payload = orjson.dumps({"f": query.fingerprint, "v": value, "i": last["_id"]})
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_sign(key, payload)}"


def decode_cursor(cursor: str, query: ListQuery, key: bytes) -> tuple[Any, int]:
    """Check signature and binding; the contents were written by us, so only trust them then."""
    try:
        body, mac = cursor.split(".")
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, binascii.Error):
        raise bad_query("cursor", "not a cursor this service issued") from None
    if not hmac.compare_digest(_sign(key, payload).encode(), mac.encode()):
        raise bad_query("cursor", "not a cursor this service issued")
    data = orjson.loads(payload)
    if data["f"] != query.fingerprint:
        raise bad_query("cursor", "belongs to other filters or another sort")
    value = data["v"]
    if query.sort_field != "_id":
        value = EPOCH + timedelta(milliseconds=value)
    return value, int(data["i"])
