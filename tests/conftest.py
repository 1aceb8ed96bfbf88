"""One database server per test session, a fresh database per test.

Without MONGODB_URL the session starts SecantusDB's `secantusd-py` (in memory) as a
child process; with it, the same tests run against that MongoDB.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pymongo import MongoClient
from pymongo.asynchronous.database import AsyncDatabase

from service.app import create_app
from service.database import DB
from service.embedded import secantusd_process
from service.keys import ADMIN_KEY_FILE, create_key
from service.settings import Settings
from tests.helpers import Client, Users

# Auth is on by default in the service. A test (or a service process it starts) that does
# not ask for it runs without it, so that no test writes a first-start admin key into the
# checkout's .data; tests of authentication turn it on explicitly (`auth_settings`, `users`).
os.environ["AUTH"] = "disabled"


@pytest.fixture(scope="session")
def mongodb_url() -> Iterator[str]:
    if url := os.environ.get("MONGODB_URL"):
        yield url
        return
    with secantusd_process(":memory:") as url:
        yield url


@pytest.fixture
def settings(mongodb_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: its own database, dropped afterwards; auth off (see `users`)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield Settings(
        mongodb_url=mongodb_url,
        mongodb_db=name,
        mongodb_timeout_ms=5000,
        auth="disabled",
        data_dir=tmp_path / "data",
    )
    admin: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    with admin:
        admin.drop_database(name)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> AsyncIterator[Client]:
    app = create_app(settings)
    test_client: Client = await aiohttp_client(app)
    yield test_client


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    """The same, with authentication on (the service's default)."""
    return settings.model_copy(update={"auth": "enabled"})


@pytest.fixture
async def users(aiohttp_client: Any, auth_settings: Settings) -> Users:
    server: TestServer = TestServer(create_app(auth_settings))
    anonymous: Client = await aiohttp_client(server)  # starts the app
    db = server.app[DB].db
    keys = {"admin": (auth_settings.data_dir / ADMIN_KEY_FILE).read_text().strip()}
    for user in ("alice", "bob"):
        keys[user], _ = await create_key(db, user, admin=False, name=f"{user}'s test key")
    clients: dict[str, Client] = {
        user: await aiohttp_client(server, headers={"Authorization": f"Bearer {key}"})
        for user, key in keys.items()
    }
    return Users(clients["alice"], clients["bob"], clients["admin"], anonymous, keys, db)


@pytest.fixture
def db(client: Client) -> AsyncDatabase[dict[str, Any]]:
    """The test's database, through the app's own client (the app has started: indexes)."""
    app: web.Application = client.app
    return app[DB].db
