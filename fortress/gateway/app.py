"""The gateway's ASGI application: OpenAI routes, operational endpoints, admin API.

Deliberately framework-free: a request is matched on (method, path), its body read with a size
limit, and only ``model``, ``stream``, ``stream_options`` and ``max_tokens`` are looked at before
the body is relayed. Every error is answered in OpenAI's format.

The gateway is built whole by ``fortress.runtime``: the relay, the access and audit layers, the
observers and extra routes are constructor arguments, never attached later. It starts and stops
nothing itself; the runtime owns every component's lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from time import monotonic, perf_counter
from typing import Any

import orjson

from fortress.config import FortressConfig
from fortress.core import errors
from fortress.core.admin import admin_allowed
from fortress.core.asgi import Handler, Receive, Scope, Send, respond_error, respond_json
from fortress.core.context import RequestContext
from fortress.core.layers import AccessLayer, AuditLayer, Capacity, Observer
from fortress.core.loops import current_task, running_loop
from fortress.gateway.admin import ReplicaAdmin
from fortress.gateway.relay import Relay
from fortress.gateway.websocket import WS_PATH, WebSocketEndpoint, WebSocketSettings
from fortress.routing.affinity import session_key
from fortress.routing.pool import Route, Router
from fortress.store.connections import ConnectionRegistry
from fortress.store.db import database_url

log = logging.getLogger("fortress.gateway")

# The OpenAI endpoints relayed to replicas, with keys, limits, audit and routing alike.
API_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
STREAMING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
# One logged traceback per exception type and minute: a request that trips a bug must not
# become a way to flood the logs.
_LOG_EVERY = 60.0
_logged: dict[type[BaseException], float] = {}


class _ClientGone(Exception):
    """The client disconnected, or the server closed a too-slow upload, before the body was read."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    @classmethod
    def from_scope(cls, scope: Scope | None) -> _ClientGone:
        # The connection layer marks a request whose body did not arrive in time.
        if scope is not None and scope.get("fortress.timeout") == "body":
            return cls(408, "request body not received in time")
        return cls(499, "client disconnected during upload")


def _client_left(ctx: RequestContext, task: asyncio.Task[Any]) -> None:
    """The client of a request being relayed went away: its task is cancelled as such."""
    if ctx.cancelled_by is None:
        ctx.cancelled_by = "client_disconnect"
        task.cancel()


def _log_internal(exc: BaseException) -> None:
    now = monotonic()
    kind = type(exc)
    if now - _logged.get(kind, -_LOG_EVERY) >= _LOG_EVERY:
        _logged[kind] = now
        log.error("request failed inside the gateway (logged once a minute per kind)", exc_info=exc)


_request_id_format = ""
_request_ids = itertools.count()


def _new_request_id_prefix() -> None:
    # 48 random bits per process (again in a forked child) and a counter: ids stay unique across
    # processes and restarts without a getrandom() system call per request.
    global _request_id_format, _request_ids
    _request_id_format = "req-" + os.urandom(6).hex() + "%012x"
    _request_ids = itertools.count()


_new_request_id_prefix()
os.register_at_fork(after_in_child=_new_request_id_prefix)


def new_request_id() -> str:
    """``req-`` and 24 hex digits: this process's random prefix, then its request counter."""
    return _request_id_format % next(_request_ids)


class Gateway:
    """The ASGI app over a ``Router`` (shared with the health checker and the fleet)."""

    def __init__(
        self,
        config: FortressConfig,
        router: Router,
        relay: Relay,
        *,
        access: AccessLayer | None = None,
        audit: AuditLayer | None = None,
        observers: Sequence[Observer] = (),
        routes: Mapping[str, Handler] | None = None,
        replica_admin: ReplicaAdmin | None = None,
        capacity: Capacity | None = None,
        worker: int | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.relay = relay
        self.access = access
        self.audit = audit
        # Called with every finished completion request (metrics, logs); must not block.
        self.observers = tuple(observers)
        # Extra routes served beside the API (/metrics, /dashboard, ...): path prefix → handler.
        self.routes = dict(routes or {})
        self.replica_admin = replica_admin or ReplicaAdmin(router)
        self.capacity = capacity  # the fleet's /admin/fleet
        self.max_body = config.server.max_body_bytes
        self.admin_token = config.server.admin_token
        # /v1/ws: each message's request goes through self.completion like a POST; its
        # registry writer starts with the first connection (rows named host:port, and /w<i> in
        # worker i of several: each worker clears its own name's rows when it starts).
        name = f"{socket.gethostname()}:{config.server.port}" + ("" if worker is None else f"/w{worker}")
        registry = ConnectionRegistry(database_url(config), name)
        self.websocket = WebSocketEndpoint(
            self.completion,
            access=access,
            audit=audit,
            registry=registry,
            max_message_bytes=self.max_body,
            settings=WebSocketSettings.from_config(config.server.websocket),
            record=self.relay.record_end,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # HTTP, and the WebSocket endpoint (the protocol upgrades only its path); the runtime
        # starts and stops every part (uvicorn runs with lifespan off).
        if scope["type"] == "http":
            path = scope["path"]
            if path in API_PATHS and scope["method"] == "POST":  # the hot path, one call shorter
                await self.completion(scope, receive, send, path)
            else:
                await self._http(scope, receive, send)
        elif scope["type"] == "websocket" and scope["path"] == WS_PATH:
            await self.websocket(scope, receive, send)

    # -- dispatch --------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in API_PATHS:
            if method != "POST":
                await respond_error(send, errors.method_not_allowed(f"Use POST for {path}."))
                return
            await self.completion(scope, receive, send, path)
        elif path == "/v1/models" and method == "GET":
            await respond_json(send, 200, self.models_list())
        elif path.startswith("/v1/models/") and method == "GET":
            await self._model(send, path[len("/v1/models/") :])
        elif path == "/health":
            await respond_json(send, 200, {"status": "ok"})
        elif path == "/ready":
            ok, missing = self.router.ready()
            body = {"ready": ok, "models_without_healthy_replica": missing}
            dormant = self.router.dormant()
            if dormant:  # pools at zero on purpose: a request wakes them (or says why not)
                body["dormant"] = dormant
            await respond_json(send, 200 if ok else 503, body)
        elif path.startswith("/admin/"):
            await self._admin(scope, receive, send, method, path)
        elif self.routes and (handler := self._route_for(path)) is not None:
            await handler(scope, receive, send)
        else:
            await respond_error(send, errors.not_found(method, path))

    def _route_for(self, path: str) -> Handler | None:
        for prefix, handler in self.routes.items():
            if path == prefix or path.startswith(prefix + "/"):
                return handler
        return None

    # -- the completion path ---------------------------------------------------------------

    async def completion(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        t0 = perf_counter()
        request_id = None
        content_length = -1
        headers: dict[bytes, bytes] = dict(scope["headers"])  # a repeated header: the last one wins
        rid = headers.get(b"x-request-id")
        if rid and len(rid) <= 256:  # the audit layer's bound on it (audit.max_header_bytes)
            request_id = rid.decode("latin-1")
        cl = headers.get(b"content-length")
        if cl is not None and cl.isdigit():
            content_length = int(cl)
        client = scope.get("client")
        ctx = RequestContext(request_id or new_request_id(), path, t0, client[0] if client else None)
        ctx.headers = headers
        audit = self.audit
        if audit is not None:
            audit.begin(ctx)
        try:
            await self._complete(ctx, scope, receive, send, content_length)
        finally:
            if audit is not None:
                audit.end(ctx)
            for observe in self.observers:
                try:
                    observe(ctx)
                except Exception:  # one broken observer must not hide the others
                    log.exception("observer %r failed", observe)

    async def _complete(
        self, ctx: RequestContext, scope: Scope, receive: Receive, send: Send, content_length: int
    ) -> None:
        access = self.access
        try:
            try:
                # Who, from the headers alone: a keyless client gets its 401 before a byte of
                # its body is read or buffered (what it still sends is discarded as it comes).
                if access is not None:
                    access.authenticate(ctx)
                if self.audit is not None:
                    self.audit.check_headers(ctx)
                if content_length > self.max_body:
                    raise errors.too_large(self.max_body)
            except errors.GatewayError as err:
                await self.relay.send_error(send, ctx, err)
                return
            # The gateway's own connections hand a body that is all there over without a message.
            whole = getattr(getattr(receive, "__self__", None), "whole_body", None)
            raw = whole() if whole is not None else None
            if raw is None:
                raw = await self._read_body(receive, scope)
            elif len(raw) > self.max_body:  # a chunked body past the limit (a sized one: above)
                raw = None
            if raw is None:
                await self.relay.send_error(send, ctx, errors.too_large(self.max_body))
                return
            ctx.bytes_in = len(raw)
            try:
                route = self._parse(ctx, raw)
                if route.pool.config.balancer == "session":
                    self._session(ctx, scope, route)
                if self.audit is not None:
                    self.audit.check_body(ctx)
                body = self.relay.upstream_body(ctx, route, raw)
                if access is not None:
                    access.authorize(ctx, route.name)
                    if not access.admit_now(ctx):
                        await access.admit(ctx)
            except errors.GatewayError as err:
                await self.relay.send_error(send, ctx, err)
                return
            await self._relay(ctx, route, body, receive, send)
        except errors.GatewayError as err:  # a layer refusing late (the audit journal)
            try:
                await self.relay.end(send, ctx, err)
            except Exception as exc:
                _log_internal(exc)
        except _ClientGone as gone:
            # The client went away (or was too slow) before its body was read: a record, no
            # traceback (anyone can do this, and cheaply).
            ctx.status = gone.status
            ctx.error = gone.reason
            try:
                await self.relay.record_end(ctx)
            except Exception as exc:  # the journal failing must not become a traceback per client
                _log_internal(exc)
        except Exception as exc:  # a bug must still answer in OpenAI's format and be recorded
            _log_internal(exc)
            err = errors.GatewayError(
                500,
                f"The gateway failed on this request ({type(exc).__name__}); it is recorded as "
                f"{ctx.request_id}.",
                "server_error",
                "internal_error",
            )
            try:  # recorded (unless it already was), then answered
                await self.relay.end(send, ctx, err)
            except Exception as again:
                _log_internal(again)
        finally:
            if access is not None and ctx.ticket is not None:
                access.release(ctx)

    async def _relay(
        self, ctx: RequestContext, route: Route, body: bytes, receive: Receive, send: Send
    ) -> None:
        task = current_task()
        # The gateway's own connections say when their client leaves (a callback); any other
        # server's receive() is watched by a task for http.disconnect.
        watch = getattr(getattr(receive, "__self__", None), "watch_disconnect", None)
        watcher: asyncio.Task[None] | None = None
        if watch is not None and task is not None:
            watch(functools.partial(_client_left, ctx, task))
        else:
            watcher = running_loop().create_task(self._watch_disconnect(receive, ctx, task))
        try:
            await self.relay.handle(ctx, route, body, send)
        except asyncio.CancelledError:
            if ctx.cancelled_by != "client_disconnect":
                raise
            if task is not None:
                task.uncancel()
            ctx.status = 499
            ctx.error = "client disconnected"
            await self.relay.record_end(ctx)
        finally:
            ctx.cancelled_by = ctx.cancelled_by or "done"
            if watcher is not None:
                watcher.cancel()
            elif watch is not None:
                watch(None)

    @staticmethod
    async def _watch_disconnect(
        receive: Receive, ctx: RequestContext, task: asyncio.Task[Any] | None
    ) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
            if ctx.cancelled_by is None and task is not None:
                ctx.cancelled_by = "client_disconnect"
                task.cancel()

    def _parse(self, ctx: RequestContext, raw: bytes) -> Route:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise errors.bad_request(
                "We could not parse the JSON body of your request. Send valid JSON."
            ) from None
        if not isinstance(body, dict):
            raise errors.bad_request("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise errors.bad_request("You must provide a model parameter.", "model")
        stream = body.get("stream", False) if ctx.path in STREAMING_PATHS else False
        if stream is not None and not isinstance(stream, bool):
            raise errors.bad_request("'stream' must be a boolean.", "stream")
        if ctx.path == "/v1/embeddings":
            field, max_tokens = "max_tokens", 0  # nothing is generated: no output to reserve
        elif ctx.path == "/v1/responses":
            field, max_tokens = "max_output_tokens", body.get("max_output_tokens")
        else:
            field, max_tokens = "max_tokens", body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
            raise errors.bad_request(f"'{field}' must be a non-negative integer.", field)
        route = self.router.route(model)
        if route is None:
            raise errors.model_not_found(model)
        ctx.body = body
        ctx.model = model
        ctx.stream = bool(stream)
        ctx.max_tokens = max_tokens
        return route

    @staticmethod
    def _session(ctx: RequestContext, scope: Scope, route: Route) -> None:
        # The session key by the pool's settings; in cookie mode a request without the cookie
        # gets a new key, and its answer (stream or not, error or not) the cookie.
        https = scope.get("scheme") == "https"
        key, cookie = session_key(ctx.headers, route.pool.config.session, secure=https)
        ctx.session = key or ""
        if cookie is not None:
            ctx.extra_headers.append((b"set-cookie", cookie))

    async def _read_body(self, receive: Receive, scope: Scope | None = None) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone.from_scope(scope)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                if message.get("more_body"):
                    await self._drain_body(receive)
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    async def _drain_body(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    # -- models ----------------------------------------------------------------------------

    def models_list(self) -> dict[str, Any]:
        created = self.router.started_at
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "fortress"}
                for name in sorted(self.router.index)
            ],
        }

    async def _model(self, send: Send, model: str) -> None:
        if model not in self.router.index:
            await respond_error(send, errors.model_not_found(model))
            return
        await respond_json(
            send,
            200,
            {"id": model, "object": "model", "created": self.router.started_at, "owned_by": "fortress"},
        )

    # -- admin -----------------------------------------------------------------------------

    async def _admin(self, scope: Scope, receive: Receive, send: Send, method: str, path: str) -> None:
        if not admin_allowed(scope, self.admin_token):
            await respond_error(send, errors.admin_required())
            return
        try:
            body = await self._read_body(receive, scope) or b""
        except _ClientGone:
            return  # nothing to answer, nobody to answer to
        if await self.replica_admin.handle(method, path, body, send):
            return
        if path == "/admin/connections" and method == "GET":
            await respond_json(send, 200, await self.websocket.listing())
            return
        if self.capacity is not None and path.startswith("/admin/fleet"):
            answer = await self.capacity.handle_admin(method, path, body)
            if answer is not None:
                await respond_json(send, answer[0], answer[1])
                return
        if self.access is not None:
            answer = await self.access.handle_admin(method, path, body)
            if answer is not None:
                await respond_json(send, answer[0], answer[1])
                return
        await respond_error(send, errors.not_found(method, path))
