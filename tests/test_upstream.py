"""The relay's HTTP/1.1 client (``fortress/gateway/upstream.py``) against real sockets.

Each test runs a small TCP server on 127.0.0.1 that answers with exactly the bytes the case
needs (content-length, chunked, read-until-close, cut off, garbage, a close while idle), so
what the pool does on each is seen on a real connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fortress.gateway.upstream import (
    HIGH_WATER,
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    Response,
    UpstreamPool,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"Content-Type: application/json\r\n"


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: its head and its body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on a free port; yields its URL and a list of connection numbers seen."""
    conns: list[int] = []

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(len(conns))
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(conn, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", conns
    finally:
        srv.close()


def length_answer(body: bytes, status: int = 200) -> bytes:
    return f"HTTP/1.1 {status} OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive server: answers each request with its own path and body."""
    while True:
        head, body = await read_request(reader)
        path = head.split(b" ")[1]
        writer.write(length_answer(path + b"|" + body))
        await writer.drain()


async def test_keep_alive_reuses_one_connection_and_sends_host_and_length() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append(head)
            writer.write(length_answer(body))
            await writer.drain()

    async with server(handler) as (url, conns):
        pool = UpstreamPool()
        for i in range(5):
            async with pool.post(url, "/v1/chat/completions", HEAD, b'{"n":%d}' % i) as resp:
                assert resp.status == 200
                assert await resp.read() == b'{"n":%d}' % i
        assert conns == [0]  # five requests, one connection
        assert pool.open_connections == 1 and pool.idle_connections == 1
        port = url.rsplit(":", 1)[1]
        assert f"Host: 127.0.0.1:{port}\r\n".encode() in seen[0]
        assert b"Content-Length: 7\r\n" in seen[0] and seen[0].startswith(
            b"POST /v1/chat/completions HTTP/1.1"
        )
        await pool.close()
        assert pool.open_connections == 0


async def test_url_path_prefix_is_kept() -> None:
    async with server(echo_forever) as (url, _):
        pool = UpstreamPool()
        async with pool.post(url + "/base/", "/v1/completions", HEAD, b"x") as resp:
            assert await resp.read() == b"/base/v1/completions|x"
        await pool.close()


async def test_chunked_body_arrives_in_pieces_and_whole() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
        )
        writer.write(b"6\r\ndata:1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\ndata:2\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # still keep-alive afterwards
        writer.write(length_answer(b"again"))
        await writer.drain()

    async with server(handler) as (url, conns):
        pool = UpstreamPool()
        async with pool.post(url, "/s", HEAD, b"{}") as resp:
            assert resp.header("content-type") == "text/event-stream"
            pieces = []
            async for piece in resp.iter_any():
                pieces.append(piece)
                release.set()
            assert b"".join(pieces) == b"data:1data:2"
            assert pieces[0] == b"data:1"  # the first piece came before the second was sent
        async with pool.post(url, "/s", HEAD, b"{}") as resp:
            assert await resp.read() == b"again"
        assert conns == [0]
        await pool.close()


async def pump_to_end(resp: Response, on_piece: Callable[[int], None] | None = None) -> list[object]:
    """Pump ``resp`` until its end: the pieces the sink got, then what the end got (None or
    the error). ``on_piece(n)`` is called after the n-th piece."""
    seen: list[object] = []
    ended: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    def sink(data: bytes) -> None:
        seen.append(data)
        if on_piece is not None:
            on_piece(len(seen))

    def end(err: Exception | None) -> None:
        seen.append(err)
        ended.set_result(err)

    resp.pump(sink, end)
    await asyncio.wait_for(ended, 5)
    return seen


async def test_a_pumped_answer_hands_each_read_over_as_one_piece() -> None:
    """What one read brings (several HTTP chunks: events a replica wrote together) reaches the
    sink as one piece, hence one write to the client; the end comes after the last piece."""
    step = [asyncio.Event(), asyncio.Event()]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata:1\r\n")
        await writer.drain()
        await step[0].wait()
        writer.write(b"6\r\ndata:2\r\n6\r\ndata:3\r\n6\r\ndata:4\r\n")  # one write
        await writer.drain()
        await step[1].wait()
        writer.write(b"6\r\ndata:5\r\n0\r\n\r\n")  # the last piece and the end together
        await writer.drain()
        await asyncio.sleep(1)

    async with server(handler) as (url, _):
        pool = UpstreamPool()
        async with pool.post(url, "/s", HEAD, b"{}") as resp:
            seen = await pump_to_end(resp, lambda n: n <= len(step) and step[n - 1].set())
        assert seen == [b"data:1", b"data:2data:3data:4", b"data:5", None]
        assert pool.idle_connections == 1  # the answer was complete: kept
        await pool.close()


async def test_a_pumped_answer_gets_what_came_before_a_bad_chunk_then_the_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"6\r\ndata:1\r\n6\r\ndata:2\r\nZZ\r\n")  # then not a chunk size
        await writer.drain()
        await asyncio.sleep(1)

    async with server(handler) as (url, _):
        pool = UpstreamPool()
        async with pool.post(url, "/s", HEAD, b"{}") as resp:
            seen = await pump_to_end(resp)
        err = seen[-1]
        assert isinstance(err, BadResponse)
        assert seen == [b"data:1data:2", err]
        assert pool.open_connections == 0
        await pool.close()


async def test_body_until_close_is_complete_and_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with server(handler) as (url, conns):
        pool = UpstreamPool()
        for _ in range(2):
            async with pool.post(url, "/", HEAD, b"") as resp:
                assert await resp.read() == b"all of it"
        assert conns == [0, 1]  # not kept: the server closed it
        await pool.close()


async def test_an_answer_nobody_asked_for_drops_the_connection(caplog) -> None:
    """Requests are never pipelined: one answer per request on a connection. Bytes past the
    answer (a second answer in the same write, or one sent while the connection is idle) mean
    the replica and the gateway disagree on where answers end: the answer asked for is
    delivered, the connection is closed instead of reused, and the next request gets a fresh
    one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(length_answer(b"first") + length_answer(b"nobody asked"))
        await writer.drain()
        await read_request(reader)  # never comes: the gateway closed this connection
        writer.write(length_answer(b"late"))

    async def idle_chatter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(length_answer(b"second"))
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(length_answer(b"unasked, while idle"))
        await writer.drain()
        await asyncio.sleep(1)

    for h, want in ((handler, b"first"), (idle_chatter, b"second")):
        async with server(h) as (url, conns):
            pool = UpstreamPool()
            async with pool.post(url, "/", HEAD, b"") as resp:
                assert await resp.read() == want
            await asyncio.sleep(0.3)
            assert pool.open_connections == 0  # dropped, not kept for the next request
            async with pool.post(url, "/", HEAD, b"") as resp:
                assert await resp.read() == want
            assert conns == [0, 1]
            await pool.close()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_refused_connect_is_connect_failed() -> None:
    async with server(echo_forever) as (url, _):
        pass  # closed: nothing listens on that port now
    pool = UpstreamPool()
    with pytest.raises(ConnectFailed) as info:
        async with pool.post(url, "/", HEAD, b""):
            pass
    assert info.value.describe().startswith("connect failed (")
    assert pool.open_connections == 0


async def test_connection_closed_while_idle_leaves_the_pool() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(length_answer(b"one"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive promised, then closed while idle (llama-server does this)

    async with server(handler) as (url, conns):
        pool = UpstreamPool()
        async with pool.post(url, "/", HEAD, b"") as resp:
            assert await resp.read() == b"one"
        await asyncio.sleep(0.3)
        assert pool.idle_connections == 0 and pool.open_connections == 0
        async with pool.post(url, "/", HEAD, b"") as resp:  # a new connection, not an error
            assert await resp.read() == b"one"
        assert conns == [0, 1]
        await pool.close()


async def test_reused_connection_closed_under_the_request_is_stale() -> None:
    reset_first = False

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not reset_first:
            await read_request(reader)
            writer.write(length_answer(b"one"))
            await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request on this connection
        writer.transport.abort()  # reset before answering

    async with server(handler) as (url, _):
        pool = UpstreamPool()
        async with pool.post(url, "/", HEAD, b"") as resp:
            assert await resp.read() == b"one"
        with pytest.raises(ConnectionLost) as info:
            async with pool.post(url, "/", HEAD, b""):
                pass
        assert info.value.stale and not info.value.started
        assert info.value.describe() in ("connection reset by replica", "connection closed by replica")
        # The same on a new connection is not stale: the replica itself failed.
        reset_first = True
        with pytest.raises(ConnectionLost) as info2:
            async with pool.post(url, "/", HEAD, b"", fresh=True):
                pass
        assert not info2.value.stale
        await pool.close()


async def test_body_cut_off_is_connection_lost_started() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.transport.abort()

    async with server(handler) as (url, _):
        pool = UpstreamPool()
        with pytest.raises(ConnectionLost) as info:
            async with pool.post(url, "/", HEAD, b"") as resp:
                assert resp.status == 200
                await resp.read()
        assert info.value.started and not info.value.stale
        assert pool.open_connections == 0
        await pool.close()


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_a_reset_is_told_from_a_close(how: str) -> None:
    """A replica whose connection is reset mid-answer (RST: SO_LINGER 0) against one that
    closes it (FIN): both are ConnectionLost after the answer started, told apart in the error."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()
        await asyncio.sleep(0.1)
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with server(handler) as (url, _):
        pool = UpstreamPool()
        with pytest.raises(ConnectionLost) as info:
            async with pool.post(url, "/", HEAD, b"") as resp:
                await resp.read()
        assert info.value.started and info.value.reset is (how == "reset")
        want = "connection reset by replica" if how == "reset" else "response cut off"
        assert info.value.describe() == want
        await pool.close()


async def test_garbage_is_bad_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with server(handler) as (url, _):
        pool = UpstreamPool()
        with pytest.raises(BadResponse):
            async with pool.post(url, "/", HEAD, b""):
                pass
        assert pool.open_connections == 0
        await pool.close()


async def test_continue_then_answer() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + length_answer(b"real", 201))
        await writer.drain()
        await asyncio.sleep(1)

    async with server(handler) as (url, _):
        pool = UpstreamPool()
        async with pool.post(url, "/", HEAD, b"") as resp:
            assert resp.status == 201
            assert await resp.read() == b"real"
        await pool.close()


async def test_abandoned_answer_closes_its_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            await writer.drain()

    async with server(handler) as (url, conns):
        pool = UpstreamPool()
        async with pool.post(url, "/", HEAD, b"") as resp:
            assert resp.status == 200  # the relay gives up here (say, a wrong model)
        assert pool.open_connections == 0
        async with pool.post(url, "/", HEAD, b"") as resp:
            assert resp.status == 200
        assert conns == [0, 1]  # the half-read connection was not handed out again
        await pool.close()


async def test_connection_limit_makes_requests_wait() -> None:
    gate = asyncio.Event()
    in_server = 0
    most = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_server, most
        while True:
            await read_request(reader)
            in_server += 1
            most = max(most, in_server)
            await gate.wait()
            in_server -= 1
            writer.write(length_answer(b"ok"))
            await writer.drain()

    async with server(handler) as (url, conns):
        pool = UpstreamPool(limit=2)

        async def one() -> bytes:
            async with pool.post(url, "/", HEAD, b"") as resp:
                return await resp.read()

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        await asyncio.sleep(0.3)
        assert pool.open_connections == 2 and most == 2
        gate.set()
        assert await asyncio.gather(*tasks) == [b"ok"] * 5
        assert len(conns) == 2
        await pool.close()


async def test_idle_connections_close_after_keepalive_timeout() -> None:
    async with server(echo_forever) as (url, conns):
        pool = UpstreamPool(keepalive_timeout=0.2)
        async with pool.post(url, "/", HEAD, b"") as resp:
            await resp.read()
        await asyncio.sleep(0.4)
        async with pool.post(url, "/", HEAD, b"") as resp:
            await resp.read()
        assert conns == [0, 1]  # the first one had idled past the timeout
        await pool.close()


async def test_slow_reader_pauses_the_replica_then_everything_arrives() -> None:
    total = 128 * HIGH_WATER  # more than loopback's socket buffers hold
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        block = b"x" * 65536
        while sent < total:
            writer.write(block)
            sent += len(block)
            await writer.drain()
        await read_request(reader)
        writer.write(length_answer(b"next"))
        await writer.drain()

    async with server(handler) as (url, conns):
        pool = UpstreamPool()
        got = 0
        async with pool.post(url, "/", HEAD, b"") as resp:
            await asyncio.sleep(0.5)  # a client that does not read: the replica must wait
            assert sent < total
            async for piece in resp.iter_any():
                got += len(piece)
        assert got == total
        async with pool.post(url, "/", HEAD, b"") as resp:  # the same connection, reading again
            assert await resp.read() == b"next"
        assert conns == [0]
        await pool.close()


async def test_cancel_while_waiting_for_the_answer_drops_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with server(handler) as (url, _):
        pool = UpstreamPool()

        async def one() -> None:
            async with pool.post(url, "/", HEAD, b""):
                pass

        task = asyncio.create_task(one())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.open_connections == 0
        await pool.close()
