"""GET /stats/jobs and /stats/deployments against generated data with known answers."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from service import stats
from service.app import create_app
from service.settings import Settings
from service.stats import StatsQuery, deployment_stats_pipeline, job_stats_pipeline

from .helpers import Client, create_deployment, create_job
from .stats_data import (
    BASE,
    DEPLOYMENTS,
    STATUSES,
    deployment_doc,
    expected_stats,
    generate,
    job_doc,
    load,
    rfc3339,
    rounded,
)
from .test_openapi import conforms

Doc = dict[str, Any]
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
async def jobs(db: AsyncDatabase[Doc]) -> list[Doc]:
    return await load(db)


async def get_stats(client: Client, path: str = "/stats/jobs", **params: Any) -> Doc:
    resp = await client.get(path, params=params)
    assert resp.status == 200, await resp.text()
    body: Doc = await resp.json()
    return body


async def bad_request(client: Client, path: str = "/stats/jobs", **params: Any) -> str:
    resp = await client.get(path, params=params)
    assert resp.status == 400, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    return str(body["detail"])


# --- /stats/jobs on the generated data set -----------------------------------------------


@pytest.mark.parametrize(
    ("group_by", "interval", "tz"),
    [
        ((), None, "UTC"),
        (("deployment_id",), "day", "UTC"),
        (("deployment_id",), "day", "Europe/Berlin"),
        (("user_id", "task_status"), None, "UTC"),
        (("task_status", "deployment_id", "user_id"), "week", "America/New_York"),
        ((), "hour", "Asia/Kolkata"),  # a half-hour offset
        (("user_id",), "month", "Europe/Berlin"),
    ],
)
async def test_matches_reference(
    client: Client, jobs: list[Doc], group_by: tuple[str, ...], interval: str | None, tz: str
) -> None:
    params: Doc = {"tz": tz}
    if group_by:
        params["group_by"] = ",".join(group_by)
    if interval:
        params["interval"] = interval
    body = await get_stats(client, **params)
    assert rounded(body) == rounded(expected_stats(jobs, group_by, interval, tz))


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"user_id": "bob"}, lambda d: d["user_id"] == "bob"),
        ({"deployment_id": "2"}, lambda d: d["deployment_id"] == 2),
        (
            {"task_status": ["FINISHED", "ERROR"]},
            lambda d: d["task_status"] in ("FINISHED", "ERROR"),
        ),
        (
            {"started_after": "2026-03-27T00:00:00Z", "started_before": "2026-03-30T12:00:00Z"},
            lambda d: (
                datetime(2026, 3, 27, tzinfo=UTC)
                <= d["started_at"]
                < datetime(2026, 3, 30, 12, tzinfo=UTC)
            ),
        ),
        (
            {"finished_after": "2026-03-28T00:00:00Z", "user_id": "alice"},
            lambda d: (
                d["user_id"] == "alice"
                and d["finished_at"] is not None
                and d["finished_at"] >= datetime(2026, 3, 28, tzinfo=UTC)
            ),
        ),
    ],
)
async def test_filters_are_those_of_jobs(
    client: Client, jobs: list[Doc], params: Doc, keep: Any
) -> None:
    """The same filters select the same jobs as GET /jobs would."""
    body = await get_stats(client, **params, group_by="deployment_id", interval="day")
    wanted = [d for d in jobs if keep(d)]
    assert wanted  # the case is not vacuous
    assert rounded(body) == rounded(expected_stats(wanted, ("deployment_id",), "day"))
    listed = await client.get("/jobs", params={**params, "count": "true", "limit": "1"})
    assert (await listed.json())["total"] == body["totals"]["count"]


async def test_empty_filters_cover_everything(client: Client, jobs: list[Doc]) -> None:
    body = await get_stats(client)
    assert body["groups"] == [{"key": {}, **body["totals"]}]
    assert body["totals"]["count"] == len(jobs)
    assert sum(body["totals"]["by_status"].values()) == len(jobs)


async def test_empty_result(client: Client, jobs: list[Doc]) -> None:
    body = await get_stats(client, user_id="nobody", group_by="deployment_id", interval="day")
    empty = {"samples": 0, "min": None, "avg": None, "p50": None, "p95": None, "max": None}
    assert body == {
        "group_by": ["deployment_id"],
        "interval": "day",
        "tz": "UTC",
        "percentiles": "exact",
        "groups": [],
        "totals": {
            "count": 0,
            "by_status": {"PENDING": 0, "RUNNING": 0, "FINISHED": 0, "ERROR": 0},
            "error_rate": None,
            "queue_time_s": empty,
            "run_time_s": empty,
        },
    }


async def test_empty_database(client: Client) -> None:
    body = await get_stats(client, group_by="user_id")
    assert body["groups"] == [] and body["totals"]["count"] == 0


# --- /stats/jobs on hand-made cases with literal answers ---------------------------------


async def test_time_zone_boundaries(client: Client, db: AsyncDatabase[Doc]) -> None:
    """23:30 UTC is the next day in Berlin; buckets are the UTC instants they begin at."""
    await db.jobs.insert_many(
        [
            job_doc(1, 1, "alice", datetime(2026, 3, 1, 23, 30, tzinfo=UTC)),
            job_doc(2, 1, "alice", datetime(2026, 3, 1, 22, 30, tzinfo=UTC)),
            # Sunday 23:30 UTC is Monday 01:30 in Berlin (summer time since that night).
            job_doc(3, 1, "alice", datetime(2026, 3, 29, 23, 30, tzinfo=UTC)),
            # 22:30 UTC on March 31 is April 1 00:30 in Berlin.
            job_doc(4, 1, "alice", datetime(2026, 3, 31, 22, 30, tzinfo=UTC)),
        ]
    )

    async def buckets(interval: str, tz: str) -> dict[str, int]:
        body = await get_stats(client, interval=interval, tz=tz)
        return {g["key"]["bucket"]: g["count"] for g in body["groups"]}

    assert await buckets("day", "UTC") == {
        "2026-03-01T00:00:00.000Z": 2,
        "2026-03-29T00:00:00.000Z": 1,
        "2026-03-31T00:00:00.000Z": 1,
    }
    assert await buckets("day", "Europe/Berlin") == {
        "2026-02-28T23:00:00.000Z": 1,  # March 1 in Berlin (UTC+1)
        "2026-03-01T23:00:00.000Z": 1,  # March 2
        "2026-03-29T22:00:00.000Z": 1,  # March 30 (UTC+2)
        "2026-03-31T22:00:00.000Z": 1,  # April 1
    }
    assert await buckets("week", "UTC") == {
        "2026-02-23T00:00:00.000Z": 2,  # weeks begin on Monday
        "2026-03-23T00:00:00.000Z": 1,
        "2026-03-30T00:00:00.000Z": 1,
    }
    assert await buckets("week", "Europe/Berlin") == {
        "2026-02-22T23:00:00.000Z": 1,
        "2026-03-01T23:00:00.000Z": 1,
        "2026-03-29T22:00:00.000Z": 2,
    }
    assert await buckets("month", "Europe/Berlin") == {
        "2026-02-28T23:00:00.000Z": 3,
        "2026-03-31T22:00:00.000Z": 1,
    }
    assert await buckets("hour", "Asia/Kolkata") == {
        "2026-03-01T22:30:00.000Z": 1,  # 04:00 in India (UTC+5:30)
        "2026-03-01T23:30:00.000Z": 1,
        "2026-03-29T23:30:00.000Z": 1,
        "2026-03-31T22:30:00.000Z": 1,
    }


async def test_durations_and_nearest_rank_percentiles(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    """Run times 1..20 s: p50 is the 10th, p95 the 19th; unfinished jobs add no run time."""
    docs = [
        job_doc(i, 1, "alice", T0, [("RUNNING", 500), ("FINISHED", i * 1000)]) for i in range(1, 21)
    ]
    docs += [
        job_doc(21, 1, "alice", T0, [("RUNNING", 2500)]),  # still running: queue time only
        job_doc(22, 1, "alice", T0),  # pending: neither
        job_doc(23, 1, "alice", T0, [("ERROR", 100)]),  # never ran: neither
        job_doc(24, 1, "alice", T0, [("RUNNING", 250), ("ERROR", 30_000)]),
    ]
    await db.jobs.insert_many(docs)
    totals = (await get_stats(client))["totals"]
    assert totals["count"] == 24
    assert totals["by_status"] == {"PENDING": 1, "RUNNING": 1, "FINISHED": 20, "ERROR": 2}
    assert totals["error_rate"] == 2 / 22
    assert totals["run_time_s"] == {
        "samples": 21,
        "min": 1.0,
        "avg": (210 + 30) / 21,
        "p50": 11.0,  # rank ceil(10.5) = 11 of 1..20, 30
        "p95": 20.0,  # rank ceil(19.95) = 20
        "max": 30.0,
    }
    assert totals["queue_time_s"] == {
        "samples": 22,
        "min": 0.25,
        "avg": (20 * 0.5 + 2.5 + 0.25) / 22,
        "p50": 0.5,
        "p95": 0.5,
        "max": 2.5,
    }
    one = (await get_stats(client, task_status="ERROR", deployment_id="1"))["totals"]
    assert one["run_time_s"]["samples"] == 1
    assert one["run_time_s"]["p50"] == one["run_time_s"]["p95"] == 30.0
    assert one["error_rate"] == 1.0


async def test_error_rate_is_null_when_nothing_ended(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    await db.jobs.insert_many([job_doc(1, 1, "alice", T0), job_doc(2, 1, "bob", T0)])
    body = await get_stats(client, group_by="user_id")
    assert [g["key"] for g in body["groups"]] == [{"user_id": "alice"}, {"user_id": "bob"}]
    assert all(g["error_rate"] is None for g in body["groups"])
    assert body["totals"]["run_time_s"]["p95"] is None


async def test_jobs_driven_through_the_api_with_real_waits(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    """Create, wait, RUNNING, wait, FINISHED/ERROR over HTTP: the service's own timestamps
    are BSON dates, and /stats measures the waits."""
    dep = await create_deployment(client)
    # (waits before RUNNING and before the end, the end) per job; None: no such step
    plans = [(0.4, 0.6, "FINISHED"), (0.2, 0.3, "ERROR"), (None, 0.2, "ERROR"), (0.3, None, None)]
    plans.append((None, None, None))  # stays PENDING
    jobs = [await create_job(client, dep["deployment_id"]) for _ in plans]
    waited: dict[int, list[float]] = {}

    async def drive(job_id: int, queue: float | None, run: float | None, end: str | None) -> None:
        t = time.monotonic()
        for wait, status in [(queue, "RUNNING"), (run, end)]:
            if wait is None or status is None:
                continue
            await asyncio.sleep(wait)
            resp = await client.patch(f"/jobs/{job_id}", json={"task_status": status})
            assert resp.status == 200, await resp.text()
            now = time.monotonic()
            waited.setdefault(job_id, []).append(now - t)
            t = now

    await asyncio.gather(*(drive(j["job_id"], *plan) for j, plan in zip(jobs, plans, strict=True)))

    stored = await db.jobs.find().sort("_id", 1).to_list(None)
    for doc in stored:  # BSON dates, not strings: what the pipelines compute with
        assert isinstance(doc["started_at"], datetime) and doc["started_at"].tzinfo is not None
        assert all(isinstance(h["at"], datetime) for h in doc["history"])
        assert doc["finished_at"] is None or isinstance(doc["finished_at"], datetime)
    dates = {"started_at": {"$type": "date"}, "history.0.at": {"$type": "date"}}
    assert await db.jobs.count_documents(dates) == len(plans)
    assert await db.jobs.count_documents({"finished_at": {"$type": "date"}}) == 3

    totals = (await get_stats(client))["totals"]
    assert totals["by_status"] == {"PENDING": 1, "RUNNING": 1, "FINISHED": 1, "ERROR": 2}
    assert totals["error_rate"] == 2 / 3
    # Exactly what the stored history says (the reference shares no code with the service) ...
    assert rounded(totals) == rounded(expected_stats(stored)["totals"])
    queue, run = totals["queue_time_s"], totals["run_time_s"]
    assert (queue["samples"], run["samples"]) == (3, 2)
    # ... and that is the time the test waited: at least each sleep, at most its round trip.
    first, second, _, fourth, _ = (waited.get(j["job_id"], []) for j in jobs)
    expected_queue = sorted([first[0], second[0], fourth[0]])
    expected_run = sorted([first[1], second[1]])
    assert queue["min"] >= 0.2 and run["min"] >= 0.3 and run["max"] >= 0.6
    for got, measured in [
        ((queue["min"], queue["p50"], queue["max"]), expected_queue),
        ((run["min"], run["max"]), expected_run),
    ]:
        for value, wall in zip(got, measured, strict=True):
            assert abs(value - wall) < 0.25, (got, measured)
    history = (await (await client.get(f"/jobs/{jobs[0]['job_id']}")).json())["history"]
    assert [h["task_status"] for h in history] == ["PENDING", "RUNNING", "FINISHED"]


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"group_by": "job_name"},
        {"group_by": ""},
        {"group_by": "user_id,user_id"},
        {"group_by": "user_id, task_status"},
        {"group_by": ["user_id", "task_status"]},  # one comma-separated value, not repeated
        {"interval": "year"},
        {"interval": ["day", "hour"]},
        {"tz": "Mars/Olympus_Mons", "interval": "day"},
        {"tz": "+02:00"},
        {"tz": ""},
        {"tz": "../../etc/passwd"},
        {"limit": "10"},
        {"started_after": "yesterday"},
        {"deployment_id": "0"},
        {"task_status": "DONE"},
    ],
)
async def test_bad_parameters(client: Client, params: Doc) -> None:
    detail = await bad_request(client, **params)
    assert next(iter(params)) in detail


async def test_too_many_groups(
    client: Client, jobs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stats, "MAX_GROUPS", 2)
    assert "more than 2 groups" in await bad_request(client, group_by="deployment_id")
    assert (
        len((await get_stats(client, group_by="deployment_id", deployment_id="1"))["groups"]) == 1
    )


async def test_time_zone_the_database_does_not_know(
    client: Client, jobs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's zone list and the server's may differ: still a 400, never a 500."""
    monkeypatch.setattr(stats, "_time_zones", lambda: frozenset({"Mars/Olympus_Mons"}))
    assert "tz" in await bad_request(client, interval="day", tz="Mars/Olympus_Mons")


# --- /stats/deployments ------------------------------------------------------------------


async def test_deployment_stats(client: Client, jobs: list[Doc]) -> None:
    body = await get_stats(client, "/stats/deployments")
    assert body["next_cursor"] is None
    assert [i["deployment_id"] for i in body["items"]] == DEPLOYMENTS
    for item in body["items"]:
        mine = [d for d in jobs if d["deployment_id"] == item["deployment_id"]]
        by_status = {s: sum(d["task_status"] == s for d in mine) for s in STATUSES}
        ended = by_status["FINISHED"] + by_status["ERROR"]
        last = max((d["started_at"] for d in mine), default=None)
        assert item == {
            "deployment_id": item["deployment_id"],
            "deployment_name": f"dep-{item['deployment_id']}",
            "user_id": deployment_doc(item["deployment_id"])["user_id"],
            "count": len(mine),
            "by_status": by_status,
            "success_rate": by_status["FINISHED"] / ended if ended else None,
            "last_job_at": None if last is None else rfc3339(last),
            "result_files": sum(len(d["results"]) for d in mine),
            "result_bytes": sum(r["size"] for d in mine for r in d["results"]),
        }
    assert body["items"][-1]["count"] == 0  # deployment 4 has no jobs


async def test_deployment_stats_pages_and_filters(client: Client, jobs: list[Doc]) -> None:
    first = await get_stats(client, "/stats/deployments", limit="3", count="true")
    assert [i["deployment_id"] for i in first["items"]] == [1, 2, 3]
    assert first["total"] == 4 and first["next_cursor"]
    rest = await get_stats(client, "/stats/deployments", limit="3", cursor=first["next_cursor"])
    assert [i["deployment_id"] for i in rest["items"]] == [4]
    owned = await get_stats(client, "/stats/deployments", user_id="bob", sort="-id")
    assert [i["deployment_id"] for i in owned["items"]] == [4, 1]  # bob owns 1 and 4
    assert owned["items"][1]["count"] == sum(d["deployment_id"] == 1 for d in jobs)


@pytest.mark.parametrize(
    "params", [{"group_by": "user_id"}, {"limit": "0"}, {"cursor": "x.y"}, {"deployment_id": "1"}]
)
async def test_deployment_stats_bad_parameters(client: Client, params: Doc) -> None:
    await bad_request(client, "/stats/deployments", **params)


# --- indexes -------------------------------------------------------------------------------


def plan_stages(explain: Any) -> set[str]:
    """Every plan stage name anywhere in an explain document (shapes differ by server)."""
    found: set[str] = set()
    if isinstance(explain, dict):
        for key, value in explain.items():
            if key == "stage" and isinstance(value, str):
                found.add(value)
            else:
                found |= plan_stages(value)
    elif isinstance(explain, list):
        for value in explain:
            found |= plan_stages(value)
    return found


START, END = BASE + timedelta(days=2), BASE + timedelta(days=5)


@pytest.mark.parametrize(
    "flt",
    [
        {"user_id": "bob"},
        {"deployment_id": 2},
        {"task_status": {"$in": ["ERROR"]}},
        {"started_at": {"$gte": START, "$lt": END}},
        {"finished_at": {"$gte": START}},
        {"user_id": "bob", "started_at": {"$gte": START, "$lt": END}},
        {"deployment_id": 2, "started_at": {"$gte": START}},
    ],
)
async def test_common_filters_use_an_index(
    db: AsyncDatabase[Doc], jobs: list[Doc], flt: Doc
) -> None:
    pipeline = job_stats_pipeline(StatsQuery(flt, ("deployment_id",), "day"))
    explain = await db.command("explain", {"aggregate": "jobs", "pipeline": pipeline, "cursor": {}})
    stages = plan_stages(explain)
    assert "IXSCAN" in stages and "COLLSCAN" not in stages, stages


async def test_deployment_stats_use_an_index(db: AsyncDatabase[Doc], jobs: list[Doc]) -> None:
    pipeline = deployment_stats_pipeline([1, 2])
    explain = await db.command("explain", {"aggregate": "jobs", "pipeline": pipeline, "cursor": {}})
    stages = plan_stages(explain)
    assert "IXSCAN" in stages and "COLLSCAN" not in stages, stages


# --- the spec ------------------------------------------------------------------------------


async def test_responses_match_the_spec(client: Client, jobs: list[Doc]) -> None:
    for params in [
        {},
        {"group_by": "deployment_id,user_id,task_status", "interval": "week", "tz": "Asia/Tokyo"},
        {"user_id": "nobody"},
        {"task_status": "PENDING", "group_by": "user_id"},
    ]:
        conforms(await get_stats(client, **params), "JobStats")
    conforms(
        await get_stats(client, "/stats/deployments", count="true", limit="2"),
        "DeploymentStatsList",
    )
    resp = await client.get("/stats/jobs", params={"interval": "year"})
    conforms(await resp.json(), "Problem")


# --- database settings ---------------------------------------------------------------------


async def test_statistics_have_their_own_time_limit(
    aiohttp_client: Any, settings: Settings, jobs: list[Doc]
) -> None:
    """Not MONGODB_OPERATION_TIMEOUT_MS: MONGODB_ANALYTICS_TIMEOUT_MS bounds them, and is a
    503 when spent. (model_copy skips validation: a limit no database can meet.)"""
    limited = settings.model_copy(update={"mongodb_analytics_timeout_ms": 1e-3})
    client: Client = await aiohttp_client(create_app(limited))
    for path in ("/stats/jobs", "/stats/deployments"):
        resp = await client.get(path)
        assert resp.status == 503, await resp.text()
        assert (await resp.json())["type"] == "/problems/database-unavailable"


async def test_statistics_read_with_the_analytics_read_preference(
    aiohttp_client: Any, settings: Settings, db: AsyncDatabase[Doc]
) -> None:
    """secondaryPreferred falls back to the primary of a single node: same answers."""
    if len((await db.client.admin.command("hello")).get("hosts", [])) > 1:
        # A MONGODB_URL set with secondaries: they may not have the writes just made.
        pytest.skip("needs a single node: secondaries lag behind the writes just made")
    await load(db)
    update = {"mongodb_analytics_read_preference": "secondaryPreferred"}
    analytics: Client = await aiohttp_client(create_app(settings.model_copy(update=update)))
    body = await get_stats(analytics, group_by="deployment_id")
    assert body["totals"]["count"] == len(generate())
    assert (await get_stats(analytics, "/stats/deployments"))["items"][0]["count"] > 0


async def test_groups_too_large_to_rank_exactly_get_approximate_percentiles(
    client: Client, jobs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MongoDB refuses a $push past 100 MB (code 146): the same statistics come back with
    $percentile's approximate ranks, and say so; every other figure is still exact."""
    exact = await get_stats(client, group_by="deployment_id", interval="day")
    real = stats.job_stats_pipeline

    def refuse_exact(query: stats.StatsQuery, approximate: bool = False) -> list[Doc]:
        if not approximate:  # what the server answers for an oversized $push
            return [{"$match": {"$expr": {"$eq": [{"$literal": "x"}, {"$toInt": "x"}]}}}]
        return real(query, approximate)

    monkeypatch.setattr(stats, "TOO_LARGE_TO_RANK", frozenset({241}))  # ConversionFailure
    monkeypatch.setattr(stats, "job_stats_pipeline", refuse_exact)
    approximate = await get_stats(client, group_by="deployment_id", interval="day")
    assert exact["percentiles"] == "exact" and approximate["percentiles"] == "approximate"
    for got, want in zip(approximate["groups"], exact["groups"], strict=True):
        assert got["key"] == want["key"] and got["by_status"] == want["by_status"]
        for metric in ("queue_time_s", "run_time_s"):
            a, e = got[metric], want[metric]
            assert (a["samples"], a["min"], a["max"]) == (e["samples"], e["min"], e["max"])
            assert a["avg"] == pytest.approx(e["avg"])
            if e["samples"]:
                assert e["min"] <= a["p50"] <= a["p95"] <= e["max"]
