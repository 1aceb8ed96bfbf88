"""JSON Merge Patch (RFC 7396) for `data`, and the rules every `data` value obeys.

`apply_merge_patch` is the RFC; `merge_operations` turns a patch into the `$set`/`$unset`
paths of one update of the stored value it was computed from (store.update_record makes
that update conditional on the record's revision, so no concurrent change is lost).
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from .errors import Loc, error

Doc = dict[str, Any]

MAX_DATA_BYTES = 1024 * 1024  # compact UTF-8 JSON
MAX_DATA_DEPTH = 64
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


def merge_operations(stored: Any, patch: Any, path: str) -> tuple[Doc, list[str]]:
    """`$set` and `$unset` paths that turn `stored` (the value at `path`, exactly as stored)
    into `apply_merge_patch(stored, patch)`.

    Dotted paths reach only as deep as the stored value has objects, so the update nests
    no deeper than the values it sets (mongod refuses commands past 200 levels); where the
    stored value is not an object, the merged value replaces it whole.
    """
    if not isinstance(patch, dict) or not isinstance(stored, dict):
        return {path: apply_merge_patch(stored, patch)}, []
    sets: Doc = {}
    unsets: list[str] = []
    for key, value in patch.items():
        if value is None:
            if key in stored:
                unsets.append(f"{path}.{key}")
            continue
        more_sets, more_unsets = merge_operations(stored.get(key), value, f"{path}.{key}")
        sets.update(more_sets)
        unsets.extend(more_unsets)
    return sets, unsets


def merged_data_errors(merged: Any, loc: Loc) -> list[dict[str, Any]]:
    """The rules of `data` for a merged value: only its size can break them (its keys came
    from values already checked, its depth is that of the stored value or the patch)."""
    if len(orjson.dumps(merged)) <= MAX_DATA_BYTES:
        return []
    return [
        error(
            loc,
            f"the merged value would be larger than {MAX_DATA_BYTES} bytes as "
            "compact JSON; nothing changed",
        )
    ]


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
