"""`python -m service sweep-results`: delete result files that no job points at.

A service process that dies mid-upload leaves chunks without an `fs.files` document (it is
written last); one that dies between writing a file and swapping it into the job's
`results`, or before deleting the file it replaced, leaves a whole file no entry points
at. Nothing reads them; they only take space. Requests that fail or are cut off clean up
after themselves, so this is only for crashes, run by an operator.

Only files begun (their ObjectId's time) before `--older-than` hours ago count, so uploads
still in progress on a running service are never touched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo.asynchronous.database import AsyncDatabase

from .database import Doc, cli_database, run_database_command
from .models import CHUNKS, FILES
from .results import delete_files
from .settings import Settings
from .store import now

BATCH = 1000


async def orphan_files(db: AsyncDatabase[Doc], before: datetime) -> AsyncIterator[list[Any]]:
    """Batches of ids of GridFS files begun before `before` that no results entry names."""
    begun = {"$lt": ObjectId.from_datetime(before)}
    # Chunks without a file document: an entry only ever points at a complete file.
    groups = await db[CHUNKS].aggregate(
        [{"$match": {"files_id": begun}}, {"$group": {"_id": "$files_id"}}]
    )
    while docs := await groups.to_list(BATCH):
        ids = [d["_id"] for d in docs]
        known = {d["_id"] async for d in db[FILES].find({"_id": {"$in": ids}}, {"_id": 1})}
        if missing := [i for i in ids if i not in known]:
            yield missing
    # Files whose job has no entry pointing at them (found by _id: no index on file_id).
    old_files = db[FILES].find({"_id": begun}, {"metadata.job_id": 1})
    while files := await old_files.to_list(BATCH):
        job_ids = list({f.get("metadata", {}).get("job_id") for f in files})
        pointed: set[Any] = set()
        async for job in db.jobs.find({"_id": {"$in": job_ids}}, {"results.file_id": 1}):
            pointed.update(entry.get("file_id") for entry in job.get("results") or [])
        if unpointed := [f["_id"] for f in files if f["_id"] not in pointed]:
            yield unpointed


async def sweep(db: AsyncDatabase[Doc], before: datetime, dry_run: bool) -> list[Any]:
    """Delete (unless `dry_run`) the orphaned files; return their ids."""
    found: list[Any] = []
    async for ids in orphan_files(db, before):
        found += ids
        if not dry_run:
            await delete_files(db, ids)
    return found


def add_sweep_command(commands: Any) -> None:
    parser = commands.add_parser(
        "sweep-results",
        help="delete result files no job points at (left by a crash; talks to the database)",
    )
    parser.add_argument(
        "--older-than",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="only files begun at least this long ago (default 24: no upload still running)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list them, delete nothing")


def sweep_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.older_than < 0:
        print("--older-than must not be negative", file=sys.stderr)
        return 2
    return run_database_command(_sweep(args, settings))


async def _sweep(args: argparse.Namespace, settings: Settings) -> int:
    async with cli_database(settings) as db:
        ids = await sweep(db, now() - timedelta(hours=args.older_than), args.dry_run)
    for file_id in ids:
        print(file_id)
    verb = "found (dry run: nothing deleted)" if args.dry_run else "deleted"
    print(f"{len(ids)} orphaned result files {verb}", file=sys.stderr)
    return 0
