"""Every setting of the service, in one place, read from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ReadPreferenceName = Literal[
    "primary", "primaryPreferred", "secondary", "secondaryPreferred", "nearest"
]


class Settings(BaseSettings):
    """Configuration; each field can be set by the upper-case environment variable.

    The README's "Configuration" table lists every field; keep the two in step.
    """

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0: any free).")
    data_dir: Path = Field(
        Path(".data"), description="Files of the embedded database (when MONGODB_URL is unset)."
    )
    mongodb_url: str | None = Field(
        None,
        repr=False,  # may hold a password: never in logs or tracebacks
        description="MongoDB connection string; unset starts the embedded database.",
    )
    mongodb_db: str = Field("jobservice", min_length=1, description="Database name.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log level written (any case)."
    )
    mongodb_pool_size: int = Field(
        8,
        ge=1,
        le=1000,
        description="Maximum connections to the database (measured: `python -m bench pool`).",
    )
    mongodb_timeout_ms: int = Field(
        5000,
        ge=100,
        description="How long to wait for a reachable database before answering 503.",
    )
    mongodb_operation_timeout_ms: int = Field(
        30000,
        ge=0,
        description="Longest wait for one reply from the database before the request gets "
        "503 (socketTimeoutMS; 0: no limit). Bounds requests when the database hangs.",
    )
    mongodb_analytics_timeout_ms: int = Field(
        600_000,
        ge=1,
        description="Time limit of one statistics aggregation and of each batch an export "
        "reads, instead of MONGODB_OPERATION_TIMEOUT_MS (also sent as maxTimeMS): they may "
        "read a whole collection before their first answer.",
    )
    mongodb_analytics_read_preference: ReadPreferenceName = Field(
        "primary",
        description="Read preference for analytics reads (statistics, exports); "
        "secondaryPreferred moves them off the primary of a replica set.",
    )
    embedded_start_timeout_s: float = Field(
        60.0,
        gt=0,
        description="How long to wait for the embedded database to start, including for "
        "the database of a killed service to exit and free DATA_DIR.",
    )
    embedded_journal: bool = Field(
        True,
        description="Acknowledge writes to the embedded database only once they are in its "
        "log (journal=true), so they survive its crash; false is faster (measured in README).",
    )
    shutdown_timeout_s: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM/SIGINT: how long in-flight requests may take to finish.",
    )
    cursor_secret: str | None = Field(
        None,
        repr=False,
        description="Key that signs list cursors; unset: a random key kept in the database, "
        "shared by every instance on it.",
    )
    max_result_bytes: int = Field(
        1024**3, ge=0, description="Largest result file a job may store, in bytes (else 413)."
    )
    max_results_per_job: int = Field(
        1000, ge=1, description="Most result files one job may have (else 409)."
    )

    # --- executors (service/claims.py) ---
    lease_sweep_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="A RUNNING job whose lease expired, or whose cancel grace period ended, "
        "becomes ERROR within this many seconds (each instance sweeps twice as often).",
    )
    cancel_grace_s: float = Field(
        60.0,
        ge=0,
        description="How long the executor of a RUNNING job asked to cancel has to end it "
        'before the service makes it ERROR "cancelled".',
    )
    max_waiters: int = Field(
        1000,
        ge=0,
        description="Requests that may wait at once in this instance (claims and GETs with "
        "wait_s); more get 503 with Retry-After.",
    )

    # --- waiting and watching (service/changes.py, service/events.py) ---
    max_streams: int = Field(
        1000,
        ge=0,
        description="Event streams (GET /events) open at once in this instance; more get 503 "
        "with Retry-After.",
    )
    events_heartbeat_s: float = Field(
        10.0,
        gt=0,
        le=15,
        description="An event stream without events gets a comment line this often.",
    )
    events_max_s: float = Field(
        3600.0,
        gt=0,
        description="An event stream ends after this long (with an `end` event); the client "
        "reconnects with Last-Event-ID, losing nothing, and is authenticated again.",
    )
    events_backlog: int = Field(
        10_000,
        ge=1,
        description="Latest job changes kept in memory, for resumes and for streams that "
        "fall behind; a stream further behind than that is dropped (with a `dropped` event).",
    )
    events_backlog_mib: int = Field(
        64, ge=1, description="The most memory those kept changes may take, in MiB."
    )

    # --- authentication (service/auth.py) ---
    auth: Literal["enabled", "disabled"] = Field(
        "enabled", description="`disabled` lets every request act as an admin (development only)."
    )
    service_admin_key: SecretStr | None = Field(
        None, min_length=20, description="An admin key given through the environment."
    )
    oidc_jwks_url: str | None = Field(
        None, description="JWKS of an OpenID Connect provider: its bearer JWTs are accepted too."
    )
    oidc_audience: str | None = Field(None, description="Required `aud` of accepted JWTs.")
    oidc_issuer: str | None = Field(None, description="Required `iss` of accepted JWTs.")
    oidc_user_claim: str = Field("sub", min_length=1, description="Claim naming the user.")
    oidc_admin_claim: str | None = Field(
        None, description="Claim (dotted path, e.g. realm_access.roles) that can make an admin."
    )
    oidc_admin_value: str = Field("admin", description="Value of that claim that makes an admin.")
    oidc_jwks_refresh_s: float = Field(
        60.0, ge=0, description="Refetch the JWKS for an unknown key id at most this often."
    )
    auth_failures_per_minute: int = Field(
        20, ge=1, description="Failed authentications per client address per minute before 429."
    )

    # --- request limits (service/http.py) ---
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body not fully received by then is answered 408."
    )

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        """A JWKS alone would accept tokens meant for any audience: require all three."""
        if self.oidc_jwks_url and not (self.oidc_audience and self.oidc_issuer):
            raise ValueError("OIDC_JWKS_URL needs OIDC_AUDIENCE and OIDC_ISSUER too")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value


SETTINGS = web.AppKey("settings", Settings)  # the one way a handler reads a setting
