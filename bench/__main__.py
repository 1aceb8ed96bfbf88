"""`make bench`: run every benchmark against one database and print one table.

`python -m bench [NAME ...] [--quick]`; NAME is a module of this package (api, bulk, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import sys
from datetime import UTC, datetime

from .common import BenchEnv, Row, database, print_table

# Each issue adds its module here.
BENCHES = ["api", "results", "bulk", "analytics", "auth", "claims", "events"]


async def main(names: list[str], quick: bool) -> int:
    rows: list[Row] = []
    with database() as url:
        env = BenchEnv(url, quick=quick)
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            print(f"-- running bench/{name}.py", file=sys.stderr, flush=True)
            rows.extend(await module.run(env))
    print(
        f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"database: {'MONGODB_URL' if 'MONGODB_URL' in os.environ else 'secantusd-py'}\n"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", default=BENCHES)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.names, args.quick)))
