"""RFC 7396 in the database equals RFC 7396 in memory; the rules for `data`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient

from service.merge_patch import (
    MAX_DATA_BYTES,
    MAX_DATA_DEPTH,
    apply_merge_patch,
    data_errors,
    merge_operations,
)
from tests.helpers import Client, create_deployment, create_job

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
patches = st.recursive(
    scalars,
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
@given(target=json_values, patch=patches.filter(lambda p: isinstance(p, dict)))
async def test_database_merge_equals_rfc7396(collection: Any, target: Any, patch: Any) -> None:
    """The update's paths give exactly what RFC 7396 gives, for any stored value."""
    await collection.delete_many({})
    await collection.insert_one({"_id": 1, "data": target})
    await merge(collection, target, patch)
    stored = (await collection.find_one({"_id": 1}))["data"]
    assert stored == apply_merge_patch(target, patch)


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


def test_data_within_limits_is_accepted() -> None:
    assert data_errors(nested(MAX_DATA_DEPTH), ["data"]) == []
    assert data_errors({"n": 2**63 - 1, "m": -(2**63), "$not_a_key": None}["n"], ["data"]) == []
    assert data_errors({"s": "x" * (MAX_DATA_BYTES - 10)}, ["data"]) == []
    assert data_errors([1, "two", None, True, 3.5, {"k": []}], ["data"]) == []


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
