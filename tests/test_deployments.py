"""Deployments: create, read, merge patch, delete with and without its jobs."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from pymongo import MongoClient
from pymongo.asynchronous.database import AsyncDatabase

from service import deployments
from service.jobs import DELETING
from service.settings import Settings
from tests.helpers import Client, create_deployment, create_job, snapshot

Db = AsyncDatabase[dict[str, Any]]


async def test_create_get_and_storage_shape(client: Client, settings: Settings) -> None:
    resp = await client.post(
        "/deployments",
        json={"user_id": "alice", "deployment_name": "bell-pair", "parameters": "--shots 1000"},
    )
    assert resp.status == 201
    dep = await resp.json()
    assert resp.headers["Location"] == f"/deployments/{dep['deployment_id']}"
    assert dep["deployment_id"] == 1 and dep["revision"] == 1
    assert dep["data"] == {} and dep["parameters"] == "--shots 1000"
    got = await client.get("/deployments/1")
    assert got.headers["ETag"] == '"1"' and await got.json() == dep
    # What analysts see: integer _id, a BSON date, data as an embedded document.
    mongo: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb_url, tz_aware=True)
    with mongo:
        stored = mongo[settings.mongodb_db].deployments.find_one({"_id": 1})
    assert stored is not None
    assert isinstance(stored["_id"], int)
    assert stored["created"].isoformat().startswith(dep["created"][:23])
    assert stored["data"] == {}


async def test_data_is_stored_as_native_bson(client: Client, settings: Settings) -> None:
    data = {"shots": 1000, "nested": {"list": [1, 2.5, "x", None, True]}, "big": 2**62}
    dep = await create_deployment(client, data=data)
    assert dep["data"] == data
    mongo: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb_url)
    with mongo:
        stored = mongo[settings.mongodb_db].deployments.find_one(
            {"data.nested.list": 2.5, "data.shots": {"$gte": 1000}}
        )
    assert stored is not None and stored["data"] == data


async def test_non_object_data_values(client: Client) -> None:
    for value in ([1, 2], "text", 3, True, None):
        dep = await create_deployment(client, data=value)
        assert dep["data"] == value


async def test_merge_patch(client: Client) -> None:
    dep = await create_deployment(client, data={"a": 1, "b": {"c": 2, "d": 3}}, parameters="p")
    resp = await client.patch(
        f"/deployments/{dep['deployment_id']}",
        json={"data": {"a": None, "b": {"c": 20}, "e": [1]}, "deployment_name": "n"},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["data"] == {"b": {"c": 20, "d": 3}, "e": [1]}
    assert body["deployment_name"] == "n" and body["parameters"] == "p"
    assert body["revision"] == 2 and resp.headers["ETag"] == '"2"'
    resp = await client.patch(
        f"/deployments/{dep['deployment_id']}", json={"parameters": None, "data": None}
    )
    body = await resp.json()
    assert body["parameters"] == "" and body["data"] == {} and body["revision"] == 3


async def test_patch_unknown_deployment_is_404(client: Client) -> None:
    resp = await client.patch("/deployments/77", json={"deployment_name": "x"})
    assert resp.status == 404


async def test_delete_refuses_while_jobs_exist_and_cascades(client: Client) -> None:
    dep = await create_deployment(client)
    jobs = [await create_job(client, dep["deployment_id"]) for _ in range(3)]
    resp = await client.delete(f"/deployments/{dep['deployment_id']}")
    assert resp.status == 409
    assert (await client.get(f"/deployments/{dep['deployment_id']}")).status == 200
    resp = await client.delete(f"/deployments/{dep['deployment_id']}?cascade=true")
    assert resp.status == 204
    assert (await client.get(f"/deployments/{dep['deployment_id']}")).status == 404
    for job in jobs:
        assert (await client.get(f"/jobs/{job['job_id']}")).status == 404


async def test_delete_without_jobs(client: Client) -> None:
    dep = await create_deployment(client)
    assert (await client.delete(f"/deployments/{dep['deployment_id']}?cascade=false")).status == 204
    assert (await client.delete(f"/deployments/{dep['deployment_id']}")).status == 404
    assert (await client.delete("/deployments/1?cascade=yes")).status == 400


async def check_branch(
    client: Client, deployment_id: int, deletes: list[int], posts: list[Any], gets: list[int]
) -> str:
    """After DELETEs raced POST /jobs: exactly one of the two outcomes, nothing in between.

    "deleted": a DELETE answered 204, no job was created (a job answered 201 would have
    blocked it) and none is left. "refused": every DELETE answered 409, every POST 201 and
    every GET 200, and every job answered 201 still exists.
    """
    jobs = await (await client.get(f"/jobs?deployment_id={deployment_id}&limit=1000")).json()
    there = (await client.get(f"/deployments/{deployment_id}")).status
    statuses = [r.status for r in posts]
    if 204 in deletes:
        assert deletes.count(204) == 1 and set(deletes) <= {204, 404, 409}, deletes
        assert set(statuses) == {422}, statuses
        assert there == 404 and jobs["items"] == []
        return "deleted"
    assert set(deletes) == {409}, deletes
    assert set(statuses) == {201}, statuses
    assert set(gets) <= {200}, gets  # never gone, not even for an instant
    created = sorted([(await r.json())["job_id"] for r in posts])
    assert there == 200 and sorted(j["job_id"] for j in jobs["items"]) == created
    for job_id in created:
        assert (await client.get(f"/jobs/{job_id}")).status == 200
    return "refused"


async def test_delete_racing_job_creation_leaves_no_orphan(client: Client) -> None:
    """Whatever the interleaving, a job never outlives its deployment, and a job answered
    201 is never taken back."""
    for delay in (0.0, 0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1):
        dep = await create_deployment(client)
        body = {"user_id": "alice", "deployment_id": dep["deployment_id"]}

        async def post(body: dict[str, Any] = body, delay: float = delay) -> Any:
            await asyncio.sleep(delay)  # later and later after the DELETE
            return await client.post("/jobs", json=body)

        delete, *posts = await asyncio.gather(
            client.delete(f"/deployments/{dep['deployment_id']}"), *[post() for _ in range(6)]
        )
        await check_branch(client, dep["deployment_id"], [delete.status], posts, [])


async def test_refused_deletes_change_nothing_under_concurrent_reads_and_creates(
    client: Client, db: Db
) -> None:
    """A refused DELETE never removes its deployment, not even for an instant: GET never
    404s and POST /jobs never 422s while DELETEs of a deployment that gains jobs are refused.
    """
    outcomes: list[str] = []
    while outcomes.count("refused") < 3 and len(outcomes) < 20:
        dep = await create_deployment(client)
        path = f"/deployments/{dep['deployment_id']}"
        body = {"user_id": "alice", "deployment_id": dep["deployment_id"]}
        before = await snapshot(db, "deployments")
        requests = []
        for i in range(30):  # interleaved: DELETE, GET, POST, DELETE, ...
            if i % 3 == 0:
                requests.append(client.delete(path))
            elif i % 3 == 1:
                requests.append(client.get(path))
            else:
                requests.append(client.post("/jobs", json=body))
        results = await asyncio.gather(*requests)
        deletes = [r.status for r in results[0::3]]
        gets = [r.status for r in results[1::3]]
        outcome = await check_branch(client, dep["deployment_id"], deletes, results[2::3], gets)
        if outcome == "refused":
            assert await snapshot(db, "deployments") == before
        outcomes.append(outcome)
    assert "refused" in outcomes  # the case is not vacuous


def interleave(
    monkeypatch: pytest.MonkeyPatch, client: Client, call: int, action: Any
) -> list[int]:
    """Run `action()` right after the DELETE's `call`-th look for jobs (1 = the first), and
    GET the deployment right before every look; return the GETs' statuses."""
    real, calls, gets = deployments._has_jobs, [0], []

    async def has_jobs(db: Any, jobs: Any) -> bool:
        gets.append((await client.get(f"/deployments/{jobs['deployment_id']}")).status)
        found = await real(db, jobs)
        calls[0] += 1
        if calls[0] == call:
            await action()
        return found

    monkeypatch.setattr(deployments, "_has_jobs", has_jobs)
    return gets


class Create:
    """Create one job of a deployment by POST /jobs or by an import; remember whether it
    was created."""

    def __init__(self, client: Client, deployment_id: int, how: str) -> None:
        self.client, self.deployment_id, self.how = client, deployment_id, how
        self.created: list[bool] = []

    async def __call__(self) -> None:
        body = {"user_id": "alice", "deployment_id": self.deployment_id}
        if self.how == "post":
            self.created.append((await self.client.post("/jobs", json=body)).status == 201)
            return
        headers = {"Content-Type": "application/x-ndjson"}
        resp = await self.client.post("/import/jobs", data=orjson.dumps(body), headers=headers)
        assert resp.status == 200, await resp.text()
        self.created.append((await resp.json())["inserted"] == 1)


@pytest.mark.parametrize("how", ["post", "import"])
@pytest.mark.parametrize("call", [1, 2])
async def test_a_job_created_between_the_delete_checks_refuses_it_cleanly(
    client: Client, db: Db, monkeypatch: pytest.MonkeyPatch, call: int, how: str
) -> None:
    """A job created just after the DELETE's first look for jobs (before it marks the
    deployment), or just after its last look (before it deletes): the job stands, the
    DELETE is 409, and the deployment was there all along."""
    dep = await create_deployment(client)
    before = await snapshot(db, "deployments")
    create = Create(client, dep["deployment_id"], how)
    gets = interleave(monkeypatch, client, call, create)
    resp = await client.delete(f"/deployments/{dep['deployment_id']}")
    assert create.created == [True]
    assert resp.status == 409, await resp.text()
    assert gets and set(gets) == {200}, gets
    assert await snapshot(db, "deployments") == before
    listing = await (await client.get(f"/deployments/{dep['deployment_id']}/jobs")).json()
    assert len(listing["items"]) == 1


async def test_a_deletes_mark_is_never_seen_and_a_stale_one_does_no_harm(
    client: Client, db: Db
) -> None:
    """The mark (jobs.DELETING) shows in no response; one left behind by a crashed DELETE
    neither blocks a later DELETE nor a job creation, which removes it."""
    dep = await create_deployment(client)
    dep_id = dep["deployment_id"]
    await db.deployments.update_one({"_id": dep_id}, {"$set": {DELETING: "crashed"}})
    got = await client.get(f"/deployments/{dep_id}")
    assert await got.json() == dep and got.headers["ETag"] == '"1"'
    await create_job(client, dep_id)
    assert DELETING not in (await db.deployments.find_one({"_id": dep_id}) or {})
    await db.deployments.update_one({"_id": dep_id}, {"$set": {DELETING: "crashed"}})
    assert (await client.delete(f"/deployments/{dep_id}?cascade=true")).status == 204
    other = await create_deployment(client)
    await db.deployments.update_one({"_id": other["deployment_id"]}, {"$set": {DELETING: "x"}})
    assert (await client.delete(f"/deployments/{other['deployment_id']}")).status == 204


async def test_list_jobs_of_a_deployment(client: Client) -> None:
    one, two = await create_deployment(client), await create_deployment(client)
    mine = [await create_job(client, one["deployment_id"]) for _ in range(3)]
    await create_job(client, two["deployment_id"])
    resp = await client.get(f"/deployments/{one['deployment_id']}/jobs")
    assert [j["job_id"] for j in (await resp.json())["items"]] == [j["job_id"] for j in mine]
    assert (await client.get("/deployments/99/jobs")).status == 404
    resp = await client.get(f"/deployments/{one['deployment_id']}/jobs?deployment_id=2")
    assert resp.status == 400
