"""What every simulated endpoint shares: OpenAI-format errors, placeholder tokens, and sleeping
that notices a client gone."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

JSON = "application/json"
# How often a sleeping handler looks whether its client is still there. aiohttp does not cancel
# handlers on disconnect by default, so a hung or slow request would otherwise never notice.
POLL_S = 0.25


class ClientGone(ConnectionResetError):
    """The client closed its connection while its request was being served."""


def error(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> web.Response:
    """An OpenAI-format error response."""
    err = {"message": message, "type": type_, "param": param, "code": code}
    return web.Response(status=status, body=orjson.dumps({"error": err}), content_type=JSON)


def gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def sleep_until(request: web.Request, deadline: float) -> None:
    """Sleep until ``deadline`` (loop time, may be inf); raise ``ClientGone`` on disconnect."""
    loop = asyncio.get_running_loop()
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, POLL_S))
        if gone(request):
            raise ClientGone("client went away")


def token(i: int) -> bytes:
    """The i-th placeholder token."""
    return b" tok%d" % i
