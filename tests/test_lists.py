"""Lists: filters, sorts, keyset cursors, Link headers, totals."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from service.database import Doc
from service.store import fetch_page
from tests.helpers import Client, create_deployment, create_job, winning_stages
from tests.list_shapes import Shape, list_shapes, shape_data


async def all_pages(client: Client, path: str) -> tuple[list[dict[str, Any]], int]:
    """Follow `Link: rel=next` to the end; return the items and the number of pages."""
    items: list[dict[str, Any]] = []
    pages = 0
    url: str | None = path
    while url:
        resp = await client.get(url)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        items += body["items"]
        pages += 1
        link = resp.headers.get("Link")
        assert (link is None) == (body["next_cursor"] is None)
        url = link[1 : link.index(">")] if link else None
        if url:
            assert parse_qs(urlsplit(url).query)["cursor"] == [body["next_cursor"]]
    return items, pages


@pytest.fixture
async def jobs(client: Client) -> list[dict[str, Any]]:
    """Twelve jobs over two deployments and two users, with started_at out of id order."""
    deps = [await create_deployment(client), await create_deployment(client, user_id="bob")]
    made = []
    for i in range(12):
        job = await create_job(
            client,
            deps[i % 2]["deployment_id"],
            user_id=["alice", "bob"][i % 2],
            started_at=f"2026-01-01T00:{(i * 7) % 12:02d}:00Z",
        )
        made.append(job)
    for job in made[:4]:
        await client.patch(f"/jobs/{job['job_id']}", json={"task_status": "RUNNING"})
    for job in made[:2]:
        await client.patch(f"/jobs/{job['job_id']}", json={"task_status": "FINISHED"})
    return made


@pytest.mark.parametrize("sort", ["id", "-id", "started_at", "-started_at"])
async def test_pages_cover_everything_once_in_order(
    client: Client, jobs: list[dict[str, Any]], sort: str
) -> None:
    items, pages = await all_pages(client, f"/jobs?limit=5&sort={sort}")
    assert pages == 3
    ids = [j["job_id"] for j in items]
    assert sorted(ids) == sorted(j["job_id"] for j in jobs)
    key = "job_id" if sort.endswith("id") else "started_at"
    expected = sorted(items, key=lambda j: (j[key], j["job_id"]), reverse=sort.startswith("-"))
    assert ids == [j["job_id"] for j in expected]


TIED = [f"2026-01-01T00:0{m}:00.000Z" for m in range(3)]  # 30 jobs, 10 on each instant


@pytest.fixture
async def tied(client: Client) -> list[dict[str, Any]]:
    """Thirty jobs over two users' deployments, only three distinct started_at values, in
    an order unrelated to their ids; some RUNNING, some FINISHED, some ERROR."""
    deps = [await create_deployment(client), await create_deployment(client, user_id="bob")]
    for i in range(30):
        owner = i % 2
        await create_job(
            client,
            deps[owner]["deployment_id"],
            user_id=["alice", "bob"][owner],
            started_at=TIED[(i * 7 // 3) % 3],
        )
    for job_id, steps in (
        [(n, ["RUNNING"]) for n in range(1, 11)]
        + [(n, ["FINISHED"]) for n in range(1, 5)]
        + [(n, ["ERROR"]) for n in range(11, 14)]
    ):
        for step in steps:
            resp = await client.patch(f"/jobs/{job_id}", json={"task_status": step})
            assert resp.status == 200, await resp.text()
    made: list[dict[str, Any]] = (await (await client.get("/jobs?limit=1000")).json())["items"]
    assert sorted(Counter(j["started_at"] for j in made).values()) == [10, 10, 10]
    return made


TIE_FILTERS: list[tuple[str, Any]] = [
    ("", lambda j: True),
    ("user_id=bob", lambda j: j["user_id"] == "bob"),
    ("deployment_id=1", lambda j: j["deployment_id"] == 1),
    (
        "task_status=RUNNING&task_status=FINISHED",
        lambda j: j["task_status"] in ("RUNNING", "FINISHED"),
    ),
    (
        "task_status=PENDING&user_id=alice",
        lambda j: j["task_status"] == "PENDING" and j["user_id"] == "alice",
    ),
    (f"started_after={TIED[1]}", lambda j: j["started_at"] >= TIED[1]),
    (f"started_before={TIED[2]}", lambda j: j["started_at"] < TIED[2]),
    ("finished_after=2000-01-01T00:00:00Z", lambda j: j["finished_at"] is not None),
    (
        "finished_before=2999-01-01T00:00:00Z&user_id=alice",
        lambda j: j["finished_at"] is not None and j["user_id"] == "alice",
    ),
]


@pytest.mark.parametrize("sort", ["started_at", "-started_at"])
@pytest.mark.parametrize(("query", "keep"), TIE_FILTERS, ids=[q or "all" for q, _ in TIE_FILTERS])
async def test_pages_split_ties_of_the_sort_key_exactly(
    client: Client, tied: list[dict[str, Any]], sort: str, query: str, keep: Any
) -> None:
    """Equal started_at across page boundaries: the `_id` tie-break decides, both ways."""
    descending = sort.startswith("-")
    wanted = sorted(
        (j for j in tied if keep(j)),
        key=lambda j: (j["started_at"], j["job_id"]),
        reverse=descending,
    )
    assert len({j["started_at"] for j in wanted}) < len(wanted)  # ties to split
    expected = [j["job_id"] for j in wanted]
    paths = [f"/jobs?{query}&sort={sort}"]
    if "deployment_id" in query:  # the deployment's own list takes the other filters
        paths.append(f"/deployments/1/jobs?{query.replace('deployment_id=1', '')}&sort={sort}")
    for path in paths:
        split = 0  # page boundaries inside a run of equal started_at
        for limit in (1, 3, 4):
            pages: list[list[dict[str, Any]]] = []
            url: str | None = f"{path}&limit={limit}"
            while url:
                resp = await client.get(url)
                assert resp.status == 200, await resp.text()
                body = await resp.json()
                pages.append(body["items"])
                link = resp.headers.get("Link")
                url = link[1 : link.index(">")] if link else None
            assert [j["job_id"] for page in pages for j in page] == expected, (path, limit)
            split += sum(
                a[-1]["started_at"] == b[0]["started_at"] for a, b in itertools.pairwise(pages) if b
            )
        assert split, path  # the case is not vacuous


async def test_filters(client: Client, jobs: list[dict[str, Any]]) -> None:
    async def ids(query: str) -> list[int]:
        resp = await client.get(f"/jobs?{query}")
        assert resp.status == 200, await resp.text()
        return [j["job_id"] for j in (await resp.json())["items"]]

    assert await ids("user_id=bob") == [j["job_id"] for j in jobs if j["user_id"] == "bob"]
    assert await ids("deployment_id=1") == [j["job_id"] for j in jobs[::2]]
    assert await ids("task_status=RUNNING") == [jobs[2]["job_id"], jobs[3]["job_id"]]
    assert await ids("task_status=RUNNING&task_status=FINISHED") == [j["job_id"] for j in jobs[:4]]
    # Half-open windows: *_after includes the instant, *_before excludes it.
    window = "started_after=2026-01-01T00:03:00Z&started_before=2026-01-01T00:05:00Z"
    expected = [j["job_id"] for j in jobs if "00:03:00" <= j["started_at"][11:19] < "00:05:00"]
    assert sorted(await ids(window)) == sorted(expected) and len(expected) == 2
    assert await ids("finished_after=2000-01-01T00:00:00Z") == [j["job_id"] for j in jobs[:2]]
    assert await ids("finished_before=2000-01-01T00:00:00Z") == []
    assert await ids("user_id=nobody") == []


async def test_count_gives_the_whole_filtered_total(
    client: Client, jobs: list[dict[str, Any]]
) -> None:
    body = await (await client.get("/jobs?limit=2&count=true&user_id=alice")).json()
    assert body["total"] == 6 and len(body["items"]) == 2
    assert "total" not in await (await client.get("/jobs?limit=2")).json()


async def test_deployment_filters(client: Client) -> None:
    for user in ("alice", "bob", "alice"):
        await create_deployment(client, user_id=user)
    body = await (await client.get("/deployments?user_id=alice&sort=-id")).json()
    assert [d["deployment_id"] for d in body["items"]] == [3, 1]
    created = body["items"][-1]["created"]
    after = await (await client.get(f"/deployments?created_after={created}")).json()
    assert after["items"][0]["deployment_id"] == 1
    before = await (await client.get(f"/deployments?created_before={created}")).json()
    assert before["items"] == []


async def test_cursor_is_bound_to_its_filters_and_sort(
    client: Client, jobs: list[dict[str, Any]]
) -> None:
    body = await (await client.get("/jobs?limit=2&user_id=alice")).json()
    cursor = body["next_cursor"]
    ok = await client.get(f"/jobs?limit=3&user_id=alice&cursor={cursor}")
    assert ok.status == 200  # the page size may change between pages
    for other in ("user_id=bob", "", "user_id=alice&sort=-id", "user_id=alice&task_status=ERROR"):
        resp = await client.get(f"/jobs?{other}&cursor={cursor}")
        assert resp.status == 400, other
        assert (await resp.json())["errors"][0]["loc"] == ["query", "cursor"]
    resp = await client.get(f"/deployments/1/jobs?cursor={cursor}")
    assert resp.status == 400


@pytest.mark.parametrize(
    "cursor",
    ["", "x", "abc.def", "eyJmIjoxfQ.AAAA", "!!!.???", "a.b.c", "%FF", "eyJ4Ijp9.x", "e30.%C3%84"],
)
async def test_tampered_cursors_are_400(
    client: Client, jobs: list[dict[str, Any]], cursor: str
) -> None:
    resp = await client.get(f"/jobs?cursor={cursor}")
    assert resp.status == 400


async def test_flipping_any_cursor_character_is_400(
    client: Client, jobs: list[dict[str, Any]]
) -> None:
    cursor = (await (await client.get("/jobs?limit=2")).json())["next_cursor"]
    for i in range(0, len(cursor), 3):
        flipped = cursor[:i] + ("A" if cursor[i] != "A" else "B") + cursor[i + 1 :]
        assert (await client.get(f"/jobs?limit=2&cursor={flipped}")).status == 400


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=ten",
        "limit=1&limit=2",
        "sort=name",
        "sort=created",
        "count=yes",
        "colour=red",
        "user_id=",
        "deployment_id=0",
        "deployment_id=x",
        "deployment_id=99999999999999999999",
        "task_status=DONE",
        "started_after=yesterday",
        "started_after=2026-01-01",
        "started_after=2026-01-01T00:00:00",
        "started_before=2026-13-01T00:00:00Z",
        "finished_after=1700000000",
        "user_id[$ne]=x",
    ],
)
async def test_bad_query_parameters_are_400(client: Client, query: str) -> None:
    resp = await client.get(f"/jobs?{query}")
    assert resp.status == 400, query
    problem = await resp.json()
    assert problem["type"] == "/problems/bad-request"
    assert problem["errors"][0]["loc"][0] == "query"


# SecantusDB's explain reports an index only for equalities plus at most one operator field
# (`$gte`, `$in`, ...) that one index leads with; for anything else it reports COLLSCAN,
# though its executor then reads one indexed clause and filters the rest (bench/pages.py
# times those pages). MongoDB plans those with an index and a residual filter, which the
# run against MongoDB checks. They are: two operator fields (a window or several statuses,
# plus the keyset bound after a cursor), and these shapes under the owner scope, which have
# no index of their own because each index costs every write: a deployment's jobs (they
# are its owner's, so the deployment's indexes serve them), finished_after, and the
# deployments' created window.
RESIDUAL = {
    ("jobs", "deployment_id"),
    ("jobs", "finished_after"),
    ("deployments", "created window"),
}


def explained_by_secantusdb(shape: Shape, flt: dict[str, Any]) -> bool:
    operators = sum(isinstance(v, dict) for v in flt.values())
    return operators <= 1 and not (shape.owner and (shape.collection, shape.filter) in RESIDUAL)


async def test_every_list_shape_reads_an_index(db: AsyncDatabase[Doc]) -> None:
    """`explain` of exactly what each list page sends, first page and after a cursor.

    On MongoDB each read is an index scan in the sort's order: no COLLSCAN and no blocking
    SORT. SecantusDB (known by `secantusVersion` in `buildInfo`) takes the order from an
    index only when there is no filter, so its explain shows a SORT for nearly every list:
    there only COLLSCAN is checked, for the reads its explain can plan (RESIDUAL above).
    """
    # Enough that on MongoDB a plan in sort order fills a page (of 51) long before one that
    # sorts its matches could: 250 jobs a deployment, 1,000 a user, 200 deployments a user.
    deployments, jobs = shape_data(jobs=5000, deployments=1000)
    await db.deployments.insert_many(deployments)
    await db.jobs.insert_many(jobs)
    embedded = "secantusVersion" in await db.client.admin.command("buildInfo")
    key, bad, checked = b"k" * 32, [], 0
    for shape in list_shapes():
        first = shape.query(key)
        page = await fetch_page(db[shape.collection], first, key)
        assert page.next_cursor, shape  # enough data for a second page
        for query in (first, shape.query(key, page.next_cursor)):
            for flt, order in query.reads():
                if embedded and not explained_by_secantusdb(shape, flt):
                    continue
                find = {"find": shape.collection, "filter": flt, "sort": dict(order)}
                plan = await db.command(
                    {"explain": {**find, "limit": query.limit + 1}, "verbosity": "queryPlanner"}
                )
                stages = winning_stages(plan)
                checked += 1
                if (
                    "COLLSCAN" in stages
                    or "IXSCAN" not in stages
                    or (not embedded and "SORT" in stages)
                ):
                    bad.append(f"{shape}: {flt} sort {order}: {sorted(stages)}")
    assert not bad, f"{len(bad)} of {checked} reads:\n" + "\n".join(bad)
