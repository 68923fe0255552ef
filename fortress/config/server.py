"""The gateway's listener and its timeouts towards the replicas."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fortress.config.base import ConfigModel


class Server(ConfigModel):
    """Where and how the gateway listens."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    upstream_connections: int = Field(1000, ge=1, description="keep-alive pool size to replicas")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Bearer token for /admin/*; without one, the admin API answers only to this machine.
    admin_token: str | None = None
    # Add keys OpenAI's schema requires that an engine left out (llama.cpp: logprobs, refusal).
    conform_responses: bool = True


class Timeouts(ConfigModel):
    """Upstream timeouts in seconds."""

    connect: float = Field(5.0, gt=0)
    first_byte: float = Field(120.0, gt=0, description="until the replica's response headers")
    idle: float = Field(60.0, gt=0, description="longest gap between two chunks of a stream")
    total: float = Field(600.0, gt=0)
