"""Client commands for a running service: `import` and `export` of NDJSON files.

With auth on, set API_KEY to a key (e.g. `API_KEY=$(cat .data/admin-key)`).

Both stream: a file of any size goes up or comes down in constant memory. Files ending in
`.gz` are (de)compressed on the fly; `-` is standard input or output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import IO, Any, cast

import aiohttp
import orjson

from .bulk_import import KINDS, ON_CONFLICT
from .pagination import DEPLOYMENT_FILTERS, JOB_FILTERS
from .records import NDJSON

DEFAULT_URL = "http://127.0.0.1:8080"
CHUNK = 256 * 1024
COMMANDS = ("import", "export")
EXPORT_FILTERS = tuple({**DEPLOYMENT_FILTERS, **JOB_FILTERS})  # the service's own names
SHOWN_ERRORS = 20
# The answer to an import comes when the last line is written: no read timeout.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    imp = commands.add_parser("import", help="stream an NDJSON file into a running service")
    imp.add_argument("file", help="NDJSON file, one record a line; '-' reads standard input")
    imp.add_argument("--kind", required=True, choices=tuple(KINDS))
    imp.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    imp.add_argument(
        "--on-conflict",
        choices=ON_CONFLICT,
        default="fail",
        help="what to do with a record whose id exists (default fail; skip to retry an import)",
    )
    imp.add_argument(
        "--errors-file", help="where failed lines are written (default FILE.errors.ndjson)"
    )
    exp = commands.add_parser("export", help="stream records of a running service as NDJSON")
    exp.add_argument("--kind", required=True, choices=tuple(KINDS))
    exp.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    exp.add_argument("-o", "--output", default="-", help="file to write (default standard output)")
    for name in EXPORT_FILTERS:
        exp.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            action="append" if name == "task_status" else "store",
            help="repeatable: any of" if name == "task_status" else None,
        )


def run(args: argparse.Namespace) -> int:
    if args.command == "import":
        return asyncio.run(
            import_file(args.url, args.kind, args.file, args.on_conflict, args.errors_file)
        )
    filters = []
    for name in EXPORT_FILTERS:
        given = getattr(args, name)  # a list for task_status (repeatable)
        values = given if isinstance(given, list) else [given]
        filters += [(name, v) for v in values if v is not None]
    return asyncio.run(export_file(args.url, args.kind, filters, args.output))


class Progress:
    """Rows and rows per second on stderr, redrawn twice a second; only on a terminal."""

    INTERVAL_S = 0.5

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.rows = 0
        self.started = self.shown = time.monotonic()
        self.visible = sys.stderr.isatty()

    def add(self, rows: int) -> None:
        self.rows += rows
        if self.visible and time.monotonic() - self.shown >= self.INTERVAL_S:
            self.show()

    def show(self, end: str = "") -> None:
        self.shown = time.monotonic()
        print(
            f"\r{self.rows:,} rows {self.verb}, {self.rate:,.0f} rows/s", end=end, file=sys.stderr
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.visible:
            self.show("\n")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.rows / max(self.elapsed, 1e-9)


def say(message: str) -> None:
    print(message, file=sys.stderr)


def client_session() -> aiohttp.ClientSession:
    """Sends the key in API_KEY (when set) as `Authorization: Bearer ...`."""
    key = os.environ.get("API_KEY", "").strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return aiohttp.ClientSession(timeout=TIMEOUT, headers=headers)


# --- import ----------------------------------------------------------------------------


def open_input(path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    if path == "-":
        return contextlib.nullcontext(sys.stdin.buffer)
    if path.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


async def import_file(
    url: str,
    kind: str,
    path: str,
    on_conflict: str = "fail",
    errors_file: str | None = None,
) -> int:
    """POST the file to /import/KIND; 0 if every line went in, 1 if some failed, 2 if the
    import itself failed. Failed lines are written to `errors_file` as they were.
    """
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(open_input(path))
        except OSError as exc:
            say(f"cannot read {path}: {exc.strerror}")
            return 2
        # Standard input can be read once: keep a copy to find the failed lines in.
        copy = stack.enter_context(tempfile.TemporaryFile()) if path == "-" else None
        progress = Progress("sent")
        report = await send(f"{url.rstrip('/')}/import/{kind}", on_conflict, source, copy, progress)
        if report is None:
            return 2
        progress.done()
        print(orjson.dumps(report).decode())
        say(
            f"{report['received']:,} received, {report['inserted']:,} inserted, "
            f"{report['replaced']:,} replaced, {report['skipped']:,} skipped, "
            f"{report['failed']:,} failed in {progress.elapsed:.1f}s"
        )
        if not report["failed"]:
            return 0
        for error in report["errors"][:SHOWN_ERRORS]:
            say(f"line {error['line']}: {error['detail']}")
        if len(report["errors"]) > SHOWN_ERRORS:
            say(f"... {len(report['errors']) - SHOWN_ERRORS} more in the report on standard output")
        target = errors_file or f"{'stdin' if path == '-' else path}.errors.ndjson"
        lines = {error["line"] for error in report["errors"]}
        if copy is not None:
            copy.seek(0)
        with open_input(path) if copy is None else copy as again:
            await asyncio.to_thread(write_lines, again, lines, target)
    which = "the failed line is" if len(lines) == 1 else f"the {len(lines):,} failed lines are"
    say(f"{which} in {target}: fix and import that file")
    if report["failed"] > len(lines):
        say(
            f"the service lists only the first {len(lines):,} of {report['failed']:,} failures; "
            "fix these, then import the whole file again with --on-conflict skip"
        )
    return 1


async def send(
    url: str, on_conflict: str, source: IO[bytes], copy: IO[bytes] | None, progress: Progress
) -> dict[str, Any] | None:
    """Stream `source` as the body; the service's report, or None (after saying why)."""

    async def body() -> AsyncIterator[bytes]:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            if copy is not None:
                await asyncio.to_thread(copy.write, chunk)
            progress.add(chunk.count(b"\n"))
            yield chunk

    params = {"on_conflict": on_conflict}
    headers = {"Content-Type": NDJSON}
    try:
        async with (
            client_session() as session,
            session.post(url, params=params, data=body(), headers=headers) as resp,
        ):
            if resp.status != 200:
                say(f"import failed: {await problem(resp)}")
                return None
            report: dict[str, Any] = await resp.json()
            return report
    except (aiohttp.ClientError, OSError) as exc:
        say(f"import failed: {exc or exc.__class__.__name__}")
        return None


def write_lines(source: IO[bytes], numbers: set[int], target: str) -> None:
    """Copy the lines with these numbers (from 1, counted as the service counts them)."""
    last = max(numbers, default=0)
    with open(target, "wb") as out:
        for number, line in enumerate(source, 1):
            if number in numbers:
                out.write(line if line.endswith(b"\n") else line + b"\n")
            if number >= last:
                return


async def problem(resp: aiohttp.ClientResponse) -> str:
    """The detail of a problem+json answer, or what there is."""
    text = await resp.text()
    if resp.status == 401:
        return f"401 {'API_KEY is not a valid key' if os.environ.get('API_KEY') else 'set API_KEY'}"
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return f"{resp.status} {orjson.loads(text)['detail']}"
    return f"{resp.status} {text[:200]}"


# --- export ----------------------------------------------------------------------------


async def export_file(url: str, kind: str, filters: list[tuple[str, str]], output: str) -> int:
    """GET /export/KIND into `output`; a file appears only once it is complete."""
    partial = f"{output}.part"
    progress = Progress("received")
    try:
        async with (
            client_session() as session,
            session.get(f"{url.rstrip('/')}/export/{kind}", params=filters) as resp,
        ):
            if resp.status != 200:
                say(f"export failed: {await problem(resp)}")
                return 2
            with open_output(output, partial) as out:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    await asyncio.to_thread(out.write, chunk)
                    progress.add(chunk.count(b"\n"))
    except (aiohttp.ClientError, OSError) as exc:
        say(f"export failed after {progress.rows:,} rows: {exc or exc.__class__.__name__}")
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        return 2
    if output != "-":
        os.replace(partial, output)
    progress.done()
    say(f"{progress.rows:,} rows exported in {progress.elapsed:.1f}s")
    return 0


@contextlib.contextmanager
def open_output(output: str, partial: str) -> Iterator[IO[bytes]]:
    if output == "-":
        stdout = sys.stdout.buffer
        yield stdout
        stdout.flush()
        return
    if output.endswith(".gz"):
        with gzip.open(partial, "wb") as packed:
            yield cast(IO[bytes], packed)
    else:
        with open(partial, "wb") as out:
            yield out
