"""The WebSocket endpoint, ``/v1/ws``: chat completions streamed over one long-lived connection.

Protocol (JSON text messages; docs/gateway.md has examples):

- Auth at the upgrade: ``Authorization: Bearer`` or ``x-api-key`` and the audit headers, as on
  HTTP. An upgrade that carries a key and fails the checks is refused before the socket is
  accepted, with the HTTP status (401, 400) and an OpenAI-format JSON body. An upgrade without a
  key that fails them (a browser cannot set headers) is accepted and must send
  ``{"type": "auth", "api_key": ..., "headers": {...}}`` first, within ``auth_timeout``; it gets
  ``{"type": "auth_ok"}``, or an error and close code 4401 / 4400 (4408 when it does not come).
- ``{"type": "request", "id": ..., "body": {...}}``: a chat completion request. The answer is
  ``{"type": "chunk", "id", "data": <chunk>}`` messages, then ``{"type": "done", "id", "usage",
  "request_id"}``, or ``{"type": "error", "id", "status", "error": <OpenAI error object>}``.
  Several requests may run at once, up to ``max_in_flight`` per connection.
- ``{"type": "cancel", "id"}`` ends a request (recorded as 499); ``{"type": "ping"}`` gets
  ``{"type": "pong"}`` (the server also sends protocol-level pings).
- With no request in flight and no message for ``idle_timeout`` seconds the server closes with
  code 1000, reason ``idle timeout``.

Each request runs through the very path a ``POST /v1/chat/completions`` does: the gateway's
``completion`` handler, called with a synthetic HTTP scope that carries the connection's headers
(keys, plans and limits, audit record, routing, relay, retries), so nothing is implemented
twice and a revoked key stops working mid-connection. The body is sent with ``stream: true``
and ``stream_options.include_usage: true`` so ``done`` can report usage; the usage-only chunk
is forwarded only when the client asked for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fortress.config.server import WebSocketLimits
from fortress.core import errors
from fortress.core.asgi import Receive, Scope, Send
from fortress.core.context import RequestContext
from fortress.core.layers import AccessLayer, AuditLayer
from fortress.store.connections import ConnectionRegistry

log = logging.getLogger("fortress.gateway.websocket")

WS_PATH = "/v1/ws"
CHAT_PATH = "/v1/chat/completions"
# Headers of the upgrade that must not reach the synthetic HTTP requests: the handshake's own,
# and those each request gets fresh (its length, its request id).
_DROPPED = frozenset(
    {
        b"connection",
        b"upgrade",
        b"content-length",
        b"transfer-encoding",
        b"x-request-id",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
    }
)
CLOSE_IDLE = 1000
CLOSE_BAD_AUTH = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_AUTH_TIMEOUT = 4408
CANCELLED = errors.GatewayError(499, "The request was cancelled.", "invalid_request_error", "cancelled")
AUTH_FORMAT = 'The first message must be {"type": "auth", "api_key": ..., "headers": {...}}.'

Complete = Callable[[Scope, Receive, Send, str], Awaitable[None]]


_QUIET = ("connection open", "connection closed", "ASGI callable returned without completing handshake.")


def _quiet_upgrades(record: logging.LogRecord) -> bool:
    """uvicorn logs every WebSocket open, close and refusal at INFO: a client could flood the
    logs with them, and the HTTP path logs no connection events above DEBUG either. Its
    sans-I/O protocol also logs an ERROR after every denial response (it does not count one as
    a finished handshake); this endpoint always accepts or denies."""
    msg = record.msg if isinstance(record.msg, str) else ""
    return not (msg.startswith(('%s - "WebSocket', "connection rejected")) or msg in _QUIET)


logging.getLogger("uvicorn.error").addFilter(_quiet_upgrades)


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """Per-connection limits (``server.websocket`` in the config)."""

    auth_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_in_flight: int = 8

    @classmethod
    def from_config(cls, limits: WebSocketLimits) -> WebSocketSettings:
        return cls(limits.auth_timeout, limits.idle_timeout, limits.max_in_flight)


@dataclass(eq=False, slots=True)
class _Connection:
    id: str
    scope: Scope
    send: Send
    headers: dict[bytes, bytes] = field(default_factory=dict)
    opened_at: float = field(default_factory=time.time)
    identity: dict[str, str | None] = field(default_factory=dict)
    requests: dict[str, _Request] = field(default_factory=dict)
    served: int = 0
    last: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    # Cookies the gateway set on this connection's answers (a session balancer's key): sent
    # back with its later requests, as a browser's jar would, so the session holds.
    cookies: dict[bytes, bytes] = field(default_factory=dict)

    def request_headers(self) -> list[tuple[bytes, bytes]]:
        """The upgrade's headers, with the cookies set since added to its Cookie header."""
        if not self.cookies:
            return list(self.headers.items())
        jar = b"; ".join(k + b"=" + v for k, v in self.cookies.items())
        sent = self.headers.get(b"cookie")
        cookie = sent + b"; " + jar if sent else jar
        return [*((k, v) for k, v in self.headers.items() if k != b"cookie"), (b"cookie", cookie)]

    async def emit(self, message: dict[str, Any]) -> bool:
        """Send one JSON message; False (and the connection marked closed) when it is gone."""
        if self.closed:
            return False
        text = orjson.dumps(message).decode()
        try:
            async with self.lock:  # one frame at a time from the connection's request tasks
                await self.send({"type": "websocket.send", "text": text})
        except Exception:  # the client went away mid-send: uvicorn raises ClientDisconnected
            self._gone()
            return False
        return True

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        with contextlib.suppress(Exception):
            async with self.lock:
                await self.send({"type": "websocket.close", "code": code, "reason": reason})
        self._gone()

    def _gone(self) -> None:
        self.closed = True
        for req in self.requests.values():
            req.cancel.set()

    def row(self) -> dict[str, Any]:
        client = self.scope.get("client")
        return {
            "id": self.id,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "opened_at": self.opened_at,
            **self.identity,
        }


@dataclass(eq=False, slots=True)
class _Request:
    id: str
    want_usage: bool
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 0
    buffer: bytes = b""
    usage: dict[str, Any] | None = None
    request_id: str | None = None
    retry_after: str | None = None
    replica: str | None = None  # what x-fortress-replica says on HTTP
    ended: bool = False  # done or error sent


class WebSocketEndpoint:
    """Serves ``/v1/ws`` for a gateway; ``complete`` is the gateway's completion handler."""

    def __init__(
        self,
        complete: Complete,
        *,
        access: AccessLayer | None,
        audit: AuditLayer | None,
        registry: ConnectionRegistry | None,
        max_message_bytes: int,
        settings: WebSocketSettings | None = None,
        record: Callable[[RequestContext], Awaitable[None]] | None = None,
    ) -> None:
        self.complete = complete
        self.access = access
        self.audit = audit
        self.registry = registry
        self.max_message_bytes = max_message_bytes
        self.settings = settings or WebSocketSettings()
        # Records a refused upgrade as the HTTP path records a refused request (audit, metrics).
        self.record = record
        self.connections: dict[str, _Connection] = {}
        self.opened_total = 0

    # -- the listing ---------------------------------------------------------------------------

    def local(self) -> list[dict[str, Any]]:
        """This gateway's open connections, with what only it knows (requests in flight)."""
        return [
            {**c.row(), "in_flight": len(c.requests), "requests": c.served} for c in self.connections.values()
        ]

    async def start(self) -> None:
        """Nothing to start: the registry's writer starts with the first connection."""

    async def stop(self) -> None:
        """Write the registry's last changes (closed connections) and stop its writer."""
        if self.registry is not None:
            await asyncio.to_thread(self.registry.stop)

    async def listing(self) -> dict[str, Any]:
        """Every open connection: from the store (every gateway sharing it), with this gateway's
        live counters merged in; this gateway's alone when the store cannot be read."""
        local = {c["id"]: c for c in self.local()}
        gateway = self.registry.gateway if self.registry is not None else None
        if self.registry is None:
            return {"gateway": gateway, "store": False, "connections": list(local.values())}
        try:
            rows = await asyncio.to_thread(self.registry.listing)
        except Exception as exc:
            log.warning("connection registry unreadable: %s", exc)
            return {"gateway": gateway, "store": False, "connections": list(local.values())}
        for row in rows:
            if row["id"] in local:
                row.update(local[row["id"]])
        return {"gateway": gateway, "store": True, "connections": rows}

    # -- a connection --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        conn = _Connection("ws-" + os.urandom(8).hex(), scope, send)
        conn.headers = {k: v for k, v in scope["headers"] if k not in _DROPPED}
        keyed = b"authorization" in conn.headers or b"x-api-key" in conn.headers
        err, ctx = self._check(conn, conn.headers)
        if err is not None and keyed:
            await self._deny(scope, send, err, ctx.request_id)
            if self.record is not None:
                ctx.status, ctx.error = err.status, err.message
                await self.record(ctx)
            return
        await send({"type": "websocket.accept"})
        authed = err is None
        if authed:
            self._register(conn)
        try:
            if not authed and not await self._auth_message(conn, receive):
                return
            await self._serve(conn, receive)
        finally:
            conn._gone()
            if conn.id in self.connections:
                del self.connections[conn.id]
                if self.registry is not None:
                    self.registry.closed(conn.id)

    def _check(
        self, conn: _Connection, headers: dict[bytes, bytes]
    ) -> tuple[errors.GatewayError | None, RequestContext]:
        """The HTTP path's header checks (key, audit headers): the error they raise, if any, and
        the context they ran on (a refusal is recorded from it)."""
        client = conn.scope.get("client")
        ctx = RequestContext(conn.id, WS_PATH, time.perf_counter(), client[0] if client else None)
        ctx.headers = headers
        try:
            if self.access is not None:
                self.access.authenticate(ctx)
            if self.audit is not None:
                self.audit.check_headers(ctx)
        except errors.GatewayError as err:
            return err, ctx
        ident = ctx.identity

        def text(name: bytes) -> str | None:
            value = headers.get(name)
            return value.decode("latin-1")[:256] if value else None

        conn.identity = {
            "key_id": ident.key_id if ident else None,
            "key_name": ident.key_name if ident else None,
            "source": text(b"x-llm-source"),
            "user": text(b"x-llm-user"),
        }
        return None, ctx

    @staticmethod
    async def _deny(scope: Scope, send: Send, err: errors.GatewayError, request_id: str) -> None:
        """Refuse the upgrade with the HTTP status and OpenAI error body, where the server
        offers the ASGI denial-response extension; else a close before accept (HTTP 403)."""
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": CLOSE_UNAUTHORIZED})
            return
        body = err.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        start = {
            "type": "websocket.http.response.start",
            "status": err.status,
            "headers": headers + err.headers,
        }
        await send(start)
        await send({"type": "websocket.http.response.body", "body": body})

    async def _auth_message(self, conn: _Connection, receive: Receive) -> bool:
        try:
            message = await asyncio.wait_for(receive(), self.settings.auth_timeout)
        except TimeoutError:
            err = errors.GatewayError(
                401, "No auth message within the auth timeout.", "invalid_request_error", "auth_timeout"
            )
            await conn.emit({"type": "error", "id": None, "status": 401, "error": err.as_dict()["error"]})
            await conn.close(CLOSE_AUTH_TIMEOUT, "auth timeout")
            return False
        if message["type"] != "websocket.receive":
            return False
        data = self._decode(message)
        headers = dict(conn.headers)
        if not isinstance(data, dict) or data.get("type") != "auth":
            err = errors.bad_request(AUTH_FORMAT)
        else:
            extra = data.get("headers") or {}
            key = data.get("api_key")
            if not isinstance(extra, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
            ):
                err = errors.bad_request("'headers' must be an object of strings.", "headers")
            elif key is not None and not isinstance(key, str):
                err = errors.bad_request("'api_key' must be a string.", "api_key")
            else:
                for k, v in extra.items():
                    name = k.lower().encode("latin-1", "replace")
                    if name not in _DROPPED:
                        headers[name] = v.encode("latin-1", "replace")
                if key:
                    headers[b"authorization"] = b"Bearer " + key.encode("latin-1", "replace")
                found, ctx = self._check(conn, headers)
                if found is None:
                    conn.headers = headers
                    self._register(conn)
                    return await conn.emit({"type": "auth_ok"})
                err = found
                if self.record is not None:  # recorded as a refused upgrade would be
                    ctx.status, ctx.error = err.status, err.message
                    await self.record(ctx)
        await conn.emit({"type": "error", "id": None, "status": err.status, "error": err.as_dict()["error"]})
        await conn.close(CLOSE_UNAUTHORIZED if err.status in (401, 403) else CLOSE_BAD_AUTH, "auth failed")
        return False

    def _register(self, conn: _Connection) -> None:
        self.connections[conn.id] = conn
        self.opened_total += 1
        if self.registry is not None:
            self.registry.start()
            self.registry.opened(conn.row())

    async def _serve(self, conn: _Connection, receive: Receive) -> None:
        idle = asyncio.get_running_loop().create_task(self._idle_watch(conn))
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    return  # websocket.disconnect
                conn.last = time.monotonic()
                data = self._decode(message)
                kind = data.get("type") if isinstance(data, dict) else None
                if kind == "request":
                    assert isinstance(data, dict)
                    task = await self._start(conn, data)
                    if task is not None:
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                elif kind == "ping" and isinstance(data, dict):
                    await conn.emit({"type": "pong", "id": data.get("id")})
                elif kind == "cancel" and isinstance(data, dict) and data.get("id") in conn.requests:
                    conn.requests[data["id"]].cancel.set()
                else:
                    rid = data.get("id") if isinstance(data, dict) else None
                    what = "not a JSON object" if not isinstance(data, dict) else f"unknown type {kind!r}"
                    if kind == "cancel":
                        what = "no request in flight has that id"
                    await self._error(conn, rid, errors.bad_request(f"Message not understood: {what}."))
        finally:
            idle.cancel()
            conn._gone()
            if tasks:  # cancelled by _gone: they record their 499 and end
                await asyncio.wait(tasks, timeout=10)

    def _decode(self, message: dict[str, Any]) -> Any:
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        if len(raw) > self.max_message_bytes:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None

    async def _idle_watch(self, conn: _Connection) -> None:
        limit = self.settings.idle_timeout
        while not conn.closed:
            await asyncio.sleep(max(limit - (time.monotonic() - conn.last), 0.05))
            if conn.requests:
                conn.last = time.monotonic()  # a long answer is not idleness
            elif time.monotonic() - conn.last >= limit:
                await conn.close(CLOSE_IDLE, "idle timeout")
                return

    @staticmethod
    async def _error(conn: _Connection, rid: Any, err: errors.GatewayError) -> None:
        await conn.emit({"type": "error", "id": rid, "status": err.status, "error": err.as_dict()["error"]})

    async def _start(self, conn: _Connection, data: dict[str, Any]) -> asyncio.Task[None] | None:
        """Start the request of a ``request`` message, or answer why not."""
        rid, body = data.get("id"), data.get("body")
        err: errors.GatewayError | None = None
        if not isinstance(rid, str) or not rid or len(rid) > 256:
            err = errors.bad_request("'id' must be a string of 1 to 256 characters.", "id")
        elif rid in conn.requests:
            err = errors.bad_request("A request with this id is in flight.", "id")
        elif not isinstance(body, dict):
            err = errors.bad_request("'body' must be a JSON object.", "body")
        elif len(conn.requests) >= self.settings.max_in_flight:
            err = errors.GatewayError(
                429,
                f"This connection has {self.settings.max_in_flight} requests in flight; wait for one to end.",
                "requests",
                "too_many_requests_in_flight",
            )
        if err is not None or not isinstance(body, dict):
            await self._error(conn, rid, err or errors.bad_request("'body' must be a JSON object."))
            return None
        so = body.get("stream_options")
        req = _Request(str(rid), isinstance(so, dict) and so.get("include_usage") is True)
        conn.requests[req.id] = req
        conn.served += 1
        return asyncio.get_running_loop().create_task(self._run(conn, req, body))

    # -- one request, through the HTTP path ----------------------------------------------------

    async def _run(self, conn: _Connection, req: _Request, body: dict[str, Any]) -> None:
        so = body.get("stream_options")
        so = {**(so if isinstance(so, dict) else {}), "include_usage": True}
        body = {**body, "stream": True, "stream_options": so}
        try:
            raw = orjson.dumps(body)
        except orjson.JSONEncodeError:
            raw = b"{"  # the gateway answers it as a body it cannot parse
        headers = [*conn.request_headers(), (b"content-length", str(len(raw)).encode())]
        ws = conn.scope
        scope: Scope = {
            "type": "http",
            "asgi": ws.get("asgi", {"version": "3.0"}),
            "http_version": "1.1",
            "method": "POST",
            "scheme": "https" if ws.get("scheme") == "wss" else "http",
            "path": CHAT_PATH,
            "raw_path": CHAT_PATH.encode(),
            "query_string": b"",
            "root_path": ws.get("root_path", ""),
            "headers": headers,
            "client": ws.get("client"),
            "server": ws.get("server"),
            "fortress.websocket": conn.id,
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await req.cancel.wait()  # the gateway cancels the relay on this, as on a disconnect
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await self._relay_message(conn, req, message)

        try:
            await self.complete(scope, receive, send, CHAT_PATH)
            if not req.ended:
                await self._error(conn, req.id, CANCELLED)
        finally:
            conn.requests.pop(req.id, None)
            conn.last = time.monotonic()

    async def _relay_message(self, conn: _Connection, req: _Request, message: dict[str, Any]) -> None:
        """The gateway's HTTP answer, turned into WebSocket messages. Never raises: a client
        gone mid-answer cancels the request instead, as an HTTP disconnect would."""
        kind = message["type"]
        if kind == "http.response.start":
            req.status = message["status"]
            for name, value in message.get("headers", ()):
                if name == b"x-request-id":
                    req.request_id = value.decode("latin-1")
                elif name == b"x-fortress-replica":
                    req.replica = value.decode("latin-1")
                elif name == b"set-cookie":
                    pair = value.split(b";", 1)[0]
                    if b"=" in pair:
                        k, v = pair.split(b"=", 1)
                        conn.cookies[k.strip()] = v.strip()
                elif name == b"retry-after":
                    req.retry_after = value.decode("latin-1")
            return
        if kind != "http.response.body" or req.ended:
            return
        req.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if req.status != 200:
            if not more:
                await self._answer_error(conn, req, req.buffer)
            return
        events = req.buffer.split(b"\n\n")
        req.buffer = events.pop()
        for event in events:
            await self._event(conn, req, event)
            if req.ended:
                return
        if not more and not req.ended:
            if req.buffer.strip():
                await self._event(conn, req, req.buffer)
            if not req.ended:
                error = errors.upstream_failed("The stream ended without its end mark.").as_dict()["error"]
                await self._finish(conn, req, {"type": "error", "status": 502, "error": error})

    async def _event(self, conn: _Connection, req: _Request, event: bytes) -> None:
        payload = b"".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not payload:
            return
        if payload == b"[DONE]":
            done = {"type": "done", "usage": req.usage, "request_id": req.request_id, "replica": req.replica}
            await self._finish(conn, req, done)
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return  # not JSON: nothing a client could use
        if not isinstance(chunk, dict):
            return
        if "error" in chunk and "choices" not in chunk:  # the relay's mid-stream error event
            status = 502
            await self._finish(conn, req, {"type": "error", "status": status, "error": chunk["error"]})
            return
        usage = chunk.get("usage")
        if usage:
            req.usage = usage
            if not req.want_usage and not chunk.get("choices"):
                return  # the usage-only chunk asked for on the client's behalf
        if not await conn.emit({"type": "chunk", "id": req.id, "data": chunk}):
            req.cancel.set()

    async def _answer_error(self, conn: _Connection, req: _Request, raw: bytes) -> None:
        try:
            obj = orjson.loads(raw)
            error = obj["error"] if isinstance(obj, dict) and isinstance(obj.get("error"), dict) else None
        except orjson.JSONDecodeError:
            error = None
        if error is None:
            error = errors.upstream_failed(raw[:200].decode("utf-8", "replace")).as_dict()["error"]
        await self._finish(conn, req, {"type": "error", "status": req.status, "error": error})

    @staticmethod
    async def _finish(conn: _Connection, req: _Request, message: dict[str, Any]) -> None:
        req.ended = True
        message["id"] = req.id
        if message["type"] == "error":
            if req.request_id:
                message["request_id"] = req.request_id
            if req.retry_after:  # a plan's 429 or a 503: when to send it again, in seconds
                message["retry_after"] = req.retry_after
        if not await conn.emit(message):
            req.cancel.set()
