"""GET of one record with If-None-Match and wait_s: held until the record changes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from service import store, wakeups
from service.app import create_app
from service.settings import Settings
from tests.helpers import Client, Users, create_deployment, create_job


async def timed_get(client: Client, path: str, tag: str | None) -> tuple[int, Any, float, str]:
    """Status, body, the moment the answer came and its ETag."""
    headers = {"If-None-Match": tag} if tag is not None else {}
    resp = await client.get(path, headers=headers)
    body = await resp.json() if resp.status == 200 or resp.status >= 400 else None
    return resp.status, body, time.monotonic(), resp.headers.get("ETag", "")


async def patch_later(client: Client, path: str, body: Any, after_s: float) -> float:
    await asyncio.sleep(after_s)
    resp = await client.patch(path, json=body)
    assert resp.status == 200, await resp.text()
    return time.monotonic()


@pytest.mark.parametrize("what", ["jobs", "deployments"])
async def test_a_waiting_get_is_answered_within_a_second_of_the_change(
    client: Client, what: str
) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    path = f"/jobs/{job['job_id']}" if what == "jobs" else f"/deployments/{dep['deployment_id']}"
    started = time.monotonic()
    waiting = asyncio.ensure_future(timed_get(client, f"{path}?wait_s=30", '"1"'))
    changed_at = await patch_later(client, path, {"data": {"x": 1}}, 0.5)
    status, body, answered_at, etag = await waiting
    assert status == 200 and body["revision"] == 2 and body["data"] == {"x": 1}
    assert etag == '"2"'
    assert answered_at - started >= 0.5  # it did wait for the change
    assert answered_at - changed_at < 1.0


async def test_a_wait_that_sees_no_change_is_304_after_wait_s(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    started = time.monotonic()
    status, body, answered_at, etag = await timed_get(
        client, f"/jobs/{job['job_id']}?wait_s=0.6", '"1"'
    )
    assert status == 304 and body is None and etag == '"1"'
    assert 0.6 <= answered_at - started < 3


@pytest.mark.parametrize(
    ("tag", "status"),
    [
        ('"2"', 200),  # another revision: the current one at once
        ('W/"2"', 200),
        ('"7", "2"', 200),
        ('"1"', 304),  # the current one, no wait: 304 at once
        ('W/"1"', 304),
        ('"3", "1"', 304),
        ("*", 304),
        (None, 200),
    ],
)
async def test_if_none_match_without_waiting(client: Client, tag: str | None, status: int) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    started = time.monotonic()
    got, body, answered_at, etag = await timed_get(client, f"/jobs/{job['job_id']}", tag)
    assert got == status and etag == '"1"'
    assert answered_at - started < 1
    if status == 200:
        assert body == job
    # With wait_s, a tag naming another revision is answered at once too.
    if tag is not None and status == 200:
        started = time.monotonic()
        got, _, answered_at, _ = await timed_get(client, f"/jobs/{job['job_id']}?wait_s=30", tag)
        assert got == 200 and answered_at - started < 1


async def test_a_job_deleted_while_waited_for_is_404(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    waiting = asyncio.ensure_future(timed_get(client, f"/jobs/{job['job_id']}?wait_s=30", '"1"'))
    await asyncio.sleep(0.3)
    assert (await client.delete(f"/jobs/{job['job_id']}")).status == 204
    status, body, _, _ = await asyncio.wait_for(waiting, 5)
    assert status == 404 and body["type"] == "/problems/not-found"


async def test_a_change_through_another_instance_wakes_the_wait(
    aiohttp_client: Any, settings: Settings
) -> None:
    one: Client = await aiohttp_client(create_app(settings))
    other: Client = await aiohttp_client(create_app(settings))
    dep = await create_deployment(one)
    path = f"/deployments/{dep['deployment_id']}"
    waiting = asyncio.ensure_future(timed_get(one, f"{path}?wait_s=30", '"1"'))
    changed_at = await patch_later(other, path, {"data": {"from": "other"}}, 0.5)
    status, body, answered_at, _ = await waiting
    assert status == 200 and body["data"] == {"from": "other"}
    assert answered_at - changed_at < 1.0


@pytest.mark.parametrize(
    ("query", "tag"),
    [
        ("wait_s=-1", '"1"'),
        ("wait_s=61", '"1"'),
        ("wait_s=soon", '"1"'),
        ("wait_s=nan", '"1"'),
        ("wait_s=1&wait_s=2", '"1"'),
        ("wait=1", '"1"'),
        ("wait_s=1", "1"),
        ("wait_s=1", '"x"'),
        ("wait_s=1", '"1", 2'),
    ],
)
async def test_bad_waits_are_400(client: Client, query: str, tag: str) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    resp = await client.get(f"/jobs/{job['job_id']}?{query}", headers={"If-None-Match": tag})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["type"] == "/problems/bad-request"


async def test_nobody_waits_on_another_users_record(users: Users) -> None:
    dep = await create_deployment(users.alice, user_id="alice")
    started = time.monotonic()
    status, _, answered_at, _ = await timed_get(
        users.bob, f"/deployments/{dep['deployment_id']}?wait_s=30", '"1"'
    )
    assert status == 404 and answered_at - started < 1


async def test_without_a_change_stream_events_are_503_and_waits_poll(
    aiohttp_client: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a standalone mongod answers to a change stream (SecantusDB always runs as a
    # replica set, so the refusal is made here).
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OperationFailure("The $changeStream stage is only supported on replica sets", 40573)

    monkeypatch.setattr(AsyncDatabase, "watch", refuse)
    client: Client = await aiohttp_client(create_app(settings))
    resp = await client.get("/events")
    assert resp.status == 503
    body = await resp.json()
    assert body["type"] == "/problems/cannot-watch" and "replica set" in body["detail"]
    dep = await create_deployment(client)
    path = f"/deployments/{dep['deployment_id']}"
    waiting = asyncio.ensure_future(timed_get(client, f"{path}?wait_s=30", '"1"'))
    changed_at = await patch_later(client, path, {"data": {"x": 1}}, 0.3)
    status, _, answered_at, _ = await waiting
    assert status == 200 and answered_at - changed_at < 2.0  # a poll every second


async def test_a_job_created_through_another_instance_wakes_a_waiting_claim(
    aiohttp_client: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No poll in time: only the instance's change stream can wake the claim.
    monkeypatch.setattr(wakeups, "POLL_S", 30.0)
    one: Client = await aiohttp_client(create_app(settings))
    other: Client = await aiohttp_client(create_app(settings))
    dep = await create_deployment(one)
    claim = asyncio.ensure_future(one.post("/jobs/claim", json={"executor": "e", "wait_s": 20}))
    await asyncio.sleep(0.5)
    job = await create_job(other, dep["deployment_id"])
    created_at = time.monotonic()
    resp = await asyncio.wait_for(claim, 25)
    assert resp.status == 200 and (await resp.json())["job_id"] == job["job_id"]
    assert time.monotonic() - created_at < 5


async def test_a_wait_reads_the_record_again_only_after_a_change(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = await create_deployment(client)
    await asyncio.sleep(0.5)  # its creation's change has reached the feed (it wakes waiters)
    reads: list[int] = []
    real = store.get_checked

    async def counted(*args: Any) -> Any:
        reads.append(1)
        return await real(*args)

    monkeypatch.setattr("service.deployments.get_checked", counted)
    path = f"/deployments/{dep['deployment_id']}?wait_s=2.5"
    status, _, _, _ = await timed_get(client, path, '"1"')
    assert status == 304 and len(reads) == 1  # not once a second while it waited
