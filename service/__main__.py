"""Command line: `python -m service serve [--host H] [--port P]`."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web
from pydantic import ValidationError

from .app import create_app
from .auth import add_keys_command, keys_command
from .database import EmbeddedDatabaseError
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (env HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (env PORT)")
    add_keys_command(commands)
    args = parser.parse_args(argv)

    overrides = {k: v for k in ("host", "port") if (v := getattr(args, k, None)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"invalid settings: {problems}", file=sys.stderr)
        return 2
    if args.command == "keys":
        return keys_command(args, settings)
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
