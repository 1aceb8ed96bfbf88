"""Configuration: one settings class; a bad value stops the start with one clear line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pymongo.read_preferences import Primary, SecondaryPreferred

from service.app import create_app
from service.database import analytics_db, make_client
from service.embedded import free_port
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "MONGODB_URL"}
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("LOG_LEVEL", "loud"),
        ("MONGODB_TIMEOUT_MS", "5"),
        ("MONGODB_POOL_SIZE", "0"),
        ("MONGODB_ANALYTICS_READ_PREFERENCE", "anywhere"),
        ("SHUTDOWN_TIMEOUT_S", "-1"),
        ("MONGODB_DB", ""),
    ],
)
def test_invalid_setting_stops_the_start_with_one_line(name: str, value: str) -> None:
    result = serve({name: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"invalid settings: {name}: ")
    assert "Traceback" not in result.stderr


def test_a_secret_value_is_never_echoed() -> None:
    """The message names the variable, not its value (a URL may carry a password)."""
    result = serve({"MONGODB_POOL_SIZE": "s3cret-but-wrong"})
    assert result.returncode == 2
    assert "s3cret" not in result.stderr


def test_port_taken_stops_the_start_with_one_line(mongodb_url: str, settings: Settings) -> None:
    env = {"MONGODB_URL": mongodb_url, "MONGODB_DB": settings.mongodb_db}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = serve(env, "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if '"level":"ERROR"' in line]
    assert len(errors) == 1 and "cannot start" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_stops_the_start_with_one_line() -> None:
    closed = free_port()  # nothing listens there
    env = {"MONGODB_URL": f"mongodb://u:pw@127.0.0.1:{closed}/", "MONGODB_TIMEOUT_MS": "500"}
    result = serve(env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if '"level":"ERROR"' in line]
    assert len(errors) == 1 and "cannot start: the database" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "pw" not in result.stderr


def test_log_level_is_case_insensitive() -> None:
    assert Settings(log_level="debug").log_level == "DEBUG"
    assert Settings(log_level=" Warning ").log_level == "WARNING"


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings(mongodb_url="mongodb://u:pw@h/", cursor_secret="k3y")
    assert "pw@" not in repr(settings) and "k3y" not in repr(settings)


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        assert f"`{name.upper()}`" in readme, f"{name.upper()} is not documented"
        assert field.description, f"{name} has no description"


async def test_analytics_reads_use_their_read_preference(settings: Settings) -> None:
    analytics = settings.model_copy(
        update={"mongodb_analytics_read_preference": "secondaryPreferred"}
    )
    client = make_client(settings.mongodb_url or "", analytics)
    try:
        db = client[settings.mongodb_db]
        assert analytics_db(db, analytics).read_preference == SecondaryPreferred()
        assert db.read_preference == Primary()  # everything else reads its own writes
        assert await analytics_db(db, analytics).jobs.count_documents({}) == 0  # it works
    finally:
        await client.close()


@pytest.mark.parametrize("path", ["/stats/jobs", "/stats/deployments", "/export/jobs"])
async def test_no_server_for_the_analytics_read_preference_is_a_quick_503(
    aiohttp_client: Any, settings: Settings, path: str
) -> None:
    """`secondary` on a set without one: 503 within MONGODB_TIMEOUT_MS, not after the
    10-minute analytics time limit (which the driver would also spend selecting a server)."""
    if os.environ.get("MONGODB_URL"):
        # A MongoDB may have a secondary (then `secondary` is served), or name its member by
        # an address the client cannot resolve once it discovers the set (docker-compose's
        # `mongo:27017` from the host): only the embedded database is sure to be neither.
        pytest.skip("needs the embedded database: a one-member set, reachable when discovered")
    # Without directConnection the driver discovers the set and honours read preferences.
    discovering = (settings.mongodb_url or "").replace(
        "directConnection=true", "directConnection=false"
    )
    slow = settings.model_copy(
        update={
            "mongodb_url": discovering,
            "mongodb_timeout_ms": 1000,
            "mongodb_analytics_read_preference": "secondary",
        }
    )
    client = await aiohttp_client(create_app(slow))
    started = time.monotonic()
    resp = await client.get(path)
    assert resp.status == 503, await resp.text()
    assert "Retry-After" in resp.headers
    assert time.monotonic() - started < 10
    assert (await client.get("/jobs")).status == 200  # the primary still serves the rest
