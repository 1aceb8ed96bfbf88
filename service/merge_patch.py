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
MAX_MERGED_BSON_BYTES = 2 * 1024 * 1024  # after a merge; see merged_size_guard
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


def merged_size_guard(field: str, merged: Any) -> dict[str, Any]:
    """A `$expr` condition: the merged value stays within the limit, or does not grow.

    The exact 1 MiB JSON limit is checked on every value a client sends; the database can
    only measure BSON, so a merge may not push the stored value past 2 MiB of BSON.
    Shrinking an (old, large) value is always allowed.
    """
    new_size = {"$bsonSize": {"v": merged}}
    return {
        "$or": [
            {"$lte": [new_size, MAX_MERGED_BSON_BYTES]},
            {"$lte": [new_size, {"$bsonSize": {"v": f"${field}"}}]},
        ]
    }


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
