"""The gateway's ASGI application: OpenAI routes, operational endpoints, admin API.

Deliberately framework-free: a request is matched on (method, path), its body read with a size
limit, and only ``model``, ``stream``, ``stream_options`` and ``max_tokens`` are looked at before
the body is relayed. Every error is answered in OpenAI's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import orjson

from fortress.config import FortressConfig, Tier
from fortress.gateway import errors
from fortress.gateway.context import RequestContext
from fortress.gateway.layers import AccessLayer, AuditLayer
from fortress.gateway.relay import Relay
from fortress.routing.health import HealthChecker
from fortress.routing.pool import Router

log = logging.getLogger("fortress.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_JSON_HEADERS = [(b"content-type", b"application/json")]


def new_request_id() -> str:
    return "req-" + os.urandom(12).hex()


class Gateway:
    """The ASGI app. ``router`` is shared with the health checker and the supervisor."""

    def __init__(
        self,
        config: FortressConfig,
        router: Router | None = None,
        access: AccessLayer | None = None,
        audit: AuditLayer | None = None,
    ) -> None:
        self.config = config
        self.router = router or Router(config)
        self.health = HealthChecker(self.router)
        self.relay = Relay(config, self.router, on_eject=self.health.poke)
        self.access = access
        self.audit = audit
        if audit is not None:
            self.relay.finish = audit.record
        # Called with every finished completion request (metrics, logs); must not block.
        self.observers: list[Callable[[RequestContext], None]] = []
        # Extra GET/POST routes served beside the API (/metrics, /dashboard, ...): path prefix → handler.
        self.routes: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {}
        self.max_body = config.server.max_body_bytes
        # Hooks for later layers: called on startup/shutdown of the serving process.
        self.on_startup: list[Callable[[], Awaitable[None]]] = []
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        # The local processes behind the replicas (``fortress up`` sets it): pid, restarts, log.
        self.processes: Callable[[], list[dict[str, Any]]] | None = None

    async def startup(self) -> None:
        for layer in (self.audit, self.access):
            if layer is not None:
                await layer.start()
        await self.relay.start()
        await self.health.start()
        for hook in self.on_startup:
            await hook()
        # Everything built so far lives as long as the process: keep it out of the collector's
        # full passes (a gen-2 collection measured 16 ms before, 2 ms after).
        gc.collect()
        gc.freeze()

    async def shutdown(self) -> None:
        for hook in self.on_shutdown:
            await hook()
        await self.health.stop()
        await self.relay.stop()
        for layer in (self.access, self.audit):
            if layer is not None:
                await layer.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- dispatch --------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in COMPLETION_PATHS:
            if method != "POST":
                await self._simple_error(send, 405, f"Use POST for {path}.", "invalid_request_error")
                return
            await self.completion(scope, receive, send, path)
        elif path == "/v1/models" and method == "GET":
            await self._json(send, 200, self.models_list())
        elif path.startswith("/v1/models/") and method == "GET":
            await self._model(send, path[len("/v1/models/") :])
        elif path == "/health":
            await self._json(send, 200, {"status": "ok"})
        elif path == "/ready":
            ok, missing = self.router.ready()
            await self._json(
                send, 200 if ok else 503, {"ready": ok, "models_without_healthy_replica": missing}
            )
        elif path.startswith("/admin/"):
            await self._admin(scope, receive, send, method, path)
        elif self.routes and (handler := self._route_for(path)) is not None:
            await handler(scope, receive, send)
        else:
            await self._simple_error(
                send, 404, f"Unknown path {method} {path}.", "invalid_request_error", "not_found"
            )

    def _route_for(self, path: str) -> Callable[[Scope, Receive, Send], Awaitable[None]] | None:
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
        if rid and len(rid) <= 200:
            request_id = rid.decode("latin-1")
        cl = headers.get(b"content-length")
        if cl is not None and cl.isdigit():
            content_length = int(cl)
        client = scope.get("client")
        ctx = RequestContext(request_id or new_request_id(), path, t0, client[0] if client else None)
        ctx.headers = headers
        try:
            await self._complete(ctx, receive, send, content_length)
        finally:
            for observe in self.observers:
                try:
                    observe(ctx)
                except Exception:  # one broken observer must not hide the others
                    log.exception("observer %r failed", observe)

    async def _complete(self, ctx: RequestContext, receive: Receive, send: Send, content_length: int) -> None:
        if content_length > self.max_body:
            await self._drain_body(receive)
            await self.relay.send_error(send, ctx, _too_large(self.max_body))
            return
        raw = await self._read_body(receive)
        if raw is None:
            await self.relay.send_error(send, ctx, _too_large(self.max_body))
            return
        ctx.bytes_in = len(raw)
        access = self.access
        try:
            # Who, then what: 401 before 400, as an API gateway answers.
            if access is not None:
                access.authenticate(ctx)
            if self.audit is not None:
                self.audit.check_headers(ctx)
            route = self._parse(ctx, raw)
            if access is not None:
                access.authorize(ctx, route.name)
                await access.admit(ctx)
        except errors.GatewayError as err:
            await self.relay.send_error(send, ctx, err)
            if access is not None and ctx.ticket is not None:
                access.release(ctx)
            return
        task = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(receive, ctx, task))
        try:
            await self.relay.handle(ctx, route, raw, send)
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
            watcher.cancel()
            if access is not None and ctx.ticket is not None:
                access.release(ctx)

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

    def _parse(self, ctx: RequestContext, raw: bytes) -> Any:
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
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise errors.bad_request("'stream' must be a boolean.", "stream")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
            raise errors.bad_request("'max_tokens' must be a non-negative integer.", "max_tokens")
        route = self.router.route(model)
        if route is None:
            raise errors.model_not_found(model)
        ctx.body = body
        ctx.model = model
        ctx.stream = bool(stream)
        ctx.max_tokens = max_tokens
        return route

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError
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
            err = errors.model_not_found(model)
            await self._json(send, 404, orjson.loads(err.body()))
            return
        await self._json(
            send,
            200,
            {"id": model, "object": "model", "created": self.router.started_at, "owned_by": "fortress"},
        )

    # -- admin -----------------------------------------------------------------------------

    async def _admin(self, scope: Scope, receive: Receive, send: Send, method: str, path: str) -> None:
        if not self._admin_allowed(scope):
            await self._simple_error(send, 401, "Admin access needs the admin token.", "authentication_error")
            return
        if self.access is not None and not path.startswith("/admin/replicas"):
            answer = await self.access.handle_admin(method, path, await self._read_body(receive) or b"")
            if answer is not None:
                await self._json(send, answer[0], answer[1])
                return
        if path == "/admin/replicas" and method == "GET":
            await self._json(send, 200, self.status())
        elif path == "/admin/replicas" and method == "POST":
            raw = await self._read_body(receive)
            try:
                req = orjson.loads(raw or b"{}")
                url = str(req["url"])
                tier = Tier(req.get("tier", "primary"))
                model = req.get("model")
            except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
                await self._simple_error(send, 400, f"Bad replica: {exc}", "invalid_request_error")
                return
            pool = self._pool_for(model)
            if pool is None:
                await self._simple_error(send, 404, f"No pool for model {model!r}.", "invalid_request_error")
                return
            replica = self.router.add_replica(pool, url, tier)
            await self._json(send, 201, replica.snapshot())
        elif path.startswith("/admin/replicas/") and method == "DELETE":
            name = path[len("/admin/replicas/") :]
            replica = next((r for r in self.router.all_replicas() if r.name == name), None)
            if replica is None:
                await self._simple_error(send, 404, f"No replica named {name!r}.", "invalid_request_error")
                return
            await self.router.drain(replica)
            await self._json(send, 200, {"removed": name})
        else:
            await self._simple_error(
                send, 404, f"Unknown path {method} {path}.", "invalid_request_error", "not_found"
            )

    def _admin_allowed(self, scope: Scope) -> bool:
        token = self.config.server.admin_token
        if token:
            for name, value in scope["headers"]:
                if name == b"authorization":
                    return hmac.compare_digest(value, b"Bearer " + token.encode())
            return False
        client = scope.get("client")
        # Without an admin token, only this machine may use the admin API.
        return bool(client) and client[0] in ("127.0.0.1", "::1")

    def _pool_for(self, model: str | None) -> Any:
        for pool in self.router.pools:
            if pool.model == model:
                return pool
        return self.router.default_pool() if model is None else None

    def status(self) -> dict[str, Any]:
        """The replica table behind ``fortress status``."""
        pools = []
        for pool in self.router.pools:
            pools.append(
                {
                    "model": pool.model,
                    "aliases": list(pool.config.aliases),
                    "replicas": [r.snapshot() for r in pool.replicas],
                }
            )
        ready, missing = self.router.ready()
        out: dict[str, Any] = {"ready": ready, "models_without_healthy_replica": missing, "pools": pools}
        if self.processes is not None:
            out["processes"] = self.processes()
        return out

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    async def _json(send: Send, status: int, obj: Any) -> None:
        body = orjson.dumps(obj)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _simple_error(
        self, send: Send, status: int, message: str, type_: str, code: str | None = None
    ) -> None:
        await self._json(send, status, orjson.loads(errors.error_body(message, type_, code)))


def _too_large(limit: int) -> errors.GatewayError:
    return errors.GatewayError(
        413,
        f"The request body is larger than the limit of {limit} bytes.",
        "invalid_request_error",
        "request_too_large",
    )
