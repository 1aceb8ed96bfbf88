"""`sweep-results`: files a crash left behind are found and deleted; nothing a job points at,
and no upload that may still be running, is touched."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo.asynchronous.database import AsyncDatabase

from service.results import CHUNK_SIZE
from service.settings import Settings
from service.store import now
from service.sweep import sweep

from .helpers import Client
from .test_auth import run_cli
from .test_results import counts, new_job, put, url

Doc = dict[str, Any]


async def crash_leftover(
    db: AsyncDatabase[Doc], begun: datetime, job_id: int | None = None
) -> ObjectId:
    """Two chunks, as a crash mid-upload leaves them; with `job_id`, also the file document,
    as a crash between writing the file and swapping it into the job leaves it."""
    file_id = ObjectId.from_datetime(begun)
    await db["fs.chunks"].insert_many(
        [{"files_id": file_id, "n": n, "data": b"x" * CHUNK_SIZE} for n in range(2)]
    )
    if job_id is not None:
        await db["fs.files"].insert_one(
            {
                "_id": file_id,
                "length": 2 * CHUNK_SIZE,
                "chunkSize": CHUNK_SIZE,
                "uploadDate": begun,
                "filename": "lost",
                "metadata": {"job_id": job_id, "name": "lost"},
            }
        )
    return file_id


async def test_sweep_deletes_only_what_no_job_points_at(
    client: Client, db: AsyncDatabase[Doc]
) -> None:
    job_id = await new_job(client)
    bodies = {"kept": b"a" * (CHUNK_SIZE + 1), "replaced": b"b" * 10}
    for name, body in bodies.items():
        assert (await put(client, job_id, name, body)).status == 201
    bodies["replaced"] = b"c" * 20
    assert (await put(client, job_id, "replaced", bodies["replaced"])).status == 200
    stored = await counts(client)  # (2 files, 3 chunks)

    two_days_ago = now() - timedelta(days=2)
    old = {
        await crash_leftover(db, two_days_ago),  # chunks only
        await crash_leftover(db, two_days_ago + timedelta(seconds=1), job_id),  # no entry
        await crash_leftover(db, two_days_ago + timedelta(seconds=2), 999),  # no such job
    }
    young = await crash_leftover(db, now() - timedelta(minutes=1))  # may still be uploading
    with_leftovers = (stored[0] + 2, stored[1] + 8)
    assert await counts(client) == with_leftovers

    an_hour_ago = now() - timedelta(hours=1)
    assert set(await sweep(db, an_hour_ago, dry_run=True)) == old
    assert await counts(client) == with_leftovers  # a dry run deletes nothing

    assert set(await sweep(db, an_hour_ago, dry_run=False)) == old
    assert await counts(client) == (stored[0], stored[1] + 2)  # the young chunks stay
    assert await sweep(db, an_hour_ago, dry_run=False) == []

    # Even counting every file as old, the ones the job points at are kept.
    assert await sweep(db, now() + timedelta(hours=1), dry_run=False) == [young]
    assert await counts(client) == stored
    for name, body in bodies.items():
        assert await (await client.get(url(job_id, name))).read() == body


async def test_sweep_results_command(
    client: Client, db: AsyncDatabase[Doc], settings: Settings, mongodb_url: str
) -> None:
    leftover = await crash_leftover(db, now() - timedelta(days=2))
    env = {"MONGODB_URL": mongodb_url, "MONGODB_DB": settings.mongodb_db}

    code, out, err = await run_cli("sweep-results", "--dry-run", env=env)
    assert code == 0, err
    assert out.split() == [str(leftover)] and "1 orphaned result files found" in err
    assert await counts(client) == (0, 2)

    code, out, err = await run_cli("sweep-results", env=env)
    assert code == 0, err
    assert out.split() == [str(leftover)] and "1 orphaned result files deleted" in err
    assert await counts(client) == (0, 0)

    code, _, err = await run_cli("sweep-results", "--older-than", "-1", env=env)
    assert code == 2 and "--older-than" in err
