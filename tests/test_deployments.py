"""Deployments: create, read, merge patch, delete with and without its jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo import MongoClient

from service.settings import Settings
from tests.helpers import Client, create_deployment, create_job


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


async def test_delete_racing_job_creation_leaves_no_orphan(client: Client) -> None:
    """Whatever the interleaving, a job never outlives its deployment."""
    for _ in range(5):
        dep = await create_deployment(client)
        path = f"/deployments/{dep['deployment_id']}"
        body = {"user_id": "alice", "deployment_id": dep["deployment_id"]}
        results = await asyncio.gather(
            *[client.post("/jobs", json=body) for _ in range(6)], client.delete(path)
        )
        deleted = results[-1].status == 204
        created = [r for r in results[:-1] if r.status == 201]
        assert all(r.status in (201, 422) for r in results[:-1])
        listing = await (await client.get(f"/jobs?deployment_id={dep['deployment_id']}")).json()
        if deleted:
            assert listing["items"] == []
        else:
            assert results[-1].status == 409
            assert len(listing["items"]) == len(created)


async def test_list_jobs_of_a_deployment(client: Client) -> None:
    one, two = await create_deployment(client), await create_deployment(client)
    mine = [await create_job(client, one["deployment_id"]) for _ in range(3)]
    await create_job(client, two["deployment_id"])
    resp = await client.get(f"/deployments/{one['deployment_id']}/jobs")
    assert [j["job_id"] for j in (await resp.json())["items"]] == [j["job_id"] for j in mine]
    assert (await client.get("/deployments/99/jobs")).status == 404
    resp = await client.get(f"/deployments/{one['deployment_id']}/jobs?deployment_id=2")
    assert resp.status == 400
