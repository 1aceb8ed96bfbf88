"""Two users and an admin against every endpoint: neither user can read, change, count or
infer the other's records; the admin sees everything."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers import Client, Users

Probe = tuple[str, str, Any, dict[str, str]]


@dataclass
class Seeded:
    alice_dep: int
    alice_job: int
    bob_dep: int
    bob_job: int


async def created(client: Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(path, json=body)
    assert resp.status == 201, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


@pytest.fixture
async def seeded(users: Users) -> Seeded:
    ids = []
    for client in (users.alice, users.bob):
        dep = await created(client, "/deployments", {"deployment_name": "d", "data": {"k": 1}})
        job = await created(client, "/jobs", {"deployment_id": dep["deployment_id"]})
        ids += [dep["deployment_id"], job["job_id"]]
        resp = await client.put(f"/jobs/{job['job_id']}/results/out.csv", data=b"a,b\n1,2\n")
        assert resp.status == 201, await resp.text()
    return Seeded(*ids)


def record_probes(dep: int, job: int) -> list[Probe]:
    """Every request that names one record: (method, path, JSON body, headers)."""
    stale, fresh = {"If-Match": '"99"'}, {"If-Match": '"1"'}
    return [
        ("GET", f"/deployments/{dep}", None, {}),
        ("PATCH", f"/deployments/{dep}", {"deployment_name": "x"}, {}),
        ("PATCH", f"/deployments/{dep}", {"deployment_name": "x"}, stale),
        ("PATCH", f"/deployments/{dep}", {"data": {"k": None}}, fresh),
        ("PATCH", f"/deployments/{dep}", {}, {}),
        ("DELETE", f"/deployments/{dep}", None, {}),
        ("DELETE", f"/deployments/{dep}", None, stale),
        ("DELETE", f"/deployments/{dep}?cascade=true", None, {}),
        ("GET", f"/deployments/{dep}/jobs", None, {}),
        ("GET", f"/deployments/{dep}/jobs?count=true&task_status=PENDING", None, {}),
        ("GET", f"/jobs/{job}", None, {}),
        ("PATCH", f"/jobs/{job}", {"task_status": "RUNNING"}, {}),
        ("PATCH", f"/jobs/{job}", {"task_status": "FINISHED"}, {}),  # 409 if it were visible
        ("PATCH", f"/jobs/{job}", {"finished_at": "2020-01-01T00:00:00Z"}, {}),
        ("PATCH", f"/jobs/{job}", {"job_name": "x"}, stale),
        ("PATCH", f"/jobs/{job}", {}, {}),
        ("DELETE", f"/jobs/{job}", None, {}),
        ("DELETE", f"/jobs/{job}", None, stale),
        ("POST", "/jobs", {"deployment_id": dep}, {}),
        ("GET", f"/jobs/{job}/results", None, {}),
        ("GET", f"/jobs/{job}/results/out.csv", None, {}),
        ("GET", f"/jobs/{job}/results/out.csv", None, {"Range": "bytes=0-1"}),
        ("GET", f"/jobs/{job}/results/other.csv", None, {}),  # which names exist: hidden too
        ("HEAD", f"/jobs/{job}/results/out.csv", None, {}),
        ("PUT", f"/jobs/{job}/results/out.csv", b"overwritten", {}),
        ("PUT", f"/jobs/{job}/results/new.csv", b"added", {}),
        ("DELETE", f"/jobs/{job}/results/out.csv", None, {}),
        ("DELETE", f"/jobs/{job}/results/other.csv", None, {}),
    ]


async def answer(client: Client, probe: Probe) -> tuple[int, str, str, dict[str, str]]:
    method, path, body, headers = probe
    payload = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = await client.request(method, path, headers=headers, **payload)
    kept = {k: v for k, v in resp.headers.items() if k not in ("Date", "Server", "X-Request-ID")}
    return resp.status, path, await resp.text(), kept


async def snapshot(client: Client, seeded: Seeded) -> list[str]:
    out = []
    for path in (
        f"/deployments/{seeded.alice_dep}",
        f"/jobs/{seeded.alice_job}",
        f"/jobs/{seeded.alice_job}/results",
        f"/jobs/{seeded.alice_job}/results/out.csv",
        "/deployments?count=true",
        "/jobs?count=true",
    ):
        resp = await client.get(path)
        assert resp.status == 200
        out.append(await resp.text())
    return out


async def test_another_users_records_answer_exactly_like_missing_ones(
    users: Users, seeded: Seeded
) -> None:
    probes = record_probes(seeded.alice_dep, seeded.alice_job)
    before = await snapshot(users.alice, seeded)
    answers = [await answer(users.bob, p) for p in probes]
    assert all(a[0] in (404, 422) for a in answers), answers
    assert await snapshot(users.alice, seeded) == before  # nothing changed
    assert await users.db["fs.files"].count_documents({}) == 2  # no file written or deleted

    # Now make alice's records really missing: bob's view must not change one byte.
    resp = await users.admin.delete(f"/deployments/{seeded.alice_dep}?cascade=true")
    assert resp.status == 204
    assert [await answer(users.bob, p) for p in probes] == answers


async def test_the_owner_and_the_admin_can_use_the_same_requests(
    users: Users, seeded: Seeded
) -> None:
    for client in (users.alice, users.admin):
        resp = await client.get(f"/deployments/{seeded.alice_dep}")
        assert resp.status == 200
        resp = await client.get(f"/jobs/{seeded.alice_job}")
        assert resp.status == 200
        resp = await client.get(f"/deployments/{seeded.alice_dep}/jobs")
        assert [j["job_id"] for j in (await resp.json())["items"]] == [seeded.alice_job]
        resp = await client.get(f"/jobs/{seeded.alice_job}/results/out.csv")
        assert resp.status == 200 and await resp.read() == b"a,b\n1,2\n"
    resp = await users.admin.put(f"/jobs/{seeded.bob_job}/results/admin.txt", data=b"x")
    assert resp.status == 201
    resp = await users.admin.patch(f"/jobs/{seeded.bob_job}", json={"task_status": "RUNNING"})
    assert resp.status == 200 and (await resp.json())["user_id"] == "bob"
    resp = await users.admin.delete(f"/deployments/{seeded.bob_dep}?cascade=true")
    assert resp.status == 204
    assert (await users.bob.get(f"/jobs/{seeded.bob_job}")).status == 404
    assert await users.db["fs.files"].count_documents({"metadata.job_id": seeded.bob_job}) == 0
    assert await users.db["fs.files"].count_documents({"metadata.job_id": seeded.alice_job}) == 1


async def list_of(client: Client, path: str) -> dict[str, Any]:
    resp = await client.get(path)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


@pytest.mark.parametrize(
    "query",
    ["", "?count=true", "?sort=-id&count=true", "?limit=1&count=true", "?user_id=alice&count=true"],
)
async def test_lists_and_totals_only_show_your_own(
    users: Users, seeded: Seeded, query: str
) -> None:
    deps = await list_of(users.bob, f"/deployments{query}")
    jobs = await list_of(users.bob, f"/jobs{query}")
    mine = "user_id=alice" not in query
    assert [d["deployment_id"] for d in deps["items"]] == ([seeded.bob_dep] if mine else [])
    assert [j["job_id"] for j in jobs["items"]] == ([seeded.bob_job] if mine else [])
    assert deps["next_cursor"] is None and jobs["next_cursor"] is None
    if "count" in query:
        assert deps["total"] == jobs["total"] == (1 if mine else 0)


@pytest.mark.parametrize(
    "query",
    [
        "?deployment_id={alice_dep}&count=true",
        "?task_status=PENDING&count=true",
        "?started_after=2000-01-01T00:00:00Z&count=true",
        "?sort=-started_at&count=true",
        "?user_id=alice&deployment_id={alice_dep}&count=true",
    ],
)
async def test_job_filters_never_reach_another_users_jobs(
    users: Users, seeded: Seeded, query: str
) -> None:
    page = await list_of(users.bob, "/jobs" + query.format(alice_dep=seeded.alice_dep))
    assert all(j["user_id"] == "bob" for j in page["items"])
    assert page["total"] == len(page["items"]) <= 1


async def test_the_admin_sees_and_counts_everyone(users: Users, seeded: Seeded) -> None:
    deps = await list_of(users.admin, "/deployments?count=true")
    assert deps["total"] == 2
    assert {d["user_id"] for d in deps["items"]} == {"alice", "bob"}
    jobs = await list_of(users.admin, "/jobs?user_id=alice&count=true")
    assert [j["job_id"] for j in jobs["items"]] == [seeded.alice_job] and jobs["total"] == 1


async def test_cursors_do_not_cross_users(users: Users, seeded: Seeded) -> None:
    for _ in range(2):
        await created(users.alice, "/deployments", {})
        await created(users.bob, "/deployments", {})
    for path in ("/deployments?limit=1", "/jobs?limit=1&sort=started_at"):
        if path.startswith("/jobs"):
            await created(users.alice, "/jobs", {"deployment_id": seeded.alice_dep})
        cursor = (await list_of(users.alice, path))["next_cursor"]
        assert cursor
        own = await list_of(users.alice, f"{path}&cursor={cursor}")
        assert all(d["user_id"] == "alice" for d in own["items"])
        for other in (users.bob, users.admin):
            resp = await other.get(f"{path}&cursor={cursor}")
            assert resp.status == 400, await resp.text()
            assert "cursor" in (await resp.json())["detail"]


async def test_creating_for_another_user_is_403_and_stores_nothing(
    users: Users, seeded: Seeded
) -> None:
    for path, body in [
        ("/deployments", {"user_id": "alice"}),
        ("/jobs", {"user_id": "alice", "deployment_id": seeded.alice_dep}),
        ("/jobs", {"user_id": "alice", "deployment_id": seeded.bob_dep}),
    ]:
        resp = await users.bob.post(path, json=body)
        assert resp.status == 403, await resp.text()
        assert (await resp.json())["type"] == "/problems/forbidden"
    assert await users.db.deployments.count_documents({}) == 2
    assert await users.db.jobs.count_documents({}) == 2


async def test_a_job_belongs_to_its_deployments_owner(users: Users, seeded: Seeded) -> None:
    # Even an admin cannot attach bob's job to alice's deployment.
    resp = await users.admin.post(
        "/jobs", json={"user_id": "bob", "deployment_id": seeded.alice_dep}
    )
    assert resp.status == 422
    assert (await resp.json())["errors"][0]["msg"] == (
        f"no deployment with id {seeded.alice_dep} of user 'bob'"
    )
    job = await created(
        users.admin, "/jobs", {"user_id": "alice", "deployment_id": seeded.alice_dep}
    )
    assert job["user_id"] == "alice"


async def test_deleting_only_ever_touches_the_owners_records(users: Users, seeded: Seeded) -> None:
    # A job of alice's on bob's deployment (left from a time auth was off).
    legacy = {**(await users.db.jobs.find_one({"_id": seeded.alice_job}) or {}), "_id": 10_000}
    await users.db.jobs.insert_one({**legacy, "deployment_id": seeded.bob_dep})
    resp = await users.bob.delete(f"/deployments/{seeded.bob_dep}")
    assert resp.status == 409  # his own job still there; alice's is not mentioned
    assert "10000" not in await resp.text()
    resp = await users.bob.delete(f"/deployments/{seeded.bob_dep}?cascade=true")
    assert resp.status == 204
    assert await users.db.jobs.find_one({"_id": seeded.bob_job}) is None
    assert await users.db.jobs.find_one({"_id": 10_000}) is not None  # not bob's to delete
    assert await users.db["fs.files"].count_documents({"metadata.job_id": seeded.alice_job}) == 1
    assert (await users.alice.get("/jobs/10000")).status == 200


async def test_metrics_are_for_admins_only(users: Users, seeded: Seeded) -> None:
    """Its job counts cover everyone, so a user's key may not read them."""
    for client in (users.alice, users.bob):
        resp = await client.get("/metrics")
        assert resp.status == 403
        assert (await resp.json())["type"] == "/problems/forbidden"
    resp = await users.admin.get("/metrics")
    assert resp.status == 200
    assert 'jobservice_jobs{task_status="PENDING"} 2.0' in await resp.text()


# --- bulk import and export --------------------------------------------------------------

NDJSON = {"Content-Type": "application/x-ndjson"}


def ndjson(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def imported(client: Client, kind: str, body: bytes, **query: str) -> dict[str, Any]:
    resp = await client.post(f"/import/{kind}", data=body, headers=NDJSON, params=query)
    assert resp.status == 200, await resp.text()
    report: dict[str, Any] = await resp.json()
    return report


async def exported(client: Client, kind: str, query: str = "") -> list[dict[str, Any]]:
    resp = await client.get(f"/export/{kind}{query}")
    assert resp.status == 200, await resp.text()
    return [json.loads(line) for line in (await resp.read()).splitlines()]


async def test_exports_hold_only_your_own_records(users: Users, seeded: Seeded) -> None:
    assert [j["user_id"] for j in await exported(users.bob, "jobs")] == ["bob"]
    for query in ("?user_id=alice", f"?deployment_id={seeded.alice_dep}"):
        assert await exported(users.bob, "jobs", query) == []
    assert [d["user_id"] for d in await exported(users.bob, "deployments")] == ["bob"]
    assert await exported(users.bob, "deployments", "?user_id=alice") == []
    everyone = await exported(users.admin, "deployments")
    assert sorted(d["user_id"] for d in everyone) == ["alice", "bob"]


async def test_imports_are_yours_unless_you_are_an_admin(users: Users, seeded: Seeded) -> None:
    report = await imported(users.bob, "deployments", ndjson({"deployment_name": "b2"}))
    assert report["inserted"] == 1
    resp = await users.bob.post(
        "/import/deployments", data=ndjson({"user_id": "alice"}), headers=NDJSON
    )
    assert resp.status == 403, await resp.text()
    body = await resp.json()
    assert body["type"] == "/problems/forbidden" and "line 1" in body["detail"]
    assert await users.db.deployments.count_documents({"user_id": "alice"}) == 1
    report = await imported(users.admin, "deployments", ndjson({"user_id": "carol"}))
    assert report["inserted"] == 1


async def test_importing_jobs_onto_another_users_deployment_is_like_a_missing_one(
    users: Users, seeded: Seeded
) -> None:
    lines = ndjson({"deployment_id": seeded.alice_dep}, {"deployment_id": seeded.bob_dep})
    report = await imported(users.bob, "jobs", lines)
    assert report["inserted"] == 1 and report["failed"] == 1
    hidden = report["errors"]
    # Now alice's deployment is really missing: bob's report reads the same.
    await users.admin.delete(f"/deployments/{seeded.alice_dep}?cascade=true")
    report = await imported(users.bob, "jobs", lines)
    assert (
        report["errors"]
        == hidden
        == [{"line": 1, "detail": f"deployment_id: no deployment with id {seeded.alice_dep}"}]
    )


async def test_an_admin_import_keeps_jobs_with_their_deployments_owner(
    users: Users, seeded: Seeded
) -> None:
    lines = ndjson(
        {"user_id": "bob", "deployment_id": seeded.alice_dep},
        {"user_id": "alice", "deployment_id": seeded.alice_dep},
    )
    report = await imported(users.admin, "jobs", lines)
    assert report["inserted"] == 1
    assert report["errors"][0]["line"] == 1


@pytest.mark.parametrize("on_conflict", ["fail", "skip", "replace"])
async def test_importing_over_another_users_ids_changes_nothing(
    users: Users, seeded: Seeded, on_conflict: str
) -> None:
    before = [await users.db.deployments.find_one({"_id": seeded.alice_dep})]
    before.append(await users.db.jobs.find_one({"_id": seeded.alice_job}))
    deployment = {"deployment_id": seeded.alice_dep, "deployment_name": "mine now"}
    job = {"job_id": seeded.alice_job, "deployment_id": seeded.bob_dep}
    for kind, line in (("deployments", deployment), ("jobs", job)):
        report = await imported(users.bob, kind, ndjson(line), on_conflict=on_conflict)
        assert report["inserted"] == report["replaced"] == 0, report
    after = [await users.db.deployments.find_one({"_id": seeded.alice_dep})]
    after.append(await users.db.jobs.find_one({"_id": seeded.alice_job}))
    assert after == before
    # His own records he may replace.
    mine = {"deployment_id": seeded.bob_dep, "deployment_name": "renamed"}
    report = await imported(users.bob, "deployments", ndjson(mine), on_conflict="replace")
    assert report["replaced"] == 1


# --- statistics ----------------------------------------------------------------------------


async def test_job_statistics_count_only_your_own(users: Users, seeded: Seeded) -> None:
    mine = await list_of(users.bob, "/stats/jobs?group_by=user_id,deployment_id")
    assert mine["totals"]["count"] == 1
    assert [g["key"] for g in mine["groups"]] == [
        {"user_id": "bob", "deployment_id": seeded.bob_dep}
    ]
    nobody = await list_of(users.bob, "/stats/jobs?deployment_id=999999")
    assert nobody["totals"]["count"] == 0
    for query in ("?user_id=alice", f"?deployment_id={seeded.alice_dep}"):
        assert await list_of(users.bob, f"/stats/jobs{query}") == nobody
    everyone = await list_of(users.admin, "/stats/jobs?group_by=user_id")
    assert everyone["totals"]["count"] == 2
    assert sorted(g["key"]["user_id"] for g in everyone["groups"]) == ["alice", "bob"]


async def test_deployment_statistics_show_only_your_own(users: Users, seeded: Seeded) -> None:
    # A job of alice's on bob's deployment (left from a time auth was off) is not counted.
    legacy = {**(await users.db.jobs.find_one({"_id": seeded.alice_job}) or {}), "_id": 10_000}
    await users.db.jobs.insert_one({**legacy, "deployment_id": seeded.bob_dep})
    page = await list_of(users.bob, "/stats/deployments?count=true")
    assert [(d["deployment_id"], d["count"]) for d in page["items"]] == [(seeded.bob_dep, 1)]
    assert page["total"] == 1
    page = await list_of(users.bob, "/stats/deployments?user_id=alice&count=true")
    assert page["items"] == [] and page["total"] == 0
    page = await list_of(users.admin, "/stats/deployments?count=true")
    assert page["total"] == 2
    assert {d["deployment_id"]: d["count"] for d in page["items"]}[seeded.bob_dep] == 2
