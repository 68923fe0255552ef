"""OpenAI-format errors: ``{"error": {"message", "type", "param", "code"}}``, built in one place.

Every error Fortress answers itself (the gateway, the admin API, /metrics, the dashboard) goes
through ``error_object`` so clients see one shape.
"""

from __future__ import annotations

from typing import Any

import orjson


def error_object(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error body as a dict."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    """The OpenAI error body as JSON bytes."""
    return orjson.dumps(error_object(message, type_, code, param))


class GatewayError(Exception):
    """An error Fortress answers itself, in OpenAI's format, with its HTTP status and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def as_dict(self) -> dict[str, Any]:
        return error_object(self.message, self.type, self.code, self.param)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param)


def not_found(method: str, path: str) -> GatewayError:
    return GatewayError(404, f"Unknown path {method} {path}.", "invalid_request_error", "not_found")


def method_not_allowed(message: str) -> GatewayError:
    return GatewayError(405, message, "invalid_request_error")


def admin_required() -> GatewayError:
    return GatewayError(
        401, "Admin access needs the admin token (Authorization: Bearer ...).", "authentication_error"
    )


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than the limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model '{model}' does not exist or is not served here.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def no_replica(model: str, retry_after: int, detail: str = "") -> GatewayError:
    msg = f"No healthy replica is serving '{model}' right now."
    if detail:
        msg += f" {detail}"
    return GatewayError(
        503,
        msg,
        "service_unavailable",
        "no_healthy_replica",
        headers=[(b"retry-after", str(retry_after).encode())],
    )


def upstream_failed(message: str) -> GatewayError:
    return GatewayError(502, message, "upstream_error", "bad_gateway")


def upstream_timeout(message: str) -> GatewayError:
    return GatewayError(504, message, "upstream_error", "gateway_timeout")


def pool_unavailable(model: str, message: str, code: str, retry_after: int) -> GatewayError:
    """503 for a pool the fleet keeps at zero (stopped, scheduled off) or that did not wake in
    time; ``code`` is ``pool_stopped``, ``pool_scheduled_off`` or ``pool_wake_timeout``."""
    return GatewayError(
        503,
        f"The pool serving '{model}' {message}",
        "service_unavailable",
        code,
        headers=[(b"retry-after", str(max(1, retry_after)).encode())],
    )
