"""Every setting of the service, in one place, read from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration; each field can be set by the upper-case environment variable."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0: any free).")
    data_dir: Path = Field(
        Path(".data"), description="Files of the embedded database (when MONGODB_URL is unset)."
    )
    mongodb_url: str | None = Field(
        None, description="MongoDB connection string; unset starts the embedded database."
    )
    mongodb_db: str = Field("jobservice", min_length=1, description="Database name.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
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
    embedded_start_timeout_s: float = Field(
        60.0, gt=0, description="How long to wait for the embedded database to answer."
    )
    cursor_secret: str | None = Field(
        None,
        description="Key that signs list cursors; unset: a random key kept in the database, "
        "shared by every instance on it.",
    )
