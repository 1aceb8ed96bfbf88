"""Command line: `python -m service serve [--host H] [--port P]`; `import`, `export`."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web
from pydantic import ValidationError

from . import cli
from .app import create_app
from .database import EmbeddedDatabaseError
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (env HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (env PORT)")
    cli.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in cli.COMMANDS:
        return cli.run(args)

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"invalid settings: {problems}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            print=lambda *_: None,
            access_log_format='%a "%r" %s %b %Tfs',
        )
    except EmbeddedDatabaseError as exc:
        logging.getLogger("service").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
