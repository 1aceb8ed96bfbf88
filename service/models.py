"""Beanie documents: the storage shape that analysts query directly.

Integer `_id`s, BSON dates (UTC), `data` as native BSON, one index per filter and sort
the list endpoints offer. The public JSON shape lives in schemas.py; keep them apart so
either can evolve without moving the other.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from beanie import Document, PydanticObjectId
from pydantic import BaseModel, Field
from pymongo import ASCENDING, IndexModel


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    ERROR = "ERROR"


TERMINAL = frozenset({TaskStatus.FINISHED, TaskStatus.ERROR})

# Allowed transitions, and for each target the statuses it may come from.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.RUNNING, TaskStatus.ERROR}),
    TaskStatus.RUNNING: frozenset({TaskStatus.FINISHED, TaskStatus.ERROR}),
    TaskStatus.FINISHED: frozenset(),
    TaskStatus.ERROR: frozenset(),
}
PREDECESSORS: dict[TaskStatus, list[str]] = {
    target: [str(s) for s, targets in TRANSITIONS.items() if target in targets]
    for target in TaskStatus
}


def _index(*keys: str) -> IndexModel:
    return IndexModel([(k, ASCENDING) for k in keys], name="_".join(keys))


class HistoryEntry(BaseModel):
    task_status: TaskStatus
    at: datetime


class ResultFile(BaseModel):
    name: str
    content_type: str
    size: int
    sha256: str
    created: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    file_id: PydanticObjectId  # its GridFS file (fs.files _id); not in the public JSON


class Deployment(Document):
    id: int = Field(alias="_id")  # type: ignore[assignment]
    deployment_name: str | None = None
    user_id: str
    created: datetime
    parameters: str = ""
    data: Any = Field(default_factory=dict)
    revision: int = 1

    class Settings:
        name = "deployments"
        use_revision = False
        indexes = [_index("user_id", "_id"), _index("created", "_id")]


class Job(Document):
    id: int = Field(alias="_id")  # type: ignore[assignment]
    job_name: str | None = None
    user_id: str
    deployment_id: int
    started_at: datetime
    finished_at: datetime | None = None
    parameters: str = ""
    data: Any = Field(default_factory=dict)
    task_status: TaskStatus = TaskStatus.PENDING
    results: list[ResultFile] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list)
    revision: int = 1

    class Settings:
        name = "jobs"
        use_revision = False
        indexes = [
            # Each list filter with the default sort, and the started_at sort.
            _index("deployment_id", "_id"),
            _index("user_id", "_id"),
            _index("task_status", "_id"),
            _index("started_at", "_id"),
            _index("finished_at", "_id"),
            _index("deployment_id", "started_at", "_id"),
            # Statistics: one user over a time window (see README "Analytics").
            _index("user_id", "started_at", "_id"),
        ]


class Counter(Document):
    """`{_id: "jobs", seq: N}`: the last id handed out; only ever moved by `$inc`/`$max`."""

    id: str = Field(alias="_id")  # type: ignore[assignment]
    seq: int

    class Settings:
        name = "counters"
        use_revision = False


DOCUMENT_MODELS: list[type[Document]] = [Deployment, Job, Counter]
