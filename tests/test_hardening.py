"""Hostile input: operator injection, oversized headers and bodies, bodies that never end,
constant-time comparisons. Each is refused with a clear status and changes nothing."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from service.app import create_app
from service.database import DB
from service.errors import BadRequest
from service.pagination import (
    DEPLOYMENT_FILTERS,
    DEPLOYMENT_SORTS,
    JOB_FILTERS,
    JOB_SORTS,
    parse_list_query,
)
from service.settings import Settings
from tests.helpers import Client, Users

OPERATOR_VALUES = ['{"$ne": null}', '{"$gt": ""}', "$ne", '{"$where": "sleep(1000)"}', "[$ne]"]


@pytest.fixture
async def data(users: Users) -> dict[str, int]:
    ids = {}
    for name, client in (("alice", users.alice), ("bob", users.bob)):
        resp = await client.post("/deployments", json={})
        ids[f"{name}_dep"] = (await resp.json())["deployment_id"]
        resp = await client.post("/jobs", json={"deployment_id": ids[f"{name}_dep"]})
        ids[f"{name}_job"] = (await resp.json())["job_id"]
    return ids


def list_paths(data: dict[str, int]) -> list[tuple[str, list[str]]]:
    dep = f"/deployments/{data['alice_dep']}/jobs"
    job_names = [*JOB_FILTERS, "sort", "limit", "cursor", "count"]
    return [
        ("/deployments", [*DEPLOYMENT_FILTERS, "sort", "limit", "cursor", "count"]),
        ("/jobs", job_names),
        (dep, [n for n in job_names if n != "deployment_id"]),
    ]


async def test_operators_in_query_values_are_plain_strings_or_400(
    users: Users, data: dict[str, int]
) -> None:
    for path, names in list_paths(data):
        for name in names:
            for value in OPERATOR_VALUES:
                resp = await users.alice.get(path, params={name: value})
                text = await resp.text()
                if resp.status == 200:  # a string filter: compared as that literal string
                    assert name == "user_id", (path, name, value)
                    assert json.loads(text)["items"] == []
                else:
                    assert resp.status == 400, (path, name, value, text)


async def test_operator_shaped_query_names_are_400(users: Users, data: dict[str, int]) -> None:
    for path, names in list_paths(data):
        for name in names:
            for hostile in (f"{name}[$ne]", f"{name}[$gt]", f"{name}.$ne", f"{name}[]"):
                resp = await users.alice.get(path, params={hostile: "x"})
                assert resp.status == 400, (path, hostile, await resp.text())
        for hostile in ("$where", "$or[0][user_id]", "filter"):
            assert (await users.alice.get(path, params={hostile: "1"})).status == 400
    # Also where a record is named, and on creates and deletes.
    for method, path in [
        ("GET", f"/deployments/{data['alice_dep']}"),
        ("GET", f"/jobs/{data['alice_job']}"),
        ("DELETE", f"/jobs/{data['bob_job']}"),
        ("POST", "/deployments"),
    ]:
        resp = await users.alice.request(method, path, params={"user_id[$ne]": "x"}, json={})
        assert resp.status == 400, (method, path)
    assert await users.db.jobs.count_documents({}) == 2


INJECTIONS: list[Any] = [{"$ne": None}, {"$gt": 0}, {"$in": ["alice", "bob"]}, ["$ne"]]


@pytest.mark.parametrize("value", INJECTIONS)
async def test_operators_in_bodies_are_422(users: Users, data: dict[str, int], value: Any) -> None:
    dep, job = data["alice_dep"], data["alice_job"]
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for name in ("user_id", "deployment_name", "parameters"):
        cases.append(("POST", "/deployments", {name: value}))
    for name in ("deployment_name", "parameters"):
        cases.append(("PATCH", f"/deployments/{dep}", {name: value}))
    for name in ("user_id", "deployment_id", "job_name", "parameters", "started_at"):
        cases.append(("POST", "/jobs", {"deployment_id": dep, name: value}))
    for name in ("job_name", "parameters", "task_status", "finished_at"):
        cases.append(("PATCH", f"/jobs/{job}", {name: value}))
    for method, path in [("POST", "/deployments"), ("PATCH", f"/deployments/{dep}")]:
        cases.append((method, path, {"data": {"$where": value}}))
        cases.append((method, path, {"data": {"a": {"b": [{"$set": value}]}}}))
        cases.append((method, path, {"$set": {"user_id": "bob"}}))
        cases.append((method, path, {"user_id.$": "bob"}))
    before = await users.db.deployments.find_one({"_id": dep})
    for method, path, body in cases:
        resp = await users.alice.request(method, path, json=body)
        assert resp.status == 422, (method, path, body, await resp.text())
    assert await users.db.deployments.count_documents({}) == 2
    assert await users.db.jobs.count_documents({}) == 2
    assert await users.db.deployments.find_one({"_id": dep}) == before


async def test_operators_in_paths_and_headers(users: Users, data: dict[str, int]) -> None:
    for path in ('/deployments/{"$ne":1}', "/jobs/%7B%22%24gt%22%3A0%7D", "/jobs/$ne"):
        assert (await users.alice.get(path)).status == 404
    resp = await users.alice.patch(
        f"/deployments/{data['alice_dep']}",
        json={"deployment_name": "x"},
        headers={"If-Match": '{"$ne": 1}'},
    )
    assert resp.status == 400
    headers = {"Authorization": 'Bearer jsk_{"$ne": null}_x'}
    assert (await users.anonymous.get("/deployments", headers=headers)).status == 401


# --- the filter parser, fuzzed ---------------------------------------------------------

ALLOWED_OPERATORS = {"$and", "$in", "$gte", "$lt"}
names = st.sampled_from(
    [*JOB_FILTERS, "sort", "limit", "count", "cursor", "user_id[$ne]", "$where", "x"]
)
values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["PENDING", "RUNNING", "1", "-id", "started_at", "true", *OPERATOR_VALUES]),
    st.sampled_from(["2026-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z", "0001-01-01T00:00:00Z"]),
)


def operators(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {k for k in node if k.startswith("$")} | {
            op for v in node.values() for op in operators(v)
        }
    if isinstance(node, list):
        return {op for v in node for op in operators(v)}
    return set()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=st.lists(st.tuples(names, values), max_size=8))
def test_filter_parser_never_widens_the_owner_scope(params: list[tuple[str, str]]) -> None:
    """Any query either is a 400 or yields a filter limited to alice, with our operators only."""
    owner = {"user_id": "alice"}
    for filters, sorts in ((JOB_FILTERS, JOB_SORTS), (DEPLOYMENT_FILTERS, DEPLOYMENT_SORTS)):
        try:
            query = parse_list_query(MultiDict(params), filters, sorts, b"k" * 32, owner)
        except BadRequest:
            continue
        flt = query.filter
        assert flt.get("user_id") == "alice" or flt["$and"][0] == owner
        for page_filter, _ in query.reads():
            assert operators(page_filter) <= ALLOWED_OPERATORS | {"$gt", "$lt"}
        assert operators(flt) <= ALLOWED_OPERATORS


# --- sizes -----------------------------------------------------------------------------


async def raw_exchange(client: Client, request: bytes, until_closed: bool = False) -> bytes:
    """Send bytes as they are; return the response (head and Content-Length body), or
    everything until the server closes the connection."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        if until_closed:
            return await asyncio.wait_for(reader.read(), 60)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(length[1])) if length else b""
        return head + body
    finally:
        writer.close()


async def test_oversized_headers_and_request_lines_are_refused(
    users: Users, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = users.keys["alice"]
    cases = [
        {"Authorization": f"Bearer {key}", "X-Big": "x" * 9000},
        {"Authorization": f"Bearer {key}", **{f"X-H{n}": "1" for n in range(150)}},
        # The key at the start of an oversized line: aiohttp's parser answers with the
        # line's first 100 bytes, to the sender only; the log must not have them.
        {"Authorization": f"Bearer {key}{'x' * 9000}"},
    ]
    for n, headers in enumerate(cases):
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        reply = await raw_exchange(
            users.alice, f"GET /deployments HTTP/1.1\r\n{lines}\r\n".encode()
        )
        assert reply.split(b"\r\n", 1)[0].split(b" ")[1] in (b"400", b"431"), reply[:300]
        if n < 2:
            assert key.encode() not in reply
    long_url = "/deployments?user_id=" + "a" * 9000
    resp = await users.alice.get(long_url)
    assert resp.status in (400, 414)
    assert key not in caplog.text
    assert key.split("_", 2)[2] not in caplog.text
    assert (await users.alice.get("/deployments")).status == 200  # still serving


async def test_large_bodies_are_refused_before_being_read_without_a_key(users: Users) -> None:
    big = b'{"parameters": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    headers = {"Content-Type": "application/json"}
    assert (await users.anonymous.post("/deployments", data=big, headers=headers)).status == 401
    resp = await users.alice.post("/deployments", data=big, headers=headers)
    assert resp.status == 413
    assert (await resp.json())["type"] == "/problems/payload-too-large"
    assert await users.db.deployments.count_documents({}) == 0


# --- slow bodies -----------------------------------------------------------------------


@pytest.fixture
async def impatient(aiohttp_client: Any, settings: Settings) -> Client:
    fast = settings.model_copy(update={"body_timeout_s": 0.5})
    client: Client = await aiohttp_client(create_app(fast))
    return client


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 100\r\n\r\n" + b'{"user_id": "a", ',  # promises 100, sends 17
        b"Transfer-Encoding: chunked\r\n\r\n" + b"5\r\n" + b'{"use' + b"\r\n",  # never ends
    ],
)
async def test_a_body_that_never_arrives_is_408(impatient: Client, framing: bytes) -> None:
    request = (
        b"POST /deployments HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" + framing
    )
    # It answers, and then closes the connection (after aiohttp's lingering of at most 10 s
    # for the rest of the body): checked once, for the first framing.
    reply = await raw_exchange(impatient, request, until_closed=b"Content-Length" in framing)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"application/problem+json" in head
    assert json.loads(body)["type"] == "/problems/request-timeout"
    resp = await impatient.get("/deployments?count=true")
    assert (await resp.json())["total"] == 0


async def test_a_slow_but_complete_body_within_the_limit_is_fine(impatient: Client) -> None:
    body = b'{"user_id": "a"}'
    reader, writer = await asyncio.open_connection(impatient.server.host, impatient.server.port)
    writer.write(
        b"POST /deployments HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    for part in (body[:5], body[5:]):
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.05)
    reply = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 201 "), reply[:200]


# --- constant-time comparisons ---------------------------------------------------------


async def test_keys_are_compared_with_compare_digest(
    users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert (await users.alice.get("/deployments")).status == 200
    assert len(calls) == 1  # the hash of the secret against the stored hash
    wrong = users.keys["alice"][:-2] + "xx"
    headers = {"Authorization": f"Bearer {wrong}"}
    assert (await users.anonymous.get("/deployments", headers=headers)).status == 401
    assert len(calls) == 2


async def test_a_stalled_result_upload_is_408_and_leaves_no_file(impatient: Client) -> None:
    resp = await impatient.post("/deployments", json={"user_id": "a"})
    dep = (await resp.json())["deployment_id"]
    resp = await impatient.post("/jobs", json={"user_id": "a", "deployment_id": dep})
    job = (await resp.json())["job_id"]
    request = (
        f"PUT /jobs/{job}/results/big.bin HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
    ).encode() + b"x" * 300_000  # more than one chunk arrives, then nothing
    reply = await raw_exchange(impatient, request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert json.loads(body)["type"] == "/problems/request-timeout"
    resp = await impatient.get(f"/jobs/{job}/results")
    assert (await resp.json())["items"] == []
    db = impatient.app[DB].db
    assert await db["fs.files"].count_documents({}) == 0
    assert await db["fs.chunks"].count_documents({}) == 0


async def test_a_stalled_import_is_408(impatient: Client) -> None:
    request = (
        b"POST /import/deployments HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/x-ndjson\r\nContent-Length: 100000\r\n\r\n"
        b'{"user_id": "a"}\n{"user_id": "b"}\n{"user_'
    )
    reply = await raw_exchange(impatient, request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert json.loads(body)["type"] == "/problems/request-timeout"
