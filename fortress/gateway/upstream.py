"""HTTP/1.1 to replicas: a keep-alive connection pool on the event loop's transports.

The relay sends one ``POST`` per attempt and reads the answer whole or as it arrives. aiohttp's
client did that at about a third of the gateway's CPU per request (request and response
objects, cookie jar, tracing, payload registry, a stream reader per response); this does only
what a relay needs: one write per request, httptools parsing callbacks straight into the
response's buffer, the connection back in the pool the moment its answer is complete.

What it guarantees, as a client of a replica:

* keep-alive per replica, most recently used connection first; connections idle longer than
  ``keepalive_timeout`` are closed; a connection the replica closed while idle leaves the pool
  when the close is seen (so it is rarely reused at all);
* at most ``limit`` connections open to all replicas together; a request beyond that waits;
* content-length, chunked and read-until-close bodies; one request per connection at a time
  (no pipelining);
* backpressure: reading from the replica pauses while more than ``HIGH_WATER`` bytes of an
  answer wait for the relay (a slow client), and resumes when they are taken;
* errors as ``UpstreamError`` subclasses that say what the relay must know: the connect failed
  (the replica is gone), or the connection was lost before or while the answer came, and
  whether it was a reused connection that failed before any byte of the answer (*stale*: the
  replica had closed it; not the replica's fault).

TLS replicas (``https://``) use the default SSL context.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from urllib.parse import urlsplit

import httptools

from fortress.core.loops import running_loop

HIGH_WATER = 256 * 1024  # bytes of an answer buffered before reading from the replica pauses
_SWEEP_EVERY = 10.0


class UpstreamError(Exception):
    """Talking to a replica failed. ``describe()`` is the short reason the relay reports."""

    def describe(self) -> str:
        return str(self) or type(self).__name__


class ConnectFailed(UpstreamError):
    """The TCP (or TLS) connect failed or timed out: nothing was sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def describe(self) -> str:
        return f"connect failed ({self.reason})"


class ConnectionLost(UpstreamError):
    """The connection ended before the answer was complete.

    ``stale``: a reused keep-alive connection that failed before any byte of the answer came
    back: the replica had closed it. ``reset``: the replica reset it (rather than closing it).
    ``started``: some of the answer had come back (a cut-off body).
    """

    def __init__(self, reason: str, *, stale: bool, reset: bool, started: bool) -> None:
        super().__init__(reason)
        self.stale = stale
        self.reset = reset
        self.started = started

    def describe(self) -> str:
        if self.started:
            return "response cut off" if not self.reset else "connection reset by replica"
        return "connection reset by replica" if self.reset else "connection closed by replica"


class BadResponse(UpstreamError):
    """The replica's bytes were not HTTP/1.1 the parser accepts."""

    def describe(self) -> str:
        return f"invalid HTTP response ({self})"


class _Origin:
    """Where a replica URL points: connection key, Host header, path prefix, TLS."""

    __slots__ = ("head", "host", "port", "prefix", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.ssl else 80)
        self.prefix = parts.path.rstrip("/")
        default = 443 if self.ssl else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = host if self.port == default else f"{host}:{self.port}"
        self.head = f"Host: {netloc}\r\n".encode("latin-1")


class Response:
    """One answer from a replica: status and headers at once, the body as it arrives."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_end",
        "_error",
        "_paused",
        "_sink",
        "_waiter",
        "raw_headers",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._sink: Callable[[bytes], None] | None = None
        self._end: Callable[[UpstreamError | None], None] | None = None

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header called ``name`` (case-insensitive), decoded as latin-1."""
        want = name.lower().encode("latin-1")
        for k, v in self.raw_headers:
            if k.lower() == want:
                return v.decode("latin-1")
        return default

    @property
    def complete(self) -> bool:
        return self._done

    async def read(self) -> bytes:
        """The whole body (waits for the end of the answer)."""
        while not self._done and self._error is None:
            await self._wait()
        if self._error is not None and not self._done:
            raise self._error
        return self.body()

    def body(self) -> bytes:
        """The whole body of a ``complete`` answer (``read`` without the coroutine)."""
        return self._take()

    def iter_any(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive: everything buffered at each wake-up joined into
        one piece (several SSE events that arrived together are handed over at once). An
        iterator object rather than an async generator: a loop may leave it at any time
        without a generator left for the event loop to finalize."""
        return _Pieces(self)

    def pump(self, sink: Callable[[bytes], None], end: Callable[[UpstreamError | None], None]) -> None:
        """From now on hand the body to ``sink`` as it is read (what one read brings as one
        piece) in the connection's read callback (no task switch per piece), and the end of
        the answer to ``end`` (None, or the error). What is buffered goes to ``sink`` at once.
        ``unpump()`` (also from ``sink``) stops it: what arrives after is buffered again."""
        self._sink = sink
        self._end = end
        self._deliver()
        if self._end is end:  # not unpumped by sink
            if self._done:
                self.unpump()
                end(None)
            elif self._error is not None:
                self.unpump()
                end(self._error)

    def unpump(self) -> None:
        """Back to buffering (see ``pump``)."""
        self._sink = None
        self._end = None

    def close(self) -> None:
        """Give the connection up: kept for reuse if the answer was complete, else closed."""
        conn = self._conn
        self._conn = None
        if conn is not None and not self._done:
            conn.abandon()

    async def _wait(self) -> None:
        loop = running_loop()
        self._waiter = waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _resume(self) -> None:
        self._paused = False
        if self._conn is not None:
            self._conn.resume()

    # -- fed by the connection ---------------------------------------------------------------

    def _take(self) -> bytes:
        """What is buffered, as one piece; reading resumes if a full buffer paused it."""
        chunks = self._chunks
        self._chunks = []
        self._buffered = 0
        if self._paused:
            self._resume()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _deliver(self) -> None:
        """Hand what is buffered to the sink (when pumped), as one piece."""
        sink = self._sink
        if sink is not None and self._chunks:
            sink(self._take())

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        if self._sink is not None:
            # Handed over once the read is parsed (``_deliver``): the HTTP chunks of one read
            # (several events a replica wrote together) reach the client in one write.
            return
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._deliver()
        end = self._end
        if end is not None:
            self.unpump()
            end(None)
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._done:
            self._error = error
            self._deliver()  # what was read before the error goes first
            end = self._end
            if end is not None:
                self.unpump()
                end(error)
            self._wake()


class _Pieces:
    """``Response.iter_any()``'s iterator."""

    __slots__ = ("_resp",)

    def __init__(self, resp: Response) -> None:
        self._resp = resp

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        resp = self._resp
        while True:
            if resp._chunks:
                return resp._take()
            if resp._done:
                raise StopAsyncIteration
            if resp._error is not None:
                raise resp._error
            await resp._wait()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a replica; parses answers with httptools' callbacks."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.started: asyncio.Future[Response] | None = None
        self.headers_done = False
        self.got_bytes = False
        self.uses = 0
        self.idle_since = 0.0
        self.closed = False
        self.idle = False  # in the pool's idle deque
        self.until_eof = False
        self.has_length = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.resp is None:  # bytes nobody asked for: the connection cannot be trusted
            self._drop()
            return
        self.got_bytes = True
        resp = self.resp
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error(BadResponse("unexpected upgrade"))
        except httptools.HttpParserError as exc:
            self._error(BadResponse(str(exc) or "parse error"))
        else:
            resp._deliver()

    def eof_received(self) -> bool | None:
        return None  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        resp = self.resp
        if resp is None:
            return
        if self.until_eof and self.headers_done and exc is None:
            self.on_message_complete()  # a body read until the replica closed: complete
            return
        reset = isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
        err = ConnectionLost(
            str(exc) if exc else "closed",
            stale=self.uses > 1 and not self.got_bytes,
            reset=reset,
            started=self.headers_done,
        )
        self._error(err)

    def pause_writing(self) -> None:  # the request body is written once; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.resp is not None
        self.resp.raw_headers.append((name, value))
        lname = name.lower()
        if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
            self.has_length = True

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        resp.status = self.parser.get_status_code()
        self.headers_done = True
        self.until_eof = not self.has_length and resp.status not in (204, 304) and resp.status >= 200
        started = self.started
        if started is not None and not started.done():
            started.set_result(resp)

    def on_body(self, body: bytes) -> None:
        assert self.resp is not None
        self.resp._feed(body)

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        if resp.status < 200:  # 100 Continue and friends: the real answer follows
            resp.raw_headers = []
            self.headers_done = False
            self.has_length = False
            return
        keep = (not self.until_eof) and self.parser.should_keep_alive() and not self.closed
        if resp._paused:  # paused by this very read: the next answer on it must be read
            resp._paused = False
            self.resume()
        self.resp = None
        self.started = None
        resp._conn = None
        resp._finish()
        if keep:
            self.pool._release(self)
        else:
            self._drop()

    # -- used by the pool and the response ---------------------------------------------------

    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Response]:
        """Write one request; the future resolves with the answer once its headers are in."""
        assert self.transport is not None and self.resp is None
        self.uses += 1
        self.resp = Response(self)
        self.headers_done = False
        self.got_bytes = False
        self.until_eof = False
        self.has_length = False
        self.started = fut = loop.create_future()
        if self.closed or self.transport.is_closing():
            self._error(ConnectionLost("closed", stale=self.uses > 1, reset=False, started=False))
            return fut
        self.transport.write(data)
        return fut

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abandon(self) -> None:
        """The relay stopped reading an unfinished answer: the connection cannot be reused."""
        self.resp = None
        self.started = None
        self._drop()

    def _error(self, err: UpstreamError) -> None:
        resp = self.resp
        started = self.started
        self.resp = None
        self.started = None
        if started is not None and not started.done():
            started.set_exception(err)
        if resp is not None:
            resp._conn = None
            resp._fail(err)
        self._drop()

    def _drop(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool._forget(self)


class _Exchange:
    """``async with pool.post(...) as resp``: the answer, and the connection given back after."""

    __slots__ = ("_body", "_fresh", "_headers", "_path", "_pool", "_resp", "_url")

    def __init__(
        self, pool: UpstreamPool, url: str, path: str, headers: bytes, body: bytes, fresh: bool
    ) -> None:
        self._pool = pool
        self._url = url
        self._path = path
        self._headers = headers
        self._body = body
        self._fresh = fresh
        self._resp: Response | None = None

    async def __aenter__(self) -> Response:
        self._resp = await self._pool.request(self._url, self._path, self._headers, self._body, self._fresh)
        return self._resp

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._resp is not None:
            self._resp.close()


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to replicas, shared by every request of the process."""

    def __init__(
        self, limit: int = 1000, keepalive_timeout: float = 30.0, connect_timeout: float = 5.0
    ) -> None:
        self.limit = limit
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int, bool], deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._slots: deque[asyncio.Future[None]] = deque()
        self._origins: dict[str, _Origin] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return sum(len(d) for d in self._idle.values())

    def post(self, url: str, path: str, headers: bytes, body: bytes, fresh: bool = False) -> _Exchange:
        """POST ``body`` to ``url`` + ``path``. ``headers`` are complete header lines
        (``b"Name: value\\r\\n"`` each) besides Host and Content-Length. ``fresh``: on a new
        connection, never a pooled one (the retry after a stale one)."""
        return _Exchange(self, url, path, headers, body, fresh)

    async def request(
        self, url: str, path: str, headers: bytes, body: bytes, fresh: bool = False
    ) -> Response:
        """Send one request and return its answer once the status and headers are in."""
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = _Origin(url)
        key = (origin.host, origin.port, origin.ssl)
        loop = running_loop()
        conn = None if fresh else self._take(key, loop.time())
        if conn is None:
            conn = await self._acquire(origin, key, loop, fresh)
        data = b"".join(
            (
                b"POST ",
                (origin.prefix + path).encode("latin-1"),
                b" HTTP/1.1\r\n",
                origin.head,
                headers,
                b"Content-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        try:
            return await conn.send(data, loop)
        except BaseException:
            if conn.resp is not None or not conn.closed:  # cancelled while waiting: unusable
                conn.abandon()
            raise

    async def close(self) -> None:
        """Close every connection; waiting requests fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._idle.clear()
        for conn in list(self._open):
            conn.idle = False
            conn._drop()
        while self._slots:
            w = self._slots.popleft()
            if not w.done():
                w.set_exception(ConnectFailed("client closed"))

    # -- internals ---------------------------------------------------------------------------

    def _take(self, key: tuple[str, int, bool], now: float) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            conn.idle = False
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > self.keepalive_timeout:
                conn._drop()
                continue
            return conn
        return None

    async def _acquire(
        self, origin: _Origin, key: tuple[str, int, bool], loop: asyncio.AbstractEventLoop, fresh: bool
    ) -> _Connection:
        """A connection for ``key``: at the limit, an idle one of this replica, else room made by
        closing an idle one of another, else wait until one is released or closed."""
        while len(self._open) >= self.limit:
            if not fresh:
                conn = self._take(key, loop.time())
                if conn is not None:
                    return conn
            if self._evict_idle():
                break
            w = loop.create_future()
            self._slots.append(w)
            await w
        return await self._connect(origin, key, loop)

    async def _connect(
        self, origin: _Origin, key: tuple[str, int, bool], loop: asyncio.AbstractEventLoop
    ) -> _Connection:
        conn = _Connection(self, key)
        self._open.add(conn)
        ssl_ctx: ssl.SSLContext | None = None
        if origin.ssl:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_ctx = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: conn, origin.host, origin.port, ssl=ssl_ctx)
        except TimeoutError:
            self._forget(conn)
            raise ConnectFailed(f"timed out after {self.connect_timeout:g} s") from None
        except OSError as exc:
            self._forget(conn)
            raise ConnectFailed(exc.strerror or str(exc)) from None
        except BaseException:
            self._forget(conn)
            raise
        if self._sweeper is None and not self._closed:
            self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)
        return conn

    def _evict_idle(self) -> bool:
        """At the limit: close the longest-idle connection, if any, to make room."""
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.key].popleft()
        oldest.idle = False
        oldest._drop()
        return True

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn._drop()
            return
        conn.idle_since = running_loop().time()
        conn.idle = True
        self._idle.setdefault(conn.key, deque()).append(conn)
        if self._slots:
            self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        if conn.idle:
            conn.idle = False
            with contextlib.suppress(ValueError):
                self._idle[conn.key].remove(conn)
        if conn in self._open:
            self._open.discard(conn)
            if self._slots:
                self._wake_one()

    def _wake_one(self) -> None:
        while self._slots:
            w = self._slots.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive timeout (every few seconds, not per request)."""
        self._sweeper = None
        if self._closed:
            return
        loop = running_loop()
        now = loop.time()
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since > self.keepalive_timeout:
                conn = idle.popleft()
                conn.idle = False
                conn._drop()
        if self._open:
            self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)


def header_lines(pairs: Iterable[tuple[str, str]]) -> bytes:
    """``Name: value\\r\\n`` lines for ``UpstreamPool.post``."""
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in pairs)
