"""What the API accepts and returns: create and patch bodies, list queries, public records.

Bodies are parsed once (pydantic-core's JSON parser keeps integers exact, so a too-large
integer is reported as such instead of silently becoming a float) and validated once.
The lines of a bulk import are records.py, built on the same types, `Strict` and
`parse_json`.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, TypeVar

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainValidator,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from .errors import Loc, MalformedJSON, ValidationFailed, error
from .lifecycle import (
    LEASE_S_DEFAULT,
    LEASE_S_MAX,
    LEASE_S_MIN,
    MAX_REASON,
    MAX_STATUS_REASON,
    TaskStatus,
)
from .merge_patch import MAX_DATA_DEPTH, data_errors

MAX_NAME = 200
MAX_PARAMETERS = 64 * 1024


def to_millis(value: datetime) -> datetime:
    """UTC, truncated to the millisecond BSON stores, so what we answer is what we keep."""
    try:
        value = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside the years 0001 to 9999 in UTC") from None
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_rfc3339(value: Any) -> datetime:
    """An RFC 3339 timestamp with its offset, in UTC at millisecond precision; else ValueError."""
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 timestamp with an offset, e.g. 2026-11-29T16:00:00Z")
    try:
        parsed = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("is not a valid date and time") from None
    return to_millis(parsed)


Timestamp = Annotated[datetime, Field(strict=False), PlainValidator(parse_rfc3339)]
UserId = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME)]


def _not_null(value: str | None) -> str:
    if value is None:
        raise ValueError("may not be null; omit it to mean yourself")
    return value


# On create: omitted means the caller (service/auth.py claim_owner); null is refused.
OwnerId = Annotated[UserId | None, AfterValidator(_not_null)]
Name = Annotated[StrictStr, Field(max_length=MAX_NAME)]
Parameters = Annotated[StrictStr, Field(max_length=MAX_PARAMETERS)]
PositiveId = Annotated[StrictInt, Field(ge=1, le=2**63 - 1)]
Status = Annotated[TaskStatus, Field(strict=False)]  # from its string


class Strict(BaseModel):
    """No type coercion; unknown fields are refused by name; `not_null` fields may be left
    out but not given as null (each subclass says when and how it reports them)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    not_null: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def nulls(cls, values: Any) -> list[str]:
        """The `not_null` fields that `values` (the input, before validation) gives as null."""
        if not isinstance(values, dict):
            return []
        return sorted(name for name in cls.not_null if name in values and values[name] is None)


class Body(Strict):
    """Strict request body: unknown and service-owned fields are refused by name."""

    owned: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="wrap")
    @classmethod
    def _no_nulls(cls, values: Any, handler: ModelWrapValidatorHandler[Body]) -> Body:
        body = handler(values)  # a body's nulls are reported once its fields are valid
        if nulls := cls.nulls(values):
            raise ValueError(f"{nulls[0]} may not be null")
        return body

    @model_validator(mode="before")
    @classmethod
    def _no_owned_fields(cls, values: Any) -> Any:
        if isinstance(values, dict):
            given = sorted(cls.owned & values.keys())
            if given:
                raise ValueError(f"{', '.join(given)}: set by the service, may not be given")
        return values


class DeploymentCreate(Body):
    owned = frozenset({"deployment_id", "created", "revision"})
    user_id: OwnerId = None
    deployment_name: Name | None = None
    parameters: Parameters = ""
    data: Any = Field(default_factory=dict)


class DeploymentPatch(Body):
    owned = DeploymentCreate.owned | {"user_id"}
    deployment_name: Name | None = None
    parameters: Parameters | None = None
    data: Any = None


EXECUTOR_FIELDS = frozenset(
    {"lease", "cancel_requested_at", "cancel_reason", "status_reason", "attempt", "retry_of"}
)
Reason = Annotated[StrictStr, Field(min_length=1, max_length=MAX_REASON)]
# A status_reason as stored and exported (a cancel's reason with its prefix), for imports.
StatusReason = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STATUS_REASON)]
Executor = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME)]
LeaseSeconds = Annotated[StrictInt, Field(ge=LEASE_S_MIN, le=LEASE_S_MAX)]


class JobCreate(Body):
    owned = (
        frozenset({"job_id", "revision", "history", "results", "task_status", "finished_at"})
        | EXECUTOR_FIELDS
    )
    user_id: OwnerId = None
    deployment_id: PositiveId
    job_name: Name | None = None
    parameters: Parameters = ""
    data: Any = Field(default_factory=dict)
    started_at: Timestamp | None = None
    not_null = frozenset({"started_at"})


class JobPatch(Body):
    owned = frozenset({"job_id", "revision", "history", "results"}) | (
        EXECUTOR_FIELDS - {"status_reason"}
    )
    job_name: Name | None = None
    parameters: Parameters | None = None
    data: Any = None
    task_status: Status | None = None
    finished_at: Timestamp | None = None
    status_reason: Reason | None = None  # only with task_status: why the job has it
    not_null = frozenset({"task_status", "finished_at"})

    @model_validator(mode="after")
    def _reason_with_status(self) -> JobPatch:
        if "status_reason" in self.model_fields_set and self.task_status is None:
            raise ValueError("status_reason may only be given with task_status")
        return self


class ClaimBody(Body):
    """POST /jobs/claim: which executor asks, for how long, and for which jobs."""

    executor: Executor
    lease_s: LeaseSeconds = LEASE_S_DEFAULT
    deployment_id: PositiveId | None = None
    user_id: UserId | None = None
    wait_s: Annotated[float, Field(ge=0, le=60)] = 0.0


class HeartbeatBody(Body):
    executor: Executor
    lease_s: LeaseSeconds = LEASE_S_DEFAULT


class NoBody(Body):
    """An endpoint that takes no fields: an empty body or `{}`."""


class CancelBody(Body):
    reason: Reason | None = None


M = TypeVar("M", bound=Body)


# --- result entries (PUT /jobs/{job_id}/results/{name}, and imported jobs' `results`) ---

MAX_METADATA = 4096  # bytes of a result's metadata as JSON
MAX_CONTENT_TYPE = 255
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
MEDIA_TYPE = re.compile(
    rf'{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"[^"\\\x00-\x1f\x7f]*"))*'
)


def check_result_name(name: str) -> str:
    """1-200 characters, no `/`, no control characters; `.` and `..` no client can address.
    Anything else is a ValueError saying why (its caller says where)."""
    if not 1 <= len(name) <= MAX_NAME:
        raise ValueError(f"must be 1 to {MAX_NAME} characters")
    if "/" in name:
        raise ValueError("may not contain '/'")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise ValueError("may not contain control characters")
    if name in (".", ".."):
        raise ValueError("may not be '.' or '..'")
    return name


def is_media_type(value: str) -> bool:
    """A media type such as `text/csv; charset=utf-8`, at most MAX_CONTENT_TYPE characters."""
    return len(value) <= MAX_CONTENT_TYPE and MEDIA_TYPE.fullmatch(value) is not None


class JSONError(ValueError):
    """Not JSON as the API reads it (the parser's message); `too_deep`: nested too deep to
    parse at all (deeper than MAX_DATA_DEPTH, the limit of `data`)."""

    def __init__(self, message: str, *, too_deep: bool) -> None:
        super().__init__(message)
        self.too_deep = too_deep


def parse_json(raw: bytes) -> Any:
    """JSON as every part of the API reads it: integers exact, no NaN or Infinity."""
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise JSONError(str(exc), too_deep="recursion limit" in str(exc)) from None


def validate_body(model: type[M], raw: bytes) -> M:
    """Parse and validate a request body; every failure is a 400 or a 422 naming the field."""
    try:
        obj = parse_json(raw)
    except JSONError as exc:
        if exc.too_deep:
            raise ValidationFailed(
                f"body: nested deeper than {MAX_DATA_DEPTH} levels",
                errors=[error(["body"], f"nested deeper than {MAX_DATA_DEPTH} levels")],
            ) from None
        raise MalformedJSON(f"The body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValidationFailed(
            "body: must be a JSON object", errors=[error(["body"], "must be a JSON object")]
        )
    try:
        parsed = model.model_validate(obj)
    except ValidationError as exc:
        raise ValidationFailed(error_summary(errs := validation_errors(exc)), errors=errs) from None
    if "data" in parsed.model_fields_set and (errs := data_errors(obj["data"], ["body", "data"])):
        raise ValidationFailed(error_summary(errs), errors=errs)
    return parsed


def validation_errors(exc: ValidationError, prefix: Loc = ("body",)) -> list[dict[str, Any]]:
    """pydantic's errors as problem+json `errors`, their locations under `prefix`."""
    out = []
    for e in exc.errors(include_url=False, include_input=False):
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append(error([*prefix, *e["loc"]], msg))
    return out


def error_summary(errors: list[dict[str, Any]]) -> str:
    """The first five as one `detail` line: `loc: message` (the message alone without loc)."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in errors[:5]
    )


# --- public shape -------------------------------------------------------------------


def rfc3339(value: datetime | None) -> str | None:
    """Always UTC, always milliseconds, always 'Z': one spelling for every timestamp."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T"
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}.{value.microsecond // 1000:03d}Z"
    )


def public_deployment(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "deployment_id": doc["_id"],
        "deployment_name": doc.get("deployment_name"),
        "user_id": doc["user_id"],
        "created": rfc3339(doc["created"]),
        "parameters": doc.get("parameters", ""),
        "data": doc.get("data", {}),
        "revision": doc.get("revision", 1),
    }


def public_job(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_id": doc["_id"],
        "job_name": doc.get("job_name"),
        "user_id": doc["user_id"],
        "deployment_id": doc["deployment_id"],
        "started_at": rfc3339(doc["started_at"]),
        "finished_at": rfc3339(doc.get("finished_at")),
        "parameters": doc.get("parameters", ""),
        "data": doc.get("data", {}),
        "task_status": doc.get("task_status", "PENDING"),
        "results": [public_result(r) for r in doc.get("results") or []],
        "history": [public_history_entry(h) for h in doc.get("history") or []],
        "revision": doc.get("revision", 1),
        "lease": public_lease(doc.get("lease")),
        "cancel_requested_at": rfc3339(doc.get("cancel_requested_at")),
        "cancel_reason": doc.get("cancel_reason"),
        "status_reason": doc.get("status_reason"),
        "attempt": doc.get("attempt", 1),
        "retry_of": doc.get("retry_of"),
    }


def public_history_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """`reason` and `executor` appear only on the entries that have them."""
    out = {"task_status": entry["task_status"], "at": rfc3339(entry["at"])}
    for optional in ("reason", "executor"):
        if entry.get(optional) is not None:
            out[optional] = entry[optional]
    return out


def public_lease(lease: dict[str, Any] | None) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {"executor": lease["executor"], "expires_at": rfc3339(lease["expires_at"])}


def public_result(entry: dict[str, Any]) -> dict[str, Any]:
    """One entry of a job's `results`; where its bytes live (`file_id`) stays private."""
    return {
        "name": entry["name"],
        "content_type": entry["content_type"],
        "size": entry["size"],
        "sha256": entry["sha256"],
        "created": rfc3339(entry["created"]),
        "metadata": entry.get("metadata", {}),
    }
