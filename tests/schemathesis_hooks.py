"""Schemathesis hooks, loaded through schemathesis.toml: bodies checked as what they parse
to, NDJSON bodies both ways, and claims that do not wait long.

A media type whose body is not JSON (NDJSON, YAML, result files) has the `schema` that
client generators read (bytes, text) and an `x-parsed-schema`: what the body parses to. The
spec describes an NDJSON body there as the array of its lines' records, so imports are
fuzzed with records and every exported line is checked against the record schema.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


def _use_parsed_schemas(node: Any) -> None:
    """Every media type with an `x-parsed-schema` gets it as its `schema`, in place."""
    if isinstance(node, dict):
        if "x-parsed-schema" in node:
            node["schema"] = node.pop("x-parsed-schema")
        for child in node.values():
            _use_parsed_schemas(child)
    elif isinstance(node, list):
        for child in node:
            _use_parsed_schemas(child)


@schemathesis.hook
def before_load_schema(ctx: Any, raw_schema: dict[str, Any]) -> None:
    """Requests are made and responses checked with the parsed shapes of non-JSON bodies."""
    _use_parsed_schemas(raw_schema.get("paths", {}))


@schemathesis.serializer("application/x-ndjson")
def to_ndjson(ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@schemathesis.deserializer("application/x-ndjson")
def from_ndjson(ctx: Any, response: Any) -> list[Any]:
    return [json.loads(line) for line in response.content.splitlines() if line.strip()]


CLAIM_WAIT_S = 0.2  # the longest a fuzzed claim or GET waits
WAITING_GETS = ("/jobs/{job_id}", "/deployments/{deployment_id}")


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """A claim's or a GET's valid `wait_s` (0-60) is cut to CLAIM_WAIT_S: with no job due
    (or no change), it holds its request that long, and up to 60 s a case would outlast
    the run. The value stays valid, so every check still applies; invalid values are sent
    as generated. (/events streams end after EVENTS_MAX_S, set short for the run.)"""
    query = case.query
    if case.operation.path in WAITING_GETS and isinstance(query, dict):
        wait = query.get("wait_s")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= 60:
            query["wait_s"] = min(wait, CLAIM_WAIT_S)
    body = case.body
    if case.operation.path == "/jobs/claim" and isinstance(body, dict):
        wait = body.get("wait_s")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= 60:
            body["wait_s"] = min(wait, CLAIM_WAIT_S)
