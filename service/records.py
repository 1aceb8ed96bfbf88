"""What one line of a bulk import may be: the import records, beside the API's schemas.

A record has the public shape (schemas.py) with ids and the service-kept fields optional,
so an export (GET /export/{kind}, one public record a line) re-imports exactly. It is
checked with the rules of the rest of the API; `complete` fills in the defaults and checks
the rules across fields. Every problem is a `RecordError` naming it, which the import
reports for that line (bulk_import.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, Field, StrictInt, StrictStr, ValidationError, model_validator

from .lifecycle import TERMINAL, TaskStatus, default_history, history_problem
from .merge_patch import MAX_DATA_DEPTH, data_errors
from .models import Doc, deployment_document, job_document
from .schemas import (
    MAX_CONTENT_TYPE,
    MAX_METADATA,
    Executor,
    JSONError,
    Name,
    OwnerId,
    Parameters,
    PositiveId,
    Reason,
    Status,
    StatusReason,
    Strict,
    Timestamp,
    check_result_name,
    error_summary,
    is_media_type,
    parse_json,
    validation_errors,
)

NDJSON = "application/x-ndjson"  # the media type of imports and exports, one record a line


class RecordError(Exception):
    """One line cannot be imported; `detail` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# A given id moves the counter past it; half of the id space stays for the service, so
# no import can leave it without ids to hand out.
MAX_GIVEN_ID = 2**62
GivenId = Annotated[StrictInt, Field(ge=1, le=MAX_GIVEN_ID)]
Revision = Annotated[StrictInt, Field(ge=1, le=2**63 - 1)]


def _media_type(value: str) -> str:
    if not is_media_type(value):
        raise ValueError(f"must be a media type such as 'text/csv', at most {MAX_CONTENT_TYPE}")
    return value


ResultName = Annotated[StrictStr, AfterValidator(check_result_name)]  # as in PUT .../results
MediaType = Annotated[StrictStr, AfterValidator(_media_type)]


class Record(Strict):
    """A line of an import: the public shape, ids and service-kept fields optional."""

    user_id: OwnerId = None  # omitted: the caller (auth.Principal.claim)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, values: Any) -> Any:
        if nulls := cls.nulls(values):  # a line's nulls are reported first, all of them
            raise ValueError(f"{', '.join(nulls)}: may not be null (leave it out instead)")
        return values

    def record_id(self) -> int | None:
        raise NotImplementedError

    def complete(self, at: datetime) -> None:
        """Fill in defaults (`at` is now) and check the rules across fields."""

    def parent_id(self) -> int | None:
        """The deployment a job belongs to."""
        return None

    def document(self, record_id: int) -> Doc:
        raise NotImplementedError

    def data_values(self) -> list[tuple[list[str | int], Any]]:
        """Every value that follows the rules of `data`, with where it is."""
        return []


class DeploymentRecord(Record):
    not_null = frozenset({"deployment_id", "created"})
    deployment_id: GivenId | None = None
    deployment_name: Name | None = None
    created: Timestamp | None = None
    parameters: Parameters = ""
    data: Any = Field(default_factory=dict)
    revision: Revision = 1

    def record_id(self) -> int | None:
        return self.deployment_id

    def complete(self, at: datetime) -> None:
        self.created = self.created or at

    def document(self, record_id: int) -> Doc:
        return deployment_document(
            _id=record_id,
            deployment_name=self.deployment_name,
            user_id=self.user_id,
            created=self.created,
            parameters=self.parameters,
            data=self.data,
            revision=self.revision,
        )

    def data_values(self) -> list[tuple[list[str | int], Any]]:
        return [(["data"], self.data)]


class HistoryRecord(Strict):
    task_status: Status
    at: Timestamp
    reason: StatusReason | None = None
    executor: Executor | None = None


class LeaseRecord(Strict):
    executor: Executor
    expires_at: Timestamp


class ResultRecord(Strict):
    name: ResultName
    content_type: MediaType
    size: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    created: Timestamp
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobRecord(Record):
    not_null = frozenset({"job_id", "started_at", "history"})
    job_id: GivenId | None = None
    job_name: Name | None = None
    deployment_id: PositiveId
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    parameters: Parameters = ""
    data: Any = Field(default_factory=dict)
    task_status: Status = TaskStatus.PENDING
    results: list[ResultRecord] = Field(default_factory=list)
    history: list[HistoryRecord] | None = None
    revision: Revision = 1
    lease: LeaseRecord | None = None
    cancel_requested_at: Timestamp | None = None
    cancel_reason: Reason | None = None
    status_reason: StatusReason | None = None
    attempt: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] = 1
    retry_of: GivenId | None = None

    def record_id(self) -> int | None:
        return self.job_id

    def parent_id(self) -> int | None:
        return self.deployment_id

    def complete(self, at: datetime) -> None:
        """The status rules of the API, for a job that may already have lived its life.

        Defaults: `started_at` now; `finished_at` the time of the last history entry; a
        missing `history` is the shortest allowed path to `task_status`, entered at
        `started_at` and, for FINISHED and ERROR, left at `finished_at`.
        """
        started = self.started_at = self.started_at or at
        status, history = self.task_status, self.history
        if status in TERMINAL and self.finished_at is None and history:
            self.finished_at = history[-1].at
        if status in TERMINAL and self.finished_at is None:
            raise RecordError(f"finished_at: required when task_status is {status.value}")
        if status not in TERMINAL and self.finished_at is not None:
            raise RecordError("finished_at: must be null unless task_status is FINISHED or ERROR")
        if self.finished_at is not None and self.finished_at < started:
            raise RecordError("finished_at: is before started_at")
        if history is None:
            history = self.history = [
                HistoryRecord.model_construct(task_status=status, at=at)
                for status, at in default_history(status, started, self.finished_at)
            ]
        entries = [(h.task_status, h.at) for h in history]
        if problem := history_problem(entries, status, started):
            raise RecordError(problem)
        if self.lease is not None and status != TaskStatus.RUNNING:
            raise RecordError("lease: only a RUNNING job has one")
        if self.cancel_requested_at is not None and status == TaskStatus.PENDING:
            raise RecordError(
                "cancel_requested_at: a PENDING job is cancelled at once, never asked"
            )
        if self.cancel_reason is not None and self.cancel_requested_at is None:
            raise RecordError("cancel_reason: given without cancel_requested_at")
        self.check_results()

    def check_results(self) -> None:
        """Entries only: a bulk import moves no file bytes (their download says so)."""
        names = set()
        for n, result in enumerate(self.results):
            if result.name in names:
                raise RecordError(f"results.{n}.name: {result.name!r} is listed twice")
            names.add(result.name)
            if len(orjson.dumps(result.metadata)) > MAX_METADATA:
                raise RecordError(f"results.{n}.metadata: larger than {MAX_METADATA} bytes")

    def document(self, record_id: int) -> Doc:
        """Its results are entries without a file (models.ResultFile)."""
        return job_document(
            _id=record_id,
            job_name=self.job_name,
            user_id=self.user_id,
            deployment_id=self.deployment_id,
            started_at=self.started_at,
            finished_at=self.finished_at,
            parameters=self.parameters,
            data=self.data,
            task_status=self.task_status,
            results=[r.model_dump() for r in self.results],
            history=[h.model_dump() for h in self.history or []],
            revision=self.revision,
            lease=self.lease.model_dump() if self.lease is not None else None,
            cancel_requested_at=self.cancel_requested_at,
            cancel_reason=self.cancel_reason,
            status_reason=self.status_reason,
            attempt=self.attempt,
            retry_of=self.retry_of,
        )

    def data_values(self) -> list[tuple[list[str | int], Any]]:
        values: list[tuple[list[str | int], Any]] = [(["data"], self.data)]
        for n, result in enumerate(self.results):
            values.append((["results", n, "metadata"], result.metadata))
        return values


def parse_record(model: type[Record], line: bytes) -> Record:
    """One line to a valid record, or a RecordError naming every problem found."""
    try:
        obj = parse_json(line)
    except JSONError as exc:
        if exc.too_deep:
            raise RecordError(f"nested deeper than {MAX_DATA_DEPTH} levels") from None
        raise RecordError(f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordError("must be a JSON object")
    try:
        record = model.model_validate(obj)
    except ValidationError as exc:
        raise RecordError(error_summary(validation_errors(exc, prefix=()))) from None
    for loc, value in record.data_values():
        if errors := data_errors(value, loc):
            raise RecordError(error_summary(errors))
    return record
