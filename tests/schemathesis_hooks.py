"""Schemathesis hooks, loaded through schemathesis.toml: NDJSON bodies both ways.

The spec describes an NDJSON body as the array of its lines' records, so imports are
fuzzed with records and every exported line is checked against the record schema.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def to_ndjson(ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@schemathesis.deserializer("application/x-ndjson")
def from_ndjson(ctx: Any, response: Any) -> list[Any]:
    return [json.loads(line) for line in response.content.splitlines() if line.strip()]
