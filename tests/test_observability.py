"""Request ids, JSON logs with an access line per request, and /metrics."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase

from service.app import create_app
from service.database import Doc
from service.logs import JsonFormatter
from service.metrics import exposition
from service.models import job_document
from service.ops import count_jobs
from service.settings import Settings

from .helpers import Client, create_deployment, create_job, winning_stages

LogReader = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def read_logs() -> Iterator[LogReader]:
    """Read back, parsed, the JSON lines the service has logged so far in this test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("service")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


# --- request ids ---------------------------------------------------------------------------


async def test_request_id_is_returned_when_given(client: Client) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "trace-42/a b"})
    assert resp.headers["X-Request-ID"] == "trace-42/a b"


@pytest.mark.parametrize("given", [None, "", "x" * 201, "tab\there", "caf\u00e9"])
async def test_request_id_is_generated_when_missing_or_invalid(
    client: Client, given: str | None
) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    resp = await client.get("/healthz", headers=headers)
    generated = resp.headers["X-Request-ID"]
    assert generated != given and len(generated) == 32 and int(generated, 16) >= 0


async def test_request_id_on_errors_and_unknown_paths(client: Client) -> None:
    for method, path, body in [
        ("GET", "/no/such/path", None),
        ("GET", "/jobs/12345", None),
        ("DELETE", "/healthz", None),
        ("POST", "/deployments", {"user_id": ""}),
    ]:
        resp = await client.request(method, path, json=body, headers={"X-Request-ID": "r-1"})
        assert resp.status >= 400
        assert resp.content_type == "application/problem+json"
        assert resp.headers["X-Request-ID"] == "r-1"


async def test_each_request_gets_its_own_id(client: Client) -> None:
    ids = {(await client.get("/healthz")).headers["X-Request-ID"] for _ in range(5)}
    assert len(ids) == 5


# --- logs ------------------------------------------------------------------------------------


async def test_access_line_per_request_with_template_status_duration(
    client: Client, read_logs: LogReader
) -> None:
    dep = await create_deployment(client, data={"secret": "do-not-log"})
    await client.get(f"/deployments/{dep['deployment_id']}", headers={"X-Request-ID": "get-1"})
    await client.get("/nowhere", headers={"X-Request-ID": "miss-1"})
    lines = read_logs()
    access = [line for line in lines if line["logger"] == "service.access"]
    assert [(a["method"], a["route"], a["status"]) for a in access] == [
        ("POST", "/deployments", 201),
        ("GET", "/deployments/{deployment_id}", 200),
        ("GET", "unmatched", 404),
    ]
    assert [a["request_id"] for a in access][1:] == ["get-1", "miss-1"]
    assert all(isinstance(a["duration_ms"], float) and a["duration_ms"] >= 0 for a in access)
    assert all(line["time"].endswith("Z") and line["level"] for line in lines)
    assert "do-not-log" not in json.dumps(lines)  # never a body


async def test_every_line_of_a_request_carries_its_id(
    aiohttp_client: Any, settings: Settings, read_logs: LogReader
) -> None:
    """A line logged deep inside a request (here: the 500 handler's) has the request's id."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = create_app(settings)
    app.router.add_get("/boom", broken)
    client: Client = await aiohttp_client(app)
    resp = await client.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert resp.status == 500 and resp.headers["X-Request-ID"] == "boom-1"
    assert "boom" not in await resp.text()  # the trace is logged, never sent
    lines = [line for line in read_logs() if line["request_id"] == "boom-1"]
    assert [line["level"] for line in lines] == ["ERROR", "INFO"]  # the error, the access line
    assert "RuntimeError: boom" in lines[0]["exception"]


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_count_requests_by_route_template_and_status(client: Client) -> None:
    before = await (await client.get("/metrics")).text()
    dep = await create_deployment(client)
    await create_job(client, dep["deployment_id"])
    await client.get("/jobs/424242")
    await client.get("/jobs/424243")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    after = await resp.text()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"method": "GET", "route": "/jobs/{job_id}", "status": "404"}
    assert delta("jobservice_http_requests_total", **route) == 2
    assert delta("jobservice_http_request_duration_seconds_count", **route) == 2
    created = {"method": "POST", "route": "/jobs", "status": "201"}
    assert delta("jobservice_http_requests_total", **created) == 1
    assert "/jobs/424242" not in after  # templates, never raw paths
    assert (
        delta("jobservice_db_command_duration_seconds_count", command="insert", outcome="ok") >= 2
    )


async def test_metrics_count_jobs_by_status(client: Client) -> None:
    dep = await create_deployment(client)
    for _ in range(3):
        await create_job(client, dep["deployment_id"])
    job = await create_job(client, dep["deployment_id"])
    resp = await client.patch(f"/jobs/{job['job_id']}", json={"task_status": "RUNNING"})
    assert resp.status == 200
    text = await (await client.get("/metrics")).text()
    assert value(text, "jobservice_jobs", task_status="PENDING") == 3
    assert value(text, "jobservice_jobs", task_status="RUNNING") == 1
    assert value(text, "jobservice_jobs", task_status="FINISHED") == 0
    assert value(text, "jobservice_database_up") == 1


class Commands(monitoring.CommandListener):
    """Remembers the commands sent on the collection `name`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[Doc] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command.get(event.command_name) == self.name:
            self.sent.append(dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_jobs_gauge_reads_the_task_status_index(
    db: AsyncDatabase[Doc], settings: Settings
) -> None:
    """Every command the count sends is an index read: a scrape must not read every job."""
    started = datetime(2026, 1, 1, tzinfo=UTC)
    statuses = ["PENDING", "RUNNING", "FINISHED", "ERROR"]
    await db.jobs.insert_many(
        job_document(_id=i, user_id="u", deployment_id=1, started_at=started, task_status=s)
        for i, s in enumerate(statuses * 50 + ["PENDING"], 1)
    )
    listener = Commands("jobs")
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        settings.mongodb_url, event_listeners=[listener]
    )
    async with client:
        assert await count_jobs(client[settings.mongodb_db])
    text = exposition().decode()
    assert value(text, "jobservice_jobs", task_status="PENDING") == 51
    assert value(text, "jobservice_jobs", task_status="ERROR") == 50
    assert listener.sent
    for command in listener.sent:
        assert command.keys() & {"aggregate", "count"}, command
        explained = {
            k: v for k, v in command.items() if k in ("aggregate", "pipeline", "count", "query")
        }
        if "aggregate" in explained:
            explained["cursor"] = {}
        plan = await db.command({"explain": explained, "verbosity": "queryPlanner"})
        stages = winning_stages(plan)
        assert "COLLSCAN" not in stages and stages & {"IXSCAN", "COUNT_SCAN"}, (command, stages)
