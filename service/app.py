"""create_app(settings): the one place the service is assembled, for `serve` and the tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from . import auth, bulk_export, bulk_import, claims, deployments, events, jobs, ops, results, stats
from .database import DB, Database, cursor_secret, init_database, make_client
from .embedded import EmbeddedDatabase, embedded_server
from .errors import problem_middleware
from .http import HEADER_LIMITS, MAX_JSON_BODY
from .logs import add_request_id_header, install_log_redaction, request_middleware
from .settings import SETTINGS, Settings

log = logging.getLogger(__name__)


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
        app[DB] = Database(client, db, key, url, embedded)
        log.info("database %r ready", settings.mongodb_db)
        yield


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[request_middleware, problem_middleware],
        client_max_size=MAX_JSON_BODY,
        handler_args=HEADER_LIMITS,
    )
    app.on_response_prepare.append(add_request_id_header)
    install_log_redaction()
    app[SETTINGS] = settings
    app.cleanup_ctx.append(database_ctx)
    auth.setup(app, settings)  # after the problem middleware and the database
    app.cleanup_ctx.append(events.changes_ctx)  # the change stream, after the database
    app.on_shutdown.append(events.end_waits)
    app.cleanup_ctx.append(claims.executors_ctx)  # after the change stream
    app.cleanup_ctx.append(jobs.creates_ctx)  # the create batchers, after the database
    app.cleanup_ctx.append(deployments.creates_ctx)
    app.add_routes(ops.routes)
    app.add_routes(deployments.routes)
    app.add_routes(claims.routes)  # /jobs/claim before /jobs/{job_id}
    app.add_routes(jobs.routes)
    app.add_routes(results.routes)
    app.add_routes(bulk_import.routes)
    app.add_routes(bulk_export.routes)
    app.add_routes(stats.routes)
    app.add_routes(events.routes)
    return app
