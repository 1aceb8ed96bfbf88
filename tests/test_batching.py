"""Group commit of the creates (service/batching.py): concurrent creates are written
together, each answered with its own record or its own error; a lone one is not delayed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from service.batching import Batcher
from service.deployments import DEPLOYMENT_CREATES
from service.errors import ValidationFailed
from service.jobs import JOB_CREATES, NewJob
from service.store import now
from tests.helpers import Client, Users, create_deployment, snapshot

Db = AsyncDatabase[dict[str, Any]]


async def test_concurrent_posts_get_their_own_records_and_consecutive_ids(
    client: Client, db: Db
) -> None:
    dep = (await create_deployment(client))["deployment_id"]
    bodies = [
        {"user_id": "alice", "deployment_id": 999 if n % 10 == 3 else dep, "job_name": f"j{n}"}
        for n in range(30)
    ]
    responses = await asyncio.gather(*(client.post("/jobs", json=b) for b in bodies))
    made = []
    for body, resp in zip(bodies, responses, strict=True):
        answer = await resp.json()
        if body["deployment_id"] == 999:  # fails alone, takes no id
            assert resp.status == 422, answer
            assert "no deployment with id 999" in answer["detail"]
            continue
        assert resp.status == 201, answer
        assert answer["job_name"] == body["job_name"]
        assert resp.headers["Location"] == f"/jobs/{answer['job_id']}"
        got = await client.get(f"/jobs/{answer['job_id']}")
        assert await got.json() == answer
        made.append(answer["job_id"])
    assert sorted(made) == list(range(1, 28))
    assert (await db.counters.find_one({"_id": "jobs"}) or {})["seq"] == 27
    assert max(client.app[JOB_CREATES].batches) > 1  # they were written together


async def test_one_batch_one_bad_job(client: Client, db: Db) -> None:
    """Five creates queued together are one batch; the one with a missing deployment is
    refused alone, and the others take consecutive ids."""
    dep = (await create_deployment(client))["deployment_id"]
    batcher = client.app[JOB_CREATES]

    def job(deployment_id: int, name: str) -> NewJob:
        fields = {"user_id": "alice", "deployment_id": deployment_id, "job_name": name}
        return NewJob({**fields, "parameters": "", "data": {}}, started_at=now(), scope={})

    items = [job(dep, "a"), job(dep, "b"), job(404, "bad"), job(dep, "c"), job(dep, "d")]
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)
    assert batcher.batches[-1] == 5
    assert isinstance(outcomes[2], ValidationFailed)
    good = [o for o in outcomes if isinstance(o, dict)]
    assert [(o["_id"], o["job_name"]) for o in good] == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
    assert await db.jobs.count_documents({}) == 4


async def test_a_job_for_another_users_deployment_fails_alone_in_its_batch(users: Users) -> None:
    dep = (await create_deployment(users.alice))["deployment_id"]
    posts = [
        users.bob.post("/jobs", json={"user_id": "bob", "deployment_id": dep})
        if n == 2
        else users.alice.post("/jobs", json={"user_id": "alice", "deployment_id": dep})
        for n in range(6)
    ]
    responses = await asyncio.gather(*posts)
    assert [r.status for r in responses] == [201, 201, 422, 201, 201, 201]
    assert "of user 'bob'" in (await responses[2].json())["detail"]
    ids = sorted([(await r.json())["job_id"] for r in responses if r.status == 201])
    assert ids == list(range(1, 6))


async def test_a_batch_of_only_bad_jobs_changes_nothing(client: Client, db: Db) -> None:
    await create_deployment(client)
    before = await snapshot(db)
    body = {"user_id": "alice", "deployment_id": 77}
    responses = await asyncio.gather(*(client.post("/jobs", json=body) for _ in range(5)))
    assert [r.status for r in responses] == [422] * 5
    assert await snapshot(db) == before


async def test_concurrent_deployments_each_their_own(client: Client) -> None:
    names = [f"d{n}" for n in range(12)]
    responses = await asyncio.gather(
        *(client.post("/deployments", json={"user_id": "u", "deployment_name": n}) for n in names)
    )
    answers = [await r.json() for r in responses]
    assert [a["deployment_name"] for a in answers] == names
    assert sorted(a["deployment_id"] for a in answers) == list(range(1, 13))
    assert max(client.app[DEPLOYMENT_CREATES].batches) > 1


async def test_a_lone_create_is_written_at_once(client: Client) -> None:
    dep = (await create_deployment(client))["deployment_id"]
    resp = await client.post("/jobs", json={"user_id": "alice", "deployment_id": dep})
    assert resp.status == 201
    assert client.app[JOB_CREATES].batches == [1]


async def test_the_batcher_waits_for_no_timer() -> None:
    """A lone item is handed to the writer within two turns of the event loop."""
    written: list[list[int]] = []

    async def write(items: list[int]) -> list[int | Exception]:
        written.append(items)
        return [i * 10 for i in items]

    batcher = Batcher[int, int](write)
    task = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)  # the submit queues it and starts the writing task
    await asyncio.sleep(0)  # which takes it
    assert written == [[1]]
    assert await task == 10


async def test_the_batcher_answers_each_item_alone() -> None:
    """Items that arrive while a batch is written form the next; an item whose request was
    cancelled before its batch is not written; a failing write fails its batch only."""
    written: list[list[int]] = []
    release = asyncio.Event()

    async def write(items: list[int]) -> list[int | Exception]:
        written.append(items)
        if items == [1]:
            await release.wait()
        if 99 in items:
            raise RuntimeError("database down")
        return [ValueError(i) if i == 3 else i * 10 for i in items]

    batcher = Batcher[int, int](write)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.01)
    later = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4, 5)]
    await asyncio.sleep(0.01)
    later[2].cancel()  # 4: its client went away while it queued
    release.set()
    assert await first == 10
    assert await later[0] == 20
    with pytest.raises(ValueError):
        await later[1]
    assert await later[3] == 50
    assert written == [[1], [2, 3, 5]]
    failing = [asyncio.create_task(batcher.submit(i)) for i in (98, 99)]
    for task in failing:
        with pytest.raises(RuntimeError, match="database down"):
            await task
    assert await batcher.submit(6) == 60  # the next batch is written as usual
