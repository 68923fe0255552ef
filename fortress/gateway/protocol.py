"""The gateway's HTTP/1.1 connection protocol: uvicorn's httptools protocol with limits that
bound what one client connection may cost.

``guarded_protocol(limits)`` returns a protocol class for ``uvicorn.Config(http=...)`` with
``limits`` (a ``ConnectionLimits``, built from ``server:`` by ``ConnectionLimits.from_config``)
and its own ``ConnectionStats`` bound to it. Each connection gets:

- a header timeout: from the connection's first moment, and from the first byte of each later
  request, the request line and headers must be complete within ``header_timeout`` (else 408
  and close). A keep-alive connection idle after a response is uvicorn's keep-alive timeout's.
- a body timeout: a body must be complete by ``headers time + body_timeout +
  bytes received / min_upload_rate``, so a large upload at a decent rate passes and a drip
  does not (408 if no response has started, then close). Chunked and sized bodies alike;
  bytes past ``max_body_bytes`` earn no more time.
- header limits: more than ``max_headers`` headers, or more than ``max_header_bytes`` of URL,
  header names and values, get 431 and close; the application never sees the request.
- a connection cap: past ``max_connections`` open connections a new one is served only
  ``/health``, ``/ready``, ``/metrics`` and ``/admin/...`` (anything else: 503 ``server_busy``
  with ``Retry-After: 1``); past ``max_connections + reserved_connections`` it is closed at once.

Every answer the protocol writes itself is an OpenAI-format JSON error with ``connection:
close``; the connection then lingers for at most ``LINGER`` seconds, reading and discarding,
so the client reads the answer rather than a reset. None of these events is logged above
DEBUG: a client could otherwise flood the logs.

Scope marker: when the body timeout closes a request the application is already handling,
``scope["fortress.timeout"] = "body"`` is set on that request's ASGI scope before the
application sees ``http.disconnect``, so it can record the request as a 408 rather than as a
client that went away.

WebSocket upgrades are offered on ``/v1/ws`` only (``fortress.gateway.websocket``), once the
upgrade request passed the header limits and the connection cap (past ``max_connections`` it
gets the 503 like any other path); an upgraded connection stays counted in ``open`` until it
closes. An upgrade request for any other path is served as plain HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import resource
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from fortress.config.server import Server
from fortress.core.errors import error_body
from fortress.gateway.deadlines import Deadline, Deadlines
from fortress.gateway.websocket import WS_PATH

log = logging.getLogger("fortress.gateway.protocol")

# What uvicorn refuses in response header names and values (a name with a separator, a value
# with a control character other than tab).
# As byte sets for ``bytes.translate``, which deletes them in one pass: a regex search over a
# response's ~300 bytes of headers cost ten times as much.
_BAD_NAME = bytes(range(0x20)) + b'\x7f()<>@,;:[]={} \t\\"'
_BAD_VALUE = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"

# Response headers that change how the response is framed or the connection ends.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})

# Paths served on connections past max_connections: what operators and orchestrators need to
# see and fix an overloaded gateway.
OPERATIONAL_PATHS = frozenset({"/health", "/ready", "/metrics"})
OPERATIONAL_PREFIX = "/admin/"
# Seconds a rejected connection is kept half-closed, its input discarded, before it is closed:
# closing with unread input would reset the connection and could destroy the answer in flight.
LINGER = 2.0
# File descriptors kept for everything else a gateway opens: journal, database, logs, pipes.
SPARE_FDS = 256
MIN_CONNECTIONS = 64
# Separators a raw request head carries beyond its URL, names and values ("GET ", " HTTP/1.1",
# ": " and CRLF per header): allowed on top of max_header_bytes when a head is still incomplete.
HEAD_OVERHEAD = 64
PER_HEADER_OVERHEAD = 4

# Where a connection is in its current request.
_HEAD, _BODY, _IDLE, _DONE = range(4)


class _Reject(Exception):
    """Raised from a parser callback to stop parsing; the answer waits in ``_pending``."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one client connection may cost; see the module docstring for each limit."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    min_upload_rate: int = 16384
    max_connections: int = 1024
    reserved_connections: int = 32
    max_headers: int = 100
    max_header_bytes: int = 32768
    max_body_bytes: int = 4 * 1024 * 1024

    @property
    def raw_head_bytes(self) -> int:
        """The most raw bytes an incomplete request head may hold: its URL, names and values,
        plus room for the separators."""
        return self.max_header_bytes + HEAD_OVERHEAD + PER_HEADER_OVERHEAD * self.max_headers

    @classmethod
    def from_config(cls, server: Server, nofile: int | None = None) -> ConnectionLimits:
        """The limits of ``server:``. Without ``max_connections``, the cap follows the open-file
        limit ``nofile`` (default: the soft ``RLIMIT_NOFILE``, first raised to the hard limit)."""
        if nofile is None:
            nofile = raise_nofile_limit()
        max_connections = server.max_connections
        if max_connections is None:
            max_connections = default_max_connections(
                nofile, server.upstream_connections, server.reserved_connections
            )
        elif max_connections + server.reserved_connections + server.upstream_connections > nofile:
            # Once, at start: the descriptors run out before the cap is reached.
            log.warning(
                "server.max_connections %d + reserved_connections %d + upstream_connections %d "
                "exceed the open-file limit %d",
                max_connections,
                server.reserved_connections,
                server.upstream_connections,
                nofile,
            )
        return cls(
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            min_upload_rate=server.min_upload_rate,
            max_connections=max_connections,
            reserved_connections=server.reserved_connections,
            max_headers=server.max_headers,
            max_header_bytes=server.max_header_bytes,
            max_body_bytes=server.max_body_bytes,
        )


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one, best effort; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def default_max_connections(nofile: int, upstream_connections: int, reserved: int) -> int:
    """Client connections a process with ``nofile`` descriptors can serve in full, leaving room
    for the upstream pool, the reserve and ``SPARE_FDS`` (at least ``MIN_CONNECTIONS``)."""
    return max(MIN_CONNECTIONS, nofile - upstream_connections - reserved - SPARE_FDS)


@dataclass(slots=True)
class ConnectionStats:
    """Counters of one protocol class (one gateway): open connections and what was refused."""

    open: int = 0
    refused_total: int = 0  # closed at once: past max_connections + reserved_connections
    busy_total: int = 0  # 503 server_busy on a reserve connection
    timeouts_total: dict[str, int] = field(default_factory=lambda: {"header": 0, "body": 0})
    too_large_headers_total: int = 0  # 431
    invalid_total: int = 0  # 400: not HTTP the parser accepts

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain data, keys prefixed ``connections_`` so they merge with other
        layers' ``stats()``; ``connections_timeouts_total`` is keyed by ``header`` / ``body``."""
        return {
            "connections_open": self.open,
            "connections_refused_total": self.refused_total,
            "connections_busy_total": self.busy_total,
            "connections_timeouts_total": dict(self.timeouts_total),
            "connections_too_large_headers_total": self.too_large_headers_total,
            "connections_invalid_total": self.invalid_total,
        }


def _answer(status: int, code: str, message: str, type_: str, extra: bytes = b"") -> bytes:
    body = error_body(message, type_, code)
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


HEADER_TIMEOUT = _answer(
    408,
    "request_timeout",
    "The request headers did not arrive in time.",
    "invalid_request_error",
)
BODY_TIMEOUT = _answer(
    408,
    "request_timeout",
    "The request body did not arrive in time.",
    "invalid_request_error",
)
TOO_LARGE_HEADERS = _answer(
    431,
    "request_header_fields_too_large",
    "The request has too many headers or they are too large.",
    "invalid_request_error",
)
SERVER_BUSY = _answer(
    503,
    "server_busy",
    "The gateway has too many open connections. Retry shortly.",
    "service_unavailable",
    b"retry-after: 1\r\n",
)
INVALID = _answer(400, "invalid_http", "The request is not valid HTTP/1.1.", "invalid_request_error")


class _Cycle:
    """One request and its response on a connection: the ASGI ``receive`` and ``send`` the
    application gets, and the task that runs it.

    What uvicorn's ``RequestResponseCycle`` does, with less per request (measured: about half
    of the server side's CPU per request with a trivial application): slots instead of a
    dict, no ``asyncio.Event`` (``receive`` waits on a future only when the body is not there
    yet, which for a small request it always is), one coroutine around the application
    instead of two. And the response's head is written together with its first body part: a
    whole non-streamed answer in one write (one system call, one TCP segment) where uvicorn
    makes two. An application here always follows ``http.response.start`` with a body part at
    once, so nothing waits on the head. Header names and values are checked once per response
    (all names, then all values) rather than twice per header.
    """

    __slots__ = (
        "_head",
        "_on_disconnect",
        "_waiter",
        "body",
        "body_size",
        "chunked_encoding",
        "delivered",
        "disconnected",
        "expected_content_length",
        "flow",
        "keep_alive",
        "more_body",
        "on_response",
        "protocol",
        "response_complete",
        "response_started",
        "scope",
        "transport",
        "waiting_for_100_continue",
    )

    def __init__(
        self, protocol: GuardedProtocol, scope: Any, keep_alive: bool, expect_100_continue: bool
    ) -> None:
        self.scope = scope
        self.protocol = protocol
        self.transport: asyncio.Transport = protocol.transport
        self.flow = protocol.flow
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.disconnected = False
        # Request body: parts not yet handed to the application, and whether more will come.
        self.body: list[bytes] = []
        self.body_size = 0
        self.more_body = True
        self.delivered = False  # the last part of the body went to the application
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding: bool | None = None
        self.expected_content_length = 0
        self.on_response: Callable[[], None] = protocol.on_response_complete
        self._head: bytes | None = None
        self._on_disconnect: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- the protocol's side ---------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """A part of the request body arrived."""
        self.body.append(data)
        self.body_size += len(data)
        if self.body_size > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        self.wake()

    def finish(self) -> None:
        """The request body is complete."""
        self.more_body = False
        self.wake()

    def wake(self) -> None:
        """Wake a ``receive`` waiting for the body (or for the end)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def watch_disconnect(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (once, from the protocol's callback) if the client goes away before
        the response is complete; None stops watching. What the application would otherwise
        learn from a task waiting in ``receive()`` for ``http.disconnect``, without that task."""
        if callback is not None and self.disconnected:  # gone already
            callback()
            return
        self._on_disconnect = callback

    def disconnect(self) -> None:
        """The client is gone (or must be treated so): no more writes, the application told."""
        self.disconnected = True
        self.wake()
        callback = self._on_disconnect
        if callback is not None:
            self._on_disconnect = None
            callback()

    # -- the application's side ------------------------------------------------------------

    async def run(self, app: Any) -> None:
        """Run ``app`` for this request. A failure is logged and answered 500 if nothing was
        sent yet (else the connection is closed); a ``CancelledError`` the application raises
        itself because the client is gone (not a cancellation of its task) ends the request
        quietly instead of as a logged traceback."""
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and self.disconnected:
                task = asyncio.current_task()
                if task is None or not task.cancelling():
                    return
            log.error("Exception in ASGI application", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.transport.close()
        else:
            if result is not None:
                log.error("ASGI callable should return None, but returned %r.", result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                log.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                log.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _nothing

    async def _send_500(self) -> None:
        body = error_body("The gateway failed on this request.", "server_error", "internal_error")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
        ]
        await self.send({"type": "http.response.start", "status": 500, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def receive(self) -> Any:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.waiting_for_100_continue = False
        if not self.body and (self.more_body or self.delivered):
            # Nothing to hand over yet (or all of it was): wait for more, the end, or the client
            # leaving, as uvicorn does.
            if not self.disconnected and not self.response_complete:
                self.flow.resume_reading()
                waiter = self._waiter = self.protocol.loop.create_future()
                await waiter
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": self._take_body(), "more_body": self.more_body}

    def write_chunk(self, data: bytes) -> bool:
        """Write ``data`` as one part of a started chunked response at once, from a callback
        (the relay's stream pump: no task switch per event). False, and nothing written, when it
        must go through ``send()`` instead: the client stopped reading (``send`` waits for it),
        is gone, or the response is not chunked or not started."""
        if (
            self.flow.write_paused
            or self.disconnected
            or not self.chunked_encoding
            or self._head is not None
            or self.response_complete
        ):
            return False
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            # Built first: headers refused raise before anything counts as started, so the
            # client still gets the 500 (nothing of this answer was written).
            self._head = self._build_head(message["status"], message.get("headers", ()))
            self.response_started = True
            self.waiting_for_100_continue = False
            return
        if self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        self._write_body(message.get("body", b""), message.get("more_body", False))

    def respond(self, status: int, headers: Any, body: bytes) -> bool:
        """A whole response at once, without the two ``send`` coroutines and their messages:
        what ``http.response.start`` then a last ``http.response.body`` would do. False, and
        nothing written, when it must go through ``send()``: the client stopped reading
        (``send`` waits for it) or a response has started."""
        if self.flow.write_paused or self.response_started:
            return False
        if not self.disconnected:  # else, like send(): nothing to write to
            self._head = self._build_head(status, headers)
            self.response_started = True
            self.waiting_for_100_continue = False
            self._write_body(body, False)
        return True

    def whole_body(self) -> bytes | None:
        """The request's whole body when all of it has arrived and none of it was handed over
        (``receive`` without the coroutine and its message); None otherwise: use ``receive``."""
        if (
            self.more_body
            or self.delivered
            or self.disconnected
            or self.response_complete
            or self.waiting_for_100_continue
        ):
            return None
        return self._take_body()

    def _take_body(self) -> bytes:
        """The body parts received so far, as one; the last of them marks the body delivered."""
        parts = self.body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.body = []
        if self.body_size > HIGH_WATER_LIMIT:
            self.flow.resume_reading()  # paused by feed() past the mark
        self.body_size = 0
        if not self.more_body:
            self.delivered = True
        return body

    def _write_body(self, body: bytes, more: bool) -> None:
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = body
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        if data:
            self.transport.write(data)
        if not more:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.wake()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _build_head(self, status: int, extra: Any) -> bytes:
        protocol = self.protocol
        defaults = protocol.server_state.default_headers
        headers = [*defaults, *extra] if defaults else extra
        names = b"".join([n for n, _ in headers])
        values = b"".join([v for _, v in headers])
        if len(names.translate(None, _BAD_NAME)) != len(names) or len(
            values.translate(None, _BAD_VALUE)
        ) != len(values):
            raise RuntimeError("Invalid HTTP header name or value.")
        if protocol.access_log:
            protocol.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                self.scope["method"],
                get_path_with_query_string(self.scope),
                self.scope["http_version"],
                status,
            )
        content = [STATUS_LINE[status]]
        closing = False
        lower = names.lower() != names  # the gateway's own names are lower case already
        for name, value in headers:
            if lower:
                name = name.lower()
            if name in _FRAMING:  # one set lookup for the other headers
                if name == b"content-length":
                    if self.chunked_encoding is None:
                        self.expected_content_length = int(value)
                        self.chunked_encoding = False
                elif name == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        self.expected_content_length = 0
                        self.chunked_encoding = True
                elif b"close" in [t.strip() for t in value.lower().split(b",")]:  # connection
                    self.keep_alive = False
                    closing = True
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not closing:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with timeouts, header limits and a connection cap.

    Use ``guarded_protocol(limits)``, which binds ``limits`` and a fresh ``counters``.
    """

    limits: ClassVar[ConnectionLimits]
    counters: ClassVar[ConnectionStats]
    # The connections' header, body and keep-alive timeouts (coarse: see gateway/deadlines.py).
    deadlines: ClassVar[Deadlines]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _HEAD
        self._counted = False  # this connection is in counters.open
        self._restricted = False  # past max_connections: operational paths only
        self._head_timer: Deadline | None = None
        self._body_timer: Deadline | None = None
        self._head_raw = 0  # bytes received while the current head is incomplete
        self._body_t0 = 0.0
        self._body_bytes = 0
        self._pending: tuple[bytes, str] | None = None  # (answer, what) for a _Reject

    @classmethod
    def stats(cls) -> dict[str, Any]:
        """This gateway's connection counters and its cap."""
        return {
            **cls.counters.snapshot(),
            "connections_max": cls.limits.max_connections,
            "connections_reserved": cls.limits.reserved_connections,
        }

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits, counters = self.limits, self.counters
        if counters.open >= limits.max_connections + limits.reserved_connections:
            counters.refused_total += 1
            transport.close()
            return
        counters.open += 1
        self._counted = True
        self._restricted = counters.open > limits.max_connections
        super().connection_made(transport)
        self._head_timer = self.deadlines.call_later(limits.header_timeout, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return  # refused in connection_made: nothing of it was set up
        self._counted = False
        self.counters.open -= 1
        self._phase = _DONE
        self._cancel_timers()
        # uvicorn's connection_lost, for this protocol's cycle.
        self.connections.discard(self)
        self.flow.resume_writing()
        if exc is None:
            self._unset_keepalive_if_required()  # cancels the keep-alive timer, closes
        self.parser = None  # type: ignore[assignment]
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_complete:
                cycle.disconnect()
            else:
                cycle.wake()

    def _should_upgrade_to_ws(self) -> bool:
        if self.ws_protocol_class is None:
            return False
        path = httptools.parse_url(self.url).path
        return path == WS_PATH.encode()

    def _upgrade(self) -> None:
        """Hand the connection to uvicorn's WebSocket protocol; it stays counted in ``open``
        until that protocol loses it (this one never hears of the connection again)."""
        self._phase = _DONE
        self._cancel_timers()
        self._counted = False
        super().handle_websocket_upgrade()
        ws = self.transport.get_protocol()
        lost = ws.connection_lost
        counters = self.counters

        def connection_lost(exc: Exception | None) -> None:
            counters.open -= 1
            lost(exc)

        ws.connection_lost = connection_lost  # type: ignore[method-assign]

    def _unsupported_upgrade_warning(self) -> None:
        log.debug("upgrade request served as plain HTTP")

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _DONE:
            return  # rejected: lingering until closed
        self._unset_keepalive_if_required()
        if phase == _IDLE:
            # Even bytes that start no request (a stray CRLF) start the header clock.
            self._phase = phase = _HEAD
            self._head_raw = 0
        if phase == _HEAD:
            self._head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._upgrade()
                return
            # Served as plain HTTP; the parser reads nothing after it, so the connection ends
            # with that response.
            self._unsupported_upgrade_warning()
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
            else:
                self.transport.close()
            return
        except httptools.HttpParserError:
            pending, self._pending = self._pending, None
            if pending is None:
                self.counters.invalid_total += 1
                pending = (INVALID, "invalid request")
            self._reject(*pending)
            return
        phase = self._phase
        if phase == _HEAD:
            limits = self.limits
            if self._head_raw > limits.raw_head_bytes:
                # The parser buffers a header until it ends: a huge one must not wait for that.
                self.counters.too_large_headers_total += 1
                self._reject(TOO_LARGE_HEADERS, "headers too large")
            elif self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                # While a response is still going out (a long stream), bytes of a next request
                # (or a stray CRLF after a body) wait: their clock starts when it is done.
                self._head_timer = self.deadlines.call_later(limits.header_timeout, self._head_expired)
        elif phase == _BODY and self._body_timer is None:
            self._arm_body_timer()

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != _HEAD:  # a pipelined request in the same chunk as the last one's end
            self._phase = _HEAD
            self._head_raw = 0

    def on_headers_complete(self) -> None:
        # Checked once per request, not per header (a call per header would cost every request);
        # data_received bounds an unfinished head, so at most one read's worth is parsed past
        # the limits. httptools may reach this in the same feed_data as the last header.
        limits = self.limits
        headers = self.headers
        if len(headers) > limits.max_headers:
            self._too_large()
        size = len(self.url)
        for name, value in headers:
            size += len(name) + len(value)
        if size > limits.max_header_bytes:
            self._too_large()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._restricted and not self._operational():
            self.counters.busy_total += 1
            self._pending = (SERVER_BUSY, "over the connection cap")
            raise _Reject
        self._start_cycle()
        self._phase = _BODY
        self._body_t0 = self.loop.time()
        self._body_bytes = 0

    def _start_cycle(self) -> None:
        """uvicorn's ``on_headers_complete`` with the cycle that writes a response's head and
        first body part in one write (``_Cycle``); the same scope, limits and pipelining."""
        parser = self.parser
        http_version = parser.get_http_version()
        scope = self.scope
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed = httptools.parse_url(self.url)
        raw_path = parsed.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = parsed.query or b""
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        existing = self.cycle
        self.cycle = _Cycle(
            self, scope, http_version != "1.0" and parser.should_keep_alive(), self.expect_100_continue
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # a pipelined request waits for the one before it
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return  # an upgrade has no cycle
        cycle.feed(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return  # an upgrade has no cycle
        cycle.finish()

    def on_response_complete(self) -> None:
        if self._phase == _BODY and not self.transport.is_closing():
            # Answered before its body was read (a 401 before the body, a 413): end the
            # connection, lingering so the client reads the answer rather than a reset; what
            # it still sends is discarded.
            self.server_state.total_requests += 1
            self._phase = _DONE
            self._cancel_timers()
            self.flow.resume_reading()
            self._linger_close()
            return
        self._response_complete()
        if self._phase == _HEAD and self._head_timer is None and not self.transport.is_closing():
            # Bytes of the next request arrived while this response went out: now they count.
            self._head_timer = self.deadlines.call_later(self.limits.header_timeout, self._head_expired)

    def _response_complete(self) -> None:
        """uvicorn's ``on_response_complete`` with the keep-alive timeout on the coarse timers
        (one per response: a loop timer each would cost more than the rest of this)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self.timeout_keep_alive_task = self.deadlines.call_later(  # type: ignore[assignment]
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _too_large(self) -> None:
        self.counters.too_large_headers_total += 1
        self._pending = (TOO_LARGE_HEADERS, "headers too large")
        raise _Reject

    def _operational(self) -> bool:
        path = httptools.parse_url(self.url).path.decode("latin-1")
        if "%" in path:  # decoded as uvicorn decodes it for the application
            path = urllib.parse.unquote(path)
        return path in OPERATIONAL_PATHS or path.startswith(OPERATIONAL_PREFIX)

    # -- timers ----------------------------------------------------------------------------

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._phase != _HEAD or self.transport.is_closing():
            return
        self.counters.timeouts_total["header"] += 1
        self._reject(HEADER_TIMEOUT, "header timeout")

    def _body_deadline(self) -> float:
        """headers time + body_timeout + bytes received / min_upload_rate; bytes past
        ``max_body_bytes`` (which the gateway refuses anyway) earn no more time."""
        limits = self.limits
        deadline = self._body_t0 + limits.body_timeout
        if limits.min_upload_rate:
            deadline += min(self._body_bytes, limits.max_body_bytes) / limits.min_upload_rate
        return deadline

    def _arm_body_timer(self) -> None:
        delay = max(self._body_deadline() - self.loop.time(), 0.05)
        self._body_timer = self.deadlines.call_later(delay, self._body_expired)

    def _body_expired(self) -> None:
        self._body_timer = None
        if self._phase != _BODY or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # The gateway is not reading (back-pressure, pipelining): not the client's fault.
            # It gets a fresh body_timeout from now for the rest.
            self._body_t0 += now - self._body_deadline() + self.limits.body_timeout
            self._arm_body_timer()
            return
        if now < self._body_deadline():  # the client kept up: its bytes earned it more time
            self._arm_body_timer()
            return
        self.counters.timeouts_total["body"] += 1
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Marked before the application hears of the disconnect, so it can say 408.
            cycle.scope["fortress.timeout"] = "body"  # type: ignore[typeddict-unknown-key]
        if cycle is not None and cycle.response_started:
            # Too late for a 408: this request has (or is getting) its answer. Just close.
            self._phase = _DONE
            self._cancel_timers()
            self.transport.close()
            return
        self._reject(BODY_TIMEOUT, "body timeout")

    def _cancel_timers(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # -- answers the protocol writes itself --------------------------------------------------

    def _reject(self, answer: bytes, what: str) -> None:
        """Write ``answer`` unless another response is being written, then close after a
        short linger; whatever the client sends from now on is discarded."""
        self._phase = _DONE
        self._cancel_timers()
        self._unset_keepalive_if_required()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s from %s: closing the connection", what, self.client)
        transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            transport.close()  # an answer now would land inside that response
            return
        if cycle is not None and not cycle.response_complete:
            cycle.disconnect()  # the application may no longer write
        transport.write(answer)
        self.flow.resume_reading()  # keep draining the input while lingering
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close, then close after ``LINGER``: a close with unread input would reset the
        connection and could destroy the answer before the client reads it."""
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    # -- the application -------------------------------------------------------------------

    def _start_asgi_task(self, cycle: _Cycle, app: Any) -> None:  # type: ignore[override]
        task = self.loop.create_task(cycle.run(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)


def _nothing() -> None:
    pass


def guarded_protocol(limits: ConnectionLimits, stats: ConnectionStats | None = None) -> type[GuardedProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits`` and counting into
    ``stats`` (a fresh ``ConnectionStats`` by default; read it with the class's ``stats()``)."""
    attrs = {
        "limits": limits,
        "counters": stats if stats is not None else ConnectionStats(),
        "deadlines": Deadlines(),
    }
    return cast(type[GuardedProtocol], type("GuardedProtocol", (GuardedProtocol,), attrs))
