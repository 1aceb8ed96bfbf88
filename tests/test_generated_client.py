"""A client generated from openapi.yaml, as a new user would make one, works against the service.

`openapi-python-client generate --fail-on-warning` with clients/openapi-python-client.yaml
must succeed (a warning means part of the API is missing from the client), and the
generated async client drives an executor's whole round, lists and errors, each answer
parsed into its typed model: problems included.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import Users

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "openapi.yaml"
CONFIG_PATH = ROOT / "clients" / "openapi-python-client.yaml"
PACKAGE = "jobservice_client"  # package_name_override in the config


def generate(output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate"]
        + ["--path", str(SPEC_PATH), "--config", str(CONFIG_PATH)]
        + ["--output-path", str(output), "--meta", "none", "--fail-on-warning"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[dict[str, ModuleType]]:
    """The generated package, importable for the test only; its modules by short name."""
    result = generate(tmp_path / PACKAGE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout
    sys.path.insert(0, str(tmp_path))
    try:
        names = {
            "client": "client",
            "types": "types",
            "models": "models",
            **{
                op: f"api.{tag}.{op}"
                for tag, ops in {
                    "deployments": ["create_deployment", "get_deployment"],
                    "jobs": ["create_job", "get_job", "list_jobs", "patch_job"],
                    "executors": ["claim_job", "heartbeat_job"],
                    "results": ["put_result", "get_result"],
                    "bulk": ["export_jobs", "import_jobs"],
                }.items()
                for op in ops
            },
        }
        yield {short: importlib.import_module(f"{PACKAGE}.{mod}") for short, mod in names.items()}
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def executor_round(g: dict[str, ModuleType], base_url: str, token: str) -> tuple[int, list[int]]:
    """With the synchronous client: create, claim, heartbeat, upload, finish, page, export.

    Returns the finished job's id and the ids of every job created.
    """
    m = g["models"]
    api = g["client"].AuthenticatedClient(
        base_url=base_url, token=token, raise_on_unexpected_status=True
    )
    with api as c:
        resp: Any = g["create_deployment"].sync_detailed(
            client=c, body=m.DeploymentCreate(deployment_name="bell-pair", parameters="-n 1")
        )
        assert resp.status_code == 201, resp.content
        dep = resp.parsed
        assert isinstance(dep, m.Deployment)
        assert (dep.user_id, dep.deployment_name, dep.revision) == ("alice", "bell-pair", 1)
        assert resp.headers["ETag"] == '"1"'

        jobs = []
        for i in range(3):
            body = m.JobCreate(deployment_id=dep.deployment_id, job_name=f"job-{i}")
            job = g["create_job"].sync(client=c, body=body)
            assert isinstance(job, m.Job)
            assert job.task_status == m.TaskStatus.PENDING
            jobs.append(job)

        claimed = g["claim_job"].sync(client=c, body=m.ClaimRequest(executor="gen-1", lease_s=30))
        assert isinstance(claimed, m.Job)
        assert claimed.job_id == jobs[0].job_id
        assert claimed.task_status == m.TaskStatus.RUNNING
        assert isinstance(claimed.lease, m.Lease)
        assert claimed.lease.executor == "gen-1"

        beat = g["heartbeat_job"].sync(
            job_id=claimed.job_id, client=c, body=m.HeartbeatRequest(executor="gen-1")
        )
        assert isinstance(beat, m.Heartbeat)
        assert (beat.job_id, beat.cancel_requested) == (claimed.job_id, False)

        content = b"outcome,count\n00,503\n11,497\n"
        file = g["types"].File(payload=BytesIO(content), file_name="counts.csv")
        resp = g["put_result"].sync_detailed(
            job_id=claimed.job_id, name="counts.csv", client=c, body=file
        )
        assert resp.status_code == 201, resp.content
        result = resp.parsed
        assert isinstance(result, m.Result)
        assert (result.name, result.size) == ("counts.csv", len(content))
        assert result.content_type == "application/octet-stream"
        download = g["get_result"].sync(job_id=claimed.job_id, name="counts.csv", client=c)
        assert isinstance(download, g["types"].File)
        assert download.payload.read() == content

        finished = g["patch_job"].sync(
            job_id=claimed.job_id,
            client=c,
            body=m.JobPatch(task_status=m.TaskStatus.FINISHED, status_reason="done"),
        )
        assert isinstance(finished, m.Job)
        assert finished.task_status == m.TaskStatus.FINISHED
        assert finished.lease is None
        assert [r.name for r in finished.results] == ["counts.csv"]

        # Paging: a page of two and one of one, the cursor taken from the first.
        page = g["list_jobs"].sync(client=c, limit=2, count=True)
        assert isinstance(page, m.JobList)
        assert page.total == 3
        seen = [j.job_id for j in page.items]
        assert isinstance(page.next_cursor, str)
        page = g["list_jobs"].sync(client=c, limit=2, cursor=page.next_cursor)
        assert isinstance(page, m.JobList)
        seen += [j.job_id for j in page.items]
        assert page.next_cursor is None
        assert seen == [j.job_id for j in jobs]

        # NDJSON both ways, as bytes: the export imported again skips every record.
        export = g["export_jobs"].sync(client=c, deployment_id=dep.deployment_id)
        assert isinstance(export, g["types"].File)
        lines = export.payload.read().splitlines()
        assert len(lines) == 3
        report = g["import_jobs"].sync(
            client=c,
            body=g["types"].File(payload=BytesIO(b"\n".join(lines))),
            on_conflict=m.ImportJobsOnConflict.SKIP,
        )
        assert isinstance(report, m.ImportReport)
        assert (report.received, report.skipped, report.failed) == (3, 3, 0)
    return claimed.job_id, seen


async def test_a_generated_client_drives_the_service(
    users: Users, generated: dict[str, ModuleType]
) -> None:
    g, m = generated, generated["models"]
    base_url = str(users.alice.make_url("")).rstrip("/")
    # The synchronous client blocks: in a thread, while this loop serves its requests.
    finished_id, _ = await asyncio.to_thread(executor_round, g, base_url, users.keys["alice"])

    # The asynchronous client, in this loop. Errors arrive as typed problems.
    api = g["client"].AuthenticatedClient(base_url=base_url, token=users.keys["alice"])
    async with api as c:
        resp: Any = await g["get_job"].asyncio_detailed(job_id=999_999, client=c)
        assert resp.status_code == 404
        problem = resp.parsed
        assert isinstance(problem, m.Problem)
        assert (problem.type_, problem.status) == ("/problems/not-found", 404)
        assert problem.detail

        resp = await g["patch_job"].asyncio_detailed(
            job_id=finished_id, client=c, body=m.JobPatch(task_status=m.TaskStatus.RUNNING)
        )
        assert resp.status_code == 409
        problem = resp.parsed
        assert isinstance(problem, m.Problem)
        assert (problem.type_, problem.status) == ("/problems/conflict", 409)
        assert "FINISHED" in problem.detail and "RUNNING" in problem.detail

        resp = await g["create_job"].asyncio_detailed(
            client=c, body=m.JobCreate(deployment_id=999_999)
        )
        assert resp.status_code == 422
        problem = resp.parsed
        assert isinstance(problem, m.Problem)
        assert (problem.type_, problem.status) == ("/problems/validation-error", 422)
        assert isinstance(problem.errors, list) and problem.errors
        assert isinstance(problem.errors[0], m.ProblemError)
        assert problem.errors[0].loc == ["body", "deployment_id"]

        # No job of that deployment to claim: 204, nothing to parse.
        none_due = m.ClaimRequest(executor="gen-1", deployment_id=999_999)
        resp = await g["claim_job"].asyncio_detailed(client=c, body=none_due)
        assert resp.status_code == 204
        assert resp.parsed is None
