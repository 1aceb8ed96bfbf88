"""Helpers the tests share: client types and the usual ways to create records."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient
from bson import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo.asynchronous.database import AsyncDatabase

Client = TestClient[Any, Any]
STORED = ("deployments", "jobs", "counters")  # every collection a create or patch may touch


def winning_stages(explain: Any) -> set[str]:
    """The stage names of the winning plans anywhere in an `explain` answer.

    Find and aggregate answers nest plans differently (`stages[0].$cursor`, MongoDB's SBE
    `queryPlan`), so every `winningPlan` is walked; `rejectedPlans` are left out.
    """
    found: set[str] = set()

    def walk(node: Any, winning: bool) -> None:
        if isinstance(node, dict):
            if winning and isinstance(node.get("stage"), str):
                found.add(node["stage"])
            for key, child in node.items():
                if key != "rejectedPlans":
                    walk(child, winning or key == "winningPlan")
        elif isinstance(node, list):
            for child in node:
                walk(child, winning)

    walk(explain, False)
    return found


@dataclass
class Users:
    """One service with auth on, and a client per caller (each sends its own key)."""

    alice: Client
    bob: Client
    admin: Client  # the key the service created at first start
    anonymous: Client  # sends no key
    keys: dict[str, str]
    db: AsyncDatabase[dict[str, Any]]


async def create_deployment(client: Client, **fields: Any) -> dict[str, Any]:
    body = {"user_id": "alice", **fields}
    resp = await client.post("/deployments", json=body)
    assert resp.status == 201, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


async def create_job(client: Client, deployment_id: int, **fields: Any) -> dict[str, Any]:
    body = {"user_id": "alice", "deployment_id": deployment_id, **fields}
    resp = await client.post("/jobs", json=body)
    assert resp.status == 201, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


async def snapshot(db: AsyncDatabase[dict[str, Any]], *collections: str) -> dict[str, list[bytes]]:
    """Every document of `collections` (default STORED) as its raw BSON, in `_id` order.

    Two equal snapshots hold byte-identical documents: same fields, order, types, values.
    """
    raw = db.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
    return {
        name: [bytes(doc.raw) async for doc in raw[name].find().sort("_id", 1)]
        for name in collections or STORED
    }


@dataclass
class Event:
    """One server-sent event: its `event:` name, `id:` and `data:` (parsed as JSON)."""

    name: str
    id: str | None
    data: Any


class EventStream:
    """Reads the server-sent events of a response (`GET /events`), one at a time."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.comments: list[str] = []

    @classmethod
    async def open(cls, client: Client, path: str = "/events", **kwargs: Any) -> EventStream:
        """Open a stream and wait for its first comment: from then on no change is missed."""
        resp = await client.get(path, **kwargs)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "text/event-stream"
        stream = cls(resp)
        await stream.comment()
        return stream

    async def _block(self, within: float) -> list[str]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.resp.content.readline(), within)
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\n")
            if not line:
                if lines:
                    return lines
                continue
            lines.append(line)

    async def comment(self, within: float = 10) -> str:
        lines = await self._block(within)
        assert lines[0].startswith(":"), lines
        return lines[0]

    async def next(self, within: float = 10) -> Event:
        """The next event (comments are kept in `comments`)."""
        while True:
            lines = await self._block(within)
            if lines[0].startswith(":"):
                self.comments.extend(lines)
                continue
            fields = dict(line.split(": ", 1) for line in lines)
            data = json.loads(fields["data"])
            return Event(fields.get("event", "message"), fields.get("id"), data)

    async def take(self, n: int, within: float = 10) -> list[Event]:
        return [await self.next(within) for _ in range(n)]

    def close(self) -> None:
        self.resp.close()
