"""Result files: streamed round trips, ranges, conditional GETs, limits, cut-off uploads."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import yaml
from aiohttp import ClientPayloadError, ClientResponse, web
from gridfs import AsyncGridFSBucket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS31Validator, validate
from pymongo.asynchronous.database import AsyncDatabase

from service.app import create_app
from service.database import DB
from service.results import CHUNK_SIZE
from service.settings import Settings
from tests.helpers import Client, create_deployment, create_job

SPEC: dict[str, Any] = yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "openapi.yaml").read_text()
)
ENTRY_FIELDS = {"name", "content_type", "size", "sha256", "created", "metadata"}
MiB = 1024 * 1024


def database(client: Client) -> AsyncDatabase[dict[str, Any]]:
    app: web.Application | None = client.app
    assert app is not None
    return app[DB].db


async def new_job(client: Client) -> int:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    job_id: int = job["job_id"]
    return job_id


def url(job_id: int, name: str) -> str:
    return f"/jobs/{job_id}/results/{quote(name, safe='')}"


async def put(client: Client, job_id: int, name: str, body: Any, **headers: str) -> ClientResponse:
    return await client.put(url(job_id, name), data=body, headers=headers)


async def counts(client: Client) -> tuple[int, int]:
    db = database(client)
    return await db["fs.files"].count_documents({}), await db["fs.chunks"].count_documents({})


async def wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a condition the server reaches on its own; the deadline only stops a hang."""
    for _ in range(1200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def pseudo_random(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/")]
        node = target
    return node


def _check(value: Any, schema: dict[str, Any]) -> None:
    validate(value, {"components": SPEC["components"], **schema}, cls=OAS31Validator)


async def conforms(resp: ClientResponse, template: str) -> bytes:
    """Assert the response is one openapi.yaml documents for its operation; return the body."""
    body = await resp.read()
    operation = SPEC["paths"][template][resp.method.lower()]
    assert str(resp.status) in operation["responses"], (resp.method, template, resp.status)
    documented = _resolve(operation["responses"][str(resp.status)])
    for name, header in documented.get("headers", {}).items():
        header = _resolve(header)
        assert name in resp.headers or not header.get("required"), (resp.status, name)
        if name in resp.headers:
            raw = resp.headers[name]
            value = int(raw) if header["schema"].get("type") == "integer" else raw
            _check(value, header["schema"])
    content = documented.get("content")
    if not content:
        assert body == b"", (resp.status, body[:100])
        return body
    media = content.get(resp.content_type) or content["*/*"]
    if resp.content_type.endswith("json"):
        _check(orjson.loads(body), media["schema"])
    return body


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 11, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 17 * CHUNK_SIZE + 5],
    ids=["empty", "small", "chunk-1", "chunk", "chunk+1", "multi-batch"],
)
async def test_round_trip(client: Client, size: int) -> None:
    job_id = await new_job(client)
    content = pseudo_random(size, seed=size)
    resp = await put(client, job_id, "out.bin", content)
    assert resp.status == 201, await resp.text()
    entry = await resp.json()
    assert set(entry) == ENTRY_FIELDS
    assert entry["size"] == size
    assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    assert entry["content_type"] == "application/octet-stream"
    assert entry["metadata"] == {}
    assert entry["created"].endswith("Z")
    assert resp.headers["Location"] == f"/jobs/{job_id}/results/out.bin"
    assert resp.headers["ETag"] == f'"{entry["sha256"]}"'

    got = await client.get(url(job_id, "out.bin"))
    assert got.status == 200
    assert await got.read() == content
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.headers["Content-Length"] == str(size)
    assert got.headers["ETag"] == f'"{entry["sha256"]}"'
    assert got.headers["Accept-Ranges"] == "bytes"
    assert got.headers["Content-Disposition"] == (
        "attachment; filename=\"out.bin\"; filename*=UTF-8''out.bin"
    )

    listed = await (await client.get(f"/jobs/{job_id}/results")).json()
    assert listed == {"items": [entry]}
    job = await (await client.get(f"/jobs/{job_id}")).json()
    assert job["results"] == [entry] and job["revision"] == 2

    # Standard GridFS: the driver's bucket reads what the service wrote.
    db = database(client)
    file_doc = await db["fs.files"].find_one({})
    assert file_doc is not None
    assert file_doc["metadata"] == {"job_id": job_id, "name": "out.bin"}
    assert file_doc["length"] == size and file_doc["chunkSize"] == CHUNK_SIZE
    stream = await AsyncGridFSBucket(db).open_download_stream(file_doc["_id"])
    assert await stream.read() == content
    assert await counts(client) == (1, -(-size // CHUNK_SIZE))


async def test_body_over_the_json_limit_streams(client: Client) -> None:
    """client_max_size (2 MiB) guards JSON bodies only; a file streams past it."""
    job_id = await new_job(client)
    content = pseudo_random(5 * MiB)
    resp = await put(client, job_id, "big", content)
    assert resp.status == 201, await resp.text()
    assert await (await client.get(url(job_id, "big"))).read() == content


async def test_100_mb_streamed_both_ways(client: Client) -> None:
    job_id = await new_job(client)
    blocks = 100
    expected = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for i in range(blocks):
            block = pseudo_random(MiB, seed=i)
            expected.update(block)
            yield block

    resp = await put(client, job_id, "huge.dat", body())  # chunked: no Content-Length
    assert resp.status == 201, await resp.text()
    entry = await resp.json()
    assert entry["size"] == blocks * MiB
    assert entry["sha256"] == expected.hexdigest()

    got = await client.get(url(job_id, "huge.dat"))
    assert got.status == 200
    assert got.headers["Content-Length"] == str(blocks * MiB)
    received = hashlib.sha256()
    size = 0
    async for piece in got.content.iter_chunked(MiB):
        received.update(piece)
        size += len(piece)
    assert size == blocks * MiB
    assert received.hexdigest() == expected.hexdigest()


async def test_content_type_and_metadata_are_kept(client: Client) -> None:
    job_id = await new_job(client)
    resp = await put(
        client,
        job_id,
        "counts.csv",
        b"a,b\n1,2\n",
        **{
            "Content-Type": "text/csv; charset=utf-8",
            "X-Result-Metadata": '{"shots": 1000, "tags": ["x"], "note": "caf\\u00e9"}',
        },
    )
    assert resp.status == 201, await resp.text()
    entry = await resp.json()
    assert entry["content_type"] == "text/csv; charset=utf-8"
    assert entry["metadata"] == {"shots": 1000, "tags": ["x"], "note": "café"}
    got = await client.get(url(job_id, "counts.csv"))
    assert got.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    # Stored natively for analysts: the entry is a BSON document in the job.
    job = await database(client).jobs.find_one({"_id": job_id})
    assert job is not None
    assert job["results"][0]["metadata"]["shots"] == 1000


async def test_replace_keeps_position_bumps_revision_and_drops_old_file(client: Client) -> None:
    job_id = await new_job(client)
    for name in ("a", "b", "c"):
        assert (await put(client, job_id, name, name.encode())).status == 201
    resp = await put(client, job_id, "b", b"second b")
    assert resp.status == 200
    assert "Location" not in resp.headers
    assert (await resp.json())["size"] == len(b"second b")
    job = await (await client.get(f"/jobs/{job_id}")).json()
    assert [r["name"] for r in job["results"]] == ["a", "b", "c"]
    assert job["revision"] == 5
    assert await (await client.get(url(job_id, "b"))).read() == b"second b"
    assert await counts(client) == (3, 3)


async def test_concurrent_uploads_to_one_job_all_land(client: Client) -> None:
    job_id = await new_job(client)
    names = [f"part-{i}" for i in range(8)]
    contents = {n: pseudo_random(CHUNK_SIZE + i, seed=i) for i, n in enumerate(names)}
    responses = await asyncio.gather(*(put(client, job_id, n, contents[n]) for n in names))
    assert [r.status for r in responses] == [201] * len(names)
    job = await (await client.get(f"/jobs/{job_id}")).json()
    assert sorted(r["name"] for r in job["results"]) == names
    assert job["revision"] == 1 + len(names)
    for n in names:
        assert await (await client.get(url(job_id, n))).read() == contents[n]
    assert (await counts(client))[0] == len(names)


async def test_concurrent_replacements_of_one_name_leave_one_file(client: Client) -> None:
    job_id = await new_job(client)
    # Every body spans two chunks, whichever wins (exactly CHUNK_SIZE bytes would be one).
    bodies = [pseudo_random(CHUNK_SIZE + 1 + i, seed=i) for i in range(6)]
    responses = await asyncio.gather(*(put(client, job_id, "same", b) for b in bodies))
    assert sorted(r.status for r in responses) == [200] * 5 + [201]
    got = await (await client.get(url(job_id, "same"))).read()
    assert got in bodies
    assert await counts(client) == (1, 2)


async def test_results_can_be_added_to_finished_jobs(client: Client) -> None:
    job_id = await new_job(client)
    for status in ("RUNNING", "FINISHED"):
        resp = await client.patch(f"/jobs/{job_id}", json={"task_status": status})
        assert resp.status == 200
    assert (await put(client, job_id, "late.txt", b"after the end")).status == 201


async def test_names_may_hold_spaces_unicode_and_braces(client: Client) -> None:
    job_id = await new_job(client)
    name = "résumé {v2} 100%.txt"
    resp = await put(client, job_id, name, b"x")
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["name"] == name
    got = await client.get(url(job_id, name))
    assert got.status == 200
    assert got.headers["Content-Disposition"] == (
        f"attachment; filename=\"r_sum_ {{v2}} 100%.txt\"; filename*=UTF-8''{quote(name, safe='')}"
    )
    assert len((await put(client, job_id, "n" * 200, b"")).headers["ETag"]) == 66


dollar_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters="/"),
    max_size=20,
).map(lambda rest: rest if rest.startswith("$") else "$" + rest)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=dollar_names | st.sampled_from(["$x.csv", "$$x", "$$ROOT", "$$this.name", "$literal"]))
async def test_names_that_look_like_expressions_are_plain_names(client: Client, name: str) -> None:
    """A name is never read as a field path or variable ($literal), on any database."""
    job_id = await new_job(client)
    assert (await put(client, job_id, "other", b"o")).status == 201
    assert (await put(client, job_id, name, b"first")).status == 201
    resp = await put(client, job_id, name, b"second")
    assert resp.status == 200, await resp.text()
    got = await client.get(url(job_id, name))
    assert got.status == 200 and await got.read() == b"second"
    assert await (await client.get(url(job_id, "other"))).read() == b"o"
    job = await (await client.get(f"/jobs/{job_id}")).json()
    assert [r["name"] for r in job["results"]] == ["other", name]
    assert (await client.delete(url(job_id, name))).status == 204
    files = database(client)["fs.files"]
    assert await files.count_documents({"metadata.job_id": job_id}) == 1  # "other" only


# --- reading: ranges and conditions -----------------------------------------------------

SIZE = 3 * CHUNK_SIZE + 10


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=0-", 0, SIZE - 1),
        ("bytes=-1", SIZE - 1, SIZE - 1),
        (f"bytes={SIZE - 1}-", SIZE - 1, SIZE - 1),
        (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),
        (f"bytes=10-{SIZE + 100}", 10, SIZE - 1),
        (f"bytes=-{SIZE * 2}", 0, SIZE - 1),
        (f"bytes={CHUNK_SIZE - 1}-{CHUNK_SIZE}", CHUNK_SIZE - 1, CHUNK_SIZE),
        (f"bytes={CHUNK_SIZE}-{2 * CHUNK_SIZE - 1}", CHUNK_SIZE, 2 * CHUNK_SIZE - 1),
        (f"bytes=5-{2 * CHUNK_SIZE + 7}", 5, 2 * CHUNK_SIZE + 7),
        (f"bytes=-{CHUNK_SIZE + 11}", SIZE - CHUNK_SIZE - 11, SIZE - 1),
        ("bytes=1-99999999999999999999999", 1, SIZE - 1),
    ],
)
async def test_single_ranges(client: Client, header: str, first: int, last: int) -> None:
    job_id = await new_job(client)
    content = pseudo_random(SIZE)
    await put(client, job_id, "r", content)
    got = await client.get(url(job_id, "r"), headers={"Range": header})
    assert got.status == 206
    assert got.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert got.headers["Content-Length"] == str(last - first + 1)
    assert await got.read() == content[first : last + 1]


@pytest.mark.parametrize(
    "header",
    [f"bytes={SIZE}-", f"bytes={SIZE}-{SIZE + 5}", "bytes=-0", "bytes=99999999999999999999-"],
)
async def test_unsatisfiable_range_is_416(client: Client, header: str) -> None:
    job_id = await new_job(client)
    await put(client, job_id, "r", pseudo_random(SIZE))
    got = await client.get(url(job_id, "r"), headers={"Range": header})
    assert got.status == 416
    assert got.headers["Content-Type"] == "application/problem+json"
    assert got.headers["Content-Range"] == f"bytes */{SIZE}"
    assert (await got.json())["type"] == "/problems/range-not-satisfiable"


async def test_any_range_of_an_empty_file_is_416(client: Client) -> None:
    job_id = await new_job(client)
    await put(client, job_id, "empty", b"")
    for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
        got = await client.get(url(job_id, "empty"), headers={"Range": header})
        assert got.status == 416
        assert got.headers["Content-Range"] == "bytes */0"


@pytest.mark.parametrize(
    "header", ["bytes=0-1,5-6", "bytes=5-2", "items=0-1", "bytes=", "bytes=-", "bytes=a-b", "0-1"]
)
async def test_ranges_not_understood_are_ignored(client: Client, header: str) -> None:
    job_id = await new_job(client)
    content = pseudo_random(100)
    await put(client, job_id, "r", content)
    got = await client.get(url(job_id, "r"), headers={"Range": header})
    assert got.status == 200
    assert "Content-Range" not in got.headers
    assert await got.read() == content


async def test_if_range_with_another_etag_sends_the_whole_file(client: Client) -> None:
    job_id = await new_job(client)
    content = pseudo_random(100)
    etag = (await put(client, job_id, "r", content)).headers["ETag"]
    same = await client.get(url(job_id, "r"), headers={"Range": "bytes=0-9", "If-Range": etag})
    assert same.status == 206 and await same.read() == content[:10]
    other = await client.get(url(job_id, "r"), headers={"Range": "bytes=0-9", "If-Range": '"x"'})
    assert other.status == 200 and await other.read() == content


@pytest.mark.parametrize("form", ["{etag}", "W/{etag}", '"nope", {etag}', "*"])
async def test_if_none_match_gives_304(client: Client, form: str) -> None:
    job_id = await new_job(client)
    etag = (await put(client, job_id, "r", b"data")).headers["ETag"]
    got = await client.get(url(job_id, "r"), headers={"If-None-Match": form.format(etag=etag)})
    assert got.status == 304
    assert got.headers["ETag"] == etag
    assert await got.read() == b""
    changed = await client.get(url(job_id, "r"), headers={"If-None-Match": '"other"'})
    assert changed.status == 200 and await changed.read() == b"data"


async def test_head_sends_headers_only(client: Client) -> None:
    job_id = await new_job(client)
    await put(client, job_id, "r", b"12345")
    got = await client.head(url(job_id, "r"))
    assert got.status == 200
    assert got.headers["Content-Length"] == "5"
    assert await got.read() == b""


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_name", ["a%2Fb", "a%00b", "a%0Ab", "tab%09", "del%7F", "c1%C2%85", "n" * 201]
)
async def test_bad_names_are_422(client: Client, raw_name: str) -> None:
    job_id = await new_job(client)
    for method in ("PUT", "GET", "DELETE"):
        resp = await client.request(method, f"/jobs/{job_id}/results/{raw_name}", data=b"x")
        assert resp.status == 422, (method, raw_name)
        body = await resp.json()
        assert body["errors"][0]["loc"] == ["path", "name"]
    assert await counts(client) == (0, 0)


async def test_dot_names_are_422(client: Client) -> None:
    """Clients fold `.` and `..` out of paths, so such names could never be read back."""
    job_id = await new_job(client)
    for name in (".", ".."):
        status, _ = await raw_exchange(client, f"PUT /jobs/{job_id}/results/{name}", b"x")
        assert status == 422


async def test_empty_name_and_slash_find_no_route(client: Client) -> None:
    job_id = await new_job(client)
    assert (await client.put(f"/jobs/{job_id}/results/", data=b"x")).status == 404
    assert (await client.put(f"/jobs/{job_id}/results/a/b", data=b"x")).status == 404


async def test_missing_job_and_missing_result_are_404(client: Client) -> None:
    job_id = await new_job(client)
    for method, path in [
        ("PUT", "/jobs/999/results/x"),
        ("GET", "/jobs/999/results/x"),
        ("DELETE", "/jobs/999/results/x"),
        ("GET", "/jobs/999/results"),
        ("PUT", "/jobs/abc/results/x"),
        ("GET", f"/jobs/{job_id}/results/nope"),
        ("DELETE", f"/jobs/{job_id}/results/nope"),
    ]:
        resp = await client.request(method, path, data=b"x" * 1000)
        assert resp.status == 404, (method, path)
        assert resp.headers["Content-Type"] == "application/problem+json"
    assert await counts(client) == (0, 0)


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("not json", 400),
        ("[1, 2]", 422),
        ('"text"', 422),
        ('{"$set": 1}', 422),
        ('{"a.b": 1}', 422),
        ('{"a": [{"$x": 1}]}', 422),
        ('{"big": "' + "x" * 5000 + '"}', 422),
    ],
)
async def test_bad_metadata_changes_nothing(client: Client, header: str, status: int) -> None:
    job_id = await new_job(client)
    resp = await put(client, job_id, "r", b"data", **{"X-Result-Metadata": header})
    assert resp.status == status
    body = await resp.json()
    assert body["errors"][0]["loc"][:2] == ["header", "X-Result-Metadata"]
    assert await counts(client) == (0, 0)
    assert (await (await client.get(f"/jobs/{job_id}")).json())["revision"] == 1


async def test_metadata_header_in_raw_utf8(client: Client) -> None:
    job_id = await new_job(client)
    meta = '{"note": "café ✓"}'.encode()
    status, _ = await raw_exchange(
        client, f"PUT {url(job_id, 'r')}", b"x", b"X-Result-Metadata: " + meta + b"\r\n"
    )
    assert status == 201
    entry = (await (await client.get(f"/jobs/{job_id}/results")).json())["items"][0]
    assert entry["metadata"] == {"note": "café ✓"}
    status, reply = await raw_exchange(
        client, f"PUT {url(job_id, 's')}", b"x", b'X-Result-Metadata: {"a": "\xff"}\r\n'
    )
    assert status == 400 and b"/problems/malformed-json" in reply


async def test_malformed_content_type_is_415(client: Client) -> None:
    job_id = await new_job(client)
    resp = await put(client, job_id, "r", b"data", **{"Content-Type": "not a type"})
    assert resp.status == 415
    assert await counts(client) == (0, 0)


async def test_unknown_query_parameters_are_400(client: Client) -> None:
    job_id = await new_job(client)
    assert (await client.put(url(job_id, "r") + "?x=1", data=b"")).status == 400
    assert (await client.get(f"/jobs/{job_id}/results?limit=1")).status == 400
    assert await counts(client) == (0, 0)


# --- limits -----------------------------------------------------------------------------


@pytest.fixture
async def small_client(aiohttp_client: Any, settings: Settings) -> Client:
    limited = settings.model_copy(update={"max_result_bytes": 3 * MiB, "max_results_per_job": 2})
    test_client: Client = await aiohttp_client(create_app(limited))
    return test_client


async def test_too_large_with_content_length_is_413_at_once(small_client: Client) -> None:
    job_id = await new_job(small_client)
    resp = await put(small_client, job_id, "big", b"x" * (3 * MiB + 1))
    assert resp.status == 413
    assert (await resp.json())["type"] == "/problems/payload-too-large"
    assert await counts(small_client) == (0, 0)


async def test_too_large_while_streaming_is_413_and_removed(small_client: Client) -> None:
    job_id = await new_job(small_client)

    async def body() -> AsyncIterator[bytes]:
        for i in range(8):
            yield pseudo_random(MiB, seed=i)

    resp = await put(small_client, job_id, "big", body())
    assert resp.status == 413
    assert await counts(small_client) == (0, 0)
    job = await (await small_client.get(f"/jobs/{job_id}")).json()
    assert job["results"] == [] and job["revision"] == 1
    exact = await put(small_client, job_id, "fits", b"x" * (3 * MiB))
    assert exact.status == 201


async def test_too_many_results_is_409_but_replacing_works(small_client: Client) -> None:
    job_id = await new_job(small_client)
    assert (await put(small_client, job_id, "a", b"1")).status == 201
    assert (await put(small_client, job_id, "b", b"2")).status == 201
    third = await put(small_client, job_id, "c", b"3")
    assert third.status == 409
    assert (await third.json())["type"] == "/problems/conflict"
    assert (await put(small_client, job_id, "b", b"22")).status == 200
    assert await counts(small_client) == (2, 2)


async def test_responses_match_openapi(small_client: Client) -> None:
    client = small_client
    job_id = await new_job(client)
    one = "/jobs/{job_id}/results/{name}"
    listed = "/jobs/{job_id}/results"
    meta = "X-Result-Metadata"
    checks: list[tuple[str, str, str, dict[str, str], Any, int]] = [
        ("PUT", one, url(job_id, "a b.csv"), {meta: '{"k": [1]}'}, b"1,2\n", 201),
        ("PUT", one, url(job_id, "a b.csv"), {}, b"1,2,3\n", 200),
        ("PUT", one, url(job_id, "empty"), {}, b"", 201),
        ("PUT", one, url(job_id, "third"), {}, b"", 409),
        ("PUT", one, url(job_id, "x") + "?q=1", {}, b"", 400),
        ("PUT", one, url(job_id, "x"), {meta: "{"}, b"", 400),
        ("PUT", one, url(job_id, "x"), {meta: "[]"}, b"", 422),
        ("PUT", one, f"/jobs/{job_id}/results/a%00", {}, b"", 422),
        ("PUT", one, url(999, "x"), {}, b"", 404),
        ("PUT", one, url(job_id, "x"), {"Content-Type": "nope"}, b"", 415),
        ("PUT", one, url(job_id, "a b.csv"), {}, b"x" * (3 * MiB + 1), 413),
        ("GET", listed, f"/jobs/{job_id}/results", {}, None, 200),
        ("GET", listed, "/jobs/999/results", {}, None, 404),
        ("GET", listed, f"/jobs/{job_id}/results?x=1", {}, None, 400),
        ("GET", one, url(job_id, "a b.csv"), {}, None, 200),
        ("GET", one, url(job_id, "a b.csv"), {"Range": "bytes=1-2"}, None, 206),
        ("GET", one, url(job_id, "a b.csv"), {"Range": "bytes=100-"}, None, 416),
        ("GET", one, url(job_id, "a b.csv"), {"If-None-Match": "*"}, None, 304),
        ("GET", one, url(job_id, "empty"), {}, None, 200),
        ("GET", one, url(job_id, "nope"), {}, None, 404),
        ("GET", one, f"/jobs/{job_id}/results/%0A", {}, None, 422),
        ("DELETE", one, url(job_id, "a b.csv"), {}, None, 204),
        ("DELETE", one, url(job_id, "a b.csv"), {}, None, 404),
        ("DELETE", one, url(job_id, "empty") + "?x=1", {}, None, 400),
    ]
    for method, template, path, headers, body, status in checks:
        resp = await client.request(method, path, headers=headers, data=body)
        assert resp.status == status, (method, path, await resp.text())
        await conforms(resp, template)


# --- cut-off uploads and readers during a replace -----------------------------------------


async def raw_exchange(
    client: Client, request_line: str, body: bytes, extra: bytes = b""
) -> tuple[int, bytes]:
    """One request over a raw socket (no client-side path folding); the status and reply."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = f"{request_line} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + extra + b"Connection: close\r\n\r\n" + body)
    reply = await reader.read()
    writer.close()
    return int(reply.split(b" ", 2)[1]), reply


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_cut_off_upload_leaves_nothing(client: Client, how: str, framing: str) -> None:
    job_id = await new_job(client)
    await put(client, job_id, "kept", b"old")
    db = database(client)
    _reader, writer = await asyncio.open_connection(client.host, client.port)
    sent = pseudo_random(6 * MiB)  # more than one batch of chunks reaches the database
    if framing == "length":
        head = f"Content-Length: {50 * MiB}\r\n"
        payload = sent
    else:
        head = "Transfer-Encoding: chunked\r\n"
        payload = b"".join(
            f"{MiB:x}\r\n".encode() + sent[i : i + MiB] + b"\r\n" for i in range(0, len(sent), MiB)
        )
    writer.write(
        f"PUT /jobs/{job_id}/results/cut HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + payload
    )
    await writer.drain()

    async def partial_written() -> bool:
        return await db["fs.chunks"].count_documents({}) > 1

    await wait_for(partial_written, "chunks of the partial upload in the database")
    if how == "reset":
        writer.transport.abort()
    else:
        writer.close()

    async def cleaned_up() -> bool:
        return await counts(client) == (1, 1)

    await wait_for(cleaned_up, "the partial upload deleted")
    job = await (await client.get(f"/jobs/{job_id}")).json()
    assert [r["name"] for r in job["results"]] == ["kept"]
    assert job["revision"] == 2
    assert await (await client.get(url(job_id, "kept"))).read() == b"old"


async def test_readers_see_the_old_file_until_the_new_one_is_complete(client: Client) -> None:
    job_id = await new_job(client)
    await put(client, job_id, "r", b"old version")
    db = database(client)
    new = pseudo_random(6 * MiB)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"PUT {url(job_id, 'r')} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(new)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + new[: 5 * MiB]
    )
    await writer.drain()

    async def partial_written() -> bool:
        return await db["fs.chunks"].count_documents({}) > 1

    await wait_for(partial_written, "chunks of the new version in the database")
    during = await client.get(url(job_id, "r"))
    assert await during.read() == b"old version"
    assert (await (await client.get(f"/jobs/{job_id}/results")).json())["items"][0]["size"] == 11

    writer.write(new[5 * MiB :])
    reply = await reader.read()
    writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    after = await client.get(url(job_id, "r"))
    assert await after.read() == new
    assert (await counts(client))[0] == 1


async def test_a_download_racing_a_replace_never_mixes_versions(client: Client) -> None:
    """The old bytes in full, or a response cut short (fewer bytes than Content-Length)."""
    job_id = await new_job(client)
    old = pseudo_random(40 * MiB, seed=1)
    await put(client, job_id, "r", old)
    got = bytearray()
    resp = await client.get(url(job_id, "r"))
    assert resp.headers["Content-Length"] == str(len(old))
    got += await resp.content.readexactly(MiB)
    assert (await put(client, job_id, "r", b"new")).status == 200
    try:
        async for piece in resp.content.iter_chunked(MiB):
            got += piece
    except ClientPayloadError:
        assert len(got) < len(old)
    assert bytes(got) == old[: len(got)]
    assert await (await client.get(url(job_id, "r"))).read() == b"new"


# --- deleting ---------------------------------------------------------------------------


async def test_delete_one_result(client: Client) -> None:
    job_id = await new_job(client)
    await put(client, job_id, "a", b"1")
    await put(client, job_id, "b", pseudo_random(2 * CHUNK_SIZE))
    resp = await client.delete(url(job_id, "b"))
    assert resp.status == 204
    job = await (await client.get(f"/jobs/{job_id}")).json()
    assert [r["name"] for r in job["results"]] == ["a"]
    assert job["revision"] == 4
    assert (await client.get(url(job_id, "b"))).status == 404
    assert (await client.delete(url(job_id, "b"))).status == 404
    assert await counts(client) == (1, 1)


async def test_deleting_a_job_deletes_its_files(client: Client) -> None:
    dep = await create_deployment(client)
    keep = (await create_job(client, dep["deployment_id"]))["job_id"]
    drop = (await create_job(client, dep["deployment_id"]))["job_id"]
    await put(client, keep, "k", b"keep")
    for name in ("x", "y"):
        await put(client, drop, name, pseudo_random(CHUNK_SIZE + 1))
    assert (await client.delete(f"/jobs/{drop}")).status == 204
    assert await counts(client) == (1, 1)
    assert await (await client.get(url(keep, "k"))).read() == b"keep"
    assert (await client.delete(f"/jobs/{keep}")).status == 204
    assert await counts(client) == (0, 0)


async def test_cascade_delete_of_a_deployment_deletes_the_files(client: Client) -> None:
    dep = await create_deployment(client)
    other = await create_deployment(client)
    jobs = [(await create_job(client, dep["deployment_id"]))["job_id"] for _ in range(3)]
    kept = (await create_job(client, other["deployment_id"]))["job_id"]
    for job_id in jobs:
        await put(client, job_id, "out", pseudo_random(CHUNK_SIZE * 2))
    await put(client, kept, "out", b"kept")
    resp = await client.delete(f"/deployments/{dep['deployment_id']}?cascade=true")
    assert resp.status == 204
    assert await counts(client) == (1, 1)
    assert await (await client.get(url(kept, "out"))).read() == b"kept"
