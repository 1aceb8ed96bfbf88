"""Bad input: each gets its problem+json status, and nothing is stored or changed.

"Nothing" is exact: the counts the API gives, and every stored document (records and id
counters) byte for byte, before and after the refused request.
"""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from tests.helpers import Client, create_deployment, create_job, snapshot

Db = AsyncDatabase[dict[str, Any]]
JSON = {"Content-Type": "application/json"}
MERGE = {"Content-Type": "application/merge-patch+json"}
TOO_LARGE = b'{"parameters": "' + b"x" * (2 * 1024 * 1024) + b'"}'  # 413 whatever the route


async def counts(client: Client) -> tuple[int, int]:
    """(deployments, jobs) as `?count=true` answers them."""
    deps = await (await client.get("/deployments?count=true")).json()
    jobs = await (await client.get("/jobs?count=true")).json()
    return deps["total"], jobs["total"]


async def assert_unchanged(
    client: Client, db: Db, before: dict[str, list[bytes]], expected: tuple[int, int]
) -> None:
    assert await counts(client) == expected
    assert await snapshot(db) == before


async def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = await resp.json()
    assert set(body) >= {"type", "title", "status", "detail"}
    assert body["status"] == status
    return body


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"nope", b'{"user_id": "a",}', b"\xff\xfe", b'{"user_id": "\\ud800"}', b"[1"],
)
async def test_malformed_json_is_400(client: Client, db: Db, raw: bytes) -> None:
    before = await snapshot(db)
    resp = await client.post("/deployments", data=raw, headers=JSON)
    body = await problem(resp, 400)
    assert body["type"] == "/problems/malformed-json"
    await assert_unchanged(client, db, before, (0, 0))


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "", "multipart/form-data"]
)
async def test_wrong_content_type_is_415(client: Client, db: Db, content_type: str) -> None:
    before = await snapshot(db)
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await client.post("/deployments", data=b'{"user_id": "a"}', headers=headers)
    await problem(resp, 415)
    resp = await client.post(
        "/deployments",
        data=b'{"user_id": "a"}',
        headers={"Content-Type": "application/merge-patch+json"},
    )
    await problem(resp, 415)  # merge patch is for PATCH only
    await assert_unchanged(client, db, before, (0, 0))


async def test_body_over_2_mib_is_413(client: Client, db: Db) -> None:
    before = await snapshot(db)
    big = b'{"user_id": "a", "parameters": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    resp = await client.post("/deployments", data=big, headers=JSON)
    await problem(resp, 413)
    await assert_unchanged(client, db, before, (0, 0))


DEPLOYMENT_422 = [
    ({}, ["body", "user_id"]),
    ({"user_id": ""}, ["body", "user_id"]),
    ({"user_id": "x" * 201}, ["body", "user_id"]),
    ({"user_id": 5}, ["body", "user_id"]),
    ({"user_id": None}, ["body", "user_id"]),
    ({"user_id": "a", "deployment_name": 7}, ["body", "deployment_name"]),
    ({"user_id": "a", "deployment_name": "x" * 201}, ["body", "deployment_name"]),
    ({"user_id": "a", "parameters": "x" * (64 * 1024 + 1)}, ["body", "parameters"]),
    ({"user_id": "a", "parameters": ["-v"]}, ["body", "parameters"]),
    ({"user_id": "a", "colour": "red"}, ["body", "colour"]),
    ({"user_id": "a", "deployment_id": 3}, ["body"]),
    ({"user_id": "a", "created": "2026-01-01T00:00:00Z"}, ["body"]),
    ({"user_id": "a", "revision": 4}, ["body"]),
    ({"user_id": "a", "data": {"$where": "1"}}, ["body", "data", "$where"]),
    ({"user_id": "a", "data": {"a": {"b": [{"c.d": 1}]}}}, ["body", "data", "a", "b", 0, "c.d"]),
    ({"user_id": "a", "data": {"a": {"": 1}}}, ["body", "data", "a", ""]),
    ({"user_id": "a", "data": {"n": 2**64}}, ["body", "data", "n"]),
    ({"user_id": "a", "data": {"s": "x" * (1024 * 1024)}}, ["body", "data"]),
]


@pytest.mark.parametrize(("body", "loc"), DEPLOYMENT_422)
async def test_invalid_deployments_are_422_naming_the_field(
    client: Client, db: Db, body: dict[str, Any], loc: list[Any]
) -> None:
    before = await snapshot(db)
    resp = await client.post("/deployments", json=body)
    problem_body = await problem(resp, 422)
    assert problem_body["type"] == "/problems/validation-error"
    assert problem_body["errors"][0]["loc"] == loc
    await assert_unchanged(client, db, before, (0, 0))


async def test_too_deep_data_is_422(client: Client, db: Db) -> None:
    before = await snapshot(db)
    for depth in (65, 500):
        raw = '{"user_id": "a", "data": ' + '{"k": ' * depth + "1" + "}" * depth + "}"
        resp = await client.post("/deployments", data=raw.encode(), headers=JSON)
        body = await problem(resp, 422)
        assert "deeper than 64" in body["detail"]
    await assert_unchanged(client, db, before, (0, 0))


async def test_body_must_be_an_object(client: Client, db: Db) -> None:
    before = await snapshot(db)
    for raw in (b"[]", b"1", b'"x"', b"null"):
        await problem(await client.post("/deployments", data=raw, headers=JSON), 422)
    await assert_unchanged(client, db, before, (0, 0))


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "a"},
        {"user_id": "a", "deployment_id": "1"},
        {"user_id": "a", "deployment_id": -1},
        {"user_id": "a", "deployment_id": 0},
        {"user_id": "a", "deployment_id": 1.5},
        {"user_id": "a", "deployment_id": 2**63},
        {"user_id": "a", "deployment_id": 1, "task_status": "RUNNING"},
        {"user_id": "a", "deployment_id": 1, "finished_at": "2026-01-01T00:00:00Z"},
        {"user_id": "a", "deployment_id": 1, "history": []},
        {"user_id": "a", "deployment_id": 1, "results": []},
        {"user_id": "a", "deployment_id": 1, "job_id": 9},
        {"user_id": "a", "deployment_id": 1, "started_at": "2026-01-01"},
        {"user_id": "a", "deployment_id": 1, "started_at": "2026-01-01T00:00:00"},
        {"user_id": "a", "deployment_id": 1, "started_at": "0001-01-01T00:00:00+01:00"},
        {"user_id": "a", "deployment_id": 1, "started_at": None},
        {"user_id": "a", "deployment_id": 1, "data": {"x": {"$gt": 1}}},
        {"user_id": "a", "deployment_id": 2},
    ],
)
async def test_invalid_jobs_are_422(client: Client, db: Db, body: dict[str, Any]) -> None:
    await create_deployment(client)
    before = await snapshot(db)
    await problem(await client.post("/jobs", json=body), 422)
    await assert_unchanged(client, db, before, (1, 0))


@pytest.mark.parametrize(
    ("raw", "headers", "status"),
    [
        (b'{"user_id": "a", "deployment_id": 1', JSON, 400),
        (b'{"user_id": "a", "deployment_id": 1}', {"Content-Type": "text/plain"}, 415),
        (b'{"user_id": "a", "deployment_id": 1}', MERGE, 415),
        (b'{"user_id": "a", "deployment_id": 1}', {}, 415),
        (TOO_LARGE, JSON, 413),
    ],
)
async def test_bad_job_bodies_store_nothing(
    client: Client, db: Db, raw: bytes, headers: dict[str, str], status: int
) -> None:
    await create_deployment(client)
    await create_job(client, 1)
    before = await snapshot(db)
    await problem(await client.post("/jobs", data=raw, headers=headers), status)
    await assert_unchanged(client, db, before, (1, 1))


@pytest.mark.parametrize("kind", ["deployments", "jobs"])
@pytest.mark.parametrize(
    ("raw", "headers", "status"),
    [
        (b'{"parameters": "x"', MERGE, 400),
        (b'{"parameters": "x",}', JSON, 400),
        (b"", MERGE, 400),
        (b'{"parameters": "x"}', {"Content-Type": "text/plain"}, 415),
        (b'{"parameters": "x"}', {"Content-Type": "application/json-patch+json"}, 415),
        (b'{"parameters": "x"}', {}, 415),
        (TOO_LARGE, MERGE, 413),
        (b'{"parameters": 5}', MERGE, 422),
        (b'[{"op": "add", "path": "/parameters", "value": "x"}]', JSON, 422),
        (b'{"data": {"$set": 1}}', MERGE, 422),
        (b'{"data": {"s": "' + b"x" * (1024 * 1024) + b'"}}', MERGE, 422),
    ],
)
async def test_bad_patch_bodies_change_nothing(
    client: Client, db: Db, kind: str, raw: bytes, headers: dict[str, str], status: int
) -> None:
    await create_deployment(client, data={"a": 1})
    await create_job(client, 1, data={"a": 1})
    before = await snapshot(db)
    got = await client.get(f"/{kind}/1")
    await problem(await client.patch(f"/{kind}/1", data=raw, headers=headers), status)
    await assert_unchanged(client, db, before, (1, 1))
    again = await client.get(f"/{kind}/1")
    assert await again.read() == await got.read() and again.headers["ETag"] == '"1"'


PATCH_422 = {
    "deployments": [
        ({"deployment_id": 2}, ["body"]),
        ({"user_id": "bob"}, ["body"]),
        ({"created": "2026-01-01T00:00:00Z"}, ["body"]),
        ({"revision": 5}, ["body"]),
        ({"colour": "red"}, ["body", "colour"]),
        ({"history": []}, ["body", "history"]),
        ({"deployment_name": "x" * 201}, ["body", "deployment_name"]),
        ({"parameters": ["-v"]}, ["body", "parameters"]),
        ({"data": {"a": {"b.c": 1}}}, ["body", "data", "a", "b.c"]),
        ({"data": {"n": 2**64}}, ["body", "data", "n"]),
    ],
    "jobs": [
        ({"job_id": 2}, ["body"]),
        ({"revision": 5}, ["body"]),
        ({"history": []}, ["body"]),
        ({"results": []}, ["body"]),
        ({"user_id": "bob"}, ["body", "user_id"]),
        ({"deployment_id": 2}, ["body", "deployment_id"]),
        ({"started_at": "2026-01-01T00:00:00Z"}, ["body", "started_at"]),
        ({"colour": "red"}, ["body", "colour"]),
        ({"task_status": "DONE"}, ["body", "task_status"]),
        ({"task_status": None}, ["body"]),
        ({"finished_at": "yesterday"}, ["body", "finished_at"]),
        ({"job_name": 7}, ["body", "job_name"]),
        ({"data": {"": 1}}, ["body", "data", ""]),
    ],
}


@pytest.mark.parametrize(
    ("kind", "body", "loc"), [(kind, *case) for kind, cases in PATCH_422.items() for case in cases]
)
async def test_patches_of_owned_unknown_or_invalid_fields_are_422_and_change_nothing(
    client: Client, db: Db, kind: str, body: dict[str, Any], loc: list[Any]
) -> None:
    await create_deployment(client, data={"a": 1})
    await create_job(client, 1, data={"a": 1})
    before = await snapshot(db)
    resp = await client.patch(f"/{kind}/1", json=body, headers=MERGE)
    problem_body = await problem(resp, 422)
    assert problem_body["errors"][0]["loc"] == loc, problem_body
    await assert_unchanged(client, db, before, (1, 1))


@pytest.mark.parametrize("kind", ["deployments", "jobs"])
async def test_a_stale_if_match_is_412_and_changes_nothing(
    client: Client, db: Db, kind: str
) -> None:
    await create_deployment(client)
    await create_job(client, 1)
    field = "deployment_name" if kind == "deployments" else "job_name"
    resp = await client.patch(f"/{kind}/1", json={field: "new"}, headers={"If-Match": '"1"'})
    assert resp.status == 200 and (await resp.json())["revision"] == 2
    if kind == "deployments":
        await client.delete("/jobs/1")  # so that only the revision stands in the way
    before = await snapshot(db)
    for method, headers in [
        ("PATCH", {"If-Match": '"1"'}),
        ("PATCH", {"If-Match": '"3"'}),
        ("DELETE", {"If-Match": '"1"'}),
        ("DELETE", {"If-Match": '"3"'}),
    ]:
        resp = await client.request(method, f"/{kind}/1", json={field: "newer"}, headers=headers)
        body = await problem(resp, 412)
        assert body["type"] == "/problems/precondition-failed"
        assert "revision" in body["detail"]
    await assert_unchanged(client, db, before, (1, int(kind == "jobs")))
    resp = await client.delete(f"/{kind}/1", headers={"If-Match": '"2"'})
    assert resp.status == 204


@pytest.mark.parametrize("raw_id", ["abc", "-1", "0", "1.5", "99999999999999999999", "1e3", "%201"])
async def test_ids_that_are_not_positive_integers_are_404(client: Client, raw_id: str) -> None:
    dep = await create_deployment(client)
    await create_job(client, dep["deployment_id"])
    for method, path in [
        ("GET", f"/jobs/{raw_id}"),
        ("PATCH", f"/jobs/{raw_id}"),
        ("DELETE", f"/jobs/{raw_id}"),
        ("GET", f"/deployments/{raw_id}"),
        ("DELETE", f"/deployments/{raw_id}"),
        ("GET", f"/deployments/{raw_id}/jobs"),
    ]:
        resp = await client.request(method, path, json={})
        body = await problem(resp, 404)
        assert body["type"] == "/problems/not-found"


async def test_unknown_path_and_method(client: Client) -> None:
    await problem(await client.get("/nothing-here"), 404)
    resp = await client.put("/jobs", json={})
    await problem(resp, 405)
    assert "POST" in resp.headers["Allow"]


@pytest.mark.parametrize("header", ["1", 'W/"1"', '"one"', '""', '"1', "abc"])
async def test_malformed_if_match_is_400(client: Client, db: Db, header: str) -> None:
    await create_deployment(client)
    await create_job(client, 1)
    before = await snapshot(db)
    for method, path in [("PATCH", "/deployments/1"), ("PATCH", "/jobs/1"), ("DELETE", "/jobs/1")]:
        resp = await client.request(
            method, path, json={"parameters": "x"}, headers={"If-Match": header}
        )
        await problem(resp, 400)
    await assert_unchanged(client, db, before, (1, 1))


async def test_unknown_query_parameters_on_single_records_are_400(client: Client, db: Db) -> None:
    dep = await create_deployment(client)
    before = await snapshot(db)
    await problem(await client.get(f"/deployments/{dep['deployment_id']}?x=1"), 400)
    await problem(await client.post("/deployments?x=1", json={"user_id": "a"}), 400)
    await problem(await client.post("/jobs?x=1", json={"user_id": "a", "deployment_id": 1}), 400)
    await problem(await client.patch("/deployments/1?x=1", json={"parameters": "p"}), 400)
    await assert_unchanged(client, db, before, (1, 0))
