"""GET /events and GETs with wait_s: the instance's one change stream, fanned out.

The ground truth for "every change, in order" is a change stream the test opens itself
with the driver: the service's event ids are the resume tokens of those same changes.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import BaseTestServer, TestServer
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from service.app import create_app
from service.changes import CHANGES
from service.settings import Settings
from tests.helpers import Client, Event, EventStream, Users, create_deployment, create_job
from tests.test_faults import running, start_service

Doc = dict[str, Any]


async def changes(db: AsyncDatabase[Doc]) -> AsyncChangeStream[Doc]:
    return await db.jobs.watch(max_await_time_ms=200)


async def tokens(stream: AsyncChangeStream[Doc], n: int) -> list[tuple[str, str, int]]:
    """The next `n` changes of the driver's own stream: (token, operation, job id)."""
    found: list[tuple[str, str, int]] = []
    deadline = time.monotonic() + 10
    while len(found) < n and time.monotonic() < deadline and stream.alive:
        change = await stream.try_next()
        if change is not None:
            key = change["documentKey"]["_id"]
            found.append((change["_id"]["_data"], change["operationType"], key))
    return found


def seen(events: list[Event]) -> list[tuple[str | None, str, int]]:
    def operation(ev: Event) -> str:
        if ev.data.get("deleted"):
            return "delete"
        return "insert" if ev.data["revision"] == 1 else "update"

    return [(ev.id, operation(ev), ev.data["job_id"]) for ev in events]


async def ok(resp: aiohttp.ClientResponse, status: int = 200) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json() if resp.content_type.endswith("json") else None


# --- every change, in order -------------------------------------------------------------


async def test_every_change_of_a_job_is_an_event_in_order(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    truth = await changes(db)
    stream = await EventStream.open(client)
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    job_id = job["job_id"]
    events = [await stream.next()]
    assert events[0].name == "job" and events[0].data == job

    async def step(method: str, path: str, status: int = 200, **kwargs: Any) -> None:
        resp = await client.request(method, path, **kwargs)
        assert resp.status == status, await resp.text()
        # Each change's event is awaited before the next change: its data is then exactly
        # the job as that change left it, which is what GET shows.
        events.append(await stream.next())
        if status != 204:
            assert events[-1].data == await ok(await client.get(f"/jobs/{job_id}"))

    await step("PATCH", f"/jobs/{job_id}", json={"data": {"step": 1}})
    await step("POST", "/jobs/claim", json={"executor": "ex-1"})
    await step("POST", f"/jobs/{job_id}/heartbeat", json={"executor": "ex-1"})
    await step("PUT", f"/jobs/{job_id}/results/out.txt", status=201, data=b"hello")
    await step("PATCH", f"/jobs/{job_id}", json={"task_status": "FINISHED"})
    await step("DELETE", f"/jobs/{job_id}", status=204)

    assert [e.name for e in events] == ["job"] * 7
    assert [e.data.get("revision") for e in events[:-1]] == list(range(1, 7))
    assert events[4].data["results"][0]["name"] == "out.txt"
    assert events[5].data["task_status"] == "FINISHED"
    assert events[-1].data == {"job_id": job_id, "deleted": True}
    # One event per change of the database, with the change's resume token as its id.
    assert [e.id for e in events] == [t[0] for t in await tokens(truth, 7)]
    with pytest.raises(TimeoutError):
        await stream.next(within=0.5)
    stream.close()


async def test_concurrent_changes_arrive_all_in_the_database_order(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    truth = await changes(db)
    stream = await EventStream.open(client)
    dep = await create_deployment(client)
    jobs = [await create_job(client, dep["deployment_id"]) for _ in range(6)]

    async def patches(job_id: int) -> None:
        for i in range(5):
            await ok(await client.patch(f"/jobs/{job_id}", json={"data": {"i": i}}))

    await asyncio.gather(*(patches(j["job_id"]) for j in jobs))
    await ok(await client.delete(f"/jobs/{jobs[0]['job_id']}"), 204)
    n = 6 + 6 * 5 + 1
    events = await stream.take(n)
    expected = await tokens(truth, n)
    assert [ev.id for ev in events] == [t[0] for t in expected]
    assert seen(events) == [(t, op, i) for t, op, i in expected]
    # Each event shows the job at or after its change: never an older revision than the
    # previous event of the same job.
    last: dict[int, int] = {}
    for ev in events:
        if not ev.data.get("deleted"):
            assert ev.data["revision"] >= last.get(ev.data["job_id"], 0)
            last[ev.data["job_id"]] = ev.data["revision"]
    stream.close()


async def test_filters_select_events(client: Client) -> None:
    one, two = await create_deployment(client), await create_deployment(client)
    by_dep = await EventStream.open(client, f"/events?deployment_id={two['deployment_id']}")
    a = await create_job(client, one["deployment_id"])
    b = await create_job(client, two["deployment_id"], user_id="bob")
    by_job = await EventStream.open(client, f"/events?job_id={a['job_id']}")
    by_user = await EventStream.open(client, "/events?user_id=bob")
    await ok(await client.patch(f"/jobs/{b['job_id']}", json={"data": {"x": 1}}))
    await ok(await client.patch(f"/jobs/{a['job_id']}", json={"data": {"x": 2}}))
    assert [(e.data["job_id"], e.data["revision"]) for e in await by_dep.take(2)] == [
        (b["job_id"], 1),
        (b["job_id"], 2),
    ]
    assert (await by_job.next()).data["data"] == {"x": 2}
    assert (await by_user.next()).data["data"] == {"x": 1}
    for stream in (by_dep, by_job, by_user):  # nothing more
        with pytest.raises(TimeoutError):
            await stream.next(within=0.5)
        stream.close()


@pytest.mark.parametrize(
    ("query", "where"),
    [
        ("job_id=x", "job_id"),
        ("deployment_id=0", "deployment_id"),
        ("user_id=", "user_id"),
        ("job_id=1&job_id=2", "job_id"),
        ("jobid=1", "jobid"),
    ],
)
async def test_bad_filters_are_400(client: Client, query: str, where: str) -> None:
    resp = await client.get(f"/events?{query}")
    assert resp.status == 400
    body = await resp.json()
    assert body["errors"][0]["loc"] == ["query", where]


# --- who sees what ----------------------------------------------------------------------


async def test_a_user_sees_only_events_of_their_own_jobs(users: Users) -> None:
    alice = await EventStream.open(users.alice)
    bob = await EventStream.open(users.bob)
    admin = await EventStream.open(users.admin)
    spying = await EventStream.open(users.bob, "/events?user_id=alice")
    dep_a = await create_deployment(users.alice, user_id="alice")
    dep_b = await create_deployment(users.bob, user_id="bob")
    job_a = await create_job(users.alice, dep_a["deployment_id"], user_id="alice")
    job_b = await create_job(users.bob, dep_b["deployment_id"], user_id="bob")
    await ok(await users.alice.patch(f"/jobs/{job_a['job_id']}", json={"data": {"s": 1}}))
    await ok(await users.alice.delete(f"/jobs/{job_a['job_id']}"), 204)
    await ok(await users.bob.delete(f"/jobs/{job_b['job_id']}"), 204)

    a_id, b_id = job_a["job_id"], job_b["job_id"]
    got_a = [(e.data["job_id"], e.data.get("deleted", False)) for e in await alice.take(3)]
    got_b = [(e.data["job_id"], e.data.get("deleted", False)) for e in await bob.take(2)]
    got_admin = [(e.data["job_id"], e.data.get("deleted", False)) for e in await admin.take(5)]
    assert got_a == [(a_id, False), (a_id, False), (a_id, True)]
    assert got_b == [(b_id, False), (b_id, True)]
    assert got_admin == [(a_id, False), (b_id, False), (a_id, False), (a_id, True), (b_id, True)]
    for stream in (alice, bob, spying):
        with pytest.raises(TimeoutError):
            await stream.next(within=0.5)
    for stream in (alice, bob, admin, spying):
        stream.close()
    resp = await users.anonymous.get("/events")
    assert resp.status == 401


# --- resuming ---------------------------------------------------------------------------


async def test_resume_with_last_event_id_loses_nothing(client: Client) -> None:
    dep = await create_deployment(client)
    stream = await EventStream.open(client)
    job = await create_job(client, dep["deployment_id"])
    for i in range(4):
        await ok(await client.patch(f"/jobs/{job['job_id']}", json={"data": {"i": i}}))
    first = await stream.take(2)
    stream.close()  # the client goes away after two events
    for i in range(4, 8):
        await ok(await client.patch(f"/jobs/{job['job_id']}", json={"data": {"i": i}}))
    resumed = await EventStream.open(client, headers={"Last-Event-ID": first[-1].id or ""})
    rest = await resumed.take(7)
    assert [e.data["revision"] for e in first + rest] == list(range(1, 10))
    with pytest.raises(TimeoutError):
        await resumed.next(within=0.5)
    resumed.close()


async def resume_elsewhere(settings: Settings, last_id: str, n: int) -> list[Event]:
    """Read `n` events resumed after `last_id` from another instance on the database."""
    async with TestServer(create_app(settings)) as server, aiohttp.ClientSession() as http:
        headers = {"Last-Event-ID": last_id}
        async with http.get(server.make_url("/events"), headers=headers) as resp:
            stream = EventStream(resp)
            await stream.comment()
            return await stream.take(n)


async def test_resume_on_another_instance_or_past_the_backlog(
    aiohttp_client: Any, settings: Settings
) -> None:
    # A backlog of 2: a resume point four changes back has left it (the catch-up path).
    small = settings.model_copy(update={"events_backlog": 2})
    client: Client = await aiohttp_client(create_app(small))
    dep = await create_deployment(client)
    stream = await EventStream.open(client)
    job = await create_job(client, dep["deployment_id"])
    all_events = [await stream.next()]
    for i in range(6):
        await ok(await client.patch(f"/jobs/{job['job_id']}", json={"data": {"i": i}}))
        all_events.append(await stream.next())
    stream.close()
    after = all_events[1]
    resumed = await EventStream.open(client, headers={"Last-Event-ID": after.id or ""})
    got = await resumed.take(5)
    assert [e.id for e in got] == [e.id for e in all_events[2:]]
    # It then follows the backlog: the next change arrives once, in order.
    await ok(await client.patch(f"/jobs/{job['job_id']}", json={"data": {"i": 6}}))
    latest = await resumed.next()
    assert latest.data["revision"] == 8
    with pytest.raises(TimeoutError):
        await resumed.next(within=0.5)
    resumed.close()
    # Another instance (an empty backlog) resumes from the same id too: the same changes,
    # each showing the job as it is now (at or after the change; its revision says which).
    elsewhere = await resume_elsewhere(settings, after.id or "", 6)
    assert [e.id for e in elsewhere] == [e.id for e in all_events[2:]] + [latest.id]
    assert {e.data["revision"] for e in elsewhere} == {8}


async def test_a_malformed_last_event_id_is_400(client: Client) -> None:
    for bad in ("not hex", "00", "41" * 20):
        resp = await client.get("/events", headers={"Last-Event-ID": bad})
        assert resp.status == 400, bad
        assert (await resp.json())["type"] == "/problems/bad-request"


async def test_a_resume_point_the_database_no_longer_has_is_410(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SecantusDB keeps every change of its lifetime; MongoDB's oplog forgets old ones
    # and then refuses the resume with code 286, which is what this stands in for.
    feed = client.app[CHANGES]

    async def forgotten(*args: Any, **kwargs: Any) -> Any:
        raise OperationFailure("resume point may no longer be in the oplog", 286)

    monkeypatch.setattr(feed, "_db", type("Db", (), {"watch": forgotten})())
    resp = await client.get("/events", headers={"Last-Event-ID": "8200000001"})
    assert resp.status == 410
    body = await resp.json()
    assert body["type"] == "/problems/history-lost" and "reload" in body["detail"]


async def test_streams_end_with_reset_when_the_feed_starts_afresh(client: Client) -> None:
    stream = await EventStream.open(client)
    client.app[CHANGES]._reset()  # what losing the database's history does to the feed
    ev = await stream.next()
    assert ev.name == "reset" and "reload" in ev.data["reason"]
    with pytest.raises(EOFError):
        await stream.next()


# --- heartbeats, limits, slow clients ---------------------------------------------------


async def test_heartbeats_and_the_stream_lifetime(aiohttp_client: Any, settings: Settings) -> None:
    fast = settings.model_copy(update={"events_heartbeat_s": 0.2, "events_max_s": 1.0})
    client: Client = await aiohttp_client(create_app(fast))
    stream = await EventStream.open(client)
    started = time.monotonic()
    ev = await stream.next(within=5)
    assert ev.name == "end" and "Last-Event-ID" in ev.data["reason"]
    assert 0.9 <= time.monotonic() - started < 3
    assert len(stream.comments) >= 3  # ": keep-alive" every 0.2 s of the second
    with pytest.raises(EOFError):
        await stream.next()


async def test_streams_and_waiters_beyond_the_limits_are_503(
    aiohttp_client: Any, settings: Settings
) -> None:
    limited = settings.model_copy(update={"max_streams": 1, "max_waiters": 1})
    client: Client = await aiohttp_client(create_app(limited))
    stream = await EventStream.open(client)
    resp = await client.get("/events")
    assert resp.status == 503 and int(resp.headers["Retry-After"]) > 0
    body = await resp.json()
    assert body["type"] == "/problems/overloaded" and "MAX_STREAMS" in body["detail"]
    stream.close()
    await asyncio.sleep(0.3)  # the closed stream's place frees when its handler sees it
    again = await EventStream.open(client)
    again.close()

    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    path, tag = f"/jobs/{job['job_id']}?wait_s=5", {"If-None-Match": '"1"'}
    waiting = asyncio.ensure_future(client.get(path, headers=tag))
    await asyncio.sleep(0.3)
    resp = await client.get(path, headers=tag)
    assert resp.status == 503 and "MAX_WAITERS" in (await resp.json())["detail"]
    await ok(await client.patch(f"/jobs/{job['job_id']}", json={"data": {"x": 1}}))
    assert (await waiting).status == 200


async def slow_reader(server: BaseTestServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client of /events that reads nothing: a tiny receive buffer, soon full."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((str(server.host), int(server.port or 0)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
    await writer.drain()
    return reader, writer


async def test_a_slow_client_is_dropped_without_slowing_a_fast_one(
    aiohttp_client: Any, settings: Settings
) -> None:
    small = settings.model_copy(update={"events_backlog": 20, "events_heartbeat_s": 0.2})
    client: Client = await aiohttp_client(create_app(small))
    fast = await EventStream.open(client)
    reader, writer = await slow_reader(client.server)
    await asyncio.sleep(0.3)
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    big = "x" * 20_000
    received: list[int] = []

    async def read_fast() -> None:
        while len(received) < 301:
            received.append((await fast.next()).data["revision"])

    reading = asyncio.ensure_future(read_fast())
    for i in range(300):
        await ok(await client.patch(f"/jobs/{job['job_id']}", json={"data": {"i": i, "b": big}}))
    await asyncio.wait_for(reading, 30)
    assert received == list(range(1, 302))  # the fast client missed nothing
    rest = await asyncio.wait_for(reader.read(), 30)  # the slow one: up to its end
    assert b"event: dropped" in rest and b"Last-Event-ID" in rest
    assert rest.count(b"event: job") < 300
    writer.close()
    fast.close()


# --- SIGTERM ----------------------------------------------------------------------------


async def test_sigterm_ends_streams_and_every_wait_at_once(tmp_path: Path) -> None:
    with running(start_service(tmp_path, "svc", DATA_DIR=str(tmp_path / "data"))) as service:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{service.url}/deployments", json={"user_id": "a"}) as resp:
                dep = await resp.json()
            body = {"user_id": "a", "deployment_id": dep["deployment_id"]}
            async with http.post(f"{service.url}/jobs", json=body) as resp:
                job = await resp.json()
            async with http.get(f"{service.url}/events") as resp:
                stream = EventStream(resp)
                await stream.comment()
                waiting = asyncio.ensure_future(
                    http.get(
                        f"{service.url}/jobs/{job['job_id']}?wait_s=60",
                        headers={"If-None-Match": '"1"'},
                    )
                )
                elsewhere = {
                    "executor": "e",
                    "wait_s": 60,
                    "deployment_id": dep["deployment_id"] + 1,
                }
                claiming = asyncio.ensure_future(  # nothing due for it: it waits
                    http.post(f"{service.url}/jobs/claim", json=elsewhere)
                )
                await asyncio.sleep(0.5)
                started = time.monotonic()
                service.proc.send_signal(signal.SIGTERM)
                ev = await stream.next(within=10)
                assert ev.name == "end" and "stopping" in ev.data["reason"]
                answer = await asyncio.wait_for(waiting, 10)
                assert answer.status == 304  # unchanged: answered now, not after 60 s
                claimed = await asyncio.wait_for(claiming, 10)
                assert claimed.status == 204  # no job: the executor claims elsewhere
                assert time.monotonic() - started < 5
        assert service.proc.wait(30) == 0  # a clean exit (a second SIGTERM would not be)
