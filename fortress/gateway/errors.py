"""OpenAI-format error responses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """An error the gateway answers itself, in OpenAI's format."""

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


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param)


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
