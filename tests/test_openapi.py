"""openapi.yaml is valid, is what the service serves, and describes what it really answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from pymongo import MongoClient
from referencing import Registry, Resource

from service.embedded import free_port
from service.errors import ValidationFailed
from service.schemas import (
    Body,
    CancelBody,
    ClaimBody,
    HeartbeatBody,
    JobPatch,
    NoBody,
    validate_body,
)
from tests.helpers import Client, create_deployment, create_job

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
_REGISTRY = Registry().with_resource("spec", Resource.opaque(SPEC))


def conforms(instance: Any, component: str) -> None:
    """Validate against `#/components/schemas/<component>` of the spec (JSON Schema 2020-12)."""
    validator = Draft202012Validator(
        {"$ref": f"spec#/components/schemas/{component}"}, registry=_REGISTRY
    )
    errors = sorted(validator.iter_errors(instance), key=str)
    assert not errors, f"{component}: {errors[0].message} at {list(errors[0].absolute_path)}"


def test_spec_is_valid_openapi_3_1() -> None:
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")


PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
GENERATOR_CONFIG = SPEC_PATH.parent / "clients" / "openapi-python-client.yaml"


def test_spec_follows_the_conventions_generators_need() -> None:
    """The conventions written at the top of `components` (tests/test_generated_client.py
    runs the generator itself; this says which rule a new operation broke)."""
    overrides = yaml.safe_load(GENERATOR_CONFIG.read_text())["content_type_overrides"]

    def readable(media_type: str) -> bool:  # by openapi-python-client, given the overrides
        media_type = overrides.get(media_type, media_type)
        known = ("application/json", "application/octet-stream", "text/")
        return media_type.startswith(known) or media_type.endswith("+json")

    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            where = f"{method.upper()} {path}"
            assert op.get("operationId") and op.get("tags"), f"{where}: operationId, tags"
            for code, response in op["responses"].items():
                if int(code) >= 400:
                    assert "$ref" in response, f"{where} {code}: not a components/responses $ref"
                for media_type in response.get("content", {}):
                    assert readable(media_type), f"{where} {code}: {media_type}"
            for media_type in op.get("requestBody", {}).get("content", {}):
                assert readable(media_type), f"{where} request body: {media_type}"
    for name, response in SPEC["components"]["responses"].items():
        problem = response.get("content", {}).get("application/problem+json")
        if problem is not None:
            schema = problem["schema"]
            assert schema["allOf"] == [PROBLEM_REF], f"{name}: allOf is the Problem $ref only"
            assert set(schema["properties"]) <= {"type", "status"}, name


def test_spec_covers_every_route(client: Client) -> None:
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in client.app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(m, p) for p, ops in SPEC["paths"].items() for m in ops if m != "parameters"}
    assert routes == documented


async def test_served_spec_is_the_file(client: Client) -> None:
    resp = await client.get("/openapi.yaml")
    assert resp.status == 200
    assert resp.content_type == "application/yaml"
    assert await resp.read() == SPEC_PATH.read_bytes()


async def test_real_responses_match_the_spec(client: Client) -> None:
    dep = await create_deployment(client, deployment_name="d", data={"k": [1, {"x": None}]})
    conforms(dep, "Deployment")
    job = await create_job(client, dep["deployment_id"], job_name=None, data=[1, "two"])
    conforms(job, "Job")
    for step in ("RUNNING", "FINISHED"):
        resp = await client.patch(f"/jobs/{job['job_id']}", json={"task_status": step})
        conforms(await resp.json(), "Job")
    resp = await client.patch(f"/deployments/{dep['deployment_id']}", json={"data": {"k": None}})
    conforms(await resp.json(), "Deployment")
    resp = await client.get("/jobs?limit=1&count=true")
    conforms(await resp.json(), "JobList")
    resp = await client.get("/deployments")
    conforms(await resp.json(), "DeploymentList")
    for path, status in [
        ("/jobs/999", 404),
        ("/jobs?limit=0", 400),
        ("/jobs?cursor=abc", 400),
    ]:
        resp = await client.get(path)
        assert resp.status == status
        assert resp.content_type == "application/problem+json"
        conforms(await resp.json(), "Problem")
    resp = await client.post("/jobs", json={"user_id": "a", "deployment_id": 999})
    conforms(await resp.json(), "Problem")


# The request bodies of the spec, and the models the service reads them with.
MODELS: dict[str, type[Body]] = {
    "ClaimRequest": ClaimBody,
    "HeartbeatRequest": HeartbeatBody,
    "CancelRequest": CancelBody,
    "EmptyBody": NoBody,
    "JobPatch": JobPatch,
}


def rejects(instance: Any, component: str) -> bool:
    validator = Draft202012Validator(
        {"$ref": f"spec#/components/schemas/{component}"}, registry=_REGISTRY
    )
    return not validator.is_valid(instance)


async def test_executor_responses_match_the_spec(client: Client) -> None:
    dep = await create_deployment(client)
    job = await create_job(client, dep["deployment_id"])
    resp = await client.post("/jobs/claim", json={"executor": "ex-1", "lease_s": 30})
    assert resp.status == 200
    claimed = await resp.json()
    conforms(claimed, "Job")
    assert claimed["history"][-1]["executor"] == "ex-1"
    resp = await client.post(f"/jobs/{job['job_id']}/heartbeat", json={"executor": "ex-1"})
    conforms(await resp.json(), "Heartbeat")
    resp = await client.post(f"/jobs/{job['job_id']}/heartbeat", json={"executor": "other"})
    assert resp.status == 409
    conforms(await resp.json(), "Problem")
    resp = await client.post(f"/jobs/{job['job_id']}/cancel", json={"reason": "x" * 1000})
    assert resp.status == 202
    conforms(await resp.json(), "Job")
    body = {"task_status": "ERROR", "status_reason": "oom"}
    resp = await client.patch(f"/jobs/{job['job_id']}", json=body)
    conforms(await resp.json(), "Job")
    resp = await client.post(f"/jobs/{job['job_id']}/retry", headers={"Idempotency-Key": "k"})
    assert resp.status == 201
    retried = await resp.json()
    conforms(retried, "Job")
    resp = await client.post(f"/jobs/{retried['job_id']}/cancel", json={"reason": "y" * 1000})
    assert resp.status == 200
    cancelled = await resp.json()
    conforms(cancelled, "Job")
    assert len(cancelled["status_reason"]) > 1000  # "cancelled: " and the whole reason
    resp = await client.post("/jobs/claim", json={"executor": "ex-1"})
    assert resp.status == 204


@pytest.mark.parametrize(
    ("component", "body"),
    [
        ("ClaimRequest", {}),
        ("ClaimRequest", {"executor": ""}),
        ("ClaimRequest", {"executor": "x" * 201}),
        ("ClaimRequest", {"executor": "e", "lease_s": 4}),
        ("ClaimRequest", {"executor": "e", "lease_s": 3601}),
        ("ClaimRequest", {"executor": "e", "lease_s": None}),
        ("ClaimRequest", {"executor": "e", "wait_s": 60.5}),
        ("ClaimRequest", {"executor": "e", "wait_s": -0.1}),
        ("ClaimRequest", {"executor": "e", "deployment_id": 0}),
        ("ClaimRequest", {"executor": "e", "user_id": ""}),
        ("ClaimRequest", {"executor": "e", "unknown": 1}),
        ("HeartbeatRequest", {"executor": "e", "lease_s": 3601}),
        ("HeartbeatRequest", {"lease_s": 60}),
        ("CancelRequest", {"reason": ""}),
        ("CancelRequest", {"reason": "x" * 1001}),
        ("EmptyBody", {"reason": "x"}),
        ("JobPatch", {"status_reason": "why"}),
        ("JobPatch", {"task_status": "ERROR", "status_reason": ""}),
    ],
)
def test_the_spec_refuses_what_the_service_refuses(component: str, body: Any) -> None:
    assert rejects(body, component)
    with pytest.raises(ValidationFailed):
        validate_body(MODELS[component], orjson.dumps(body))


@pytest.mark.parametrize(
    ("component", "body"),
    [
        ("ClaimRequest", {"executor": "e"}),
        ("ClaimRequest", {"executor": "e", "lease_s": 5, "wait_s": 0.5, "deployment_id": None}),
        ("ClaimRequest", {"executor": "e", "wait_s": 60, "user_id": None}),
        ("CancelRequest", {}),
        ("CancelRequest", {"reason": None}),
        ("EmptyBody", {}),
        ("JobPatch", {"task_status": "ERROR", "status_reason": None}),
    ],
)
def test_the_spec_accepts_what_the_service_accepts(component: str, body: Any) -> None:
    conforms(body, component)
    validate_body(MODELS[component], orjson.dumps(body))


LIVE_ADMIN_KEY = f"test-admin-{uuid.uuid4().hex}"


@pytest.fixture
def live_service(mongodb_url: str, tmp_path: Path) -> Any:
    """The service as a real process, for tools that need a URL; auth on, LIVE_ADMIN_KEY."""
    port, name = free_port(), f"test_st_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MONGODB_URL": mongodb_url, "MONGODB_DB": name, "LOG_LEVEL": "ERROR"}
    env |= {"AUTH": "enabled", "SERVICE_ADMIN_KEY": LIVE_ADMIN_KEY, "DATA_DIR": str(tmp_path)}
    env["AUTH_FAILURES_PER_MINUTE"] = "1000000"  # schemathesis tries bad credentials on purpose
    env["EVENTS_MAX_S"] = "0.5"  # each /events case reads a whole (short) stream
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        env=env,
        cwd=SPEC_PATH.parent,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60

    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the service did not start") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(20)
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    with client:
        client.drop_database(name)


def test_schemathesis_finds_no_500_and_no_spec_violation(live_service: str) -> None:
    """A bounded schemathesis run: every check, except the one that cannot know our data.

    `positive_data_acceptance` expects every schema-valid request to succeed, but a valid
    request can still name a deployment that does not exist (422), carry a stale If-Match
    (412) or a cursor from elsewhere (400): state no schema can express.
    """
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    result = subprocess.run(
        [st, "run", str(SPEC_PATH), "--url", live_service]
        + ["-H", f"Authorization: Bearer {LIVE_ADMIN_KEY}"]
        + ["--checks", "all", "--exclude-checks", "positive_data_acceptance"]
        + ["--max-examples", os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25")]
        + ["--workers", "1", "--seed", "1", "--no-color"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = [line for line in result.stdout.splitlines() if "generated" in line]
    print("\n".join(summary))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
