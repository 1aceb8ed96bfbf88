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
from pymongo import MongoClient, monitoring
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


MAX_BSON_DEPTH = 200  # mongod's maxBSONDepth: it refuses any command nested deeper


def bson_depth(value: Any) -> int:
    """Nesting depth as mongod counts it: the command document is level 1."""
    depth, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        depth = max(depth, level)
        if isinstance(node, dict):
            stack.extend(
                (child, level + 1) for child in node.values() if isinstance(child, dict | list)
            )
        elif isinstance(node, list | tuple):
            stack.extend((child, level + 1) for child in node if isinstance(child, dict | list))
    return depth


class CommandDepthListener(monitoring.CommandListener):
    """Sees every command any client in this process sends; remembers the too-deep ones."""

    def __init__(self) -> None:
        self.too_deep: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        depth = bson_depth(event.command)
        if depth > MAX_BSON_DEPTH:
            self.too_deep.append(f"{event.command_name} nested {depth} levels deep")

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


COMMAND_DEPTH = CommandDepthListener()
monitoring.register(COMMAND_DEPTH)  # every client created from here on, the service's too


@pytest.fixture(autouse=True)
def no_command_deeper_than_mongod_accepts() -> Iterator[None]:
    """Fails the test in which the service sent a command that MongoDB would refuse."""
    COMMAND_DEPTH.too_deep.clear()
    yield
    assert not COMMAND_DEPTH.too_deep, f"MongoDB refuses these: {COMMAND_DEPTH.too_deep[:3]}"


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
