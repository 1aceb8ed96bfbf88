"""create_app(settings): the one place the service is assembled, for `serve` and the tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from . import auth, bulk_export, bulk_import, deployments, jobs, metrics, results, stats
from .database import DB, Database, cursor_secret, init_database, make_client
from .embedded import EmbeddedDatabase, embedded_server
from .errors import RETRY_AFTER_S, DatabaseUnavailable, problem_middleware
from .http import MAX_JSON_BODY, json_response
from .logs import add_request_id_header, request_middleware
from .settings import SETTINGS, Settings

log = logging.getLogger(__name__)

SPEC_PATHS = [
    Path(__file__).resolve().parent.parent / "openapi.yaml",  # source checkout
    Path("openapi.yaml").resolve(),  # container: WORKDIR holds it
]


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the embedded database if no MONGODB_URL is set; connect; create indexes."""
    settings = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        url = settings.mongodb_url
        embedded: EmbeddedDatabase | None = None
        if url is None:
            log.info("MONGODB_URL is not set: starting the embedded database")
            embedded = await stack.enter_async_context(
                embedded_server(
                    settings.data_dir, settings.embedded_start_timeout_s, settings.embedded_journal
                )
            )
            url = embedded.url
        client = make_client(url, settings)
        stack.push_async_callback(client.close)
        db = client[settings.mongodb_db]
        await init_database(db)
        key = await cursor_secret(db, settings.cursor_secret)
        app[DB] = Database(client, db, key, embedded)
        log.info("database %r ready", settings.mongodb_db)
        yield


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    database = request.app[DB]
    if database.embedded is not None and database.embedded.exit_code is not None:
        raise DatabaseUnavailable(
            f"The embedded database exited (code {database.embedded.exit_code}); "
            "restart the service, its data is kept.",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    try:
        await database.client.admin.command("ping")
    except Exception as exc:
        log.warning("readiness check failed: %s", exc.__class__.__name__)
        raise DatabaseUnavailable(
            "The database does not answer.", headers={"Retry-After": RETRY_AFTER_S}
        ) from None
    return json_response({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    for path in SPEC_PATHS:
        if path.exists():
            return web.Response(body=path.read_bytes(), content_type="application/yaml")
    raise web.HTTPNotFound()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[request_middleware, problem_middleware],
        client_max_size=MAX_JSON_BODY,
        handler_args=auth.HEADER_LIMITS,
    )
    app.on_response_prepare.append(add_request_id_header)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(database_ctx)
    auth.setup(app, settings)  # after the problem middleware and the database
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.yaml", openapi)
    app.add_routes(deployments.routes)
    app.add_routes(jobs.routes)
    app.add_routes(metrics.routes)
    app.add_routes(results.routes)
    app.add_routes(bulk_import.routes)
    app.add_routes(bulk_export.routes)
    app.add_routes(stats.routes)
    return app
