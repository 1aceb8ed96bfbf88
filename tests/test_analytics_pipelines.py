"""The README's analyst pipelines: shown verbatim, and giving the endpoints' numbers.

Each pipeline is run from the very text the README shows (service/analyst_pipelines.py)
on the data set the endpoint tests use.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from service.analyst_pipelines import (
    BUSIEST_HOURS,
    EXPIRED_LEASES,
    FAILURE_RATE,
    P95_RUN_TIME,
    PIPELINES,
    RESULTS_VOLUME,
    STUCK_RUNNING,
    AnalystPipeline,
)
from service.claims import sweep
from service.settings import Settings

from .helpers import Client, create_deployment, create_job
from .stats_data import entered, job_doc, load, rfc3339, rounded

Doc = dict[str, Any]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
async def jobs(db: AsyncDatabase[Doc]) -> list[Doc]:
    return await load(db)


async def run(db: AsyncDatabase[Doc], analyst: AnalystPipeline) -> list[Doc]:
    return await (await db.jobs.aggregate(analyst.pipeline())).to_list(None)


async def get(client: Client, path: str, **params: str) -> Doc:
    resp = await client.get(path, params=params)
    assert resp.status == 200, await resp.text()
    body: Doc = await resp.json()
    return body


def test_readme_shows_exactly_these_pipelines() -> None:
    text = README.read_text()
    section = re.search(r"^## Analytics$(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Analytics' section"
    shown = re.findall(r"^```js\n(.*?)\n```$", section.group(1), flags=re.MULTILINE | re.DOTALL)
    assert shown == [p.text for p in PIPELINES]


def test_pipelines_are_json() -> None:
    for analyst in PIPELINES:
        assert analyst.pipeline(), analyst.name


async def test_failure_rate_per_deployment_per_day(
    client: Client, db: AsyncDatabase[Doc], jobs: list[Doc]
) -> None:
    rows = await run(db, FAILURE_RATE)
    stats = await get(client, "/stats/jobs", group_by="deployment_id", interval="day")
    expected = [
        {
            "deployment_id": g["key"]["deployment_id"],
            "day": g["key"]["bucket"],
            "finished": g["by_status"]["FINISHED"],
            "failed": g["by_status"]["ERROR"],
            "failure_rate": g["error_rate"],
        }
        for g in stats["groups"]
        if g["error_rate"] is not None
    ]
    assert len(expected) > 10
    got = [{**r, "day": rfc3339(r["day"])} for r in rows]
    assert rounded(got) == rounded(expected)


async def test_p95_run_time_per_user(
    client: Client, db: AsyncDatabase[Doc], jobs: list[Doc]
) -> None:
    rows = await run(db, P95_RUN_TIME)
    stats = await get(client, "/stats/jobs", group_by="user_id")
    expected = [
        {
            "user_id": g["key"]["user_id"],
            "jobs": g["run_time_s"]["samples"],
            "p95_run_s": g["run_time_s"]["p95"],
        }
        for g in stats["groups"]
        if g["run_time_s"]["samples"]
    ]
    assert len(expected) == 3
    assert rows == expected


async def test_jobs_stuck_in_running(db: AsyncDatabase[Doc], jobs: list[Doc]) -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # BSON keeps milliseconds
    recent = [
        job_doc(1001, 1, "alice", now - timedelta(hours=3), [("RUNNING", 3_600_000)]),  # 2 h
        job_doc(1002, 1, "alice", now - timedelta(hours=3), [("RUNNING", 10_000_000)]),  # 13 min
        job_doc(1003, 1, "alice", now - timedelta(hours=3), [("RUNNING", 1), ("ERROR", 1)]),
    ]
    await db.jobs.insert_many(recent)
    rows = await run(db, STUCK_RUNNING)
    hour_ago = now - timedelta(hours=1)
    since = {d["_id"]: entered(d, "RUNNING") or now for d in jobs + recent}
    running = [d for d in jobs + recent if d["task_status"] == "RUNNING"]
    stuck = [d for d in running if since[d["_id"]] < hour_ago]
    stuck.sort(key=lambda d: (since[d["_id"]], d["_id"]))
    assert [r["job_id"] for r in rows] == [d["_id"] for d in stuck]
    assert 1001 in [r["job_id"] for r in rows] and 1002 not in [r["job_id"] for r in rows]
    for row, doc in zip(rows, stuck, strict=True):
        assert row["running_since"] == entered(doc, "RUNNING")
        assert row["deployment_id"] == doc["deployment_id"] and row["user_id"] == doc["user_id"]
        assert row["running_for_s"] >= 3600


async def test_busiest_hours(client: Client, db: AsyncDatabase[Doc], jobs: list[Doc]) -> None:
    rows = await run(db, BUSIEST_HOURS)
    stats = await get(client, "/stats/jobs", interval="hour")
    per_hour: Counter[int] = Counter()
    for group in stats["groups"]:
        per_hour[int(group["key"]["bucket"][11:13])] += group["count"]
    expected = sorted(per_hour.items(), key=lambda kv: (-kv[1], kv[0]))
    assert [(r["hour"], r["jobs"]) for r in rows] == expected
    assert sum(r["jobs"] for r in rows) == len(jobs)


async def test_results_volume_per_deployment(
    client: Client, db: AsyncDatabase[Doc], jobs: list[Doc]
) -> None:
    rows = await run(db, RESULTS_VOLUME)
    stats = await get(client, "/stats/deployments")
    expected = sorted(
        (
            {
                "deployment_id": i["deployment_id"],
                "files": i["result_files"],
                "bytes": i["result_bytes"],
            }
            for i in stats["items"]
            if i["result_files"]
        ),
        key=lambda r: (-r["bytes"], r["deployment_id"]),
    )
    assert len(expected) == 3
    assert rows == expected
    assert sum(r["bytes"] for r in rows) == sum(f["size"] for d in jobs for f in d["results"])


async def test_expired_leases_per_executor(
    client: Client, db: AsyncDatabase[Doc], settings: Settings
) -> None:
    """Leases that really expire (claimed through the API, ended by the sweeper), beside
    jobs the pipeline must not count."""
    dep = await create_deployment(client)
    ids = [(await create_job(client, dep["deployment_id"]))["job_id"] for _ in range(6)]
    for executor in ("ex-b", "ex-a", "ex-a", "ex-b", "ex-a", "ex-c"):
        resp = await client.post("/jobs/claim", json={"executor": executor, "lease_s": 5})
        assert resp.status == 200
    # ex-c ends its job in time with its own ERROR; ex-b's second job finishes.
    ended = [(ids[5], {"task_status": "ERROR", "status_reason": "oom"}), (ids[3], {})]
    for job_id, body in ended:
        resp = await client.patch(f"/jobs/{job_id}", json=body or {"task_status": "FINISHED"})
        assert resp.status == 200
    # The rest stop heartbeating: their leases lie in the past, the sweeper ends them.
    past = datetime.now(UTC) - timedelta(seconds=1)
    await db.jobs.update_many({"task_status": "RUNNING"}, {"$set": {"lease.expires_at": past}})
    assert await sweep(db, settings) == 4
    # A job made RUNNING by PATCH has no lease: it never expires and is never counted.
    by_patch = await create_job(client, dep["deployment_id"])
    await client.patch(f"/jobs/{by_patch['job_id']}", json={"task_status": "RUNNING"})
    assert await sweep(db, settings) == 0

    rows = await run(db, EXPIRED_LEASES)
    jobs = {j["job_id"]: j for j in (await get(client, "/jobs", limit="100"))["items"]}
    assert all(jobs[i]["status_reason"] == "lease expired" for i in ids[:3] + ids[4:5])

    def last_end(*job_ids: int) -> str:
        return max(str(jobs[i]["finished_at"]) for i in job_ids)  # RFC 3339 sorts as time

    expected = [
        {"executor": "ex-a", "expired": 3, "last_expired_at": last_end(ids[1], ids[2], ids[4])},
        {"executor": "ex-b", "expired": 1, "last_expired_at": last_end(ids[0])},
    ]
    assert [{**r, "last_expired_at": rfc3339(r["last_expired_at"])} for r in rows] == expected
