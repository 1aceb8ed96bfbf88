"""Command line: `python -m service serve [--host H] [--port P]`; `import`, `export`, `keys`,
`sweep-results`."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from . import cli
from .app import create_app
from .embedded import EmbeddedDatabaseError
from .keys import add_keys_command, keys_command
from .logs import configure_logging
from .settings import Settings
from .sweep import add_sweep_command, sweep_command

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (env HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (env PORT)")
    cli.add_commands(commands)
    add_keys_command(commands)
    add_sweep_command(commands)
    args = parser.parse_args(argv)
    if args.command in cli.COMMANDS:
        return cli.run(args)

    overrides = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        # One line naming each bad variable; never the value (it may be a secret).
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"invalid settings: {problems}", file=sys.stderr)
        return 2
    if args.command == "keys":
        return keys_command(args, settings)
    if args.command == "sweep-results":
        return sweep_command(args, settings)
    configure_logging(settings.log_level)
    log.info(
        "starting on http://%s:%d (database %r, %s)",
        settings.host,
        settings.port,
        settings.mongodb_db,
        "MONGODB_URL" if settings.mongodb_url else f"embedded, files in {settings.data_dir}",
    )
    try:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            print=lambda *_: None,
            access_log=None,  # service.logs writes the access log, with the request id
            shutdown_timeout=settings.shutdown_timeout_s,
        )
    except (EmbeddedDatabaseError, OSError) as exc:  # e.g. the port is taken, DATA_DIR locked
        log.error("cannot start: %s", exc)
        return 1
    except PyMongoError as exc:  # the database did not answer at start
        log.error("cannot start: the database: %s: %s", exc.__class__.__name__, exc)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
