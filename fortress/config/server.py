"""The gateway's listener, the limits on each client connection, and timeouts towards the
replicas."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator

from fortress.config.base import ConfigModel, seconds


class WebSocketLimits(ConfigModel):
    """``server.websocket``: what one ``/v1/ws`` connection may cost."""

    # A browser's auth message follows the open at once.
    auth_timeout: float = Field(5.0, gt=0, description="seconds to send the auth message (else close 4408)")
    # A chat window left open costs a registry row and a descriptor.
    idle_timeout: float = Field(300.0, gt=0, description="seconds with no request in flight before close")
    # One client, one connection: its plan still bounds the total.
    max_in_flight: int = Field(8, ge=1, description="requests in flight on one connection (else 429)")

    @field_validator("auth_timeout", "idle_timeout", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return seconds(v)


class Server(ConfigModel):
    """Where and how the gateway listens, and what one client connection may cost."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    upstream_connections: int = Field(1000, ge=1, description="keep-alive pool size to replicas")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Operational logs (Fortress's and uvicorn's, on stderr): plain text, or one JSON object
    # per line (ts, level, logger, message, exc_info) for log shippers.
    log_format: Literal["text", "json"] = "text"
    # Bearer token for /admin/*; without one, the admin API answers only to this machine.
    admin_token: str | None = None
    # Add keys OpenAI's schema requires that an engine left out (llama.cpp: logprobs, refusal).
    conform_responses: bool = True
    # Client connections: slow or idle clients must not hold the gateway's sockets.
    header_timeout: float = Field(
        10.0, gt=0, description="seconds to send a request's line and headers (else 408)"
    )
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a request body may take, plus its size / min_upload_rate (else 408)"
    )
    min_upload_rate: int = Field(
        16384, ge=0, description="bytes/s: each byte received adds 1/min_upload_rate s to body_timeout"
    )
    keepalive_timeout: float = Field(
        75.0, gt=0, description="seconds an idle keep-alive connection stays open"
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="client connections served in full; None: the open-file limit minus "
        "upstream_connections, reserved_connections and 256",
    )
    reserved_connections: int = Field(
        32, ge=0, description="connections past max_connections served /health, /ready, /metrics, /admin only"
    )
    max_headers: int = Field(100, ge=1, le=10000, description="headers in one request (else 431)")
    max_header_bytes: int = Field(
        32768, ge=1024, description="bytes of URL, header names and values in one request (else 431)"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="IPs or CIDRs whose X-Forwarded-For is believed; empty: it never is",
    )
    websocket: WebSocketLimits = Field(default_factory=WebSocketLimits)
    # Gateway processes on this machine, each a whole gateway on the same port (SO_REUSEPORT).
    # auto: every usable core for `fortress serve`, 1 for `fortress up` (its local replicas are
    # supervised once per machine).
    workers: int | Literal["auto"] = Field(
        "auto", description="gateway processes sharing the port: a number >= 1, or auto (the usable cores)"
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, bool) or (isinstance(v, int) and v < 1):
            raise ValueError("workers must be a number >= 1 or auto")
        if isinstance(v, str) and not v.strip().isdigit():
            raise ValueError(f"workers must be a number >= 1 or auto, not {v!r}")
        return v

    @field_validator("header_timeout", "body_timeout", "keepalive_timeout", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return seconds(v)

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        out = []
        for entry in v:
            try:
                if "/" in entry:
                    out.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
                else:
                    out.append(str(ipaddress.ip_address(entry.strip())))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
        return out


class Timeouts(ConfigModel):
    """Upstream timeouts in seconds."""

    connect: float = Field(5.0, gt=0)
    first_byte: float = Field(120.0, gt=0, description="until the replica's response headers")
    idle: float = Field(60.0, gt=0, description="longest gap between two chunks of a stream")
    total: float = Field(600.0, gt=0)
