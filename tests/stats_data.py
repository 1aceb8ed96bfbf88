"""A generated job data set, and its statistics computed independently in plain Python.

The documents are in the storage shape `jobs.insert_jobs` writes (history, finished_at,
results) and are inserted directly with the driver, which is much faster than the API.
The reference functions here share no code with service/stats.py, so agreement between
the two is evidence for both.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pymongo.asynchronous.database import AsyncDatabase

Doc = dict[str, Any]
STATUSES = ["PENDING", "RUNNING", "FINISHED", "ERROR"]
TERMINAL = {"FINISHED", "ERROR"}
# Spans the EU summer-time change (2026-03-29) and a month end.
BASE = datetime(2026, 3, 24, tzinfo=UTC)
USERS = ["alice", "bob", "carol"]
DEPLOYMENTS = [1, 2, 3, 4]  # deployment 4 never gets a job


def job_doc(
    job_id: int,
    deployment_id: int,
    user_id: str,
    started_at: datetime,
    steps: Iterable[tuple[str, int]] = (),
    result_sizes: Iterable[int] = (),
) -> Doc:
    """A job whose history is PENDING at `started_at`, then each (status, ms later) step."""
    history = [{"task_status": "PENDING", "at": started_at}]
    at = started_at
    for status, after_ms in steps:
        at += timedelta(milliseconds=after_ms)
        history.append({"task_status": status, "at": at})
    status = str(history[-1]["task_status"])
    return {
        "_id": job_id,
        "job_name": None,
        "user_id": user_id,
        "deployment_id": deployment_id,
        "started_at": started_at,
        "finished_at": at if status in TERMINAL else None,
        "parameters": "",
        "data": {},
        "task_status": status,
        "results": [
            {
                "name": f"out-{i}.bin",
                "content_type": "application/octet-stream",
                "size": size,
                "sha256": "0" * 64,
                "created": at,
                "metadata": {},
            }
            for i, size in enumerate(result_sizes)
        ],
        "history": history,
        "revision": len(history),
    }


def deployment_doc(deployment_id: int) -> Doc:
    return {
        "_id": deployment_id,
        "deployment_name": f"dep-{deployment_id}",
        "user_id": USERS[deployment_id % len(USERS)],
        "created": BASE - timedelta(days=1),
        "parameters": "",
        "data": {},
        "revision": 1,
    }


def generate(n: int = 240, seed: int = 4) -> list[Doc]:
    """`n` jobs over 12 days in every lifecycle state, some with result files."""
    rnd = random.Random(seed)
    docs = []
    for job_id in range(1, n + 1):
        started = BASE + timedelta(milliseconds=rnd.randrange(12 * 86_400_000))
        queue, run = rnd.randrange(1, 600_000), rnd.randrange(1, 7_200_000)
        path = rnd.choices(
            [[], [("RUNNING", queue)], [("ERROR", queue)], [("RUNNING", queue), ("FINISHED", run)]]
            + [[("RUNNING", queue), ("ERROR", run)]],
            weights=[1, 1, 1, 5, 2],
        )[0]
        sizes = [rnd.randrange(1, 10**6) for _ in range(rnd.choice([0, 0, 1, 3]))] if path else []
        deployment = rnd.choice(DEPLOYMENTS[:3])
        docs.append(job_doc(job_id, deployment, rnd.choice(USERS), started, path, sizes))
    return docs


async def load(db: AsyncDatabase[Doc]) -> list[Doc]:
    """Insert the deployments and the generated jobs; return the jobs."""
    docs = generate()
    await db.deployments.insert_many([deployment_doc(d) for d in DEPLOYMENTS])
    await db.jobs.insert_many(docs)
    return docs


# --- the reference ----------------------------------------------------------------------


def entered(doc: Doc, status: str) -> datetime | None:
    return next((h["at"] for h in doc["history"] if h["task_status"] == status), None)


def durations(doc: Doc) -> tuple[float | None, float | None]:
    """(queue, run) seconds from the history: PENDING → RUNNING, RUNNING → FINISHED/ERROR."""
    pending, running = entered(doc, "PENDING"), entered(doc, "RUNNING")
    end = next((h["at"] for h in doc["history"] if h["task_status"] in TERMINAL), None)
    queue = _seconds(pending, running)
    return queue, _seconds(running, end)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return ((end - start) // timedelta(milliseconds=1)) / 1000


def bucket(at: datetime, interval: str, tz: str) -> datetime:
    """The UTC instant at which `at`'s hour/day/week (from Monday)/month begins in `tz`."""
    local = at.astimezone(ZoneInfo(tz))
    if interval == "hour":
        # Hours begin at whole local hours, also in zones offset by a fraction of an hour.
        start = local.replace(minute=0, second=0, microsecond=0)
    else:
        day = local.date()
        if interval == "week":
            day -= timedelta(days=day.weekday())
        elif interval == "month":
            day = day.replace(day=1)
        start = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz))
    return start.astimezone(UTC)


def nearest_rank(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(percent * len(ordered) / 100) - 1]


def summary(values: list[float]) -> Doc:
    if not values:
        return {"samples": 0, "min": None, "avg": None, "p50": None, "p95": None, "max": None}
    return {
        "samples": len(values),
        "min": min(values),
        "avg": sum(values) / len(values),
        "p50": nearest_rank(values, 50),
        "p95": nearest_rank(values, 95),
        "max": max(values),
    }


def metrics(docs: list[Doc]) -> Doc:
    by_status = {s: sum(d["task_status"] == s for d in docs) for s in STATUSES}
    ended = by_status["FINISHED"] + by_status["ERROR"]
    pairs = [durations(d) for d in docs]
    return {
        "count": len(docs),
        "by_status": by_status,
        "error_rate": by_status["ERROR"] / ended if ended else None,
        "queue_time_s": summary([q for q, _ in pairs if q is not None]),
        "run_time_s": summary([r for _, r in pairs if r is not None]),
    }


def expected_stats(
    docs: list[Doc], group_by: tuple[str, ...] = (), interval: str | None = None, tz: str = "UTC"
) -> Doc:
    """What `GET /stats/jobs` must answer for these (already filtered) jobs."""
    groups: dict[tuple[Any, ...], list[Doc]] = defaultdict(list)
    for doc in docs:
        key = tuple(doc[f] for f in group_by)
        if interval:
            key += (bucket(doc["started_at"], interval, tz),)
        groups[key].append(doc)
    names = [*group_by, "bucket"] if interval else list(group_by)
    rendered = []
    for key in sorted(groups):
        values = [rfc3339(v) if isinstance(v, datetime) else v for v in key]
        rendered.append({"key": dict(zip(names, values, strict=True)), **metrics(groups[key])})
    return {
        "group_by": list(group_by),
        "interval": interval,
        "tz": tz,
        "percentiles": "exact",
        "groups": rendered,
        "totals": metrics(docs),
    }


def rfc3339(value: datetime) -> str:
    value = value.astimezone(UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}Z"


def rounded(value: Any) -> Any:
    """Floats to 9 significant digits, so sums taken in another order compare equal."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value
