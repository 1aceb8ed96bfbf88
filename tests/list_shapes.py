"""Every list shape the contract allows, and data to run them on (tests and bench/pages.py).

A shape is one filter alone, or the owner scope (`user_id`, always there for a non-admin
caller) with one other filter, and one sort. Its reads are what `ListQuery.reads()` gives
for the first page and for a page after a cursor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from multidict import MultiDict

from service.models import deployment_document, job_document
from service.pagination import (
    DEPLOYMENT_FILTERS,
    DEPLOYMENT_SORTS,
    JOB_FILTERS,
    JOB_SORTS,
    ListQuery,
    parse_list_query,
)

Doc = dict[str, Any]
OWNER = "u1"
USERS = [f"u{i}" for i in range(5)]
DEPLOYMENTS_WITH_JOBS = 20  # deployment d belongs to USERS[d % 5], and so do its jobs
BASE, SPAN = datetime(2026, 1, 1, tzinfo=UTC), timedelta(days=100)
# Windows over most of the data: on MongoDB the plan in sort order then fills a page long
# before a range scan plus a sort of every match could finish.
FROM, TO = BASE + SPAN / 8, BASE + SPAN * 7 / 8


def _at(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


JOB_SHAPES: dict[str, list[tuple[str, str]]] = {
    "no filter": [],
    "user_id": [("user_id", OWNER)],
    "deployment_id": [("deployment_id", "6")],
    "one task_status": [("task_status", "FINISHED")],
    "two task_status": [("task_status", "FINISHED"), ("task_status", "ERROR")],
    "started window": [("started_after", _at(FROM)), ("started_before", _at(TO))],
    "finished_after": [("finished_after", _at(FROM))],
}
DEPLOYMENT_SHAPES: dict[str, list[tuple[str, str]]] = {
    "no filter": [],
    "user_id": [("user_id", OWNER)],
    "created window": [("created_after", _at(FROM)), ("created_before", _at(TO))],
}


@dataclass(frozen=True)
class Shape:
    collection: str  # "jobs" or "deployments"
    filter: str  # a key of JOB_SHAPES or DEPLOYMENT_SHAPES
    owner: bool  # a non-admin caller: the owner scope applies
    sort: str

    def __str__(self) -> str:
        scope = "owner" if self.owner else "admin"
        return f"{self.collection}: {scope}, {self.filter}, sort={self.sort}"

    def query(self, key: bytes, cursor: str | None = None) -> ListQuery:
        """What the list handler parses for this shape (`cursor`: a later page)."""
        shapes, filters, sorts = (
            (JOB_SHAPES, JOB_FILTERS, JOB_SORTS)
            if self.collection == "jobs"
            else (DEPLOYMENT_SHAPES, DEPLOYMENT_FILTERS, DEPLOYMENT_SORTS)
        )
        params = MultiDict([*shapes[self.filter], ("sort", self.sort)])
        if cursor is not None:
            params["cursor"] = cursor
        return parse_list_query(
            params, filters, sorts, key, {"user_id": OWNER} if self.owner else {}
        )


def list_shapes() -> list[Shape]:
    shapes = []
    for collection, filters, sorts in [
        ("jobs", JOB_SHAPES, ["id", "-id", "started_at", "-started_at"]),
        ("deployments", DEPLOYMENT_SHAPES, ["id", "-id"]),
    ]:
        for name in filters:
            for owner in (False, True):
                if owner and name == "user_id":
                    continue  # the owner scope is that filter already
                shapes += [Shape(collection, name, owner, sort) for sort in sorts]
    return shapes


def shape_data(jobs: int, deployments: int, seed: int = 1) -> tuple[list[Doc], list[Doc]]:
    """Deployments and jobs in every status, their times at random (not in id order)."""
    rnd = random.Random(seed)

    def when() -> datetime:
        t = BASE + SPAN * rnd.random()
        return t.replace(microsecond=t.microsecond // 1000 * 1000)

    deps = [
        deployment_document(_id=d, user_id=USERS[d % len(USERS)], created=when())
        for d in range(1, deployments + 1)
    ]
    made = []
    for i in range(1, jobs + 1):
        dep = rnd.randint(1, DEPLOYMENTS_WITH_JOBS)
        status = rnd.choice(["PENDING", "RUNNING", "FINISHED", "FINISHED", "FINISHED", "ERROR"])
        started = when()
        finished = None
        if status in ("FINISHED", "ERROR"):
            finished = started + timedelta(seconds=rnd.randint(1, 3600))
        made.append(
            job_document(
                _id=i,
                user_id=USERS[dep % len(USERS)],
                deployment_id=dep,
                task_status=status,
                started_at=started,
                finished_at=finished,
            )
        )
    return deps, made
