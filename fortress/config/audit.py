"""The audit trail and the database behind keys and audit records."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fortress.config.base import ConfigModel


class Audit(ConfigModel):
    """The audit trail: required headers, body capture, journal and where records are shipped."""

    enabled: bool = True
    required_headers: list[str] = Field(
        default_factory=lambda: ["x-llm-source", "x-llm-user", "x-llm-request-type"]
    )
    # Accept the body's standard `user` field as the end user when x-llm-user is missing.
    user_from_body: bool = False
    body_capture: Literal["none", "metadata", "full"] = "none"
    redact_fields: list[str] = Field(default_factory=lambda: ["messages", "prompt"])
    journal_dir: str | None = Field(None, description="default: <state_dir>/journal")
    group_commit_ms: float = Field(2.0, ge=0, description="longest wait to batch records per fsync")
    archive_dir: str | None = Field(None, description="JSONL.gz per day, or s3://bucket/prefix")
    anchor_every: float = Field(60.0, gt=0, description="seconds between chain-head anchors")
    segment_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="journal segment size before rotation")
    ship_batch: int = Field(1000, ge=1, le=100_000, description="records per store transaction")
    ship_interval: float = Field(
        0.25, ge=0, le=60, description="least seconds between store transactions (gathers records)"
    )
    archive_every: float = Field(300.0, gt=0, description="seconds between archive part files")
    # Bounds on what one request can put in the journal (a client controls all of it).
    max_header_bytes: int = Field(
        256, ge=16, le=65536, description="longest audit header value (x-llm-*, x-request-id); longer: 400"
    )
    max_body_capture_bytes: int = Field(
        65536, ge=1024, description="largest captured body (body_capture: full); larger: its metadata"
    )
    min_free_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="free space the journal's disk keeps; below it: 503 (0: off)"
    )

    @field_validator("required_headers")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [h.lower() for h in v]


class Database(ConfigModel):
    """The store for keys and audit records: SQLite by default, PostgreSQL by URL."""

    url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<state_dir>/fortress.db")
