"""Helpers the tests share: client types and the usual ways to create records."""

from __future__ import annotations

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
