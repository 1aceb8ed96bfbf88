"""Bad input: each gets its problem+json status, and nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import Client, create_deployment, create_job


async def nothing_stored(client: Client) -> bool:
    deps = await (await client.get("/deployments?count=true")).json()
    jobs = await (await client.get("/jobs?count=true")).json()
    return bool(deps["total"] <= 1 and jobs["total"] == 0)


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
async def test_malformed_json_is_400(client: Client, raw: bytes) -> None:
    resp = await client.post("/deployments", data=raw, headers={"Content-Type": "application/json"})
    body = await problem(resp, 400)
    assert body["type"] == "/problems/malformed-json"
    assert await nothing_stored(client)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "", "multipart/form-data"]
)
async def test_wrong_content_type_is_415(client: Client, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await client.post("/deployments", data=b'{"user_id": "a"}', headers=headers)
    await problem(resp, 415)
    resp = await client.post(
        "/deployments",
        data=b'{"user_id": "a"}',
        headers={"Content-Type": "application/merge-patch+json"},
    )
    await problem(resp, 415)  # merge patch is for PATCH only
    assert await nothing_stored(client)


async def test_body_over_2_mib_is_413(client: Client) -> None:
    big = b'{"user_id": "a", "parameters": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    resp = await client.post("/deployments", data=big, headers={"Content-Type": "application/json"})
    await problem(resp, 413)
    assert await nothing_stored(client)


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
    client: Client, body: dict[str, Any], loc: list[Any]
) -> None:
    resp = await client.post("/deployments", json=body)
    problem_body = await problem(resp, 422)
    assert problem_body["type"] == "/problems/validation-error"
    assert problem_body["errors"][0]["loc"] == loc
    assert await nothing_stored(client)


async def test_too_deep_data_is_422(client: Client) -> None:
    for depth in (65, 500):
        raw = '{"user_id": "a", "data": ' + '{"k": ' * depth + "1" + "}" * depth + "}"
        resp = await client.post(
            "/deployments", data=raw.encode(), headers={"Content-Type": "application/json"}
        )
        body = await problem(resp, 422)
        assert "deeper than 64" in body["detail"]
    assert await nothing_stored(client)


async def test_body_must_be_an_object(client: Client) -> None:
    for raw in (b"[]", b"1", b'"x"', b"null"):
        resp = await client.post(
            "/deployments", data=raw, headers={"Content-Type": "application/json"}
        )
        await problem(resp, 422)


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
async def test_invalid_jobs_are_422(client: Client, body: dict[str, Any]) -> None:
    await create_deployment(client)
    await problem(await client.post("/jobs", json=body), 422)
    assert await nothing_stored(client)


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
async def test_malformed_if_match_is_400(client: Client, header: str) -> None:
    dep = await create_deployment(client)
    resp = await client.patch(
        f"/deployments/{dep['deployment_id']}",
        json={"deployment_name": "x"},
        headers={"If-Match": header},
    )
    await problem(resp, 400)
    assert (await (await client.get("/deployments/1")).json())["revision"] == 1


async def test_unknown_query_parameters_on_single_records_are_400(client: Client) -> None:
    dep = await create_deployment(client)
    await problem(await client.get(f"/deployments/{dep['deployment_id']}?x=1"), 400)
    await problem(await client.post("/deployments?x=1", json={"user_id": "a"}), 400)
    assert await nothing_stored(client)
