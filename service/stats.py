"""/stats: job statistics, computed by MongoDB aggregation pipelines.

Job documents never come into Python: the database groups them and sends one row per
group. The pipelines are built by plain functions so that tests and the benchmark run
exactly what the endpoints run, directly with the driver.

Durations come from `history`: queue time is PENDING → RUNNING, run time is RUNNING →
FINISHED/ERROR, in seconds. Percentiles use the nearest-rank method: of the n samples
sorted ascending, pXX is the one at rank ceil(XX·n/100) (1-based), so it is always a real
sample. It is exact, unlike `$percentile` (t-digest on MongoDB), and needs MongoDB 5.2+.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from multidict import MultiMapping
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from .auth import owner_filter
from .database import DB, Doc, analytics_source, analytics_time_limit
from .errors import BadRequest, bad_query
from .http import json_response, page_response
from .lifecycle import STATUS_NAMES as STATUSES
from .lifecycle import TERMINAL_NAMES as TERMINAL
from .pagination import (
    DEPLOYMENT_FILTERS,
    DEPLOYMENT_SORTS,
    JOB_FILTERS,
    ListQuery,
    parse_filters,
    parse_list_query,
)
from .schemas import rfc3339
from .settings import SETTINGS
from .store import Page, fetch_page

routes = web.RouteTableDef()

Expr = Any  # an aggregation expression: a dict, a "$path" string or a constant
GROUP_FIELDS = ("deployment_id", "user_id", "task_status")
INTERVALS = ("hour", "day", "week", "month")
PERCENTILES = {"p50": 50, "p95": 95}
MAX_GROUPS = 10_000
UNKNOWN_TIME_ZONE = 40485  # the server's code for a time zone it does not know
# $push past internalQueryMaxPushBytes (ExceededMemoryLimit), or a group document past 16 MB
TOO_LARGE_TO_RANK = frozenset({146, 10334})
EMPTY_SUMMARY = {"samples": 0, "min": None, "avg": None, **dict.fromkeys(PERCENTILES), "max": None}


@dataclass(frozen=True)
class StatsQuery:
    """What `/stats/jobs` was asked: which jobs (the `/jobs` filters) and how to group them."""

    filter: dict[str, Any]
    group_by: tuple[str, ...] = ()
    interval: str | None = None
    tz: str = "UTC"


# --- query parameters -----------------------------------------------------------------


def parse_stats_query(params: MultiMapping[str], owner: Doc | None = None) -> StatsQuery:
    """The `/jobs` filters plus `group_by`, `interval` and `tz`; anything else is a 400."""
    flt = parse_filters(params, JOB_FILTERS, ("group_by", "interval", "tz"), owner)
    group_by = _parse_group_by(params["group_by"]) if "group_by" in params else ()
    interval = params.get("interval")
    if interval is not None and interval not in INTERVALS:
        raise bad_query("interval", f"must be one of {', '.join(INTERVALS)}")
    tz = params.get("tz", "UTC")
    if tz != "UTC" and tz not in _time_zones():
        raise bad_query("tz", "must be an IANA time zone name, e.g. Europe/Berlin")
    return StatsQuery(flt, group_by, interval, tz)


def _parse_group_by(value: str) -> tuple[str, ...]:
    names = value.split(",")
    for name in names:
        if name not in GROUP_FIELDS:
            raise bad_query(
                "group_by", f"{name!r} is not one of {', '.join(GROUP_FIELDS)} (comma-separated)"
            )
    if len(set(names)) < len(names):
        raise bad_query("group_by", "names a field more than once")
    return tuple(names)


@functools.cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


# --- pipeline builders ----------------------------------------------------------------


def _entered(statuses: list[str]) -> Expr:
    """The job's first `history` entry with one of `statuses`; missing when there is none."""
    return {
        "$first": {
            "$filter": {
                "input": {"$ifNull": ["$history", []]},
                "cond": {"$in": ["$$this.task_status", statuses]},
                "limit": 1,
            }
        }
    }


def _seconds(start: str, end: str) -> Expr:
    """Seconds from entry `$$start` to entry `$$end`; null when either is missing."""
    diff = {
        "$dateDiff": {"startDate": f"$${start}.at", "endDate": f"$${end}.at", "unit": "millisecond"}
    }
    return {"$divide": [diff, 1000]}


# Both durations of one job, from one pass over its history.
DURATIONS: Expr = {
    "$let": {
        "vars": {"p": _entered(["PENDING"]), "r": _entered(["RUNNING"]), "e": _entered(TERMINAL)},
        "in": {"queue": _seconds("p", "r"), "run": _seconds("r", "e")},
    }
}


def _status_count(status: str) -> Expr:
    return {"$sum": {"$cond": [{"$eq": ["$task_status", status]}, 1, 0]}}


def _rate(part: str, whole: list[str]) -> Expr:
    """`part / sum(whole)` over the group's status counts; null when the sum is 0."""
    total = {"$add": [f"${s}" for s in whole]}
    return {"$cond": [{"$gt": [total, 0]}, {"$divide": [f"${part}", total]}, None]}


def summary(values: Expr) -> Expr:
    """min, avg, nearest-rank percentiles and max of the numbers in array `values`."""
    nearest = {
        name: {
            "$arrayElemAt": [
                "$$v",
                {"$subtract": [{"$ceil": {"$divide": [{"$multiply": [p, "$$n"]}, 100]}}, 1]},
            ]
        }
        for name, p in PERCENTILES.items()
    }
    numbers = {"$filter": {"input": values, "cond": {"$isNumber": "$$this"}}}
    return {
        "$let": {
            "vars": {"v": {"$sortArray": {"input": numbers, "sortBy": 1}}},
            "in": {
                "$let": {
                    "vars": {"n": {"$size": "$$v"}},
                    "in": {
                        "$cond": [
                            {"$eq": ["$$n", 0]},
                            {"$literal": EMPTY_SUMMARY},
                            {
                                "samples": "$$n",
                                "min": {"$first": "$$v"},
                                "avg": {"$avg": "$$v"},
                                **nearest,
                                "max": {"$last": "$$v"},
                            },
                        ]
                    },
                }
            },
        }
    }


def approximate_summary(prefix: str) -> Expr:
    """`summary`'s shape from the accumulators of `_approximate_accumulators(prefix)`."""
    found = {
        "samples": f"${prefix}_n",
        "min": f"${prefix}_min",
        "avg": f"${prefix}_avg",
        **{name: {"$arrayElemAt": [f"${prefix}_p", i]} for i, name in enumerate(PERCENTILES)},
        "max": f"${prefix}_max",
    }
    return {"$cond": [{"$eq": [f"${prefix}_n", 0]}, {"$literal": EMPTY_SUMMARY}, found]}


def _approximate_accumulators(prefix: str, value: str) -> Doc:
    """Count, min, avg, max and `$percentile` (t-digest; MongoDB 7.0+) of `value`."""
    return {
        f"{prefix}_n": {"$sum": {"$cond": [{"$isNumber": value}, 1, 0]}},
        f"{prefix}_min": {"$min": value},
        f"{prefix}_avg": {"$avg": value},
        f"{prefix}_max": {"$max": value},
        f"{prefix}_p": {
            "$percentile": {
                "input": value,
                "p": [p / 100 for p in PERCENTILES.values()],
                "method": "approximate",
            }
        },
    }


def _group_stages(key: Expr, approximate: bool = False) -> list[Doc]:
    """Group by `key`, then shape each group's metrics.

    Exact ranks `$push` every duration of a group into one array, which MongoDB refuses
    past 100 MB (`internalQueryMaxPushBytes`, ~6.5 million jobs); `approximate` uses
    `$percentile` instead, which keeps no array.
    """
    accumulators: Doc = {"count": {"$sum": 1}, **{s: _status_count(s) for s in STATUSES}}
    if approximate:
        accumulators |= _approximate_accumulators("queue", "$d.queue")
        accumulators |= _approximate_accumulators("run", "$d.run")
        durations = {
            "queue_time_s": approximate_summary("queue"),
            "run_time_s": approximate_summary("run"),
        }
    else:
        accumulators |= {"queue": {"$push": "$d.queue"}, "run": {"$push": "$d.run"}}
        durations = {"queue_time_s": summary("$queue"), "run_time_s": summary("$run")}
    metrics = {
        "_id": 0,
        "key": "$_id",
        "count": 1,
        "by_status": {s: f"${s}" for s in STATUSES},
        "error_rate": _rate("ERROR", TERMINAL),
        **durations,
    }
    return [{"$group": {"_id": key, **accumulators}}, {"$project": metrics}]


def _bucket(interval: str, tz: str) -> Expr:
    # `tz` is one of the IANA names (checked in parse_stats_query), never "$...", so it
    # needs no $literal, which SecantusDB 0.7 does not accept for `timezone`.
    trunc: dict[str, Any] = {"date": "$started_at", "unit": interval, "timezone": tz}
    if interval == "week":
        trunc["startOfWeek"] = "monday"  # ISO 8601 weeks
    return {"$dateTrunc": trunc}


def job_stats_pipeline(query: StatsQuery, approximate: bool = False) -> list[Doc]:
    """One aggregation: the filtered jobs, their durations, then groups and totals together.

    `$facet` lets one pass over the jobs feed both; its output is one small document
    (at most MAX_GROUPS + 1 groups). Ungrouped, the one group is the totals: no `groups`.
    """
    key: dict[str, Any] = {f: f"${f}" for f in query.group_by}
    fields: dict[str, Any] = {f: 1 for f in query.group_by}
    if query.interval is not None:
        key["bucket"] = _bucket(query.interval, query.tz)
        fields["started_at"] = 1
    facet = {"totals": _group_stages(None, approximate)}
    if key:
        groups = _group_stages(key, approximate)
        groups[1:1] = [{"$sort": {f"_id.{k}": 1 for k in key}}, {"$limit": MAX_GROUPS + 1}]
        facet["groups"] = groups
    return [
        {"$match": query.filter},
        {"$project": {"_id": 0, **fields, "task_status": 1, "d": DURATIONS}},
        {"$facet": facet},
    ]


def deployment_stats_pipeline(deployment_ids: Sequence[int], owner: Doc | None = None) -> list[Doc]:
    """Per deployment of a page: jobs by status, last start, success rate, result files."""
    results = {"$ifNull": ["$results", []]}
    sizes = {"$sum": {"$map": {"input": results, "in": "$$this.size"}}}
    return [
        {"$match": {**(owner or {}), "deployment_id": {"$in": list(deployment_ids)}}},
        {
            "$group": {
                "_id": "$deployment_id",
                "count": {"$sum": 1},
                **{s: _status_count(s) for s in STATUSES},
                "last_job_at": {"$max": "$started_at"},
                "result_files": {"$sum": {"$size": results}},
                "result_bytes": {"$sum": sizes},
            }
        },
        {
            "$project": {
                "count": 1,
                "by_status": {s: f"${s}" for s in STATUSES},
                "success_rate": _rate("FINISHED", TERMINAL),
                "last_job_at": 1,
                "result_files": 1,
                "result_bytes": 1,
            }
        },
    ]


# --- data layer -----------------------------------------------------------------------


async def job_stats(db: AsyncDatabase[Doc], query: StatsQuery) -> Doc:
    """Run the pipeline and render `{"groups", "totals", ...}`; too many groups is a 400.

    Percentiles are exact unless a group is too large for the server to rank exactly:
    then the same statistics come again with approximate ones (`"percentiles"` says which).
    """
    method = "exact"
    try:
        try:
            rows = await (await db.jobs.aggregate(job_stats_pipeline(query))).to_list(None)
        except OperationFailure as exc:
            if exc.code not in TOO_LARGE_TO_RANK:
                raise
            method = "approximate"
            pipeline = job_stats_pipeline(query, approximate=True)
            rows = await (await db.jobs.aggregate(pipeline)).to_list(None)
    except OperationFailure as exc:
        if exc.code == UNKNOWN_TIME_ZONE:  # Python's zone list and the server's disagree
            raise bad_query("tz", "is a time zone the database does not know") from None
        raise
    facets = rows[0]  # $facet always answers one document
    groups: list[Doc] = facets["groups"] if "groups" in facets else facets["totals"]
    if len(groups) > MAX_GROUPS:
        raise BadRequest(
            f"The statistics would have more than {MAX_GROUPS} groups; narrow the filters, "
            "group by fewer fields or choose a longer interval."
        )
    totals = facets["totals"][0] if facets["totals"] else _empty_metrics()
    return {
        "group_by": list(query.group_by),
        "interval": query.interval,
        "tz": query.tz,
        "percentiles": method,
        "groups": [_render_group(g) for g in groups],
        "totals": _render_metrics(totals),
    }


def _empty_metrics() -> Doc:
    return {
        "count": 0,
        "by_status": dict.fromkeys(STATUSES, 0),
        "error_rate": None,
        "queue_time_s": EMPTY_SUMMARY,
        "run_time_s": EMPTY_SUMMARY,
    }


def _render_metrics(row: Doc) -> Doc:
    return {
        "count": row["count"],
        "by_status": row["by_status"],
        "error_rate": row["error_rate"],
        "queue_time_s": _render_summary(row["queue_time_s"]),
        "run_time_s": _render_summary(row["run_time_s"]),
    }


def _render_summary(row: Doc) -> Doc:
    """Seconds as JSON numbers: floats, whatever numeric type the server summed them in."""
    return {k: v if k == "samples" or v is None else float(v) for k, v in row.items()}


def _render_group(row: Doc) -> Doc:
    key = {k: rfc3339(v) if isinstance(v, datetime) else v for k, v in (row["key"] or {}).items()}
    return {"key": key, **_render_metrics(row)}


DEPLOYMENT_FIELDS = {"deployment_name": 1, "user_id": 1}


async def deployment_stats(
    db: AsyncDatabase[Doc], query: ListQuery, key: bytes, owner: Doc | None = None
) -> Page:
    """A keyset page of deployments (as `GET /deployments`), each with its job statistics."""
    page = await fetch_page(db.deployments, query, key, DEPLOYMENT_FIELDS)
    stats = {}
    if page.items:
        ids = [d["_id"] for d in page.items]
        rows = await db.jobs.aggregate(deployment_stats_pipeline(ids, owner))
        stats = {row["_id"]: row async for row in rows}
    page.items = [{**d, "stats": stats.get(d["_id"])} for d in page.items]
    return page


def public_deployment_stats(doc: Doc) -> Doc:
    stats = doc["stats"] or {
        "count": 0,
        "by_status": dict.fromkeys(STATUSES, 0),
        "success_rate": None,
        "last_job_at": None,
        "result_files": 0,
        "result_bytes": 0,
    }
    return {
        "deployment_id": doc["_id"],
        "deployment_name": doc.get("deployment_name"),
        "user_id": doc["user_id"],
        "count": stats["count"],
        "by_status": stats["by_status"],
        "success_rate": stats["success_rate"],
        "last_job_at": rfc3339(stats["last_job_at"]),
        "result_files": stats["result_files"],
        "result_bytes": stats["result_bytes"],
    }


# --- handlers -------------------------------------------------------------------------


@routes.get("/stats/jobs")
async def jobs_stats(request: web.Request) -> web.Response:
    query = parse_stats_query(request.query, owner_filter(request))
    source = await _analytics(request)
    with analytics_time_limit(request.app[SETTINGS]):
        return json_response(await job_stats(source, query))


@routes.get("/stats/deployments")
async def deployments_stats(request: web.Request) -> web.Response:
    database = request.app[DB]
    owner = owner_filter(request)
    query = parse_list_query(
        request.query, DEPLOYMENT_FILTERS, DEPLOYMENT_SORTS, database.cursor_key, owner
    )
    source = await _analytics(request)
    with analytics_time_limit(request.app[SETTINGS]):
        page = await deployment_stats(source, query, database.cursor_key, owner)
    return page_response(request, page, public_deployment_stats)


async def _analytics(request: web.Request) -> AsyncDatabase[Doc]:
    """Statistics may read from secondaries (MONGODB_ANALYTICS_READ_PREFERENCE)."""
    return await analytics_source(request.app[DB].db, request.app[SETTINGS])
