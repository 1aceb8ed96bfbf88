"""Who is asking, and what they may see: principals, ownership, OIDC, the auth middleware.

Every request outside `PUBLIC_PATHS` must carry `Authorization: Bearer <credential>`;
`auth_middleware` turns it into a `Principal` at `request[PRINCIPAL]`. Resource modules
adopt the rules with one call each:

- `owner_filter(request)`: merge into every query that reads, changes, counts or
  deletes records (`{}` for admins, `{"user_id": <caller>}` otherwise), so another user's
  record is indistinguishable from a missing one;
- `claim_owner(request, user_id)`: the owner of a record being created or imported
  (omitted: the caller; another user: 403 unless admin);
- `same_owner(request, user_id)`: the filter a referenced record (a job's deployment) must
  match, so links never cross owners;
- `require_admin(request)`: for endpoints about the whole service (e.g. /metrics).

A credential is SERVICE_ADMIN_KEY, an OIDC bearer JWT or an API key (stored by keys.py).
Verified keys are cached in-process for `KEY_CACHE_TTL_S`: a revoked key stops working
within that time on every instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from pymongo.asynchronous.database import AsyncDatabase

from .database import DB, Doc
from .errors import Forbidden, TooManyRequests, Unauthorized, invalid
from .keys import (
    ENV_ADMIN_USER,
    KEY_CACHE_TTL_S,
    ensure_first_key,
    find_key,
    hash_secret,
    split_key,
)
from .settings import Settings

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.yaml"})  # ops.py: probes, the spec
KEY_CACHE_SIZE = 1024
MAX_CREDENTIAL = 8192  # longer than any key or sane JWT; refused without parsing
JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)  # asymmetric only: "none" and HMAC algorithms (key confusion) are never accepted
JWKS_MAX_AGE_S = 3600.0


class OwnerRequired(Exception):
    """A record names no `user_id` and there is no caller to default to (auth disabled)."""


@dataclass(frozen=True)
class Principal:
    """The caller, and the rules that follow from who it is (for code without a request at
    hand, e.g. a bulk import; handlers use the functions below).

    `user_id` is None only when auth is disabled (then every request is an admin)."""

    user_id: str | None
    admin: bool

    def owner_filter(self) -> Doc:
        return {} if self.admin else {"user_id": self.user_id}

    def claim(self, user_id: str | None, loc: list[str | int]) -> str:
        if user_id is None:
            if self.user_id is None:  # auth disabled: nobody to default to
                raise OwnerRequired()
            return self.user_id
        if not self.admin and user_id != self.user_id:
            where = ".".join(map(str, loc))
            raise Forbidden(f"{where}: you may only create records of your own user.")
        return user_id

    def same_owner(self, user_id: str) -> Doc:
        return {} if self.user_id is None else {"user_id": user_id}


ANONYMOUS_ADMIN = Principal(None, True)
PRINCIPAL = web.RequestKey("principal", Principal)


# --- the rules, for resource modules -----------------------------------------------------


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def owner_filter(request: web.Request) -> Doc:
    """What every read, change, count and delete must also match: the caller's records."""
    return request[PRINCIPAL].owner_filter()


def claim_owner(request: web.Request, user_id: str | None) -> str:
    """The owner of a new record: `user_id` if the caller may create for them (else 403);
    omitted, the caller (422 when auth is disabled and there is no caller)."""
    try:
        return request[PRINCIPAL].claim(user_id, ["body", "user_id"])
    except OwnerRequired:
        raise invalid(["body", "user_id"], "Field required") from None


def same_owner(request: web.Request, user_id: str) -> Doc:
    """The filter a record referenced by a new record of `user_id` must match (auth on)."""
    return request[PRINCIPAL].same_owner(user_id)


def require_admin(request: web.Request) -> None:
    if not request[PRINCIPAL].admin:
        raise Forbidden("Only an admin may use this endpoint.")


# --- failed authentications -------------------------------------------------------------


class FailureLimiter:
    """Failed authentications per client address in a sliding one-minute window."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until `client` may try again, or None if it may now."""
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.WINDOW_S:
            times.popleft()
        if len(times) < self.per_minute:
            return None
        return max(1, math.ceil(times[0] + self.WINDOW_S - now))

    def record(self, client: str, now: float) -> None:
        times = self._failures.pop(client, None) or deque(maxlen=self.per_minute)
        times.append(now)
        self._failures[client] = times  # most recent last
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


# --- verified keys -------------------------------------------------------------------------


@dataclass
class CachedKey:
    salt: str
    hash: str
    principal: Principal
    expires: float


class KeyCache:
    """Verified key documents by key id, for a few seconds, so a request costs no lookup."""

    def __init__(self, ttl_s: float = KEY_CACHE_TTL_S, size: int = KEY_CACHE_SIZE) -> None:
        self.ttl_s, self.size = ttl_s, size
        self._entries: OrderedDict[str, CachedKey] = OrderedDict()

    def get(self, key_id: str, now: float) -> CachedKey | None:
        entry = self._entries.get(key_id)
        if entry is not None and entry.expires <= now:
            del self._entries[key_id]
            return None
        return entry

    def put(self, key_id: str, doc: Doc, now: float) -> CachedKey:
        entry = CachedKey(
            doc["salt"],
            doc["hash"],
            Principal(doc["user_id"], bool(doc["admin"])),
            now + self.ttl_s,
        )
        self._entries.pop(key_id, None)
        self._entries[key_id] = entry
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


# --- OpenID Connect ------------------------------------------------------------------------


class Jwks:
    """The provider's signing keys, fetched with aiohttp, refetched for an unknown key id."""

    def __init__(self, url: str, session: aiohttp.ClientSession, refresh_s: float) -> None:
        self.url, self.session, self.refresh_s = url, session, refresh_s
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        now = time.monotonic()
        stale = self.fetched_at is None or now - self.fetched_at > JWKS_MAX_AGE_S
        may_refetch = self.fetched_at is None or now - self.fetched_at >= self.refresh_s
        if stale or (kid not in self.keys and may_refetch):
            async with self._lock:
                if self.fetched_at is None or self.fetched_at < now:  # nobody fetched meanwhile
                    await self._fetch()
        return self.keys.get(kid)

    async def _fetch(self) -> None:
        self.fetched_at = time.monotonic()
        try:
            async with self.session.get(self.url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("could not fetch the OIDC JWKS: %s", exc.__class__.__name__)
            return
        keys: dict[str | None, jwt.PyJWK] = {}
        for jwk in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            with contextlib.suppress(jwt.PyJWTError):
                keys[jwk.get("kid")] = jwt.PyJWK(jwk)
        if len(keys) == 1:
            keys.setdefault(None, next(iter(keys.values())))  # a token without kid: the one key
        self.keys = keys


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


# --- the authenticator ---------------------------------------------------------------------


@dataclass
class Authenticator:
    settings: Settings
    keys: KeyCache = field(default_factory=KeyCache)
    limiter: FailureLimiter = field(init=False)
    admin_digest: bytes | None = field(init=False)  # of SERVICE_ADMIN_KEY, hashed once
    jwks: Jwks | None = None

    def __post_init__(self) -> None:
        self.limiter = FailureLimiter(self.settings.auth_failures_per_minute)
        admin_key = self.settings.service_admin_key
        self.admin_digest = _digest(admin_key.get_secret_value()) if admin_key else None

    async def authenticate(self, request: web.Request) -> Principal:
        if self.settings.auth == "disabled":
            return ANONYMOUS_ADMIN
        client = request.remote or "unknown"
        now = time.monotonic()
        wait = self.limiter.retry_after(client, now)
        if wait is not None:
            raise TooManyRequests(
                "Too many failed authentications from your address; try again later.",
                headers={"Retry-After": str(wait)},
            )
        header = request.headers.get("Authorization")
        if header is None:
            self.limiter.record(client, now)
            raise Unauthorized(
                "Send an API key or token as `Authorization: Bearer <key>`.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        found = None
        if scheme.lower() == "bearer" and 0 < len(credential) <= MAX_CREDENTIAL:
            found = await self.verify(request.app[DB].db, credential)
        if found is None:
            self.limiter.record(client, now)
            log.info("failed authentication from %s", client)
            raise Unauthorized(
                "The credential is not valid (unknown, revoked, expired or malformed).",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return found

    async def verify(self, db: AsyncDatabase[Doc], credential: str) -> Principal | None:
        """The principal `credential` stands for, or None; every comparison in constant time."""
        if self.admin_digest is not None and hmac.compare_digest(
            _digest(credential), self.admin_digest
        ):
            return Principal(ENV_ADMIN_USER, True)
        if self.jwks is not None and looks_like_jwt(credential):
            return await self.verify_jwt(credential)
        parts = split_key(credential)
        if parts is None:
            return None
        key_id, secret = parts
        now = time.monotonic()
        entry = self.keys.get(key_id, now)
        if entry is None:
            doc = await find_key(db, key_id)
            if doc is None:
                return None
            entry = self.keys.put(key_id, doc, now)
        if not hmac.compare_digest(hash_secret(entry.salt, secret).encode(), entry.hash.encode()):
            return None
        return entry.principal

    async def verify_jwt(self, token: str) -> Principal | None:
        assert self.jwks is not None
        settings = self.settings
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in JWT_ALGORITHMS:
                return None
            jwk = await self.jwks.key(header.get("kid"))
            if jwk is None or jwk.algorithm_name not in (alg, None):
                return None
            claims = jwt.decode(
                token,
                jwk.key,
                algorithms=[alg],
                audience=settings.oidc_audience,
                issuer=settings.oidc_issuer,
                options={"require": ["exp", "aud", "iss"]},
                leeway=30,
            )
        except jwt.PyJWTError:
            return None
        user = _claim(claims, settings.oidc_user_claim)
        if not isinstance(user, str) or not 0 < len(user) <= 200:
            return None
        admin = False
        if settings.oidc_admin_claim:
            granted = _claim(claims, settings.oidc_admin_claim)
            value = settings.oidc_admin_value
            admin = granted == value or (isinstance(granted, list) and value in granted)
        return Principal(user, admin)


AUTH = web.AppKey("auth", Authenticator)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in PUBLIC_PATHS:
        request[PRINCIPAL] = await request.app[AUTH].authenticate(request)
    return await handler(request)


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """At start: warn when auth is off, make sure an admin can get in, start OIDC."""
    authenticator = app[AUTH]
    settings = authenticator.settings
    if settings.auth == "disabled":
        log.warning("AUTH=disabled: every request acts as an admin; never expose this service")
        yield
        return
    if settings.service_admin_key is None:
        await ensure_first_key(app[DB].db, settings.data_dir)
    async with contextlib.AsyncExitStack() as stack:
        if settings.oidc_jwks_url:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            authenticator.jwks = Jwks(settings.oidc_jwks_url, session, settings.oidc_jwks_refresh_s)
            log.info("OIDC bearer tokens accepted (issuer %s)", settings.oidc_issuer)
        yield


def setup(app: web.Application, settings: Settings) -> None:
    """Install authentication on `app`: after the problem middleware, after the database."""
    app[AUTH] = Authenticator(settings)
    app.middlewares.append(auth_middleware)
    app.cleanup_ctx.append(auth_ctx)
