"""The storage shape that analysts query directly, declared once: documents and indexes.

Integer `_id`s, BSON dates (UTC), `data` as native BSON, and the indexes the list,
statistics and /metrics queries read. Every stored deployment and job is built here
(`deployment_document`, `job_document`); the Beanie documents add the collection and its
indexes on top of the same fields. The public JSON shape lives in schemas.py; keep them
apart so either can evolve without moving the other.

The `*Fields` models are plain pydantic models because a Beanie document cannot even be
validated before `init_beanie` has run; the bulk paths and benchmarks build documents
without a database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from beanie import Document, PydanticObjectId
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from pymongo import ASCENDING, IndexModel

from .lifecycle import TaskStatus

Doc = dict[str, Any]


def _index(*keys: str, **options: Any) -> IndexModel:
    return IndexModel([(k, ASCENDING) for k in keys], name="_".join(keys), **options)


class Stored(BaseModel):
    """Stored as plain BSON: enums as their strings, aliases (`_id`) as the field names."""

    model_config = ConfigDict(populate_by_name=True, use_enum_values=True, validate_default=True)

    def document(self) -> Doc:
        return self.model_dump(by_alias=True, exclude={"revision_id"})


class HistoryEntry(Stored):
    task_status: TaskStatus
    at: datetime
    # Why the job entered the status (its status_reason then), and which executor's claim
    # made it RUNNING; stored only when known.
    reason: str | None = Field(None, exclude_if=lambda v: v is None)
    executor: str | None = Field(None, exclude_if=lambda v: v is None)


class Lease(Stored):
    """A claimed job's executor, and until when the job is theirs without a heartbeat."""

    executor: str
    expires_at: datetime


class ResultFile(Stored):
    """One entry of a job's `results`. `file_id` is its GridFS file (fs.files `_id`, not in
    the public JSON); an entry listed by a bulk import has none, as an import moves no bytes,
    and is stored without the field until an upload replaces the entry."""

    name: str
    content_type: str
    size: int
    sha256: str
    created: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    file_id: PydanticObjectId | None = None

    @model_serializer(mode="wrap")
    def _no_file_no_field(self, handler: SerializerFunctionWrapHandler) -> Doc:
        doc: Doc = handler(self)
        if "file_id" in doc and doc["file_id"] is None:
            del doc["file_id"]
        return doc


class DeploymentFields(Stored):
    id: int = Field(alias="_id")
    deployment_name: str | None = None
    user_id: str
    created: datetime
    parameters: str = ""
    data: Any = Field(default_factory=dict)
    revision: int = 1


class JobFields(Stored):
    id: int = Field(alias="_id")
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
    # Executors (see lifecycle.py): null unless claimed, asked to cancel, retried.
    lease: Lease | None = None
    cancel_requested_at: datetime | None = None
    cancel_reason: str | None = None
    status_reason: str | None = None
    attempt: int = 1
    retry_of: int | None = None


def deployment_document(**fields: Any) -> Doc:
    """A deployment as stored, from its fields (`_id` included)."""
    return DeploymentFields.model_validate(fields).document()


def job_document(**fields: Any) -> Doc:
    """A job as stored; a new job's history starts with PENDING at `started_at`."""
    if "history" not in fields:
        fields["history"] = [{"task_status": TaskStatus.PENDING, "at": fields["started_at"]}]
    return JobFields.model_validate(fields).document()


class Deployment(DeploymentFields, Document):
    class Settings:
        name = "deployments"
        use_revision = False
        # Lists, as for jobs: one owner's by id; a created window (its bounds where few
        # match); by id after a cursor with the window checked in the keys, and the index
        # led by `_id` that SecantusDB needs to read the id order.
        indexes = [_index("user_id", "_id"), _index("created", "_id"), _index("_id", "created")]


class Job(JobFields, Document):
    class Settings:
        name = "jobs"
        use_revision = False
        # Lists: the equalities, then the sort keys, then a window (ESR), for each shape the
        # contract allows; tests/test_lists.py explains every one. Each index costs every
        # insert, so a window beside an equality is a filter on that equality's index.
        indexes = [
            # Each equality a list sends (the owner scope too), by id and by started_at.
            _index("user_id", "_id"),
            _index("user_id", "started_at", "_id"),  # also statistics: a user over a window
            _index("deployment_id", "_id"),
            _index("deployment_id", "started_at", "_id"),
            _index("task_status", "_id"),  # also /metrics: one count per status
            _index("task_status", "started_at", "_id"),
            _index("user_id", "task_status", "_id"),
            _index("user_id", "task_status", "started_at", "_id"),
            # No equality: by started_at, or a started window (its bounds); a finished
            # window (its bounds, where few jobs match); by id after a cursor, either window
            # checked in the keys (MongoDB takes an index for a condition on its first field
            # only), and the index led by `_id` that SecantusDB needs to read the id order.
            _index("started_at", "_id"),
            _index("finished_at", "_id"),
            _index("_id", "started_at", "finished_at"),
            # The sweeper: expired leases, cancels past their grace period.
            _index("task_status", "lease.expires_at"),
            _index("task_status", "cancel_requested_at"),
        ]


class Counter(Document):
    """`{_id: "jobs", seq: N}`: the last id handed out; only ever moved by `$inc`/`$max`."""

    id: str = Field(alias="_id")  # type: ignore[assignment]
    seq: int

    class Settings:
        name = "counters"
        use_revision = False


class ApiKeyFields(Stored):
    """An API key: only a salted hash of its secret is stored (see keys.py)."""

    id: str = Field(alias="_id")  # the key id, 16 hex digits
    salt: str
    hash: str
    user_id: str
    admin: bool
    name: str | None = None
    created: datetime
    revoked_at: datetime | None = None


class ApiKey(ApiKeyFields, Document):
    class Settings:
        name = "api_keys"
        use_revision = False


IDEMPOTENCY_TTL_S = 24 * 3600  # how long an Idempotency-Key answers its first request again


class IdempotencyRecord(Document):
    """One Idempotency-Key of one user: the request it came with and, once made, the
    answer (`status` null while the first request is still being answered)."""

    id: str = Field(alias="_id")  # type: ignore[assignment]  # sha256 of user and key
    user_id: str | None
    key: str
    request: str  # sha256 of method, path and canonical body
    created: datetime
    status: int | None = None
    body: bytes | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    class Settings:
        name = "idempotency_keys"
        use_revision = False
        indexes = [
            IndexModel([("created", ASCENDING)], expireAfterSeconds=IDEMPOTENCY_TTL_S),
        ]


# Result files live in a GridFS bucket (files and chunks collections, per the GridFS spec);
# results.py writes and reads them as raw documents.
BUCKET = "fs"
FILES, CHUNKS = f"{BUCKET}.files", f"{BUCKET}.chunks"
GRIDFS_INDEXES: dict[str, list[IndexModel]] = {
    FILES: [
        IndexModel([("filename", ASCENDING), ("uploadDate", ASCENDING)]),  # the spec's
        IndexModel([("metadata.job_id", ASCENDING)]),  # a deleted job's files
    ],
    CHUNKS: [IndexModel([("files_id", ASCENDING), ("n", ASCENDING)], unique=True)],  # the spec's
}

DOCUMENT_MODELS: list[type[Document]] = [Deployment, Job, Counter, ApiKey, IdempotencyRecord]
