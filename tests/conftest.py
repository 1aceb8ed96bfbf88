"""One database server per test session, a fresh database per test.

Without MONGODB_URL the session starts SecantusDB's `secantusd-py` (in memory) as a
child process; with it, the same tests run against that MongoDB.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pymongo import MongoClient

from service.app import create_app
from service.database import secantusd_process
from service.settings import Settings

Client = TestClient[Any, Any]


@pytest.fixture(scope="session")
def mongodb_url() -> Iterator[str]:
    if url := os.environ.get("MONGODB_URL"):
        yield url
        return
    with secantusd_process(":memory:") as url:
        yield url


@pytest.fixture
def settings(mongodb_url: str) -> Iterator[Settings]:
    """Settings for one test: its own database, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield Settings(mongodb_url=mongodb_url, mongodb_db=name, mongodb_timeout_ms=5000)
    admin: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    with admin:
        admin.drop_database(name)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> AsyncIterator[Client]:
    app = create_app(settings)
    test_client: Client = await aiohttp_client(app)
    yield test_client


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
