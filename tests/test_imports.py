"""Bulk import and export: per-line errors, conflicts, ids, crash and retry, round trips."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import orjson
import pytest
from aiohttp import ClientPayloadError, StreamReader
from prometheus_client import REGISTRY
from pymongo import MongoClient
from pymongo.asynchronous.database import AsyncDatabase

from service.app import create_app
from service.bulk_export import EXPORTS
from service.bulk_import import BATCH_RECORDS, KINDS, MAX_LINE, IdSet, Importer, LineReader
from service.database import DB
from service.merge_patch import MAX_DATA_BYTES
from service.records import MAX_GIVEN_ID
from service.schemas import public_job
from service.settings import Settings
from tests.helpers import Client, create_deployment, create_job
from tests.test_openapi import conforms

NDJSON = {"Content-Type": "application/x-ndjson"}
MERGE = {"Content-Type": "application/merge-patch+json"}
T0 = "2026-01-01T00:00:00.000Z"


def ndjson(records: Iterable[Any]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


async def import_(client: Client, kind: str, body: Any, **query: str) -> dict[str, Any]:
    resp = await client.post(f"/import/{kind}", data=body, headers=NDJSON, params=query)
    assert resp.status == 200, await resp.text()
    report: dict[str, Any] = await resp.json()
    counted = report["inserted"] + report["replaced"] + report["skipped"] + report["failed"]
    assert counted == report["received"], report
    return report


async def export(client: Client, kind: str, **params: Any) -> bytes:
    resp = await client.get(f"/export/{kind}", params=params)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "application/x-ndjson"
    return await resp.read()


def records(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in body.splitlines()]


def job_record(job_id: int, deployment_id: int, **fields: Any) -> dict[str, Any]:
    """A job exactly as the API and the export spell it."""
    return {
        "job_id": job_id,
        "job_name": f"job-{job_id}",
        "user_id": "alice",
        "deployment_id": deployment_id,
        "started_at": T0,
        "finished_at": None,
        "parameters": "--shots 10",
        "data": {"n": job_id, "tags": ["a", "b"]},
        "task_status": "PENDING",
        "results": [],
        "history": [{"task_status": "PENDING", "at": T0}],
        "revision": 1,
        "lease": None,
        "cancel_requested_at": None,
        "cancel_reason": None,
        "status_reason": None,
        "attempt": 1,
        "retry_of": None,
        **fields,
    }


class Chunks:
    """Stands in for a request body arriving in these pieces."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = deque(chunks)

    async def readany(self) -> bytes:
        return self.chunks.popleft() if self.chunks else b""


def database(client: Client) -> AsyncDatabase[dict[str, Any]]:
    assert client.app is not None
    db: AsyncDatabase[dict[str, Any]] = client.app[DB].db
    return db


@pytest.fixture
async def other_client(aiohttp_client: Any, mongodb_url: str) -> AsyncIterator[Client]:
    """The service on a second, empty database."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    settings = Settings(mongodb_url=mongodb_url, mongodb_db=name, mongodb_timeout_ms=5000)
    yield await aiohttp_client(create_app(settings))
    admin: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    with admin:
        admin.drop_database(name)


# --- import --------------------------------------------------------------------------


async def test_records_without_ids_get_new_ids_and_defaults(client: Client) -> None:
    report = await import_(client, "deployments", ndjson([{"user_id": "a"}, {"user_id": "b"}]))
    assert report == {
        "received": 2,
        "inserted": 2,
        "replaced": 0,
        "skipped": 0,
        "failed": 0,
        "errors": [],
    }
    deps = records(await export(client, "deployments"))
    assert [d["deployment_id"] for d in deps] == [1, 2]
    assert deps[0]["data"] == {} and deps[0]["parameters"] == "" and deps[0]["revision"] == 1
    assert deps[0]["deployment_name"] is None and deps[0]["created"].endswith("Z")
    job = {"user_id": "a", "deployment_id": 1}
    assert (await import_(client, "jobs", ndjson([job])))["inserted"] == 1
    (stored,) = records(await export(client, "jobs"))
    assert stored["task_status"] == "PENDING" and stored["finished_at"] is None
    assert stored["history"] == [{"task_status": "PENDING", "at": stored["started_at"]}]
    assert (await create_deployment(client))["deployment_id"] == 3


async def test_given_ids_are_kept_and_later_ids_never_collide(client: Client) -> None:
    deps = [{"deployment_id": 7, "user_id": "a"}, {"user_id": "b"}]
    await import_(client, "deployments", ndjson(deps))
    assert [d["deployment_id"] for d in records(await export(client, "deployments"))] == [7, 8]
    await import_(client, "jobs", ndjson([job_record(100, 7)]))
    assert (await create_deployment(client))["deployment_id"] == 9
    assert (await create_job(client, 7))["job_id"] == 101
    # A smaller id later does not move the counter back.
    await import_(client, "jobs", ndjson([job_record(50, 7), {"user_id": "a", "deployment_id": 7}]))
    assert (await create_job(client, 7))["job_id"] == 103


async def test_a_given_id_of_a_deleted_record_restores_it_under_that_id(client: Client) -> None:
    """As the README says: the id is free again in the collection, not in the counter."""
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"], job_name="old")
    assert (await client.delete(f"/jobs/{job['job_id']}")).status == 204
    assert (await create_job(client, dep["deployment_id"]))["job_id"] == job["job_id"] + 1
    restored = job_record(job["job_id"], dep["deployment_id"], job_name="restored")
    assert (await import_(client, "jobs", ndjson([restored])))["inserted"] == 1
    got = await (await client.get(f"/jobs/{job['job_id']}")).json()
    assert got == restored
    assert (await create_job(client, dep["deployment_id"]))["job_id"] == job["job_id"] + 2
    # The same for deployments; without an id the record gets a new one instead.
    assert (await client.delete(f"/jobs/{job['job_id']}")).status == 204
    assert (await client.delete(f"/deployments/{dep['deployment_id']}?cascade=true")).status == 204
    body = ndjson([{"deployment_id": dep["deployment_id"], "user_id": "alice"}, {"user_id": "b"}])
    assert (await import_(client, "deployments", body))["inserted"] == 2
    ids = [d["deployment_id"] for d in records(await export(client, "deployments"))]
    assert ids == [dep["deployment_id"], dep["deployment_id"] + 1]


async def test_imports_without_ids_alongside_post_jobs_never_share_an_id(client: Client) -> None:
    """Both take ids from the one counter: distinct, and every record is there."""
    dep = (await create_deployment(client))["deployment_id"]
    n_imported, n_posted = 2 * BATCH_RECORDS + 500, 40
    body = ndjson(
        {"user_id": "alice", "deployment_id": dep, "job_name": "imported"}
        for _ in range(n_imported)
    )

    async def posts() -> list[int]:
        ids = []
        for _ in range(n_posted // 4):  # four at a time, while the import runs
            made = await asyncio.gather(
                *(create_job(client, dep, job_name="posted") for _ in range(4))
            )
            ids += [j["job_id"] for j in made]
        return ids

    report, posted = await asyncio.gather(import_(client, "jobs", body), posts())
    assert report["inserted"] == n_imported and report["failed"] == 0
    stored = records(await export(client, "jobs"))
    ids = [j["job_id"] for j in stored]
    assert len(ids) == len(set(ids)) == n_imported + n_posted
    assert set(posted) <= set(ids) and len(set(posted)) == n_posted
    names = [j["job_name"] for j in stored]
    assert names.count("imported") == n_imported and names.count("posted") == n_posted
    assert max(ids) == n_imported + n_posted  # no id was skipped or handed out twice
    imported = [j["job_id"] for j in stored if j["job_name"] == "imported"]
    assert any(min(imported) < i < max(imported) for i in posted)  # they did interleave


async def test_given_ids_leave_room_for_the_service(client: Client) -> None:
    top = MAX_GIVEN_ID
    body = ndjson(
        [{"deployment_id": top, "user_id": "a"}, {"deployment_id": top + 1, "user_id": "b"}]
    )
    report = await import_(client, "deployments", body)
    assert report["inserted"] == 1
    assert report["errors"][0]["line"] == 2
    assert report["errors"][0]["detail"].startswith("deployment_id: Input should be less than")
    assert (await create_deployment(client))["deployment_id"] == top + 1
    # Should the counter ever stand at the very end, records without ids fail one by one.
    await database(client).counters.update_one({"_id": "deployments"}, {"$set": {"seq": 2**63 - 1}})
    report = await import_(
        client, "deployments", ndjson([{"user_id": "c"}, {"deployment_id": 5, "user_id": "d"}])
    )
    assert report["inserted"] == 1
    assert report["errors"] == [{"line": 1, "detail": "deployment_id: no ids are left to hand out"}]


async def test_historical_jobs_keep_status_times_history_and_results(client: Client) -> None:
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    result = {
        "name": "out.csv",
        "content_type": "text/csv",
        "size": 12,
        "sha256": "0" * 64,
        "created": "2026-01-01T02:00:00.000Z",
        "metadata": {"rows": 3},
    }
    history = [
        {"task_status": "PENDING", "at": T0},
        {"task_status": "RUNNING", "at": "2026-01-01T00:30:00.000Z"},
        {"task_status": "FINISHED", "at": "2026-01-01T01:00:00.000Z"},
    ]
    given = [
        job_record(1, 1, task_status="FINISHED", finished_at="2026-01-01T01:00:00.000Z")
        | {"history": history, "results": [result], "revision": 5},
        # finished_at defaults to the last history entry
        {"job_id": 2, "user_id": "a", "deployment_id": 1, "started_at": T0}
        | {"task_status": "FINISHED", "history": history},
        # history defaults to the shortest path to the status
        {"job_id": 3, "user_id": "a", "deployment_id": 1, "started_at": "2026-01-01T01:00:00+01:00"}
        | {"task_status": "ERROR", "finished_at": "2026-01-01T00:10:00.123456Z"},
        {"job_id": 4, "user_id": "a", "deployment_id": 1, "started_at": T0}
        | {"task_status": "RUNNING"},
    ]
    assert (await import_(client, "jobs", ndjson(given)))["inserted"] == 4
    one, two, three, four = records(await export(client, "jobs"))
    assert one == given[0]
    assert two["finished_at"] == "2026-01-01T01:00:00.000Z" and two["history"] == history
    assert three["started_at"] == T0 and three["finished_at"] == "2026-01-01T00:10:00.123Z"
    assert three["history"] == [
        {"task_status": "PENDING", "at": T0},
        {"task_status": "ERROR", "at": "2026-01-01T00:10:00.123Z"},
    ]
    assert [h["task_status"] for h in four["history"]] == ["PENDING", "RUNNING"]
    assert four["finished_at"] is None
    # The lifecycle goes on from the imported state.
    resp = await client.patch("/jobs/4", json={"task_status": "FINISHED"}, headers=MERGE)
    assert resp.status == 200
    assert (await resp.json())["revision"] == 2
    resp = await client.patch("/jobs/1", json={"task_status": "ERROR"}, headers=MERGE)
    assert resp.status == 409


async def test_imported_result_entries_work_with_the_results_api(client: Client) -> None:
    """Entries come in, bytes do not: a download says so until PUT brings the file."""
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    entry = {
        "name": "counts.csv",
        "content_type": "text/csv",
        "size": 3,
        "sha256": "1" * 64,
        "created": T0,
        "metadata": {"rows": 1},
    }
    other = {**entry, "name": "log.txt", "content_type": "text/plain"}
    await import_(client, "jobs", ndjson([job_record(1, 1, results=[entry, other])]))
    resp = await client.get("/jobs/1/results")
    assert resp.status == 200
    assert [r["name"] for r in (await resp.json())["items"]] == ["counts.csv", "log.txt"]
    resp = await client.get("/jobs/1/results/counts.csv")
    assert resp.status == 404
    assert "imported without its bytes" in (await resp.json())["detail"]
    resp = await client.put(
        "/jobs/1/results/counts.csv", data=b"a,b", headers={"Content-Type": "text/csv"}
    )
    assert resp.status == 200  # it replaced the imported entry
    resp = await client.get("/jobs/1/results/counts.csv")
    assert resp.status == 200 and await resp.read() == b"a,b"
    assert (await client.delete("/jobs/1/results/log.txt")).status == 204
    (job,) = records(await export(client, "jobs"))
    assert [r["name"] for r in job["results"]] == ["counts.csv"]
    assert job["results"][0]["size"] == 3 and job["revision"] == 3


async def test_imported_result_entries_are_stored_without_a_file_id(client: Client) -> None:
    """models.ResultFile: no bytes, no `file_id` field, until an upload replaces the entry."""
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    entry = {"name": "a.txt", "content_type": "text/plain", "size": 1, "sha256": "1" * 64}
    await import_(client, "jobs", ndjson([job_record(1, 1, results=[{**entry, "created": T0}])]))
    doc = await database(client).jobs.find_one({"_id": 1})
    assert doc is not None
    assert list(doc["results"][0]) == [*entry, "created", "metadata"]
    resp = await client.put(
        "/jobs/1/results/a.txt", data=b"x", headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 200
    doc = await database(client).jobs.find_one({"_id": 1})
    assert doc is not None
    assert list(doc["results"][0]) == [*entry, "created", "metadata", "file_id"]


async def test_every_bad_line_is_reported_and_the_rest_goes_in(client: Client) -> None:
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    base = {"user_id": "a", "deployment_id": 1, "started_at": T0}
    at1 = "2026-01-01T01:00:00Z"
    ok_result = {"name": "r", "content_type": "text/plain", "size": 0, "sha256": "a" * 64}
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    cases: list[tuple[Any, str]] = [
        (b"{", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
        ({"user_id": "a"}, "deployment_id: Field required"),
        ({**base, "extra": 1}, "extra: unknown field"),
        ({**base, "job_id": 0}, "job_id: Input should be greater than or equal to 1"),
        ({**base, "job_id": "5"}, "job_id: Input should be a valid integer"),
        ({**base, "revision": 0}, "revision: Input should be greater than or equal to 1"),
        ({**base, "job_name": "x" * 201}, "job_name: String should have at most 200"),
        ({**base, "user_id": ""}, "user_id: String should have at least 1"),
        ({**base, "parameters": "p" * (64 * 1024 + 1)}, "parameters: String should have at most"),
        (
            {**base, "started_at": "2026-01-01T00:00:00"},
            "started_at: must be an RFC 3339 timestamp",
        ),
        ({**base, "started_at": None, "job_id": None}, "job_id, started_at: may not be null"),
        ({**base, "history": None}, "history: may not be null"),
        ({**base, "task_status": "DONE"}, "task_status: Input should be 'PENDING'"),
        ({**base, "data": {"$x": 1}}, "data.$x: object keys may not start with '$'"),
        ({**base, "data": {"a": {"b.c": 1}}}, "data.a.b.c: object keys may not contain '.'"),
        (
            orjson.dumps(base)[:-1] + b', "data": [18446744073709551616]}',
            "data.0: integer outside the signed 64-bit range",
        ),
        ({**base, "data": deep}, "nested deeper than 64 levels"),
        ({**base, "task_status": "FINISHED"}, "finished_at: required when task_status is FINISHED"),
        ({**base, "finished_at": at1}, "finished_at: must be null unless task_status is FINISHED"),
        (
            {**base, "task_status": "ERROR", "finished_at": "2025-12-31T00:00:00Z"},
            "finished_at: is before started_at",
        ),
        ({**base, "history": []}, "history: must start with PENDING"),
        (
            {**base, "task_status": "RUNNING", "history": [{"task_status": "RUNNING", "at": T0}]},
            "history: must start with PENDING",
        ),
        (
            {
                **base,
                "task_status": "FINISHED",
                "finished_at": at1,
                "history": [
                    {"task_status": "PENDING", "at": T0},
                    {"task_status": "FINISHED", "at": at1},
                ],
            },
            "history.1: PENDING cannot change to FINISHED",
        ),
        (
            {**base, "task_status": "RUNNING", "history": [{"task_status": "PENDING", "at": T0}]},
            "history: must end with task_status (RUNNING)",
        ),
        (
            {**base, "history": [{"task_status": "PENDING", "at": "2025-01-01T00:00:00Z"}]},
            "history.0.at: is before started_at",
        ),
        ({**base, "history": [{"task_status": "PENDING"}]}, "history.0.at: Field required"),
        (
            {**base, "results": [{**ok_result, "created": T0, "name": "a/b"}]},
            "results.0.name: may not contain '/'",
        ),
        ({**base, "results": [{**ok_result, "created": T0, "name": ".."}]}, "results.0.name"),
        (
            {**base, "results": [{**ok_result, "created": T0, "content_type": "csv"}]},
            "results.0.content_type: must be a media type",
        ),
        (
            {**base, "results": [{**ok_result, "created": T0}, {**ok_result, "created": T0}]},
            "results.1.name: 'r' is listed twice",
        ),
        (
            {**base, "results": [{**ok_result, "created": T0, "metadata": {"k": "v" * 5000}}]},
            "results.0.metadata: larger than 4096 bytes",
        ),
        ({**base, "results": [{**ok_result, "created": T0, "sha256": "X"}]}, "results.0.sha256"),
        ({**base, "results": [ok_result]}, "results.0.created: Field required"),
        (
            {**base, "results": [{**ok_result, "created": T0, "metadata": {"": 1}}]},
            "results.0.metadata.: object keys may not be empty",
        ),
        ({**base, "deployment_id": 999}, "deployment_id: no deployment with id 999"),
        ({**base, "job_id": 5}, ""),  # fine
        ({**base, "job_id": 5}, "job_id: 5 appears earlier in this import"),
    ]
    lines = [c if isinstance(c, bytes) else orjson.dumps(c) for c, _ in cases]
    body = b"\n".join(
        [b'{"user_id": "a", "deployment_id": 1}', *lines, b'{"user_id": "b", "deployment_id": 1}']
    )
    report = await import_(client, "jobs", body)
    assert report["received"] == len(cases) + 2
    assert report["inserted"] == 3 and report["failed"] == len(cases) - 1
    details = {e["line"]: e["detail"] for e in report["errors"]}
    for line, (_, expected) in enumerate(cases, start=2):
        if expected:
            assert expected in details[line], (line, details.get(line))
            assert "Value error" not in details[line]
        else:
            assert line not in details
    assert [e["line"] for e in report["errors"]] == sorted(details)
    stored = records(await export(client, "jobs"))
    assert sorted(j["user_id"] for j in stored) == ["a", "a", "b"]


async def test_deployment_records_follow_the_rules_of_post(client: Client) -> None:
    cases: list[tuple[Any, str]] = [
        ({"user_id": "a", "created": "yesterday"}, "created: "),
        ({"user_id": "a", "created": "0001-01-01T00:00:00+01:00"}, "created: is outside the years"),
        ({"user_id": "a", "deployment_id": None}, "deployment_id: may not be null"),
        ({"user_id": "a", "deployment_name": 5}, "deployment_name: Input should be a valid string"),
        ({"deployment_id": 2**62 + 1, "user_id": "a"}, "deployment_id: Input should be less than"),
        ({"user_id": "a", "data": {"k\x00": 1}}, "object keys may not contain NUL"),
        ({"user_id": "a", "job_id": 1}, "job_id: unknown field"),
    ]
    report = await import_(client, "deployments", ndjson(c for c, _ in cases))
    assert report["failed"] == len(cases)
    for error, (_, expected) in zip(report["errors"], cases, strict=True):
        assert expected in error["detail"], error


async def test_blank_lines_crlf_and_a_last_line_without_newline(client: Client) -> None:
    body = b'\n{"user_id": "a"}\r\n  \r\n\n{"user_id": "b"}\r\n{"user_id": "c"}'
    report = await import_(client, "deployments", body)
    assert (report["received"], report["inserted"], report["failed"]) == (3, 3, 0)
    report = await import_(client, "deployments", b'\n\n{"user_id": "a"}\n{"user_id"')
    assert report["errors"] == [
        {"line": 4, "detail": "not valid JSON: EOF while parsing an object at line 1 column 10"}
    ]
    assert (await import_(client, "deployments", b""))["received"] == 0


async def test_a_line_longer_than_the_limit_is_one_error(client: Client) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"user_id": "before"}\n{"user_id": "'
        for _ in range(MAX_LINE // 65536):
            yield b"x" * 65536
        yield b'"}\n{"user_id": "after"}\n'

    report = await import_(client, "deployments", body())
    assert report["received"] == 3 and report["inserted"] == 2
    assert report["errors"] == [{"line": 2, "detail": f"longer than {MAX_LINE} bytes"}]


async def test_data_is_held_to_1_mib_as_everywhere(client: Client) -> None:
    """The limit of POST and PATCH, to the byte: exactly 1 MiB of compact JSON goes in."""
    at_limit = {"s": "x" * (MAX_DATA_BYTES - len(b'{"s":""}'))}
    over = {"s": at_limit["s"] + "x"}
    lines = [
        {"user_id": "a", "data": at_limit},
        {"user_id": "a", "data": over},
        {"user_id": "a", "data": {f"k{i}": "v" * 1000 for i in range(1500)}},  # ~1.5 MB
    ]
    report = await import_(client, "deployments", ndjson(lines))
    too_large = f"data: larger than {MAX_DATA_BYTES} bytes as compact JSON"
    assert report["inserted"] == 1
    assert report["errors"] == [{"line": 2, "detail": too_large}, {"line": 3, "detail": too_large}]
    (stored,) = records(await export(client, "deployments"))
    assert stored["data"] == at_limit and len(orjson.dumps(stored["data"])) == MAX_DATA_BYTES
    jobs = [job_record(1, 1, data=at_limit), job_record(2, 1, data=over)]
    report = await import_(client, "jobs", ndjson(jobs))
    assert report["inserted"] == 1
    assert report["errors"] == [{"line": 2, "detail": too_large}]


async def test_only_the_first_1000_errors_are_listed(client: Client) -> None:
    report = await import_(client, "deployments", b"nope\n" * 1500 + b'{"user_id": "a"}\n')
    assert report["failed"] == 1500 and report["inserted"] == 1
    assert [e["line"] for e in report["errors"]] == list(range(1, 1001))


async def test_import_rows_are_counted_in_the_metrics(client: Client) -> None:
    def counted(outcome: str) -> float:
        labels = {"kind": "deployments", "outcome": outcome}
        return REGISTRY.get_sample_value("jobservice_import_rows_total", labels) or 0.0

    before = {o: counted(o) for o in ("inserted", "replaced", "skipped", "failed")}
    body = ndjson([{"deployment_id": 1, "user_id": "a"}, {"deployment_id": 2, "user_id": "a"}])
    await import_(client, "deployments", body)
    await import_(client, "deployments", body + b"nope\n", on_conflict="skip")
    after = {o: counted(o) - before[o] for o in before}
    assert after == {"inserted": 2, "replaced": 0, "skipped": 2, "failed": 1}
    text = await (await client.get("/metrics")).text()
    assert 'jobservice_import_rows_total{kind="deployments",outcome="skipped"}' in text


async def test_on_conflict_fail_skip_replace(client: Client) -> None:
    def dep(i: int, name: str) -> dict[str, Any]:
        return {"deployment_id": i, "user_id": "a", "deployment_name": name}

    await import_(client, "deployments", ndjson([dep(1, "one"), dep(2, "two")]))
    report = await import_(client, "deployments", ndjson([dep(1, "x"), dep(3, "three")]))
    assert (report["inserted"], report["failed"]) == (1, 1)
    assert report["errors"] == [{"line": 1, "detail": "deployment_id: 1 already exists"}]
    report = await import_(
        client,
        "deployments",
        ndjson([dep(1, "x"), dep(2, "x"), dep(4, "four")]),
        on_conflict="skip",
    )
    assert (report["inserted"], report["skipped"], report["failed"]) == (1, 2, 0)
    report = await import_(
        client, "deployments", ndjson([dep(1, "uno"), dep(5, "five")]), on_conflict="replace"
    )
    assert (report["inserted"], report["replaced"], report["failed"]) == (1, 1, 0)
    names = {
        d["deployment_id"]: d["deployment_name"]
        for d in records(await export(client, "deployments"))
    }
    assert names == {1: "uno", 2: "two", 3: "three", 4: "four", 5: "five"}


async def test_duplicates_inside_one_import_are_errors_in_every_mode(client: Client) -> None:
    for mode in ("fail", "skip", "replace"):
        body = ndjson([{"deployment_id": 9, "user_id": mode}, {"deployment_id": 9, "user_id": "x"}])
        report = await import_(client, "deployments", body, on_conflict=mode)
        assert report["errors"] == [
            {"line": 2, "detail": "deployment_id: 9 appears earlier in this import"}
        ]
    # ids handed out in this import count too, across batches
    body = ndjson([{"user_id": "a"}] * 1000 + [{"deployment_id": 12, "user_id": "b"}])
    report = await import_(client, "deployments", body, on_conflict="replace")
    (error,) = report["errors"]
    assert error["line"] == 1001
    assert error["detail"].startswith(
        "deployment_id: 12 was already handed out to an earlier record without an id"
    )
    assert records(await export(client, "deployments", user_id="b")) == []


async def test_bad_requests(client: Client) -> None:
    body = ndjson([{"user_id": "a"}])
    for params in ({"on_conflict": "merge"}, {"on_conflict": ["skip", "skip"]}, {"limit": "5"}):
        resp = await client.post("/import/deployments", data=body, headers=NDJSON, params=params)
        assert resp.status == 400, params
        assert resp.content_type == "application/problem+json"
    for content_type in ("application/json", "text/plain", ""):
        headers = {"Content-Type": content_type} if content_type else {}
        resp = await client.post("/import/jobs", data=body, headers=headers)
        assert resp.status == 415
        assert (await resp.json())["type"] == "/problems/unsupported-media-type"
    assert (await client.post("/import/users", data=body, headers=NDJSON)).status == 404
    assert (await client.get("/import/jobs")).status == 405
    assert (await client.post("/export/jobs")).status == 405
    assert (await client.head("/export/jobs")).status == 405
    assert records(await export(client, "deployments")) == []


async def test_many_batches_mixed_ids_and_errors(client: Client) -> None:
    """Old records with their ids, then new ones without: each batch in order."""
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    lines: list[bytes] = []
    for n in range(1, 2601):
        if n % 500 == 0:
            lines.append(b"broken")
        elif n <= 1300:
            lines.append(orjson.dumps(job_record(n, 1)))
        else:
            lines.append(orjson.dumps({"user_id": "b", "deployment_id": 1}))
    report = await import_(client, "jobs", b"\n".join(lines))
    conforms(report, "ImportReport")
    assert (report["received"], report["inserted"], report["failed"]) == (2600, 2595, 5)
    assert [e["line"] for e in report["errors"]] == [500, 1000, 1500, 2000, 2500]
    stored = records(await export(client, "jobs"))
    ids = [j["job_id"] for j in stored]
    assert len(set(ids)) == 2595
    assert ids[:1298] == [n for n in range(1, 1301) if n % 500]
    assert ids[1298:] == list(range(1301, 1301 + 1297))


# --- crash and retry -----------------------------------------------------------------


@pytest.mark.parametrize("cut_lines", [300, 1000.5, 2500])
async def test_retry_with_skip_after_a_cut_off_import_inserts_exactly_the_rest(
    client: Client, cut_lines: float
) -> None:
    """Cut the connection mid-body (mid-line, too), then send the whole file again."""
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    lines = [orjson.dumps(job_record(n, 1)) + b"\n" for n in range(1, 5001)]
    body = b"".join(lines)
    whole = int(cut_lines)
    cut = sum(map(len, lines[:whole])) + (len(lines[whole]) // 2 if cut_lines != whole else 0)
    written_before_cut = whole // BATCH_RECORDS * BATCH_RECORDS

    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = (
        "POST /import/jobs?on_conflict=skip HTTP/1.1\r\n"
        f"Host: {server.host}\r\nContent-Type: application/x-ndjson\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body[:cut])
    await writer.drain()
    jobs = database(client).jobs
    for _ in range(600):  # the batches before the cut are written (a generous minute)
        if await jobs.count_documents({}) >= written_before_cut:
            break
        await asyncio.sleep(0.1)
    writer.transport.abort()
    assert not await reader.read()  # no answer: the request never ended
    before = await jobs.count_documents({})
    assert written_before_cut <= before < 5000

    report = await import_(client, "jobs", body, on_conflict="skip")
    assert report["received"] == 5000 and report["failed"] == 0
    assert report["inserted"] + report["skipped"] == 5000
    assert report["skipped"] >= before
    assert await export(client, "jobs") == body  # nothing lost, nothing doubled, all exact


async def test_jobs_of_a_deployment_deleted_mid_import_are_taken_back_out(client: Client) -> None:
    """The import re-checks deployments after writing, as POST /jobs does."""
    keep = (await create_deployment(client))["deployment_id"]
    doomed = (await create_deployment(client))["deployment_id"]
    body = ndjson([job_record(1, keep), job_record(2, doomed), job_record(3, doomed)])
    db = database(client)
    importer = Importer(db, KINDS["jobs"], "fail", cast(StreamReader, Chunks(body)))
    batch = await importer.prepare()
    assert batch is not None and len(batch.docs) == 3
    await db.deployments.delete_one({"_id": doomed})  # after the check, before the write
    await importer.write(batch)
    importer.report.add(batch)
    assert importer.report.inserted == 1 and importer.report.failed == 2
    assert importer.report.errors[0]["detail"] == (
        f"deployment_id: deployment {doomed} was deleted during the import"
    )
    assert [j["_id"] async for j in db.jobs.find()] == [1]


# --- export --------------------------------------------------------------------------


async def test_export_import_round_trip_is_exact(client: Client, other_client: Client) -> None:
    d1 = await create_deployment(
        client,
        deployment_name="bell",
        parameters="--shots 1000",
        data={"a": [1, 2.5, {"b": None}], "big": 2**62, "s": "ü€😀", "f": 1.0, "t": True},
    )
    d2 = await create_deployment(client, data=[1, "two"])
    await create_deployment(client, data=None)
    j1 = await create_job(client, d1["deployment_id"], started_at="2026-11-29T18:00:00.1239+01:00")
    j2 = await create_job(client, d2["deployment_id"], job_name="x", data={"k": {"l": [None]}})
    await create_job(client, d1["deployment_id"])
    for job_id, patch in [
        (j1["job_id"], {"task_status": "RUNNING"}),
        (j1["job_id"], {"task_status": "FINISHED", "finished_at": "2027-01-01T00:00:00.5Z"}),
        (j2["job_id"], {"data": {"k": {"m": 1}}}),
        (j2["job_id"], {"task_status": "ERROR"}),
    ]:
        resp = await client.patch(f"/jobs/{job_id}", json=patch, headers=MERGE)
        assert resp.status == 200, await resp.text()
    await client.patch(
        f"/deployments/{d2['deployment_id']}", json={"deployment_name": "n"}, headers=MERGE
    )
    result = {
        "name": "r.bin",
        "content_type": "application/octet-stream",
        "size": 3,
        "sha256": "f" * 64,
        "created": "2026-11-29T16:00:00.001Z",
        "metadata": {"m": [1]},
    }
    await import_(client, "jobs", ndjson([job_record(50, 1, results=[result])]))

    deployments, jobs = await export(client, "deployments"), await export(client, "jobs")
    assert len(records(deployments)) == 3 and len(records(jobs)) == 4
    for job in records(jobs):  # each line is exactly what GET answers, and what the spec says
        assert job == await (await client.get(f"/jobs/{job['job_id']}")).json()
        conforms(job, "Job")
        conforms(job, "JobRecord")
    for deployment in records(deployments):
        conforms(deployment, "Deployment")
        conforms(deployment, "DeploymentRecord")
    assert (await import_(other_client, "deployments", deployments))["inserted"] == 3
    assert (await import_(other_client, "jobs", jobs))["inserted"] == 4
    assert await export(other_client, "deployments") == deployments
    assert await export(other_client, "jobs") == jobs
    assert (await create_job(other_client, 1))["job_id"] == 51
    assert (await create_deployment(other_client))["deployment_id"] == 4


async def test_round_trip_keeps_the_executor_fields(client: Client, other_client: Client) -> None:
    """Leases, cancels (with the longest reason), status reasons, retries, history reasons."""
    dep = await create_deployment(client)
    jobs = [await create_job(client, dep["deployment_id"]) for _ in range(4)]
    claim = {"executor": "e" * 200, "lease_s": 3600}
    for _ in range(2):
        assert (await client.post("/jobs/claim", json=claim)).status == 200
    longest = {"reason": "r" * 1000}
    assert (await client.post(f"/jobs/{jobs[0]['job_id']}/cancel", json=longest)).status == 202
    assert (await client.post(f"/jobs/{jobs[2]['job_id']}/cancel", json=longest)).status == 200
    ended = {"task_status": "ERROR", "status_reason": "s" * 1000}
    assert (await client.patch(f"/jobs/{jobs[1]['job_id']}", json=ended)).status == 200
    assert (await client.post(f"/jobs/{jobs[1]['job_id']}/retry")).status == 201
    exported = await export(client, "jobs")
    lines = records(exported)
    assert len(lines[2]["status_reason"]) == len("cancelled: ") + 1000
    assert lines[0]["lease"] is not None and lines[0]["cancel_reason"] == "r" * 1000
    assert lines[4]["retry_of"] == jobs[1]["job_id"] and lines[4]["attempt"] == 2
    for job in lines:
        conforms(job, "JobRecord")
    await import_(other_client, "deployments", await export(client, "deployments"))
    report = await import_(other_client, "jobs", exported)
    assert report["inserted"] == 5, report
    assert await export(other_client, "jobs") == exported


async def test_export_filters_like_the_lists(client: Client) -> None:
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    await import_(client, "deployments", ndjson([{"deployment_id": 2, "user_id": "b"}]))
    done = {"task_status": "ERROR", "finished_at": "2026-01-02T00:00:00.000Z"}
    given = [
        job_record(1, 1),
        job_record(2, 2, user_id="bob"),
        job_record(3, 1, started_at="2026-01-03T00:00:00.000Z", history=[]) | done,
        job_record(4, 2) | done,
    ]
    given[2]["history"] = [
        {"task_status": "PENDING", "at": "2026-01-03T00:00:00.000Z"},
        {"task_status": "ERROR", "at": "2026-01-03T00:00:00.000Z"},
    ]
    given[2]["finished_at"] = "2026-01-03T00:00:00.000Z"
    given[3]["history"] = [{"task_status": "PENDING", "at": T0}, {"task_status": "ERROR", "at": T0}]
    await import_(client, "jobs", ndjson(given))

    async def ids(**params: Any) -> list[int]:
        return [j["job_id"] for j in records(await export(client, "jobs", **params))]

    assert await ids() == [1, 2, 3, 4]
    assert await ids(user_id="bob") == [2]
    assert await ids(deployment_id=2) == [2, 4]
    assert await ids(task_status=["ERROR", "RUNNING"]) == [3, 4]
    assert await ids(started_after="2026-01-02T00:00:00Z") == [3]
    assert await ids(finished_before="2026-01-03T00:00:00Z") == [4]
    deps = records(await export(client, "deployments", user_id="b"))
    assert [d["deployment_id"] for d in deps] == [2]
    for kind, params in [
        ("jobs", {"limit": "10"}),
        ("jobs", {"sort": "-id"}),
        ("jobs", {"cursor": "x"}),
        ("jobs", {"count": "true"}),
        ("jobs", {"task_status": "DONE"}),
        ("jobs", {"created_after": T0}),
        ("deployments", {"deployment_id": "1"}),
        ("deployments", {"created_after": "yesterday"}),
    ]:
        resp = await client.get(f"/export/{kind}", params=params)
        assert resp.status == 400, (kind, params)
        assert (await resp.json())["type"] == "/problems/bad-request"


async def test_export_streams_many_batches_in_id_order(client: Client) -> None:
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    given = [job_record(n, 1) for n in random.Random(3).sample(range(1, 10_000), 2500)]
    await import_(client, "jobs", ndjson(given))
    resp = await client.get("/export/jobs")
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    assert records(await resp.read()) == sorted(given, key=lambda j: j["job_id"])


async def test_exports_read_within_the_analytics_time_limit(
    aiohttp_client: Any, settings: Settings
) -> None:
    """MONGODB_ANALYTICS_TIMEOUT_MS bounds an export's reads, and only theirs (the import
    works): spent, it is a 503 before anything is sent. (model_copy skips validation: a
    limit no database can meet.)"""
    limited = settings.model_copy(update={"mongodb_analytics_timeout_ms": 1e-3})
    client: Client = await aiohttp_client(create_app(limited))
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    resp = await client.get("/export/deployments")
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["type"] == "/problems/database-unavailable"


async def test_an_export_that_fails_midway_is_visibly_incomplete(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status line is sent by then: the stream is broken off, never ended cleanly."""
    await import_(client, "deployments", ndjson([{"deployment_id": 1, "user_id": "a"}]))
    await import_(client, "jobs", ndjson(job_record(n, 1) for n in range(1, 3001)))

    def flaky(doc: dict[str, Any]) -> dict[str, Any]:
        if doc["_id"] == 2500:
            raise RuntimeError("the database went away")
        return public_job(doc)

    monkeypatch.setitem(EXPORTS, "jobs", dataclasses.replace(EXPORTS["jobs"], public=flaky))
    resp = await client.get("/export/jobs")
    assert resp.status == 200
    with pytest.raises(ClientPayloadError):
        await resp.read()
    assert (await client.get("/healthz")).status == 200


# --- the parts -----------------------------------------------------------------------


async def test_line_reader_finds_the_same_lines_however_the_bytes_arrive() -> None:
    lines = [b"a", b"", b"bb\r", b"x" * 50, b"c" * 20, b"y" * 21, b"last"]
    data = b"\n".join(lines)
    expected = [(n, line.removesuffix(b"\r")) for n, line in enumerate(lines, 1)]
    expected[3] = (4, None)  # type: ignore[assignment]
    expected[5] = (6, None)  # type: ignore[assignment]
    rng = random.Random(1)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 12)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        reader = LineReader(cast(StreamReader, Chunks(*chunks)), max_line=20)
        got: list[tuple[int, bytes | None]] = []
        while batch := await reader.read(3, 1000):
            assert len(batch) <= 3
            got += batch
        assert got == expected


def test_id_set_agrees_with_a_set() -> None:
    rng = random.Random(2)
    for ordered in (True, False):
        ids, reference = IdSet(), set()
        ids.FOLD = 7
        values = list(range(1, 300)) if ordered else [rng.randint(1, 400) for _ in range(600)]
        values += [rng.randint(1, 400) for _ in range(300)]
        for value in values:
            assert ids.add(value) == (value not in reference)
            reference.add(value)
    sorted_ids = IdSet()
    for n in range(1, 200_001):
        sorted_ids.add(n)
    assert len(sorted_ids.starts) == 1  # an export's ids fold into one run
