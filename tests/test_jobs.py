"""Jobs: creation, the status lifecycle, finished_at, history, revisions, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from service.lifecycle import SHORTEST_PATH, TRANSITIONS, TaskStatus
from tests.helpers import Client, create_deployment, create_job, snapshot

MERGE = {"Content-Type": "application/merge-patch+json"}
Db = AsyncDatabase[dict[str, Any]]


async def patch(client: Client, job_id: int, body: Any, **headers: str) -> Any:
    resp = await client.patch(f"/jobs/{job_id}", json=body, headers={**MERGE, **headers})
    return resp.status, await resp.json()


async def test_create_returns_record_location_and_etag(client: Client) -> None:
    dep = await create_deployment(client)
    resp = await client.post(
        "/jobs",
        json={"user_id": "alice", "deployment_id": dep["deployment_id"], "job_name": "run"},
    )
    assert resp.status == 201
    job = await resp.json()
    assert resp.headers["Location"] == f"/jobs/{job['job_id']}"
    assert resp.headers["ETag"] == '"1"'
    assert job["task_status"] == "PENDING"
    assert job["finished_at"] is None
    assert job["results"] == [] and job["data"] == {} and job["parameters"] == ""
    assert job["history"] == [{"task_status": "PENDING", "at": job["started_at"]}]
    assert job["revision"] == 1
    assert job["started_at"].endswith("Z") and len(job["started_at"]) == 24
    fetched = await client.get(f"/jobs/{job['job_id']}")
    assert fetched.headers["ETag"] == '"1"'
    assert await fetched.json() == job


async def test_explicit_started_at_is_normalised_to_utc_milliseconds(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(
        client, dep["deployment_id"], started_at="2026-11-29T18:00:00.123456+01:00"
    )
    assert job["started_at"] == "2026-11-29T17:00:00.123Z"


async def test_job_for_missing_deployment_is_422_and_stores_nothing(client: Client, db: Db) -> None:
    await create_job(client, (await create_deployment(client))["deployment_id"])
    before = await snapshot(db)
    resp = await client.post("/jobs", json={"user_id": "alice", "deployment_id": 999})
    assert resp.status == 422
    body = await resp.json()
    assert body["errors"][0]["loc"] == ["body", "deployment_id"]
    assert await snapshot(db) == before  # not even the id counter moved
    assert len((await (await client.get("/jobs")).json())["items"]) == 1


@pytest.mark.parametrize("source", list(TaskStatus))
@pytest.mark.parametrize("target", list(TaskStatus))
async def test_every_transition_follows_the_table(
    client: Client, db: Db, source: TaskStatus, target: TaskStatus
) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    path = [s.value for s in SHORTEST_PATH[source]]
    for step in path:
        assert (await patch(client, job["job_id"], {"task_status": step}))[0] == 200
    before = await snapshot(db)
    status, body = await patch(client, job["job_id"], {"task_status": target.value})
    if target in TRANSITIONS[source]:
        assert status == 200, body
        assert body["task_status"] == target.value
        assert body["history"][-1]["task_status"] == target.value
        assert [h["task_status"] for h in body["history"]] == ["PENDING", *path, target.value]
        assert (body["finished_at"] is not None) == (target in {"FINISHED", "ERROR"})
    else:
        assert status == 409, body
        assert source.value in body["detail"] and target.value in body["detail"]
        assert await snapshot(db) == before
        after = await (await client.get(f"/jobs/{job['job_id']}")).json()
        assert after["task_status"] == source.value
        assert after["revision"] == 1 + len(path)


async def test_finished_at_defaults_to_now_and_history_matches(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    await patch(client, job["job_id"], {"task_status": "RUNNING"})
    status, done = await patch(client, job["job_id"], {"task_status": "FINISHED"})
    assert status == 200
    assert done["finished_at"] >= done["started_at"]
    assert done["history"][-1]["at"] == done["finished_at"]
    assert done["revision"] == 3


async def test_finished_at_given_with_the_transition(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"], started_at="2026-01-01T00:00:00Z")
    status, body = await patch(
        client, job["job_id"], {"task_status": "ERROR", "finished_at": "2026-01-01T01:00:00Z"}
    )
    assert status == 200, body
    assert body["finished_at"] == "2026-01-01T01:00:00.000Z"


async def test_finished_at_is_never_before_started_at(client: Client, db: Db) -> None:
    dep = await create_deployment(client)
    future = "2999-01-01T00:00:00.000Z"
    job = await create_job(client, dep["deployment_id"], started_at=future)
    before = await snapshot(db)
    status, body = await patch(
        client, job["job_id"], {"task_status": "ERROR", "finished_at": "2026-01-01T00:00:00Z"}
    )
    assert status == 422 and body["errors"][0]["loc"] == ["body", "finished_at"]
    assert await snapshot(db) == before
    # Set by the service: never earlier than a future started_at.
    status, body = await patch(client, job["job_id"], {"task_status": "ERROR"})
    assert status == 200 and body["finished_at"] == future


async def test_finished_at_rules_without_a_transition(client: Client, db: Db) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"], started_at="2026-01-01T00:00:00Z")
    before = await snapshot(db)
    status, body = await patch(client, job["job_id"], {"finished_at": "2026-01-02T00:00:00Z"})
    assert status == 409 and "PENDING" in body["detail"]
    status, body = await patch(
        client, job["job_id"], {"task_status": "RUNNING", "finished_at": "2026-01-02T00:00:00Z"}
    )
    assert status == 422
    assert await snapshot(db) == before
    await patch(client, job["job_id"], {"task_status": "ERROR"})
    status, body = await patch(client, job["job_id"], {"finished_at": "2026-01-02T00:00:00Z"})
    assert status == 200 and body["finished_at"] == "2026-01-02T00:00:00.000Z"
    before = await snapshot(db)
    for bad in (None, "2026-01-02", "yesterday", 1700000000, "2025-12-31T23:59:59.999Z"):
        status, body = await patch(client, job["job_id"], {"finished_at": bad})
        assert status == 422, bad
    assert await snapshot(db) == before


async def test_concurrent_transitions_have_exactly_one_winner(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    await patch(client, job["job_id"], {"task_status": "RUNNING"})
    targets = ["FINISHED", "ERROR"] * 16
    results = await asyncio.gather(
        *(patch(client, job["job_id"], {"task_status": t}) for t in targets)
    )
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [409] * (len(targets) - 1)
    final = await (await client.get(f"/jobs/{job['job_id']}")).json()
    assert len(final["history"]) == 3
    assert final["revision"] == 3


async def test_concurrent_data_patches_on_different_keys_all_land(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"], data={"keep": True})
    n = 24
    results = await asyncio.gather(
        *(patch(client, job["job_id"], {"data": {f"k{i}": {"v": i}}}) for i in range(n))
    )
    assert all(status == 200 for status, _ in results)
    final = await (await client.get(f"/jobs/{job['job_id']}")).json()
    assert final["data"] == {"keep": True, **{f"k{i}": {"v": i} for i in range(n)}}
    assert final["revision"] == 1 + n


async def test_if_match(client: Client, db: Db) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    before = await snapshot(db)
    status, body = await patch(client, job["job_id"], {"job_name": "x"}, **{"If-Match": '"7"'})
    assert status == 412
    assert await snapshot(db) == before
    status, body = await patch(client, job["job_id"], {"job_name": "x"}, **{"If-Match": '"1"'})
    assert status == 200 and body["revision"] == 2 and body["job_name"] == "x"
    before = await snapshot(db)
    status, _ = await patch(client, job["job_id"], {"job_name": "y"}, **{"If-Match": '"1"'})
    assert status == 412
    assert (await (await client.get(f"/jobs/{job['job_id']}")).json())["job_name"] == "x"
    resp = await client.delete(f"/jobs/{job['job_id']}", headers={"If-Match": '"1"'})
    assert resp.status == 412
    assert await snapshot(db) == before
    resp = await client.delete(f"/jobs/{job['job_id']}", headers={"If-Match": '"2"'})
    assert resp.status == 204


async def test_patch_fields_and_nulls_reset_to_defaults(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"], parameters="-v", data={"a": 1})
    status, body = await patch(client, job["job_id"], {"job_name": "n", "parameters": "-q"})
    assert (body["job_name"], body["parameters"]) == ("n", "-q")
    status, body = await patch(
        client, job["job_id"], {"job_name": None, "parameters": None, "data": None}
    )
    assert status == 200
    assert (body["job_name"], body["parameters"], body["data"]) == (None, "", {})
    status, body = await patch(client, job["job_id"], {"data": [1, 2]})
    assert body["data"] == [1, 2]
    status, body = await patch(client, job["job_id"], {"data": {"x": {"y": None, "z": 1}}})
    assert body["data"] == {"x": {"z": 1}}
    status, same = await patch(client, job["job_id"], {})
    assert status == 200 and same == body


async def test_plain_json_content_type_is_accepted_for_patch(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    resp = await client.patch(f"/jobs/{job['job_id']}", json={"job_name": "j"})
    assert resp.status == 200


@pytest.mark.parametrize(
    "body",
    [
        {"job_id": 5},
        {"revision": 9},
        {"history": []},
        {"results": []},
        {"user_id": "mallory"},
        {"deployment_id": 2},
        {"started_at": "2026-01-01T00:00:00Z"},
        {"colour": "red"},
        {"task_status": "DONE"},
        {"task_status": None},
        {"job_name": "x" * 201},
        {"parameters": "x" * (64 * 1024 + 1)},
        {"data": {"a": {"$inc": 1}}},
    ],
)
async def test_bad_patches_are_422_and_change_nothing(client: Client, db: Db, body: Any) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    before = await snapshot(db)
    status, problem = await patch(client, job["job_id"], body)
    assert status == 422, problem
    assert problem["errors"]
    assert await (await client.get(f"/jobs/{job['job_id']}")).json() == job
    assert await snapshot(db) == before


async def test_delete_job(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    assert (await client.delete(f"/jobs/{job['job_id']}")).status == 204
    assert (await client.get(f"/jobs/{job['job_id']}")).status == 404
    assert (await client.delete(f"/jobs/{job['job_id']}")).status == 404


async def test_ids_are_unique_and_increasing_under_concurrency(client: Client) -> None:
    dep = await create_deployment(client)
    jobs: list[dict[str, Any]] = await asyncio.gather(
        *(create_job(client, dep["deployment_id"]) for _ in range(40))
    )
    ids = sorted(j["job_id"] for j in jobs)
    assert ids == list(range(1, 41))
    later = await create_job(client, dep["deployment_id"])
    assert later["job_id"] == 41
    assert (await client.delete(f"/jobs/{later['job_id']}")).status == 204
    assert (await create_job(client, dep["deployment_id"]))["job_id"] == 42  # never reused


async def test_ids_continue_across_two_instances(aiohttp_client: Any, settings: Any) -> None:
    from service.app import create_app

    first: Client = await aiohttp_client(create_app(settings))
    second: Client = await aiohttp_client(create_app(settings))
    dep = await create_deployment(first)
    made: list[dict[str, Any]] = await asyncio.gather(
        *(create_job(c, dep["deployment_id"]) for c in [first, second] * 10)
    )
    assert sorted(j["job_id"] for j in made) == list(range(1, 21))
