"""Without MONGODB_URL the service runs its own database, and its data survives restarts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from service.settings import Settings
from tests.helpers import Client, create_deployment


async def test_embedded_database_persists_across_restarts(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = Settings(mongodb_url=None, data_dir=tmp_path / "data", auth="disabled")
    first: Client = await aiohttp_client(create_app(settings))
    dep = await create_deployment(first, deployment_name="kept")
    await first.close()
    assert "embedded database" in caplog.text
    assert (tmp_path / "data" / "db").is_dir()

    second: Client = await aiohttp_client(create_app(settings))
    resp = await second.get(f"/deployments/{dep['deployment_id']}")
    assert await resp.json() == dep
    assert (await create_deployment(second))["deployment_id"] == dep["deployment_id"] + 1
    await second.close()
