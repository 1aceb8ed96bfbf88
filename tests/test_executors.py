"""Executors: claims, leases, heartbeats, the sweeper, cancels, retries, Idempotency-Key."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from pymongo.asynchronous.database import AsyncDatabase

from service.app import create_app
from service.claims import sweep
from service.database import DB
from service.settings import Settings
from service.wakeups import POLL_S
from tests.helpers import Client, Users, create_deployment, create_job, snapshot

Doc = dict[str, Any]
NDJSON = {"Content-Type": "application/x-ndjson"}


async def claim(client: Client, executor: str = "ex-1", **fields: Any) -> tuple[int, Any]:
    resp = await client.post("/jobs/claim", json={"executor": executor, **fields})
    body = await resp.json() if resp.status not in (204,) else None
    return resp.status, body


async def heartbeat(client: Client, job_id: int, executor: str = "ex-1", **fields: Any) -> Any:
    resp = await client.post(f"/jobs/{job_id}/heartbeat", json={"executor": executor, **fields})
    return resp.status, await resp.json()


async def patch(client: Client, job_id: int, body: Doc) -> tuple[int, Any]:
    resp = await client.patch(f"/jobs/{job_id}", json=body)
    return resp.status, await resp.json()


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
async def fast(aiohttp_client: Any, settings: Settings) -> Client:
    """A service whose sweeper runs every 0.1 s and whose cancel grace is 1 s."""
    quick = settings.model_copy(update={"lease_sweep_s": 0.2, "cancel_grace_s": 1.0})
    client: Client = await aiohttp_client(create_app(quick))
    return client


# --- claiming ---------------------------------------------------------------------------


async def test_claim_takes_the_oldest_due_job_with_a_lease(client: Client) -> None:
    dep = await create_deployment(client)
    now = datetime.now(UTC)
    later = await create_job(client, dep["deployment_id"], started_at=f"{now:%Y-%m-%dT%H:%M:%S}Z")
    scheduled = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await create_job(client, dep["deployment_id"], started_at=scheduled)  # not due yet
    older = (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    first = await create_job(client, dep["deployment_id"], started_at=older)

    status, job = await claim(client, lease_s=30)
    assert status == 200
    assert job["job_id"] == first["job_id"] and job["task_status"] == "RUNNING"
    assert job["lease"]["executor"] == "ex-1"
    lease_left = at(job["lease"]["expires_at"]) - datetime.now(UTC)
    assert timedelta(seconds=25) < lease_left <= timedelta(seconds=30)
    assert job["history"][-1]["task_status"] == "RUNNING"
    assert job["history"][-1]["executor"] == "ex-1"
    assert job["revision"] == 2 and job["attempt"] == 1 and job["retry_of"] is None
    assert (await client.get(f"/jobs/{first['job_id']}")).headers["ETag"] == '"2"'

    assert (await claim(client))[1]["job_id"] == later["job_id"]
    assert (await claim(client))[0] == 204  # the scheduled one is not due


async def test_claim_filters_by_deployment_and_user(client: Client) -> None:
    one, two = await create_deployment(client), await create_deployment(client, user_id="bob")
    await create_job(client, one["deployment_id"])
    bobs = await create_job(client, two["deployment_id"], user_id="bob")
    assert (await claim(client, deployment_id=two["deployment_id"]))[1]["job_id"] == bobs["job_id"]
    assert (await claim(client, user_id="bob"))[0] == 204
    assert (await claim(client, user_id="alice"))[1]["deployment_id"] == one["deployment_id"]


async def test_users_claim_only_their_own_jobs_and_admins_any(users: Users) -> None:
    dep = await create_deployment(users.bob, user_id="bob")
    job = await create_job(users.bob, dep["deployment_id"], user_id="bob")
    assert (await claim(users.alice))[0] == 204
    assert (await claim(users.alice, user_id="bob"))[0] == 204  # no widening of the scope
    assert (await claim(users.admin))[1]["job_id"] == job["job_id"]
    assert (await heartbeat(users.alice, job["job_id"]))[0] == 404  # as good as missing


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"executor": ""},
        {"executor": "x" * 201},
        {"executor": 5},
        {"executor": "e", "lease_s": 4},
        {"executor": "e", "lease_s": 3601},
        {"executor": "e", "lease_s": "60"},
        {"executor": "e", "wait_s": 61},
        {"executor": "e", "wait_s": -1},
        {"executor": "e", "deployment_id": 0},
        {"executor": "e", "user_id": ""},
        {"executor": "e", "unknown": 1},
    ],
)
async def test_bad_claims_are_422_and_take_nothing(
    client: Client, db: AsyncDatabase[Doc], body: Doc
) -> None:
    dep = await create_deployment(client)
    await create_job(client, dep["deployment_id"])
    before = await snapshot(db)
    resp = await client.post("/jobs/claim", json=body)
    assert resp.status == 422, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert await snapshot(db) == before


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE", "PUT"])
async def test_other_methods_on_the_claim_path_are_405(client: Client, method: str) -> None:
    """/jobs/claim is no job: not a 404 for job 'claim', but 405 naming POST."""
    resp = await client.request(method, "/jobs/claim", json={"executor": "e"})
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert (await resp.json())["type"] == "/problems/method-not-allowed"
    assert (await client.get("/jobs/claimx")).status == 404  # other non-ids are still 404


async def drain(clients: list[Client], executors: int) -> list[int]:
    """`executors` loops (spread over `clients`) claim and finish jobs until none is left."""
    claimed: list[int] = []

    async def executor(n: int) -> None:
        client = clients[n % len(clients)]
        while True:
            status, job = await claim(client, f"ex-{n}")
            if status == 204:
                return
            assert status == 200, job
            claimed.append(job["job_id"])
            done = await patch(client, job["job_id"], {"task_status": "FINISHED"})
            assert done[0] == 200, done

    await asyncio.gather(*(executor(n) for n in range(executors)))
    return claimed


async def make_jobs(client: Client, n: int) -> list[int]:
    dep = await create_deployment(client)
    lines = [{"deployment_id": dep["deployment_id"], "user_id": "alice"} for _ in range(n)]
    body = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    resp = await client.post("/import/jobs", data=body, headers=NDJSON)
    assert (await resp.json())["inserted"] == n
    resp = await client.get("/jobs", params={"limit": "1", "count": "true"})
    return list(range(1, (await resp.json())["total"] + 1))


async def test_16_executors_drain_2000_jobs_each_claimed_once(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    ids = await make_jobs(client, 2000)
    claimed = await drain([client], 16)
    assert sorted(claimed) == ids  # every job once, none twice
    assert await db.jobs.count_documents({"task_status": "FINISHED"}) == 2000
    async for job in db.jobs.find({}, {"history": 1}):
        assert [h["task_status"] for h in job["history"]] == ["PENDING", "RUNNING", "FINISHED"]


async def test_two_instances_on_one_database_hand_out_each_job_once(
    aiohttp_client: Any, client: Client, settings: Settings
) -> None:
    ids = await make_jobs(client, 600)
    other: Client = await aiohttp_client(create_app(settings))
    claimed = await drain([client, other], 16)
    assert sorted(claimed) == ids


async def test_a_waiting_claim_is_answered_when_a_job_is_created(client: Client) -> None:
    dep = await create_deployment(client)
    waiting = asyncio.ensure_future(claim(client, wait_s=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    job = await create_job(client, dep["deployment_id"])
    created = time.monotonic()
    status, got = await waiting
    assert status == 200 and got["job_id"] == job["job_id"]
    assert time.monotonic() - created < 1.0


async def test_a_waiting_claim_sees_jobs_of_another_instance_within_the_poll(
    aiohttp_client: Any, client: Client, settings: Settings
) -> None:
    dep = await create_deployment(client)
    other: Client = await aiohttp_client(create_app(settings))
    waiting = asyncio.ensure_future(claim(client, wait_s=10))
    await asyncio.sleep(0.3)
    job = await create_job(other, dep["deployment_id"])
    created = time.monotonic()
    status, got = await waiting
    assert status == 200 and got["job_id"] == job["job_id"]
    assert time.monotonic() - created < POLL_S + 0.5


async def test_a_claim_waits_at_most_wait_s(client: Client) -> None:
    started = time.monotonic()
    assert (await claim(client, wait_s=1.5))[0] == 204
    assert 1.4 < time.monotonic() - started < 3


async def test_waiters_are_limited(aiohttp_client: Any, settings: Settings) -> None:
    client: Client = await aiohttp_client(
        create_app(settings.model_copy(update={"max_waiters": 1}))
    )
    waiting = asyncio.ensure_future(claim(client, wait_s=3))
    await asyncio.sleep(0.3)
    resp = await client.post("/jobs/claim", json={"executor": "e", "wait_s": 3})
    assert resp.status == 503 and "Retry-After" in resp.headers
    assert (await resp.json())["type"] == "/problems/overloaded"
    assert (await claim(client))[0] == 204  # one that does not wait is still served
    assert (await waiting)[0] == 204


# --- heartbeats and the sweeper ----------------------------------------------------------


async def test_heartbeat_extends_the_lease_and_says_why_not(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    _, claimed = await claim(client, lease_s=10)
    status, beat = await heartbeat(client, job["job_id"], lease_s=600)
    assert status == 200
    assert beat["job_id"] == job["job_id"] and beat["cancel_requested"] is False
    assert at(beat["lease"]["expires_at"]) > at(claimed["lease"]["expires_at"])
    status, problem = await heartbeat(client, job["job_id"], executor="someone-else")
    assert status == 409 and "leased to another executor" in problem["detail"]
    assert (await heartbeat(client, 999))[0] == 404
    assert (await heartbeat(client, job["job_id"], lease_s=1))[0] == 422
    await patch(client, job["job_id"], {"task_status": "FINISHED"})
    status, problem = await heartbeat(client, job["job_id"])
    assert status == 409 and "FINISHED" in problem["detail"]

    by_patch = await create_job(client, dep["deployment_id"])
    await patch(client, by_patch["job_id"], {"task_status": "RUNNING"})
    status, problem = await heartbeat(client, by_patch["job_id"])
    assert status == 409 and "no lease" in problem["detail"]


async def test_an_executor_that_stops_heartbeating_loses_the_job(fast: Client) -> None:
    dep = await create_deployment(fast)
    job = await create_job(fast, dep["deployment_id"])
    _, claimed = await claim(fast, lease_s=5)
    expires = at(claimed["lease"]["expires_at"])
    for _ in range(100):  # the sweeper acts within LEASE_SWEEP_S of the lease's end
        got = await (await fast.get(f"/jobs/{job['job_id']}")).json()
        if got["task_status"] != "RUNNING":
            break
        await asyncio.sleep(0.1)
    assert got["task_status"] == "ERROR" and got["status_reason"] == "lease expired"
    assert got["lease"] is None
    assert expires <= at(got["finished_at"]) <= expires + timedelta(seconds=1)
    assert got["history"][-1] == {
        "task_status": "ERROR",
        "at": got["finished_at"],
        "reason": "lease expired",
    }
    late = await patch(fast, job["job_id"], {"task_status": "FINISHED"})
    assert late[0] == 409  # the late executor cannot revive it
    assert (await heartbeat(fast, job["job_id"]))[0] == 409


async def test_each_expiry_happens_once_however_many_sweep(
    client: Client, db: AsyncDatabase[Doc], settings: Settings
) -> None:
    ids = await make_jobs(client, 50)
    for _ in ids:
        await claim(client, lease_s=5)
    past = datetime.now(UTC) - timedelta(seconds=1)
    await db.jobs.update_many({}, {"$set": {"lease.expires_at": past}})
    ended = await asyncio.gather(*(sweep(db, settings) for _ in range(6)))
    assert sum(ended) == 50
    async for job in db.jobs.find():
        assert [h["task_status"] for h in job["history"]] == ["PENDING", "RUNNING", "ERROR"]


async def test_the_sweep_reads_by_index(client: Client, db: AsyncDatabase[Doc]) -> None:
    await make_jobs(client, 20)
    now = datetime.now(UTC)
    for flt in (
        {"task_status": "RUNNING", "lease.expires_at": {"$lte": now}},
        {"task_status": "RUNNING", "cancel_requested_at": {"$lte": now}},
    ):
        plan = await db.command("explain", {"find": "jobs", "filter": flt})
        assert "IXSCAN" in str(plan["queryPlanner"]["winningPlan"]), flt
        assert "COLLSCAN" not in str(plan["queryPlanner"]["winningPlan"]), flt


# --- cancels ---------------------------------------------------------------------------


async def test_cancel_a_pending_job_ends_it(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    resp = await client.post(f"/jobs/{job['job_id']}/cancel", json={"reason": "not needed"})
    assert resp.status == 200
    got = await resp.json()
    assert got["task_status"] == "ERROR" and got["status_reason"] == "cancelled: not needed"
    assert got["finished_at"] is not None and got["history"][-1]["reason"] == got["status_reason"]
    again = await client.post(f"/jobs/{job['job_id']}/cancel")
    assert again.status == 409
    plain = await create_job(client, dep["deployment_id"])
    resp = await client.post(f"/jobs/{plain['job_id']}/cancel")  # no body at all
    assert resp.status == 200 and (await resp.json())["status_reason"] == "cancelled"


async def test_cancel_a_running_job_asks_its_executor(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    await claim(client)
    resp = await client.post(f"/jobs/{job['job_id']}/cancel", json={"reason": "stop"})
    assert resp.status == 202
    asked = await resp.json()
    assert asked["task_status"] == "RUNNING" and asked["cancel_requested_at"] is not None
    again = await client.post(f"/jobs/{job['job_id']}/cancel", json={"reason": "other"})
    assert again.status == 202
    assert (await again.json())["revision"] == asked["revision"]  # the first request stands
    status, beat = await heartbeat(client, job["job_id"])
    assert status == 200 and beat["cancel_requested"] is True
    status, ended = await patch(client, job["job_id"], {"task_status": "ERROR"})
    assert status == 200 and ended["status_reason"] == "cancelled: stop"


async def test_a_cancel_past_its_grace_period_ends_the_job(fast: Client) -> None:
    dep = await create_deployment(fast)
    job = await create_job(fast, dep["deployment_id"])
    await claim(fast, lease_s=600)
    assert (await fast.post(f"/jobs/{job['job_id']}/cancel")).status == 202
    asked = time.monotonic()
    for _ in range(100):
        got = await (await fast.get(f"/jobs/{job['job_id']}")).json()
        if got["task_status"] != "RUNNING":
            break
        await asyncio.sleep(0.1)
    assert got["task_status"] == "ERROR" and got["status_reason"] == "cancelled"
    assert 0.9 < time.monotonic() - asked < 3  # CANCEL_GRACE_S 1, LEASE_SWEEP_S 0.2


async def test_cancel_of_an_ended_or_unknown_job(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    await patch(client, job["job_id"], {"task_status": "RUNNING"})
    await patch(client, job["job_id"], {"task_status": "FINISHED"})
    resp = await client.post(f"/jobs/{job['job_id']}/cancel")
    assert resp.status == 409 and "FINISHED" in (await resp.json())["detail"]
    assert (await client.post("/jobs/999/cancel")).status == 404
    bad = await client.post(f"/jobs/{job['job_id']}/cancel", json={"reason": ""})
    assert bad.status == 422


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_claims_and_cancels_are_counted(client: Client) -> None:
    """Metrics are per process: compare before and after."""
    cancels = "jobservice_cancels_total"
    before = {
        "claims": metric("jobservice_claims_total"),
        "ended": metric(cancels, outcome="ended"),
        "requested": metric(cancels, outcome="requested"),
    }
    dep = await create_deployment(client)
    running = await create_job(client, dep["deployment_id"])
    await claim(client)
    pending = await create_job(client, dep["deployment_id"])
    assert (await client.post(f"/jobs/{pending['job_id']}/cancel")).status == 200
    for _ in range(3):  # asked once; the repeats change nothing and count nothing
        assert (await client.post(f"/jobs/{running['job_id']}/cancel")).status == 202
    assert (await client.post(f"/jobs/{pending['job_id']}/cancel")).status == 409
    assert metric("jobservice_claims_total") - before["claims"] == 1
    assert metric(cancels, outcome="ended") - before["ended"] == 1
    assert metric(cancels, outcome="requested") - before["requested"] == 1


# --- status_reason on PATCH -------------------------------------------------------------


async def test_patch_may_give_a_status_reason_with_a_status(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    status, body = await patch(client, job["job_id"], {"status_reason": "why"})
    assert status == 422  # only with task_status
    status, body = await patch(
        client, job["job_id"], {"task_status": "ERROR", "status_reason": "oom"}
    )
    assert status == 200 and body["status_reason"] == "oom"
    assert body["history"][-1]["reason"] == "oom"


# --- retries ---------------------------------------------------------------------------


async def test_retry_chains(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(
        client, dep["deployment_id"], job_name="n", parameters="-x", data={"k": 1}
    )
    assert (await client.post(f"/jobs/{job['job_id']}/retry")).status == 409  # PENDING
    current = job
    for attempt in (2, 3):
        await patch(client, current["job_id"], {"task_status": "ERROR"})
        resp = await client.post(f"/jobs/{current['job_id']}/retry")
        assert resp.status == 201, await resp.text()
        new = await resp.json()
        assert resp.headers["Location"] == f"/jobs/{new['job_id']}"
        assert new["retry_of"] == current["job_id"] and new["attempt"] == attempt
        assert new["task_status"] == "PENDING" and new["history"][0]["task_status"] == "PENDING"
        for name in ("deployment_id", "user_id", "job_name", "parameters", "data"):
            assert new[name] == job[name]
        current = new
    assert (await client.post("/jobs/999/retry")).status == 404


# --- Idempotency-Key ---------------------------------------------------------------------


async def test_idempotency_key_creates_one_record_for_concurrent_duplicates(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    dep = await create_deployment(client)
    body = {"deployment_id": dep["deployment_id"], "user_id": "alice", "job_name": "once"}
    headers = {"Idempotency-Key": "k-1"}
    answers = await asyncio.gather(
        *(client.post("/jobs", json=body, headers=headers) for _ in range(10))
    )
    assert sorted(r.status for r in answers) == [201] * 10
    bodies = [await r.json() for r in answers]
    assert all(b == bodies[0] for b in bodies)
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in answers) == 9
    assert await db.jobs.count_documents({}) == 1
    # The same key with the same body in another spelling replays; another body is 422.
    same = await client.post(
        "/jobs",
        data=orjson.dumps(dict(reversed(body.items()))),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert same.status == 201 and same.headers["Idempotent-Replayed"] == "true"
    other = await client.post("/jobs", json={**body, "job_name": "twice"}, headers=headers)
    assert other.status == 422
    assert await db.jobs.count_documents({}) == 1


async def test_idempotency_key_on_deployments_and_retries(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    headers = {"Idempotency-Key": "dep"}
    first = await client.post("/deployments", json={"user_id": "alice"}, headers=headers)
    again = await client.post("/deployments", json={"user_id": "alice"}, headers=headers)
    assert first.status == again.status == 201
    assert (
        await first.json() == await again.json()
        and again.headers["Location"] == first.headers["Location"]
    )
    dep = await first.json()
    job = await create_job(client, dep["deployment_id"])
    await patch(client, job["job_id"], {"task_status": "ERROR"})
    retries = [
        await client.post(f"/jobs/{job['job_id']}/retry", headers={"Idempotency-Key": "r"})
        for _ in range(3)
    ]
    assert [r.status for r in retries] == [201] * 3
    assert await db.jobs.count_documents({}) == 2
    # No body and {} are the same request.
    same = await client.post(
        f"/jobs/{job['job_id']}/retry", json={}, headers={"Idempotency-Key": "r"}
    )
    assert same.status == 201 and same.headers["Idempotent-Replayed"] == "true"
    assert await db.jobs.count_documents({}) == 2
    # A key is per user and per request: the same key for a deployment is not a retry.
    assert (await client.post(f"/jobs/{job['job_id']}/retry", headers=headers)).status == 422


async def test_a_failed_create_frees_its_key(client: Client) -> None:
    headers = {"Idempotency-Key": "fix-me"}
    bad = await client.post("/jobs", json={"user_id": "alice", "deployment_id": 5}, headers=headers)
    assert bad.status == 422
    await create_deployment(client)
    assert (
        await client.post("/jobs", json={"user_id": "alice", "deployment_id": 1}, headers=headers)
    ).status == 201


async def test_bad_idempotency_keys_are_400(client: Client) -> None:
    long_key = {"Idempotency-Key": "x" * 201}
    resp = await client.post("/deployments", json={"user_id": "alice"}, headers=long_key)
    assert resp.status == 400


async def test_executor_fields_round_trip_through_export_and_import(
    aiohttp_client: Any, client: Client, settings: Settings
) -> None:
    dep = await create_deployment(client)
    for _ in range(3):
        await create_job(client, dep["deployment_id"])
    await claim(client, "ex-a")  # RUNNING with a lease
    await claim(client, "ex-b")
    await client.post("/jobs/2/cancel", json={"reason": "enough"})  # asked
    await patch(client, 3, {"task_status": "ERROR", "status_reason": "bad input"})
    await client.post("/jobs/3/retry")  # attempt 2, retry_of 3
    exported = {}
    for kind in ("deployments", "jobs"):
        exported[kind] = await (await client.get(f"/export/{kind}")).read()
    other_db = settings.model_copy(update={"mongodb_db": settings.mongodb_db + "_copy"})
    copy: Client = await aiohttp_client(create_app(other_db))
    for kind in ("deployments", "jobs"):
        resp = await copy.post(f"/import/{kind}", data=exported[kind], headers=NDJSON)
        assert (await resp.json())["failed"] == 0, await resp.text()
    again = await (await copy.get("/export/jobs")).read()
    assert again == exported["jobs"]
    jobs = [orjson.loads(line) for line in again.splitlines()]
    assert {j["job_id"]: j["attempt"] for j in jobs} == {1: 1, 2: 1, 3: 1, 4: 2}
    assert jobs[1]["cancel_reason"] == "enough" and jobs[0]["lease"]["executor"] == "ex-a"
    await copy.app[DB].client.drop_database(other_db.mongodb_db)
