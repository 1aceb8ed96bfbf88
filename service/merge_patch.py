"""JSON Merge Patch (RFC 7396) for `data`, and the rules every `data` value obeys.

`merge_expression` turns a patch into one aggregation expression that MongoDB evaluates
inside a single pipeline update, so two clients patching different keys never lose each
other's change and nothing is read first. `apply_merge_patch` is the in-memory reference
the tests compare it with.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from .errors import Loc, error

MAX_DATA_BYTES = 1024 * 1024  # compact UTF-8 JSON
MAX_DATA_DEPTH = 64
# Compact JSON is at most 6 times the BSON of the same value: see merged_size_guard.
JSON_PER_BSON_BYTE = 6
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2, verbatim."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def merge_expression(target: Any, patch: Any, depth: int = 0) -> Any:
    """An aggregation expression equal to `apply_merge_patch(<target>, patch)`.

    `target` is an expression (e.g. "$data"). Variables are bound with `$let` so each
    level refers to its parent once: the expression grows linearly with the patch.
    """
    if not isinstance(patch, dict):
        return {"$literal": patch}
    value, obj = f"v{depth}", f"o{depth}"
    as_object = {"$cond": [{"$eq": [{"$type": f"$${value}"}, "object"]}, f"$${value}", {}]}
    sets = {
        key: merge_expression({"$getField": {"field": key, "input": f"$${obj}"}}, v, depth + 1)
        for key, v in patch.items()
        if v is not None
    }
    removed = [key for key, v in patch.items() if v is None]
    merged: Any = {"$mergeObjects": [f"$${obj}", sets]} if sets else f"$${obj}"
    if removed:
        merged = {
            "$arrayToObject": {
                "$filter": {
                    "input": {"$objectToArray": merged},
                    "as": "kv",
                    "cond": {"$not": [{"$in": ["$$kv.k", removed]}]},
                }
            }
        }
    # $ifNull turns a missing field into null; SecantusDB 0.7 reports $type "object" for
    # a missing $getField result, MongoDB "missing": both now agree.
    bound = {"$ifNull": [target, None]}
    return {
        "$let": {"vars": {value: bound}, "in": {"$let": {"vars": {obj: as_object}, "in": merged}}}
    }


def merged_size_guard(merged: Any) -> dict[str, Any]:
    """A `$expr` condition that proves the merged value within MAX_DATA_BYTES as JSON.

    The database measures only BSON. Compact JSON takes at most 6 bytes for each byte of
    BSON: the worst is a control character in a string or key (1 byte, `\\u0001` in JSON);
    a double takes 8 bytes and at most 24 characters, `null` 4 characters against the
    element's type byte and key, and every element pays a type byte and a NUL in BSON for
    the quotes, colon and comma it has in JSON. So a merged value of at most 1/6 of the
    limit as BSON is within it. One larger may be within it too: `merged_size_problem`
    then decides exactly, on the record as read (store.apply_update).
    """
    return {"$lte": [{"$bsonSize": {"v": merged}}, MAX_DATA_BYTES // JSON_PER_BSON_BYTE]}


def merged_size_problem(stored: Any, patch: Any) -> str | None:
    """Why merging `patch` into `stored` gives a `data` over the limit, or None."""
    if len(orjson.dumps(apply_merge_patch(stored, patch))) > MAX_DATA_BYTES:
        return f"the merged value would be larger than {MAX_DATA_BYTES} bytes as compact JSON"
    return None


def data_errors(value: Any, loc: Loc) -> list[dict[str, Any]]:
    """Every way `value` breaks the rules for `data`, each with its location."""
    errors: list[dict[str, Any]] = []
    stack: list[tuple[Any, list[str | int], int]] = [(value, list(loc), 0)]
    while stack and len(errors) < 20:
        node, path, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= MAX_DATA_DEPTH:
                errors.append(error(path, f"nested deeper than {MAX_DATA_DEPTH} levels"))
                continue
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in reversed(list(items)):  # the stack pops them in order
                if isinstance(key, str) and (msg := key_problem(key)):
                    errors.append(error([*path, key], msg))
                stack.append((child, [*path, key], depth + 1))
        elif isinstance(node, int) and not isinstance(node, bool):
            if not INT64_MIN <= node <= INT64_MAX:
                errors.append(error(path, "integer outside the signed 64-bit range"))
        elif isinstance(node, float) and not math.isfinite(node):
            errors.append(error(path, "number outside the range of a double"))
    if not errors and len(orjson.dumps(value)) > MAX_DATA_BYTES:
        errors.append(error(loc, f"larger than {MAX_DATA_BYTES} bytes as compact JSON"))
    return errors


def key_problem(key: str) -> str | None:
    if not key:
        return "object keys may not be empty"
    if key.startswith("$"):
        return "object keys may not start with '$'"
    if "." in key:
        return "object keys may not contain '.'"
    if "\x00" in key:
        return "object keys may not contain NUL"
    return None
