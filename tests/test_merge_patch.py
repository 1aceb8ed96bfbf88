"""RFC 7396 in the database equals RFC 7396 in memory; the rules for `data`."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from service import store
from service.merge_patch import (
    MAX_DATA_BYTES,
    MAX_DATA_DEPTH,
    apply_merge_patch,
    data_errors,
    merge_operations,
)
from tests.helpers import Client, create_deployment, create_job, snapshot

# RFC 7396 appendix A, verbatim.
RFC_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC_EXAMPLES)
def test_apply_merge_patch_matches_rfc_examples(target: Any, patch: Any, expected: Any) -> None:
    assert apply_merge_patch(target, patch) == expected


keys = st.text(alphabet="abcxyz_-", min_size=1, max_size=4)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)
# Objects merge; anything else in a patch, arrays (of objects with nulls, too) included, is
# a value taken as it is.
patches = st.recursive(
    json_values,
    lambda children: st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


async def merge(collection: Any, stored: Any, patch: Any) -> None:
    """Apply `patch` to the document's `data` as the service does (store.Change.merge)."""
    sets, unsets = merge_operations(stored, patch, "data")
    update: dict[str, Any] = {"$inc": {"n": 1}}
    if sets:
        update["$set"] = sets
    if unsets:
        update["$unset"] = dict.fromkeys(unsets, "")
    await collection.update_one({"_id": 1}, update)


@pytest.fixture
async def collection(mongodb_url: str) -> Any:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_url)
    yield client.test_merge_patch.docs
    await client.drop_database("test_merge_patch")
    await client.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(target=json_values, patch=st.dictionaries(keys, patches, max_size=4))
async def test_database_merge_equals_rfc7396(collection: Any, target: Any, patch: Any) -> None:
    """The update's paths give exactly what RFC 7396 gives, for any stored value."""
    await collection.delete_many({})
    await collection.insert_one({"_id": 1, "data": target})
    await merge(collection, target, patch)
    stored = (await collection.find_one({"_id": 1}))["data"]
    assert stored == apply_merge_patch(target, patch)


def test_the_property_test_puts_arrays_into_patches() -> None:
    """`patches` does produce what RFC 7396 treats as plain values: arrays, with objects
    holding nulls inside them."""

    def holds_an_array_of_objects(patch: Any) -> bool:
        return any(
            isinstance(v, list) and any(isinstance(x, dict) and None in x.values() for x in v)
            for v in patch.values()
        )

    find(
        st.dictionaries(keys, patches), holds_an_array_of_objects, settings=settings(database=None)
    )


async def test_arrays_in_patches_are_values_not_merged(collection: Any) -> None:
    target = {"a": [1, {"b": 1}], "c": {"d": [1, 2]}, "e": "x"}
    patch = {"a": [{"b": None}], "c": {"d": [None]}, "e": [], "f": [[{"g": None}]]}
    await collection.insert_one({"_id": 1, "data": target})
    await merge(collection, target, patch)
    stored = (await collection.find_one({"_id": 1}))["data"]
    assert stored == apply_merge_patch(target, patch)
    assert stored == {"a": [{"b": None}], "c": {"d": [None]}, "e": [], "f": [[{"g": None}]]}


async def test_merge_replaces_non_object_by_object_at_depth(collection: Any) -> None:
    await collection.insert_one({"_id": 1, "data": {"a": "text", "b": [1, 2], "c": 5}})
    patch = {"a": {"x": {"y": 1}}, "b": {"k": None, "j": 2}, "c": None, "d": {"e": None}}
    await merge(collection, (await collection.find_one({"_id": 1}))["data"], patch)
    stored = (await collection.find_one({"_id": 1}))["data"]
    assert stored == {"a": {"x": {"y": 1}}, "b": {"j": 2}, "d": {}}


async def test_values_that_look_like_operators_stay_literal(collection: Any) -> None:
    await collection.insert_one({"_id": 1, "data": {}})
    patch = {"s": "$data", "l": ["$$ROOT", {"k": "$x"}], "o": {"n": "$literal"}}
    await merge(collection, (await collection.find_one({"_id": 1}))["data"], patch)
    assert (await collection.find_one({"_id": 1}))["data"] == patch


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    ("value", "loc", "fragment"),
    [
        ({"$set": 1}, ["data", "$set"], "start with '$'"),
        ({"a": [{"b.c": 1}]}, ["data", "a", 0, "b.c"], "contain '.'"),
        ({"a": {"": 1}}, ["data", "a", ""], "empty"),
        ({"a\x00b": 1}, ["data", "a\x00b"], "NUL"),
        ({"n": 2**63}, ["data", "n"], "64-bit"),
        ([-(2**63) - 1], ["data", 0], "64-bit"),
        ({"f": float("inf")}, ["data", "f"], "double"),
        (nested(MAX_DATA_DEPTH + 1), None, "deeper than 64"),
        ({"s": "x" * MAX_DATA_BYTES}, ["data"], "larger than"),
    ],
)
def test_data_rules_name_the_key_or_limit(value: Any, loc: list[Any] | None, fragment: str) -> None:
    errors = data_errors(value, ["data"])
    assert errors, "expected a rule violation"
    assert fragment in errors[0]["msg"]
    if loc is not None:
        assert errors[0]["loc"] == loc


AT_THE_LIMIT = {"s": "x" * (MAX_DATA_BYTES - len(b'{"s":""}'))}  # exactly MAX_DATA_BYTES


@pytest.mark.parametrize(
    "value",
    [
        nested(MAX_DATA_DEPTH),
        [nested(MAX_DATA_DEPTH - 1)],
        2**63 - 1,
        -(2**63),
        {"n": 2**63 - 1, "m": -(2**63)},
        [2**63 - 1, -(2**63)],
        1.7976931348623157e308,
        -5e-324,
        "$not_a_key",  # values may look like operators; only keys may not
        {"k": "$x", "l": ["$$ROOT"]},
        {"a$": 1, "a b": 2, "ü€😀": 3, "-": 4, "_id": 5},
        AT_THE_LIMIT,
        [1, "two", None, True, 3.5, {"k": []}],
        {},
        [],
        None,
    ],
)
def test_data_within_limits_is_accepted(value: Any) -> None:
    assert data_errors(value, ["data"]) == []


def test_the_size_limit_is_exact() -> None:
    assert len(orjson.dumps(AT_THE_LIMIT)) == MAX_DATA_BYTES
    (error,) = data_errors({"s": AT_THE_LIMIT["s"] + "x"}, ["data"])
    assert error == {"loc": ["data"], "msg": f"larger than {MAX_DATA_BYTES} bytes as compact JSON"}


# --- the 1 MiB limit after a merge ------------------------------------------------------

Db = AsyncDatabase[dict[str, Any]]
MERGE = {"Content-Type": "application/merge-patch+json"}


def filler(json_bytes: int, char: str) -> str:
    """A string taking `json_bytes` bytes of JSON inside its quotes: `char`s (1 or 6 bytes
    each, "\\u0001" being 6) topped up with 'x's."""
    width = len(orjson.dumps(char)) - 2
    return char * (json_bytes // width) + "x" * (json_bytes % width)


@pytest.mark.parametrize("kind", ["deployments", "jobs"])
@pytest.mark.parametrize("char", ["x", "\x01"])
async def test_a_merge_past_1_mib_is_422_and_changes_nothing(
    client: Client, db: Db, kind: str, char: str
) -> None:
    """Exactly the limit merges; one byte more is 422 with every document as it was.

    With control characters (6 bytes of JSON each) the merged value is far smaller as
    BSON than as JSON; with 'x's they are about the same: the check is on JSON in both.
    """
    first = filler(600_000, char)
    await create_deployment(client, data={"a": first})
    await create_job(client, 1, data={"a": first})
    room = MAX_DATA_BYTES - len(orjson.dumps({"a": first, "b": ""}))
    before = await snapshot(db)
    over = {"b": filler(room + 1, char)}
    merged = apply_merge_patch({"a": first}, over)
    assert len(orjson.dumps(merged)) == MAX_DATA_BYTES + 1
    for patch in [over, {"b": filler(room - 5, char), "c": 1}]:  # `,"c":1` is 6 bytes
        resp = await client.patch(f"/{kind}/1", json={"data": patch}, headers=MERGE)
        assert resp.status == 422, await resp.text()
        body = await resp.json()
        assert body["errors"] == [
            {
                "loc": ["body", "data"],
                "msg": f"the merged value would be larger than {MAX_DATA_BYTES} bytes as "
                "compact JSON; nothing changed",
            }
        ]
        assert await snapshot(db) == before
    if kind == "jobs":  # a status change in the same request does not happen either
        patch = {"data": over, "task_status": "RUNNING"}
        assert (await client.patch("/jobs/1", json=patch, headers=MERGE)).status == 422
        assert await snapshot(db) == before
    resp = await client.patch(f"/{kind}/1", json={"data": {"b": filler(room, char)}})
    assert resp.status == 200, await resp.text()
    stored = (await resp.json())["data"]
    assert len(orjson.dumps(stored)) == MAX_DATA_BYTES and stored["a"] == first
    assert (await client.patch(f"/{kind}/1", json={"data": {"c": 1}})).status == 422
    resp = await client.patch(f"/{kind}/1", json={"data": {"b": None, "c": 1}})
    assert resp.status == 200 and (await resp.json())["data"] == {"a": first, "c": 1}


def read_together(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make `n` concurrent updates each read the record once before any of them writes.

    store.update_record reads the record before it writes; holding each request there
    until all `n` have read forces the race the revision check is for.
    """
    barrier, seen, real = asyncio.Barrier(n), set(), store.get_checked

    async def get_checked(*args: Any, **kwargs: Any) -> Any:
        doc = await real(*args, **kwargs)
        if (task := asyncio.current_task()) not in seen:
            seen.add(task)
            await asyncio.wait_for(barrier.wait(), 30)
        return doc

    monkeypatch.setattr(store, "get_checked", get_checked)


async def test_concurrent_merges_into_a_large_value_all_land(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge is checked on the record it read and written only to that revision;
    concurrent merges of other keys are retried, never lost."""
    big = "x" * (MAX_DATA_BYTES // 6)
    dep = await create_deployment(client, data={"big": big})
    n = 8  # each loses at most n - 1 times, well within store.MAX_ATTEMPTS
    read_together(monkeypatch, n)
    results = await asyncio.gather(
        *[
            client.patch(f"/deployments/{dep['deployment_id']}", json={"data": {f"k{i}": i}})
            for i in range(n)
        ]
    )
    assert [r.status for r in results] == [200] * n
    final = await (await client.get(f"/deployments/{dep['deployment_id']}")).json()
    assert final["data"] == {"big": big, **{f"k{i}": i for i in range(n)}}
    assert final["revision"] == 1 + n


async def test_concurrent_merges_cannot_pass_the_limit_together(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fits alone, any two do not: one lands, the others are checked again and 422."""
    dep = await create_deployment(client, data={"base": "x" * 600_000})
    path = f"/deployments/{dep['deployment_id']}"
    read_together(monkeypatch, 4)
    results = await asyncio.gather(
        *[client.patch(path, json={"data": {f"k{i}": "y" * 300_000}}) for i in range(4)]
    )
    assert sorted(r.status for r in results) == [200, 422, 422, 422]
    final = await (await client.get(path)).json()
    assert len(orjson.dumps(final["data"])) <= MAX_DATA_BYTES
    assert final["revision"] == 2 and len(final["data"]) == 2


@pytest.mark.parametrize("depth", [20, 40, 63])
async def test_deep_data_is_created_patched_and_imported(client: Client, depth: int) -> None:
    """Every depth the contract allows works, and (conftest) no command nests past 200."""
    dep = await create_deployment(client, data=nested(depth))
    job = await create_job(client, dep["deployment_id"], data=nested(depth))
    for path, record in (("deployments", dep), ("jobs", job)):
        record_id = record[f"{path[:-1]}_id"]
        patch = {"data": {"k": nested(depth - 1), "new": nested(depth - 1)}}
        resp = await client.patch(f"/{path}/{record_id}", json=patch)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["data"] == {"k": nested(depth - 1), "new": nested(depth - 1)}
        deletion = {"data": {"k": None, "new": nested(depth - 1)}}
        resp = await client.patch(f"/{path}/{record_id}", json=deletion)
        assert (await resp.json())["data"] == {"new": nested(depth - 1)}
    line = orjson.dumps(
        {"user_id": "alice", "deployment_id": dep["deployment_id"], "data": nested(depth)}
    )
    resp = await client.post(
        "/import/jobs", data=line + b"\n", headers={"Content-Type": "application/x-ndjson"}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["inserted"] == 1
