"""Faults production brings, each provoked for real: the database stops or hangs, the
service is stopped under load, the embedded database dies, two instances share a database.

These tests start their own secantusd-py and service processes (never the session's), so
they can stop, freeze and kill them. Bounds on time are generous: they catch a request that
hangs, not a slow machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.app import create_app
from service.embedded import free_port, start_secantusd
from service.settings import Settings

from .helpers import Client, create_deployment, create_job

ROOT = Path(__file__).resolve().parent.parent
HANG = 60.0  # a request taking longer than this is hanging, however slow the machine
START = 90.0  # how long a process may take to start on a busy machine


# --- processes ---------------------------------------------------------------------------


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(START)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def freeze(proc: subprocess.Popen[bytes]) -> None:
    """SIGSTOP, and wait until the kernel shows the process stopped."""
    proc.send_signal(signal.SIGSTOP)
    status, deadline = Path(f"/proc/{proc.pid}/status"), time.monotonic() + START
    while "\nState:\tT" not in status.read_text():
        assert time.monotonic() < deadline, "the database did not stop"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting to be reaped does not count)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@dataclass
class Service:
    """`python -m service serve` as a child process, its JSON log lines in a file."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines


def spawn_service(
    tmp_path: Path, name: str, env: dict[str, str], new_session: bool = False
) -> Service:
    """Start `python -m service serve`, without waiting (`new_session`: its own process
    group, for a test to kill it whole)."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k != "MONGODB_URL"}
    # The default MONGODB_TIMEOUT_MS: a shorter one lets a busy machine's slow heartbeat
    # count as an outage, and the load tests below would see 503s that are not faults.
    full_env = {**base, "HOST": "127.0.0.1", "PORT": str(port)}
    full_env.update(env)
    log_path = tmp_path / f"{name}.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=ROOT,
            env=full_env,
            stdout=log_file,
            stderr=log_file,
            start_new_session=new_session,
        )
    return Service(proc, f"http://127.0.0.1:{port}", log_path)


def start_service(tmp_path: Path, name: str, **env: str) -> Service:
    return ready(spawn_service(tmp_path, name, env))


def ready(service: Service) -> Service:
    """Wait until /readyz answers 200."""
    proc, log_path = service.proc, service.log_path
    deadline = time.monotonic() + START
    while True:
        try:
            with urllib.request.urlopen(f"{service.url}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return service
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc, signal.SIGKILL)
            raise RuntimeError(f"the service did not start:\n{log_path.read_text()}")
        time.sleep(0.1)


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    """Stop the service at the end (SIGTERM: it stops its embedded database too)."""
    try:
        yield service
    finally:
        stop(service.proc)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HANG)) as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    async with http.request(method, url, json=body) as resp:
        text = await resp.text()
        return resp.status, dict(resp.headers), json.loads(text) if text else None


def assert_unavailable(status: int, headers: dict[str, str], body: Any) -> None:
    assert status == 503, body
    assert int(headers["Retry-After"]) > 0
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["type"] == "/problems/database-unavailable"


# --- the database stops, or hangs, while the service runs --------------------------------


@dataclass
class OwnDatabase:
    """A secantusd-py of this test's own, on files that survive its restarts."""

    port: int
    storage: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> None:
        self.proc = start_secantusd(self.port, str(self.storage), START)  # same port, files


@pytest.fixture
def own_database(tmp_path: Path) -> Iterator[OwnDatabase]:
    port, storage = free_port(), tmp_path / "db"
    db = OwnDatabase(port, storage, start_secantusd(port, str(storage), START))
    yield db
    if db.proc.poll() is None:
        db.proc.send_signal(signal.SIGCONT)  # in case a test left it frozen
        time.sleep(0.5)
        db.proc.terminate()
        try:
            db.proc.wait(15)
        except subprocess.TimeoutExpired:
            db.proc.kill()
            db.proc.wait()


def outage_settings(db: OwnDatabase) -> Settings:
    return Settings(
        mongodb_url=db.url,
        mongodb_db="faults",
        mongodb_timeout_ms=1000,
        mongodb_operation_timeout_ms=2000,
    )


async def requests_during_outage(client: Client, deployment_id: int) -> None:
    """Every kind of request is answered 503 with Retry-After, none hangs."""
    for method, path, body in [
        ("GET", f"/deployments/{deployment_id}", None),
        ("GET", "/jobs", None),
        ("POST", "/jobs", {"user_id": "alice", "deployment_id": deployment_id}),
        ("PATCH", f"/deployments/{deployment_id}", {"parameters": "-v"}),
        ("GET", "/readyz", None),
    ]:
        resp = await asyncio.wait_for(client.request(method, path, json=body), HANG)
        assert_unavailable(resp.status, dict(resp.headers), await resp.json())
        assert resp.headers["X-Request-ID"]
    resp = await asyncio.wait_for(client.get("/healthz"), HANG)
    assert resp.status == 200  # the process itself is fine
    metrics = await (await asyncio.wait_for(client.get("/metrics"), HANG)).text()
    assert "jobservice_database_up 0.0" in metrics


async def recovers(client: Client, deployment_id: int, job: dict[str, Any]) -> None:
    """Without a restart of the service: ready again, data intact, writes work."""
    deadline = time.monotonic() + START
    while (await asyncio.wait_for(client.get("/readyz"), HANG)).status != 200:
        assert time.monotonic() < deadline, "the service did not recover"
        await asyncio.sleep(0.2)
    resp = await client.get(f"/jobs/{job['job_id']}")
    assert resp.status == 200 and (await resp.json()) == job
    assert (await create_job(client, deployment_id))["job_id"] > job["job_id"]


async def test_database_stops_then_service_recovers_by_itself(
    aiohttp_client: Any, own_database: OwnDatabase
) -> None:
    client: Client = await aiohttp_client(create_app(outage_settings(own_database)))
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])

    stop(own_database.proc)
    await requests_during_outage(client, dep["deployment_id"])

    own_database.start()
    await recovers(client, dep["deployment_id"], job)


async def test_database_hangs_then_service_recovers_by_itself(
    aiohttp_client: Any, own_database: OwnDatabase
) -> None:
    """A frozen database (SIGSTOP: connections open, no answers) must not hang requests."""
    client: Client = await aiohttp_client(create_app(outage_settings(own_database)))
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])

    freeze(own_database.proc)
    try:
        await requests_during_outage(client, dep["deployment_id"])
    finally:
        own_database.proc.send_signal(signal.SIGCONT)
    await recovers(client, dep["deployment_id"], job)


# --- the service is stopped (SIGTERM) under load ------------------------------------------


async def test_sigterm_under_load_finishes_in_flight_and_loses_no_acknowledged_write(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data_dir = str(tmp_path / "data")
    first = start_service(tmp_path, "first", DATA_DIR=data_dir, SHUTDOWN_TIMEOUT_S="30")
    with running(first):
        _, _, dep = await call(http, "POST", f"{first.url}/deployments", {"user_id": "alice"})
        acknowledged: list[int] = []
        answers: list[int] = []

        async def client() -> None:
            """Create jobs until the service is gone; remember what it said it created."""
            body = {"user_id": "alice", "deployment_id": dep["deployment_id"]}
            while True:
                try:
                    status, _, job = await call(http, "POST", f"{first.url}/jobs", body)
                except aiohttp.ClientConnectionError:
                    return  # refused or closed: the service has stopped accepting
                answers.append(status)
                if status == 201:
                    acknowledged.append(job["job_id"])

        clients = [asyncio.create_task(client()) for _ in range(8)]
        deadline = time.monotonic() + START
        while len(acknowledged) < 40:  # under load: every client is busy
            assert time.monotonic() < deadline and not any(c.done() for c in clients)
            await asyncio.sleep(0.01)
        first.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*clients), HANG)
        assert await asyncio.to_thread(first.proc.wait, START) == 0

    # Every request the service took was finished, none cut off with an error.
    assert set(answers) == {201}, answers
    messages = [line["message"] for line in first.logs()]
    assert any(m.startswith("embedded database stopped (exit code 0)") for m in messages)
    assert messages[-1] == "stopped"

    second = start_service(tmp_path, "second", DATA_DIR=data_dir)
    with running(second):
        _, _, page = await call(http, "GET", f"{second.url}/jobs?limit=1000")
        stored = {job["job_id"] for job in page["items"]}
        assert set(acknowledged) <= stored
        # Ids keep increasing after the restart.
        body = {"user_id": "alice", "deployment_id": dep["deployment_id"]}
        status, _, job = await call(http, "POST", f"{second.url}/jobs", body)
        assert status == 201 and job["job_id"] > max(stored)


# --- the embedded database process dies ---------------------------------------------------


async def test_embedded_database_dies_service_says_so_and_starts_again_on_same_data(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data_dir = str(tmp_path / "data")
    # A short server selection time: requests to the dead database fail fast.
    first = start_service(tmp_path, "first", DATA_DIR=data_dir, MONGODB_TIMEOUT_MS="1000")
    with running(first):
        _, _, dep = await call(http, "POST", f"{first.url}/deployments", {"user_id": "alice"})
        (started,) = [line for line in first.logs() if "embedded_pid" in line]
        os.kill(started["embedded_pid"], signal.SIGKILL)

        deadline = time.monotonic() + START
        while not (errors := [line for line in first.logs() if line["level"] == "ERROR"]):
            assert time.monotonic() < deadline, "the death of the database was not logged"
            await asyncio.sleep(0.1)
        status, headers, body = await call(http, "GET", f"{first.url}/readyz")
        assert_unavailable(status, headers, body)
        assert "embedded database exited" in body["detail"]
        status, headers, body = await call(
            http, "GET", f"{first.url}/deployments/{dep['deployment_id']}"
        )
        assert_unavailable(status, headers, body)
        assert await asyncio.to_thread(stop, first.proc) == 0

    (error,) = errors  # said once, clearly
    assert "embedded database" in error["message"] and "exited" in error["message"]
    assert error["exit_code"] == -signal.SIGKILL
    assert sum(line["level"] == "ERROR" for line in first.logs()) == 1

    second = start_service(tmp_path, "second", DATA_DIR=data_dir)  # `make run` again
    with running(second):
        status, _, again = await call(
            http, "GET", f"{second.url}/deployments/{dep['deployment_id']}"
        )
        assert status == 200 and again == dep


async def test_service_killed_its_embedded_database_follows_and_it_starts_again(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """SIGKILL (OOM killer) gives the service no chance to stop its child: the child
    stops itself, releasing DATA_DIR for the next start."""
    data_dir = str(tmp_path / "data")
    first = start_service(tmp_path, "first", DATA_DIR=data_dir)
    with running(first):
        _, _, dep = await call(http, "POST", f"{first.url}/deployments", {"user_id": "alice"})
        (started,) = [line for line in first.logs() if "embedded_pid" in line]
        stop(first.proc, signal.SIGKILL)

    deadline = time.monotonic() + START
    while alive(started["embedded_pid"]):
        assert time.monotonic() < deadline, "the embedded database outlived the service"
        await asyncio.sleep(0.1)

    second = start_service(tmp_path, "second", DATA_DIR=data_dir)
    with running(second):
        status, _, again = await call(
            http, "GET", f"{second.url}/deployments/{dep['deployment_id']}"
        )
        assert status == 200 and again == dep


async def test_kill_9_under_load_then_the_first_restart_comes_up_with_every_write(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """`kill -9` of the service's process group, restarted at once (a supervisor): the old
    database, stopping on its parent-death signal, still holds DATA_DIR for a few seconds."""
    data_dir = str(tmp_path / "data")
    env = {"DATA_DIR": data_dir, "AUTH": "disabled"}
    first = ready(spawn_service(tmp_path, "first", env, new_session=True))
    with running(first):
        (started,) = [line for line in first.logs() if "embedded_pid" in line]
        acknowledged: list[int] = []

        async def client() -> None:
            """Create deployments until the service is gone; remember each 201."""
            while True:
                try:
                    status, _, dep = await call(
                        http, "POST", f"{first.url}/deployments", {"user_id": "alice"}
                    )
                except aiohttp.ClientConnectionError:
                    return  # killed
                assert status == 201, dep
                acknowledged.append(dep["deployment_id"])

        clients = [asyncio.create_task(client()) for _ in range(8)]
        deadline = time.monotonic() + START
        while len(acknowledged) < 400:  # under load: every client is busy
            assert time.monotonic() < deadline and not any(c.done() for c in clients)
            await asyncio.sleep(0.01)
        os.killpg(first.proc.pid, signal.SIGKILL)  # its own group: the service's process
        # Still shutting down: without this the restart below would not test the wait.
        assert alive(started["embedded_pid"])
        second = start_service(tmp_path, "second", **env)
        await asyncio.wait_for(asyncio.gather(*clients), HANG)

    with running(second):
        waited = [line for line in second.logs() if "previous_embedded_pid" in line]
        assert [line["previous_embedded_pid"] for line in waited] == [started["embedded_pid"]]
        missing: list[int] = []

        async def check(ids: list[int]) -> None:
            for dep_id in ids:
                status, _, _ = await call(http, "GET", f"{second.url}/deployments/{dep_id}")
                if status != 200:
                    missing.append(dep_id)

        await asyncio.wait_for(asyncio.gather(*(check(acknowledged[i::8]) for i in range(8))), HANG)
        assert missing == [], f"{len(missing)} of {len(acknowledged)} acknowledged are missing"


async def test_a_second_instance_on_the_same_data_dir_is_refused_fast_naming_the_first(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data_dir = str(tmp_path / "data")
    first = start_service(tmp_path, "first", DATA_DIR=data_dir)
    with running(first):
        # A long start timeout: refused at once, not after waiting for the first to go.
        env = {"DATA_DIR": data_dir, "EMBEDDED_START_TIMEOUT_S": "600"}
        other = spawn_service(tmp_path, "other", env)
        with running(other):
            assert await asyncio.to_thread(other.proc.wait, START) == 1
        (error,) = [line for line in other.logs() if line["level"] == "ERROR"]
        assert error["message"].startswith("cannot start: ")
        assert f"pid {first.proc.pid}" in error["message"], error["message"]
        status, _, _ = await call(http, "GET", f"{first.url}/readyz")
        assert status == 200  # the first is untouched


# --- two service instances on one database ------------------------------------------------


async def test_two_service_processes_create_jobs_concurrently(
    tmp_path: Path, http: aiohttp.ClientSession, mongodb_url: str, settings: Settings
) -> None:
    env = {"MONGODB_URL": mongodb_url, "MONGODB_DB": settings.mongodb_db}
    a = start_service(tmp_path, "a", **env)
    with running(a):
        b = start_service(tmp_path, "b", **env)
        with running(b):
            _, _, dep = await call(http, "POST", f"{a.url}/deployments", {"user_id": "alice"})
            body = {"user_id": "alice", "deployment_id": dep["deployment_id"]}

            async def client(url: str) -> list[int]:
                """Sequential creates from one client: each id above the one before."""
                ids = []
                for _ in range(10):
                    status, _, job = await call(http, "POST", f"{url}/jobs", body)
                    assert status == 201, job
                    ids.append(job["job_id"])
                assert ids == sorted(ids)
                return ids

            made = await asyncio.gather(*(client(url) for url in [a.url, b.url] * 4))
            _, _, page = await call(http, "GET", f"{b.url}/jobs?limit=1000")

    ids = [job_id for ids in made for job_id in ids]
    assert sorted(ids) == list(range(1, len(ids) + 1))  # unique, no gaps
    assert [job["job_id"] for job in page["items"]] == sorted(ids)  # nothing lost


async def test_a_waiting_claim_whose_client_left_takes_no_job(
    tmp_path: Path, http: aiohttp.ClientSession, mongodb_url: str, settings: Settings
) -> None:
    """A real server runs a handler on after its client disconnects (aiohttp's default;
    the test server cancels it instead): the claim must notice, not take the next job."""
    env = {"MONGODB_URL": mongodb_url, "MONGODB_DB": settings.mongodb_db}
    with running(start_service(tmp_path, "claims", **env)) as service:
        _, _, dep = await call(http, "POST", f"{service.url}/deployments", {"user_id": "alice"})
        impatient = aiohttp.ClientTimeout(total=0.5)
        with contextlib.suppress(TimeoutError):
            body = {"executor": "gone", "wait_s": 10}
            await http.post(f"{service.url}/jobs/claim", json=body, timeout=impatient)
        job_body = {"user_id": "alice", "deployment_id": dep["deployment_id"]}
        _, _, job = await call(http, "POST", f"{service.url}/jobs", job_body)
        await asyncio.sleep(2.5)  # the abandoned claim woke up and looked meanwhile
        _, _, got = await call(http, "GET", f"{service.url}/jobs/{job['job_id']}")
        assert got["task_status"] == "PENDING", got
