"""Authentication: API keys, the admin key, OIDC JWTs, the failure limit, the `keys` command."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr, ValidationError
from pymongo import MongoClient

from service.app import create_app
from service.auth import AUTH, FailureLimiter, KeyCache
from service.cli import export_file, import_file
from service.database import DB
from service.embedded import PORT_FILE
from service.keys import ADMIN_KEY_FILE, create_key, list_keys, revoke_key, split_key
from service.settings import Settings
from tests.helpers import Client, Users
from tests.test_openapi import conforms

ROOT = Path(__file__).resolve().parent.parent
AuthClient = Callable[..., Awaitable[Client]]


async def problem(resp: Any, status: int, slug: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = await resp.json()
    assert body["type"] == f"/problems/{slug}"
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- who needs a key -------------------------------------------------------------------


async def test_probes_and_spec_need_no_key(users: Users) -> None:
    for path in ("/healthz", "/readyz", "/openapi.yaml"):
        assert (await users.anonymous.get(path)).status == 200, path


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/deployments"),
        ("POST", "/deployments"),
        ("GET", "/deployments/1"),
        ("PATCH", "/deployments/1"),
        ("DELETE", "/deployments/1"),
        ("GET", "/deployments/1/jobs"),
        ("GET", "/jobs"),
        ("POST", "/jobs"),
        ("GET", "/jobs/1"),
        ("PATCH", "/jobs/1"),
        ("DELETE", "/jobs/1"),
        ("GET", "/metrics"),
        ("GET", "/no-such-path"),  # 401 before 404: routes are not revealed either
        ("GET", "/healthz/"),
    ],
)
async def test_everything_else_needs_a_key(users: Users, method: str, path: str) -> None:
    resp = await users.anonymous.request(method, path, json={"user_id": "alice"})
    await problem(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert await users.db.deployments.count_documents({}) == 0


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ",
        "Bearer nonsense",
        "Basic YWxpY2U6c2VjcmV0",
        "jsk_0123456789abcdef_secret",  # no scheme
        "Bearer jsk_0123456789abcdef_" + "A" * 43,  # unknown key id
        "Bearer jsk_0123456789abcdef",
        "Bearer jsk__secret",
        'Bearer jsk_{"$ne":null}_x',
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",  # a JWT, and OIDC is off
    ],
)
async def test_invalid_credentials_are_401(users: Users, header: str) -> None:
    resp = await users.anonymous.get("/deployments", headers={"Authorization": header})
    body = await problem(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert header.split()[-1] not in body["detail"]


async def test_a_wrong_secret_for_a_real_key_id_is_401(users: Users) -> None:
    key_id, secret = split_key(users.keys["alice"]) or ("", "")
    forged = f"jsk_{key_id}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    await users.alice.get("/deployments")  # the genuine key is now cached
    await problem(
        await users.anonymous.get("/deployments", headers=bearer(forged)), 401, "unauthorized"
    )


async def test_bearer_scheme_is_case_insensitive(users: Users) -> None:
    headers = {"Authorization": f"bearer {users.keys['alice']}"}
    assert (await users.anonymous.get("/deployments", headers=headers)).status == 200


# --- keys ------------------------------------------------------------------------------


async def test_keys_are_stored_only_as_salted_hashes(users: Users) -> None:
    key = users.keys["alice"]
    key_id, secret = split_key(key) or ("", "")
    doc = await users.db.api_keys.find_one({"_id": key_id})
    assert doc is not None
    assert doc["user_id"] == "alice" and doc["admin"] is False
    assert len(doc["salt"]) == 32 and len(doc["hash"]) == 64
    assert secret not in json.dumps(doc, default=str)
    assert len(secret) >= 43  # 256 random bits
    listed = await list_keys(users.db)
    assert {d["_id"] for d in listed} >= {key_id}
    assert all("hash" not in d and "salt" not in d for d in listed)


async def test_a_revoked_key_stops_working_once_its_cache_entry_expires(users: Users) -> None:
    assert (await users.alice.get("/deployments")).status == 200
    key_id = (split_key(users.keys["alice"]) or ("", ""))[0]
    revoked = await revoke_key(users.db, key_id)
    assert revoked is not None and revoked["revoked_at"] is not None
    assert await revoke_key(users.db, key_id) is None  # once only
    # Within the cache TTL the running service may still accept it; then it does not.
    users.alice.app[AUTH].keys = KeyCache(ttl_s=0)
    await problem(await users.alice.get("/deployments"), 401, "unauthorized")


def test_key_cache_expires_and_is_bounded() -> None:
    cache = KeyCache(ttl_s=10, size=2)
    doc = {"salt": "s", "hash": "h", "user_id": "u", "admin": False}
    cache.put("a", doc, now=100)
    assert cache.get("a", now=109.9) is not None
    assert cache.get("a", now=110) is None
    for key_id in ("a", "b", "c"):
        cache.put(key_id, doc, now=200)
    assert cache.get("a", now=200) is None  # the oldest made room
    assert cache.get("c", now=200) is not None


async def test_keys_are_verified_from_the_cache_without_a_lookup(users: Users) -> None:
    assert (await users.alice.get("/deployments")).status == 200
    await users.db.api_keys.delete_many({"user_id": "alice"})  # gone from the database
    assert (await users.alice.get("/deployments")).status == 200  # still cached (<= TTL)


async def test_first_start_writes_an_admin_key_file_once(
    aiohttp_client: AuthClient, auth_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = auth_settings.data_dir / ADMIN_KEY_FILE
    first = await aiohttp_client(create_app(auth_settings))
    key = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path.resolve()) in caplog.text
    assert key not in caplog.text
    resp = await first.get("/deployments", headers=bearer(key))
    assert resp.status == 200
    await first.close()

    second = await aiohttp_client(create_app(auth_settings))  # same database: keys exist
    assert path.read_text().strip() == key
    assert (await second.get("/deployments", headers=bearer(key))).status == 200
    assert len(await list_keys(second.app[DB].db)) == 1


async def test_service_admin_key_from_the_environment(
    aiohttp_client: AuthClient, auth_settings: Settings
) -> None:
    admin_key = "x" * 10 + uuid.uuid4().hex
    settings = auth_settings.model_copy(update={"service_admin_key": SecretStr(admin_key)})
    client = await aiohttp_client(create_app(settings))
    assert not (settings.data_dir / ADMIN_KEY_FILE).exists()  # no key file needed
    resp = await client.post("/deployments", json={}, headers=bearer(admin_key))
    assert resp.status == 201
    assert (await resp.json())["user_id"] == "admin"
    resp = await client.post("/deployments", json={"user_id": "carol"}, headers=bearer(admin_key))
    assert resp.status == 201  # an admin may create for anyone
    await problem(
        await client.get("/deployments", headers=bearer(admin_key[:-1])), 401, "unauthorized"
    )


def test_a_short_service_admin_key_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(service_admin_key="too-short")


async def test_auth_disabled_warns_at_start(
    aiohttp_client: AuthClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(create_app(settings))
    assert "AUTH=disabled" in caplog.text
    assert (await client.get("/deployments")).status == 200


async def test_creating_for_yourself_by_default_and_not_for_others(users: Users) -> None:
    resp = await users.alice.post("/deployments", json={"deployment_name": "mine"})
    assert resp.status == 201
    dep = await resp.json()
    assert dep["user_id"] == "alice"
    resp = await users.alice.post("/jobs", json={"deployment_id": dep["deployment_id"]})
    assert resp.status == 201 and (await resp.json())["user_id"] == "alice"
    resp = await users.alice.post("/deployments", json={"user_id": "bob"})
    await problem(resp, 403, "forbidden")
    resp = await users.alice.post(
        "/jobs", json={"user_id": "bob", "deployment_id": dep["deployment_id"]}
    )
    await problem(resp, 403, "forbidden")
    resp = await users.alice.post("/deployments", json={"user_id": None})
    await problem(resp, 422, "validation-error")
    assert await users.db.deployments.count_documents({}) == 1
    assert await users.db.jobs.count_documents({}) == 1


# --- failure limit ---------------------------------------------------------------------


def test_failure_limiter_window_slides() -> None:
    limiter = FailureLimiter(per_minute=3)
    for t in (0.0, 10.0, 20.0):
        assert limiter.retry_after("a", t) is None
        limiter.record("a", t)
    assert limiter.retry_after("a", 30.0) == 30  # the first failure leaves the window at 60
    assert limiter.retry_after("b", 30.0) is None  # per address
    assert limiter.retry_after("a", 60.0) is None
    limiter.record("a", 60.0)
    assert limiter.retry_after("a", 61.0) == 9


def test_failure_limiter_memory_is_bounded() -> None:
    limiter = FailureLimiter(per_minute=2, max_clients=100)
    for n in range(1000):
        limiter.record(f"10.0.{n // 256}.{n % 256}", 0.0)
    assert len(limiter._failures) == 100


async def test_failed_authentication_is_rate_limited(
    aiohttp_client: AuthClient, auth_settings: Settings
) -> None:
    settings = auth_settings.model_copy(update={"auth_failures_per_minute": 3})
    client = await aiohttp_client(create_app(settings))
    key = (settings.data_dir / ADMIN_KEY_FILE).read_text().strip()
    for _ in range(5):  # successes do not count
        assert (await client.get("/deployments", headers=bearer(key))).status == 200
    for _ in range(3):
        await problem(await client.get("/deployments", headers=bearer("bad")), 401, "unauthorized")
    resp = await client.get("/deployments", headers=bearer("bad"))
    await problem(resp, 429, "too-many-requests")
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    # While limited, even a valid key waits: guessing cannot go on between good requests.
    await problem(await client.get("/deployments", headers=bearer(key)), 429, "too-many-requests")
    assert (await client.get("/healthz")).status == 200


# --- OIDC ------------------------------------------------------------------------------

ISSUER, AUDIENCE = "https://idp.example.test/", "jobservice"


class Provider:
    """A JWKS served by an aiohttp test server, and tokens signed with its keys."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {"k1": rsa.generate_private_key(65537, 2048)}
        self.fetches = 0

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            jwk = json.loads(
                jwt.algorithms.get_default_algorithms()[self.alg(kid)].to_jwk(key.public_key())
            )
            out.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": out}

    def alg(self, kid: str) -> str:
        return "ES256" if isinstance(self.keys[kid], ec.EllipticCurvePrivateKey) else "RS256"

    async def handler(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.jwks())

    def token(self, kid: str = "k1", key: Any = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "iat": now, "exp": now + 300}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(
            payload, key or self.keys[kid], algorithm=self.alg(kid), headers={"kid": kid}
        )


@pytest.fixture
async def oidc(
    aiohttp_client: AuthClient, aiohttp_server: Any, auth_settings: Settings
) -> tuple[Provider, Client]:
    provider = Provider()
    idp = web.Application()
    idp.router.add_get("/jwks", provider.handler)
    server = await aiohttp_server(idp)
    settings = auth_settings.model_copy(
        update={
            "oidc_jwks_url": str(server.make_url("/jwks")),
            "oidc_audience": AUDIENCE,
            "oidc_issuer": ISSUER,
            "oidc_admin_claim": "realm_access.roles",
            "oidc_admin_value": "admin",
            "oidc_jwks_refresh_s": 3600,
        }
    )
    return provider, await aiohttp_client(create_app(settings))


async def test_oidc_token_is_a_user(oidc: tuple[Provider, Client]) -> None:
    provider, client = oidc
    token = provider.token()
    resp = await client.post("/deployments", json={}, headers=bearer(token))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["user_id"] == "carol"
    resp = await client.post("/deployments", json={"user_id": "dave"}, headers=bearer(token))
    await problem(resp, 403, "forbidden")
    # Another subject sees none of carol's records.
    other = provider.token(sub="dave")
    assert (await (await client.get("/deployments", headers=bearer(other))).json())["items"] == []
    admin = provider.token(sub="erin", realm_access={"roles": ["viewer", "admin"]})
    listed = await (await client.get("/deployments", headers=bearer(admin))).json()
    assert [d["user_id"] for d in listed["items"]] == ["carol"]
    assert provider.fetches == 1  # the JWKS is cached


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": int(time.time()) - 3600},
        {"exp": None},
        {"aud": "someone-else"},
        {"aud": None},
        {"iss": "https://evil.example.test/"},
        {"iss": None},
        {"sub": None},
        {"sub": ""},
        {"sub": 42},
        {"nbf": int(time.time()) + 3600},
    ],
)
async def test_oidc_token_claims_are_checked(
    oidc: tuple[Provider, Client], claims: dict[str, Any]
) -> None:
    provider, client = oidc
    token = provider.token(**claims)
    await problem(await client.get("/deployments", headers=bearer(token)), 401, "unauthorized")


async def test_oidc_signatures_are_checked(oidc: tuple[Provider, Client]) -> None:
    provider, client = oidc
    stranger = rsa.generate_private_key(65537, 2048)
    public_pem = (
        provider.keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "exp": now + 300}
    forged = [
        provider.token(key=stranger),  # the right kid, another key
        jwt.encode(claims, "", algorithm="none", headers={"kid": "k1"}),
        hs256(claims, public_pem),  # HMAC keyed with the public key: key confusion
        provider.token()[:-4] + "AAAA",
    ]
    for token in forged:
        await problem(await client.get("/deployments", headers=bearer(token)), 401, "unauthorized")


def hs256(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT itself refuses a PEM as an HMAC key)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


async def test_oidc_key_rotation_refetches_at_most_every_n_seconds(
    oidc: tuple[Provider, Client],
) -> None:
    provider, client = oidc
    assert (await client.get("/deployments", headers=bearer(provider.token()))).status == 200
    assert provider.fetches == 1
    provider.keys["k2"] = ec.generate_private_key(ec.SECP256R1())
    token = provider.token(kid="k2")
    # Refetched recently (OIDC_JWKS_REFRESH_S=3600): an unknown kid does not refetch again.
    await problem(await client.get("/deployments", headers=bearer(token)), 401, "unauthorized")
    assert provider.fetches == 1
    jwks = client.app[AUTH].jwks
    assert jwks is not None
    jwks.refresh_s = 0
    assert (await client.get("/deployments", headers=bearer(token))).status == 200
    assert provider.fetches == 2
    assert (await client.get("/deployments", headers=bearer(token))).status == 200
    assert provider.fetches == 2  # known now


def test_oidc_needs_audience_and_issuer() -> None:
    with pytest.raises(ValidationError):
        Settings(oidc_jwks_url="https://idp.example.test/jwks")


# --- the `keys` command ----------------------------------------------------------------


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`python -m service ...` as a child process (never blocking the test's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_keys_command_against_mongodb_url(
    aiohttp_client: AuthClient, auth_settings: Settings, mongodb_url: str
) -> None:
    env = {"MONGODB_URL": mongodb_url, "MONGODB_DB": auth_settings.mongodb_db}
    code, out, err = await run_cli("keys", "create", "--user", "carol", "--name", "ci", env=env)
    assert code == 0, err
    key = out.strip()
    key_id = (split_key(key) or ("", ""))[0]
    assert key_id and key_id in err and "only this once" in err

    client = await aiohttp_client(create_app(auth_settings))
    resp = await client.post("/deployments", json={}, headers=bearer(key))
    assert (await resp.json())["user_id"] == "carol"

    code, out, err = await run_cli("keys", "list", env=env)
    assert code == 0, err
    assert key_id in out and "carol" in out and "ci" in out
    secret = key.split("_", 2)[2]
    stored = MongoClient(mongodb_url)[auth_settings.mongodb_db].api_keys.find_one({"_id": key_id})
    assert stored is not None
    for text in (key, secret, stored["hash"], stored["salt"]):
        assert text not in out + err

    code, _, err = await run_cli("keys", "revoke", key_id, env=env)
    assert code == 0, err
    code, _, err = await run_cli("keys", "revoke", key_id, env=env)
    assert code == 1 and "no unrevoked key" in err
    client.app[AUTH].keys = KeyCache(ttl_s=0)  # skip the up-to-10-s cache
    await problem(await client.get("/deployments", headers=bearer(key)), 401, "unauthorized")


async def test_keys_command_uses_the_running_services_embedded_database(
    aiohttp_client: AuthClient, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(mongodb_url=None, data_dir=data_dir, auth="enabled")
    client = await aiohttp_client(create_app(settings))
    assert (data_dir / PORT_FILE).exists()
    env = {"DATA_DIR": str(data_dir), "MONGODB_URL": ""}
    code, out, err = await run_cli("keys", "create", "--user", "dora", "--admin", env=env)
    assert code == 0, err
    resp = await client.get("/deployments", headers=bearer(out.strip()))
    assert resp.status == 200, await resp.text()
    await client.close()
    assert not (data_dir / PORT_FILE).exists()

    # Service stopped: the command starts the embedded database just for itself.
    code, out, err = await run_cli("keys", "list", env=env)
    assert code == 0, err
    assert "dora" in out and "admin" in out  # dora's key and the first-start admin key
    assert not (data_dir / PORT_FILE).exists()


async def test_keys_command_refuses_a_bad_user(mongodb_url: str) -> None:
    env = {"MONGODB_URL": mongodb_url, "MONGODB_DB": "unused"}
    code, _, err = await run_cli("keys", "create", "--user", "", env=env)
    assert code == 2 and "--user" in err


# --- no secret in logs or errors -------------------------------------------------------


async def test_no_key_appears_in_logs_or_responses(
    users: Users, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key, _ = await create_key(users.db, "alice", admin=False)
    bodies = []
    for client, headers in [
        (users.alice, {}),
        (users.anonymous, bearer(key)),
        (users.anonymous, bearer(key + "x")),
        (users.anonymous, bearer(key[:-3])),
        (users.anonymous, {"Authorization": key}),
        (users.bob, {}),
    ]:
        for method, path in [("GET", "/deployments"), ("GET", "/jobs/1"), ("POST", "/jobs")]:
            resp = await client.request(method, path, json={"x": 1}, headers=headers)
            bodies.append(await resp.text())
            bodies.append(json.dumps(dict(resp.headers)))
    text = caplog.text + "\n".join(bodies)
    for secret in [key, *users.keys.values()]:
        assert secret not in text
        assert secret.split("_", 2)[2] not in text


async def test_auth_problems_match_the_spec(
    aiohttp_client: AuthClient, auth_settings: Settings
) -> None:
    settings = auth_settings.model_copy(update={"auth_failures_per_minute": 1})
    client = await aiohttp_client(create_app(settings))
    key = (settings.data_dir / ADMIN_KEY_FILE).read_text().strip()
    alice, _ = await create_key(client.app[DB].db, "alice", admin=False)
    resp = await client.post("/deployments", json={"user_id": "bob"}, headers=bearer(alice))
    conforms(await problem(resp, 403, "forbidden"), "Problem")
    resp = await client.get("/deployments")
    conforms(await problem(resp, 401, "unauthorized"), "Problem")
    resp = await client.get("/deployments", headers=bearer(key))
    conforms(await problem(resp, 429, "too-many-requests"), "Problem")
    assert int(resp.headers["Retry-After"]) >= 1


def test_a_bad_admin_key_setting_is_not_echoed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        cwd=ROOT,
        env={**os.environ, "SERVICE_ADMIN_KEY": "short-s3cret"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "SERVICE_ADMIN_KEY" in result.stderr and "s3cret" not in result.stderr


async def test_import_and_export_commands_send_api_key(
    users: Users,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = str(users.anonymous.make_url(""))
    source = tmp_path / "mine.ndjson"
    source.write_bytes(b'{"deployment_name": "a"}\n{"deployment_name": "b"}\n')
    out = tmp_path / "out.ndjson"
    assert await export_file(url, "deployments", [], str(out)) == 2
    assert "set API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("API_KEY", users.keys["bob"])
    assert await import_file(url, "deployments", str(source)) == 0
    monkeypatch.setenv("API_KEY", users.keys["alice"])
    assert await import_file(url, "deployments", str(source)) == 0
    assert await export_file(url, "deployments", [], str(out)) == 0
    exported = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert [(d["user_id"], d["deployment_name"]) for d in exported] == [
        ("alice", "a"),
        ("alice", "b"),
    ]
    err = capsys.readouterr().err
    assert users.keys["alice"] not in err and users.keys["bob"] not in err
