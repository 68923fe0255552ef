"""Relay one completion request to a replica and its answer back to the client.

The body goes upstream as received (re-encoded only to ask for stream usage or to replace an
alias by the real model id). Upstream bytes go to the client as they arrive, at SSE event
boundaries for streams. A failure before the first byte reached the client is reported to the
outlier detector (which decides whether the replica is ejected) and another replica is tried;
after that, the stream ends with an OpenAI error event, unless the pool has ``continuation``:
then a chat stream cut by its replica goes on from another one (``gateway/continuation.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import Any

import orjson

from fortress.config import FortressConfig
from fortress.core import errors
from fortress.core.context import RequestContext
from fortress.core.layers import Capacity
from fortress.core.loops import current_task, running_loop
from fortress.gateway.conform import fix_chat_completion, openai_error
from fortress.gateway.continuation import Continuation
from fortress.gateway.deadlines import Deadlines
from fortress.gateway.sse import RESPONSES_DONE, StreamTap, first_event_model
from fortress.gateway.upstream import ConnectFailed, ConnectionLost, Response, UpstreamError, UpstreamPool
from fortress.gateway.watchdog import Watchdog
from fortress.routing.outlier import Failure, OutlierDetector
from fortress.routing.pool import Route, Router
from fortress.routing.replica import Replica, State

log = logging.getLogger("fortress.relay")

_HOLD = object()  # _pump: the task must await something before more goes out
_END = object()  # _pump: the replica's answer is complete

Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = b"application/json"
# Request header lines sent to replicas besides Host, Content-Length and X-Request-Id.
_JSON_HEAD = b"Content-Type: application/json\r\n"
_STREAM_HEAD = b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _Done:
    """An awaitable that is already done (``await`` returns None without suspending)."""

    __slots__ = ()

    def __await__(self) -> Iterator[None]:
        return iter(())


_DONE = _Done()


class _Retry(Exception):
    """This attempt failed before anything reached the client; another replica may try."""

    def __init__(self, error: errors.GatewayError, same_replica: bool = False) -> None:
        self.error = error
        # The replica had closed the pooled keep-alive connection (llama-server does so after
        # every stream without saying so): not its fault, try it again on a fresh connection.
        self.same_replica = same_replica


class _Cut(Exception):
    """A stream of a pool with continuation lost its replica after the client got some of it."""

    def __init__(self, error: errors.GatewayError) -> None:
        self.error = error


class Relay:
    """Holds the upstream connection pool and relays requests to picked replicas."""

    def __init__(
        self,
        config: FortressConfig,
        router: Router,
        outlier: OutlierDetector,
        finish: Callable[[RequestContext], Awaitable[None]] | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        self.config = config
        # The fleet: wakes a pool at zero before a request for it is relayed.
        self.capacity = capacity
        self.router = router
        self.outlier = outlier
        self.pool: UpstreamPool | None = None
        # The requests' upstream timeouts (first byte, idle, total): coarse timers, one loop
        # timer for all of them.
        self.deadlines = Deadlines()
        self.conform = config.server.conform_responses
        # Awaited once per request before its last byte goes out (the audit journal's commit).
        self.finish = finish

    async def start(self) -> None:
        # Only the TCP connect is timed by the pool; the other timeouts are the Watchdog's.
        self.pool = UpstreamPool(
            limit=self.config.server.upstream_connections,
            keepalive_timeout=30.0,
            connect_timeout=self.config.timeouts.connect,
        )

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        self.deadlines.close()

    async def handle(self, ctx: RequestContext, route: Route, body: bytes, send: Send) -> None:
        """Pick, relay, retry. Ends with a complete response sent to the client. ``body`` is
        what goes upstream (``upstream_body``)."""
        rcfg = self.config.routing
        if self.capacity is not None and not _any_healthy(route):
            try:
                await self.capacity.wait(route.pool.name, route.name)
            except errors.GatewayError as exc:
                await self.send_error(send, ctx, exc)
                return
            # The index was rebuilt when the woken replicas joined: route by the new one.
            route = self.router.route(route.name) or route
        wd = Watchdog(ctx, self.config.timeouts.total, self.deadlines)
        tried: tuple[Replica, ...] = ()
        last_error: errors.GatewayError | None = None
        again: Replica | None = None
        # Only pools that opted in pay for watching a stream's text.
        cont = (
            Continuation()
            if ctx.stream and ctx.path == "/v1/chat/completions" and route.pool.config.continuation
            else None
        )
        first_body = body  # a continuation's request is built from what the first replica got
        try:
            while ctx.attempts < rcfg.max_attempts:
                replica = again or self.router.pick(route, ctx, tried)
                if replica is None:
                    break
                if again is None:
                    tried += (replica,)
                    ctx.attempts += 1
                ctx.replica = replica if cont is None else cont.served(replica)
                try:
                    await self._attempt(
                        ctx, replica, route.upstream_model, body, send, wd, fresh=again is not None, cont=cont
                    )
                    return
                except _Retry as r:
                    last_error = r.error
                    ctx.error = r.error.message
                    again = replica if r.same_replica and again is None else None
                except _Cut as c:
                    assert cont is not None
                    last_error = c.error
                    again = None
                    if cont.finish is not None:  # the text was complete: only [DONE] was missing
                        await self._close_finished(ctx, cont, send)
                        return
                    log.info(
                        "request %s: replica %s died mid-stream (%s); continuing on another replica",
                        ctx.request_id,
                        replica.name,
                        c.error.message,
                    )
                    cont.cut(replica.name)
                    nxt = cont.body(first_body)
                    if nxt is None:  # max_tokens used up: the answer ends here
                        await self._close_length(ctx, cont, send)
                        return
                    body = nxt
        finally:
            wd.stop()
        if cont is not None and ctx.responded:
            # Cut, and no replica could carry the stream on: an error event, as without it.
            await self._fail(
                ctx, send, True, last_error or errors.upstream_failed("No replica to continue on.")
            )
            return
        if last_error is None:
            healthy = self.router.healthy_count(route)
            detail = "Every replica is unhealthy." if healthy == 0 else ""
            last_error = errors.no_replica(route.name, rcfg.retry_after, detail)
            ctx.replica = None
        await self.send_error(send, ctx, last_error)

    def upstream_body(self, ctx: RequestContext, route: Route, raw: bytes) -> bytes:
        """The body to send upstream: as received, or re-encoded to ask for stream usage or to
        replace an alias. Raises a 400 ``GatewayError`` for a body JSON cannot re-encode."""
        assert ctx.body is not None
        body = dict(ctx.body)  # ctx.body stays what the client sent (audit captures it)
        changed = False
        if route.is_alias:
            body["model"] = route.upstream_model
            changed = True
        if ctx.stream and ctx.path != "/v1/responses":  # the Responses API always reports usage
            so = body.get("stream_options")
            ctx.want_usage = isinstance(so, dict) and so.get("include_usage") is True
            if not ctx.want_usage:
                body["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
                changed = True
        if not changed:
            return raw
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError:  # nested deeper than orjson writes
            raise errors.bad_request(
                "The request body is nested more than 254 levels deep; it cannot be relayed."
            ) from None

    async def _attempt(
        self,
        ctx: RequestContext,
        replica: Replica,
        want: str,
        body: bytes,
        send: Send,
        wd: Watchdog,
        fresh: bool = False,
        cont: Continuation | None = None,
    ) -> None:
        pool = self.pool
        assert pool is not None
        t_up = perf_counter()
        ctx.overhead += t_up - ctx.t0 if ctx.attempts == 1 else 0.0
        headers = b"".join(
            (
                _STREAM_HEAD if ctx.stream else _JSON_HEAD,
                b"X-Request-Id: ",
                ctx.request_id.encode("latin-1"),
                b"\r\n",
            )
        )
        replica.in_flight += 1
        wd.expect(self.config.timeouts.first_byte, "first_byte")
        try:
            async with pool.post(replica.url, ctx.path, headers, body, fresh) as resp:
                status = resp.status
                if status >= 500:
                    text = await resp.read()
                    self.outlier.failure(replica, Failure.STATUS, f"status {status}", status)
                    raise _Retry(
                        errors.upstream_failed(f"Replica {replica.name} answered {status}: {_snippet(text)}")
                    )
                if status == 404:
                    # A 404 that speaks of the model: the pool's model may be gone from this
                    # replica (a vLLM serving another model answers so). Not relayed: tried
                    # elsewhere, and the replica's /v1/models is checked at once. Any other 404
                    # (a server without /v1/completions) is the replica's answer, relayed below.
                    text = await resp.read()
                    if b"model" in text.lower():
                        self.outlier.suspect_model(replica)
                        raise _Retry(
                            errors.upstream_failed(
                                f"Replica {replica.name} does not serve {want!r}: {_snippet(text, 120)}"
                            )
                        )
                if not resp.complete:  # more to come: from now on, silences are what is timed
                    wd.expect(self.config.timeouts.idle, "idle")
                if cont is not None and cont.resuming and status != 200:
                    # The replica would not continue (an engine without continue_final_message
                    # answers 400): the client's stream ends as it would have without it.
                    text = await resp.read()
                    await self._fail(
                        ctx,
                        send,
                        True,
                        errors.upstream_failed(
                            f"Replica {replica.name} could not continue the stream: {_snippet(text)}"
                        ),
                    )
                    return
                ctx.error = None  # an earlier attempt's failure is not this answer's
                if ctx.stream and status == 200:
                    await self._relay_stream(ctx, replica, want, resp, send, wd, cont)
                else:
                    data = resp.body() if resp.complete else await resp.read()
                    ctx.ttfb = perf_counter() - ctx.t0
                    ctx.status = status
                    ctype = resp.header("content-type", "application/json") or "application/json"
                    if status == 200:
                        data = self._inspect(ctx, replica, want, data)
                    elif status >= 400:  # a replica's own 4xx: relayed, in OpenAI's error format
                        fixed = openai_error(data, status)
                        if fixed is not None:
                            data, ctype = fixed, "application/json"
                        ctx.error = _snippet(data)
                    t_out = perf_counter()
                    hdrs = self._headers(ctx, replica, ctype)
                    hdrs.append((b"content-length", str(len(data)).encode()))
                    ctx.overhead += perf_counter() - t_out
                    hdrs.append((b"x-fortress-overhead-ms", f"{ctx.overhead * 1000:.3f}".encode()))
                    ctx.bytes_out = len(data)
                    await self._finish(ctx)
                    ctx.responded = True
                    respond = getattr(getattr(send, "__self__", None), "respond", None)
                    if respond is None or not respond(status, hdrs, data):
                        await send({"type": "http.response.start", "status": status, "headers": hdrs})
                        await send({"type": "http.response.body", "body": data, "more_body": False})
                if ctx.status < 500:  # not a stream the replica cut short
                    self.outlier.success(replica)
        except _Retry:
            raise
        except asyncio.CancelledError:
            reason = ctx.cancelled_by
            if reason is None or reason == "client_disconnect":
                raise
            # One of our timeouts fired: this task's cancel was ours, so take it back.
            task = current_task()
            if task is not None:
                task.uncancel()
            err = errors.upstream_timeout(
                f"Replica {replica.name} did not answer within the {reason} timeout."
            )
            self.outlier.failure(replica, Failure.TIMEOUT, f"{reason} timeout")
            if not ctx.responded and reason != "total":
                ctx.cancelled_by = None
                raise _Retry(err) from None
            if cont is not None and reason != "total" and cont.can_continue():
                ctx.cancelled_by = None
                raise _Cut(err) from None
            await self._fail(ctx, send, ctx.responded, err)
        except UpstreamError as exc:
            err = errors.upstream_failed(f"Replica {replica.name} failed: {exc.describe()}")
            if not ctx.responded and not fresh and isinstance(exc, ConnectionLost) and exc.stale:
                raise _Retry(err, same_replica=True) from None
            kind = Failure.CONNECT if isinstance(exc, ConnectFailed) else Failure.RESET
            self.outlier.failure(replica, kind, exc.describe())
            if not ctx.responded:
                raise _Retry(err) from None
            if cont is not None and cont.can_continue():
                raise _Cut(err) from None
            await self._fail(ctx, send, True, err)
        finally:
            replica.in_flight -= 1

    def _wrong_model(self, replica: Replica, served: str, want: str) -> None:
        """An answer from another model: never relayed; the replica leaves rotation."""
        self.outlier.wrong_model(replica, served, want)
        raise _Retry(
            errors.upstream_failed(
                f"Replica {replica.name} answered as model {served!r}, not {want!r}; "
                "the answer was not relayed."
            )
        )

    async def _relay_stream(
        self,
        ctx: RequestContext,
        replica: Replica,
        want: str,
        resp: Response,
        send: Send,
        wd: Watchdog,
        cont: Continuation | None = None,
    ) -> None:
        """Relay a stream event by event. The response starts with the first complete event,
        once its model is checked: until then a failure is retried on another replica. With
        ``cont`` (a pool with continuation) the events also go through it: it keeps the text,
        and rewrites a continuing replica's events into the client's stream."""
        resuming = cont is not None and cont.resuming
        if ctx.path == "/v1/responses":
            tap = StreamTap(strip_usage=False, done_marks=RESPONSES_DONE)
        else:
            # A continuing replica's usage is summed with the cut ones' before it goes out.
            tap = StreamTap(strip_usage=not ctx.want_usage and not resuming)
        chunks = ctx.chunks if resuming else 0
        checked = False
        mark = wd.mark
        # Once the response has started, a plain stream to one of the gateway's own connections
        # is pumped from the replica's read callback straight to the client (_pump, the
        # connection's write_chunk).
        write = getattr(getattr(send, "__self__", None), "write_chunk", None) if cont is None else None
        async for data in resp.iter_any():
            mark()
            out = tap.feed(data)
            if out:
                if not checked:
                    checked = True
                    got = first_event_model(out)
                    if got is not None and got != want:
                        self._wrong_model(replica, got, want)
                    if not ctx.responded:
                        await self._start_stream(ctx, replica, send)
                if cont is not None:
                    out = cont.feed(out, ctx.want_usage)
                    if not out:
                        continue
                ctx.bytes_out += len(out)
                if tap.done and not ctx.finished:
                    # The chunk with [DONE] waits until the request's record is committed.
                    ctx.usage = cont.usage if resuming and cont is not None else _usage(tap.usage)
                    ctx.chunks = chunks + tap.chunks
                    await self._finish(ctx)
                await send({"type": "http.response.body", "body": out, "more_body": True})
                # A slow client holds us in send(); that silence is not the replica's.
                mark()
                if write is not None and not tap.done:
                    await self._pump(ctx, resp, tap, write, send, mark)
                    break
        rest = tap.flush()
        ctx.usage = cont.usage if resuming and cont is not None else _usage(tap.usage)
        ctx.chunks = chunks + tap.chunks
        if not tap.done:
            # The replica closed the stream early: tell the client instead of ending silently.
            err = errors.upstream_failed(f"Replica {replica.name} ended the stream early.")
            self.outlier.failure(replica, Failure.RESET, "stream ended early")
            if not ctx.responded:
                raise _Retry(err)
            if cont is not None and cont.can_continue():
                raise _Cut(err)  # the unfinished last event is dropped: its text is not sent
            await self._fail(ctx, send, True, err, rest)
            return
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    async def _pump(
        self,
        ctx: RequestContext,
        resp: Response,
        tap: StreamTap,
        write: Callable[[bytes], bool],
        send: Send,
        mark: Callable[[], None],
    ) -> None:
        """Relay the rest of a started stream from the replica's read callback: each piece
        goes through the tap and straight to the client's connection (``write``: the
        protocol's ``write_chunk``), without waking this task per event. The task wakes only for what needs
        awaiting, through the ASGI ``send`` as before: the event with [DONE] (after the
        request's record is committed), a client that stopped reading (uvicorn's drain), a
        client gone. Returns at the end of the replica's answer; raises its error."""
        loop = running_loop()
        try:
            while True:
                fut: asyncio.Future[object] = loop.create_future()
                held: list[bytes] = []

                def sink(data: bytes, fut: asyncio.Future[object] = fut, held: list[bytes] = held) -> None:
                    mark()
                    out = tap.feed(data)
                    if not out:
                        return
                    ctx.bytes_out += len(out)
                    if held or (tap.done and not ctx.finished) or not write(out):
                        held.append(out)
                        if not fut.done():
                            resp.unpump()
                            fut.set_result(_HOLD)
                        return

                def end(err: Exception | None, fut: asyncio.Future[object] = fut) -> None:
                    if not fut.done():
                        fut.set_result(_END if err is None else err)

                resp.pump(sink, end)
                got = await fut
                if got is _END:
                    return
                if isinstance(got, BaseException):
                    raise got
                for out in held:
                    if tap.done and not ctx.finished:
                        ctx.usage = _usage(tap.usage)
                        ctx.chunks = tap.chunks
                        await self._finish(ctx)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    mark()
        finally:
            resp.unpump()

    async def _close_finished(self, ctx: RequestContext, cont: Continuation, send: Send) -> None:
        """End a stream whose replica died after its last content: only [DONE] was missing."""
        out = cont.done_events(ctx.want_usage)
        ctx.usage = cont.usage
        ctx.error = None
        ctx.bytes_out += len(out)
        await self._finish(ctx)
        await send({"type": "http.response.body", "body": out, "more_body": False})

    async def _close_length(self, ctx: RequestContext, cont: Continuation, send: Send) -> None:
        """End a cut stream that had used its ``max_tokens``: the finish the replica would have sent."""
        assert cont.ident is not None
        cid, created, model = cont.ident
        chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        }
        cont.finish = "length"
        last = b"data: " + orjson.dumps(chunk) + b"\n\n"
        await send({"type": "http.response.body", "body": last, "more_body": True})
        await self._close_finished(ctx, cont, send)

    async def _start_stream(self, ctx: RequestContext, replica: Replica, send: Send) -> None:
        t_in = perf_counter()
        ctx.status = 200
        ctx.ttfb = t_in - ctx.t0
        hdrs = self._headers(ctx, replica, None)
        ctx.overhead += perf_counter() - t_in
        hdrs.append((b"x-fortress-overhead-ms", f"{ctx.overhead * 1000:.3f}".encode()))
        ctx.responded = True
        await send({"type": "http.response.start", "status": 200, "headers": hdrs})

    def _inspect(self, ctx: RequestContext, replica: Replica, want: str, data: bytes) -> bytes:
        """Check the answer's model; keep its usage; fill in fields OpenAI's schema requires."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data  # not JSON: relay it as the replica sent it
        if not isinstance(obj, dict):
            return data
        got = obj.get("model")
        if isinstance(got, str) and got != want:
            self._wrong_model(replica, got, want)
        usage = obj.get("usage")
        ctx.usage = _usage(usage)
        if self.conform and obj.get("object") == "chat.completion" and fix_chat_completion(obj):
            return orjson.dumps(obj)
        return data

    def _headers(self, ctx: RequestContext, replica: Replica, ctype: str | None) -> list[tuple[bytes, bytes]]:
        base = [(b"content-type", ctype.encode())] if ctype else list(_SSE_HEADERS)
        if ctx.extra_headers:
            base += ctx.extra_headers
        base += [
            (b"x-request-id", ctx.request_id.encode()),
            (b"x-fortress-replica", replica.name.encode()),
            (b"x-fortress-tier", str(replica.tier).encode()),
            (b"x-fortress-attempts", str(ctx.attempts).encode()),
        ]
        return base

    async def _fail(
        self, ctx: RequestContext, send: Send, started: bool, err: errors.GatewayError, rest: bytes = b""
    ) -> None:
        ctx.error = err.message
        if not started:
            await self.send_error(send, ctx, err)
            return
        ctx.status = err.status
        event = b"data: " + err.body() + b"\n\n"
        await self._finish(ctx)
        await send({"type": "http.response.body", "body": rest + event, "more_body": False})

    async def end(self, send: Send, ctx: RequestContext, err: errors.GatewayError) -> None:
        """End the request with ``err``: an error response, or, when the response has started
        (a stream), a final error event. Recorded first, as every answer."""
        await self._fail(ctx, send, ctx.responded, err)

    async def record_end(self, ctx: RequestContext) -> None:
        """Hand a request that ended without an answer (client gone) to the audit layer."""
        await self._finish(ctx)

    def _finish(self, ctx: RequestContext) -> Awaitable[None]:
        """What to await before answering: the request's record committed, once. A plain
        function returning the hook's awaitable (or one already done), not a coroutine around
        it: one coroutine less on every request's path."""
        if self.finish is not None and not ctx.finished:
            ctx.finished = True
            return self.finish(ctx)
        return _DONE

    async def send_error(self, send: Send, ctx: RequestContext, err: errors.GatewayError) -> None:
        """Answer with an OpenAI-format error (after the request's record is committed)."""
        ctx.status = err.status
        ctx.error = err.message
        body = err.body()
        headers = [
            (b"content-type", _JSON),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", ctx.request_id.encode()),
            *ctx.extra_headers,
            *err.headers,
        ]
        if ctx.attempts:  # the replicas tried before this error (502/503/504 after retries)
            headers.append((b"x-fortress-attempts", str(ctx.attempts).encode()))
        ctx.bytes_out = len(body)
        await self._finish(ctx)
        ctx.responded = True
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _usage(usage: Any) -> dict[str, Any] | None:
    """Usage in chat completions' terms: the Responses API says input/output_tokens."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage and "prompt_tokens" not in usage:
        usage = {
            **usage,
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
        }
    return usage


def _snippet(text: bytes, limit: int = 200) -> str:
    try:
        obj = orjson.loads(text)
        msg = obj["error"]["message"] if isinstance(obj.get("error"), dict) else obj.get("error")
        if msg:
            return str(msg)[:limit]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        pass
    return text[:limit].decode("utf-8", "replace") or "(empty body)"


def _any_healthy(route: Route) -> bool:
    """A healthy replica in any tier (normally the first one looked at)."""
    for tier in route.tiers:
        for r in tier:
            if r.state is State.HEALTHY:
                return True
    return False
