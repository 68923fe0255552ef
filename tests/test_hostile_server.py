"""Hostile clients against real gateways: slow headers and bodies, silent and idle connections,
too many connections, too many or too large headers, a forged X-Forwarded-For.

Timeouts are configured small (1 s); each test waits for the server to close the socket, with
generous slack, rather than asserting tight wall-clock bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from helpers import AUDIT_HEADERS, PYTHON, Proc, fortress_argv, free_port, sim_argv, wait_for, wait_http

from fortress.config import ConfigError, parse_config
from fortress.gateway.protocol import ConnectionLimits, guarded_protocol

SLACK = 15.0  # seconds a server may take, on a loaded machine, to close what it should close
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()

LIMITED = """
server:
  header_timeout: 1
  body_timeout: 1
  min_upload_rate: 1000
  keepalive_timeout: 1
auth: {enabled: false}
audit: {enabled: false}
"""


def pools(sim_url: str) -> str:
    return f"pools:\n  - model: m\n    replicas: [{{url: '{sim_url}'}}]\n"


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = Proc(sim_argv(port, "m"), tmp_path_factory.mktemp("sim") / "sim.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=20)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def limited(sim_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A gateway with 1 s header, body and keep-alive timeouts; yields its port."""
    tmp = tmp_path_factory.mktemp("limited")
    port = free_port()
    path = tmp / "fortress.yaml"
    path.write_text(LIMITED + f"state_dir: {tmp / 'state'}\n" + pools(sim_url))
    proc = Proc(fortress_argv("serve", "-c", str(path), "--port", str(port)), tmp / "gw.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=20)
        yield port
    finally:
        proc.stop()


# -- raw HTTP ----------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=SLACK)


def head(method: str, path: str, *headers: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: gateway", *headers]
    if length is not None:
        lines += ["content-type: application/json", f"content-length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, limit: float = SLACK) -> bytes:
    """Everything the server sends until it closes; fails if it is still open after ``limit``."""
    sock.settimeout(limit)
    got = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # a reset is a close too
            return got
        if not data:
            return got
        got += data
    raise AssertionError(f"the server kept the connection open for {limit}s; it sent {got[:200]!r}")


def drip_until_closed(sock: socket.socket, piece: bytes, every: float = 0.2) -> tuple[bytes, int]:
    """Send ``piece`` every ``every`` seconds until the server closes; (what it sent, pieces sent)."""
    sock.settimeout(every)
    got = b""
    sent = 0
    deadline = time.monotonic() + SLACK
    while time.monotonic() < deadline:
        try:
            sock.sendall(piece)
            sent += 1
        except OSError:
            return got + read_until_closed(sock, 1.0), sent
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return got, sent
        if not data:
            return got, sent
        got += data
    raise AssertionError(f"the server kept a dripping connection open for {SLACK}s")


def response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body) of the one response in ``raw``."""
    head_part, _, body = raw.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body else None


def request(sock: socket.socket, data: bytes) -> tuple[int, dict[str, str], Any]:
    """Send one request on a keep-alive connection and read its (sized) response."""
    sock.settimeout(SLACK)
    sock.sendall(data)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {raw!r}"
        raw += chunk
    headers = response(raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")[1]
    length = int(headers.get("content-length", "0"))
    while len(raw.partition(b"\r\n\r\n")[2]) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {raw!r}"
        raw += chunk
    return response(raw)


def assert_openai_error(raw: bytes, status: int, code: str) -> dict[str, str]:
    got, headers, body = response(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"]
    return headers


# -- timeouts ----------------------------------------------------------------------------------


def test_a_silent_fresh_connection_gets_408_and_is_closed(limited: int) -> None:
    with connect(limited) as sock:
        raw = read_until_closed(sock)
    headers = assert_openai_error(raw, 408, "request_timeout")
    assert response(raw)[2]["error"]["type"] == "invalid_request_error"
    assert "retry-after" not in headers


def test_dripping_headers_are_cut_off_by_the_header_timeout(limited: int) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: gateway\r\n")
        raw, sent = drip_until_closed(sock, b"x-drip: 1\r\n")
    assert_openai_error(raw, 408, "request_timeout")
    assert sent >= 2  # it was dripping, not silent, when it was cut off
    # A piece goes out at most every 0.2 s: cut off within the 1 s timeout + 5 s of slack.
    assert sent <= (1 + 5) / 0.2, sent


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_dripping_body_is_cut_off_by_the_body_timeout(limited: int, framing: str) -> None:
    with connect(limited) as sock:
        if framing == "chunked":
            sock.sendall(head("POST", "/v1/chat/completions", "transfer-encoding: chunked") + b"1\r\n{\r\n")
            piece = b"1\r\n \r\n"
        else:
            sock.sendall(head("POST", "/v1/chat/completions", length=100_000) + b"{")
            piece = b" "
        raw, sent = drip_until_closed(sock, piece)
    assert_openai_error(raw, 408, "request_timeout")
    assert sent >= 2
    # 1 s + the dripped bytes / 1000 B/s: cut off within that + 5 s of slack.
    assert sent <= (1 + 5) / 0.2, sent


def test_a_long_stream_survives_bytes_sent_after_its_body(tmp_path: Path) -> None:
    """A stray CRLF after a POST body (some clients send one) starts no header clock while the
    answer is still streaming: a 3 s stream outlives the 1 s header timeout."""
    sim_port, port = free_port(), free_port()
    slow = Proc(
        sim_argv(sim_port, "m", "--ttft", "0", "--itl", "0.05", "--tokens", "60"), tmp_path / "sim.log"
    )
    path = tmp_path / "fortress.yaml"
    path.write_text(LIMITED + f"state_dir: {tmp_path / 'state'}\n" + pools(f"http://127.0.0.1:{sim_port}"))
    gw = Proc(fortress_argv("serve", "-c", str(path), "--port", str(port)), tmp_path / "gw.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=20)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        with connect(port) as sock:
            sock.sendall(head("POST", "/v1/chat/completions", length=len(body)) + body.encode())
            time.sleep(0.3)
            sock.sendall(b"\r\n")
            got = b""
            sock.settimeout(SLACK)
            while b"data: [DONE]" not in got:
                data = sock.recv(65536)
                assert data, f"the stream was cut: {got[-300:]!r}"
                got += data
        assert got.startswith(b"HTTP/1.1 200") and got.count(b"tok") >= 60
    finally:
        gw.stop()
        slow.stop()


def test_a_slow_upload_that_keeps_the_minimum_rate_gets_through(limited: int) -> None:
    """3000 B/s against min_upload_rate 1000 B/s: about 2 s, twice body_timeout, and served."""
    body = CHAT + b" " * (6000 - len(CHAT))
    with connect(limited) as sock:
        sock.sendall(head("POST", "/v1/chat/completions", length=len(body)) + body[:600])
        for i in range(600, len(body), 600):
            time.sleep(0.2)
            sock.sendall(body[i : i + 600])
        status, _, answer = request(sock, b"")
    assert status == 200, answer
    assert answer["choices"]


def test_an_idle_keepalive_connection_is_closed(limited: int) -> None:
    with connect(limited) as sock:
        status, headers, _ = request(sock, head("GET", "/health"))
        assert status == 200 and headers.get("connection") != "close"
        assert read_until_closed(sock) == b""  # closed by the keep-alive timeout, no answer


# -- header limits -----------------------------------------------------------------------------


def chat_request(rid: str, *extra: str) -> bytes:
    return head("POST", "/v1/chat/completions", f"x-request-id: {rid}", *extra, length=len(CHAT)) + CHAT


def split_responses(raw: bytes) -> list[tuple[int, dict[str, str], Any]]:
    """The sized responses one after another in ``raw``."""
    out = []
    while raw:
        head_part, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        headers = response(head_part + sep)[1]
        length = int(headers["content-length"])
        out.append(response(head_part + sep + rest[:length]))
        raw = rest[length:]
    return out


def requests_total(port: int, status: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SLACK) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fortress_requests_total{") and f'status="{status}"' in line
    )


def test_pipelined_requests_are_answered_in_order(limited: int) -> None:
    with connect(limited) as sock:
        # Three requests in one write; the last asks to close, so the server ends the connection.
        sock.sendall(chat_request("p-1") + chat_request("p-2") + chat_request("p-3", "connection: close"))
        answers = split_responses(read_until_closed(sock))
    assert [h["x-request-id"] for _, h, _ in answers] == ["p-1", "p-2", "p-3"]
    for status, _, body in answers:
        assert status == 200 and body["object"] == "chat.completion"


def test_a_half_closed_client_is_recorded_as_gone(limited: int) -> None:
    before = requests_total(limited, "499")
    with connect(limited) as sock:
        sock.sendall(chat_request("half-closed"))
        sock.shutdown(socket.SHUT_WR)  # the request is complete; the client sends nothing more
        assert read_until_closed(sock) == b""  # gone, as behind nginx: nothing is sent
    wait_for(lambda: requests_total(limited, "499") >= before + 1, 10, what="the 499 counted")
    with connect(limited) as sock:  # the gateway is none the worse for it
        status, _, body = request(sock, chat_request("after"))
    assert status == 200 and body["object"] == "chat.completion"


def test_100_headers_pass_and_101_get_431(limited: int) -> None:
    extra = [f"x-h{i}: v" for i in range(99)]  # with host: 100 headers
    with connect(limited) as sock:
        assert request(sock, head("GET", "/health", *extra))[0] == 200
    with connect(limited) as sock:
        sock.sendall(head("GET", "/health", *extra, "x-one-more: v"))
        assert_openai_error(read_until_closed(sock), 431, "request_header_fields_too_large")


@pytest.mark.parametrize("ended", [True, False], ids=["whole-head", "unfinished-head"])
def test_40_kib_of_headers_get_431(limited: int, ended: bool) -> None:
    data = head("GET", "/health", "x-big: " + "a" * 40 * 1024)
    with connect(limited) as sock:
        # Unfinished: the answer must not wait for the end of the head (nor the header timeout).
        sock.sendall(data if ended else data[:-4])
        assert_openai_error(read_until_closed(sock), 431, "request_header_fields_too_large")


def test_many_small_headers_over_the_byte_limit_get_431(limited: int) -> None:
    extra = [f"x-h{i}: " + "b" * 500 for i in range(80)]  # 80 headers, about 40 KiB
    with connect(limited) as sock:
        sock.sendall(head("GET", "/health", *extra))
        assert_openai_error(read_until_closed(sock), 431, "request_header_fields_too_large")


# -- the connection cap ------------------------------------------------------------------------


def test_past_the_cap_only_operational_paths_and_past_the_reserve_nothing(
    cluster, sim_url: str, tmp_path: Path
) -> None:
    config = "server: {max_connections: 4, reserved_connections: 2}\n" + f"state_dir: {tmp_path / 'state'}\n"
    url, _ = cluster.gateway(config + pools(sim_url))
    port = urllib.parse.urlsplit(url).port
    assert port is not None
    time.sleep(0.5)  # the readiness probes' connections close first: they would count
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect(port)) for _ in range(4)]
        # Each is counted once it has been served; the first shows full service.
        assert request(held[0], head("POST", "/v1/chat/completions", length=len(CHAT)) + CHAT)[0] == 200
        for sock in held[1:]:
            assert request(sock, head("GET", "/health"))[0] == 200
        reserve = [stack.enter_context(connect(port)) for _ in range(2)]
        assert request(reserve[0], head("GET", "/health"))[0] == 200
        assert request(reserve[1], head("GET", "/admin/replicas"))[0] == 200
        assert request(reserve[1], head("GET", "/ready"))[0] == 200

        # Past max_connections + reserved_connections: closed at once, never answered.
        with connect(port) as refused:
            with contextlib.suppress(OSError):
                refused.sendall(head("GET", "/health"))
            assert read_until_closed(refused) == b""

        # A reserve connection asking for a completion: 503 in OpenAI's format, then closed.
        reserve[0].sendall(head("POST", "/v1/chat/completions", length=len(CHAT)) + CHAT)
        headers = assert_openai_error(read_until_closed(reserve[0]), 503, "server_busy")
        assert headers["retry-after"] == "1"
    # Everything closed: a new connection is served in full again.

    def served() -> bool:
        try:
            with connect(port) as sock:
                return request(sock, head("POST", "/v1/chat/completions", length=len(CHAT)) + CHAT)[0] == 200
        except (AssertionError, OSError):  # refused while the closes are still being counted
            return False

    wait_for(served, 10, what="full service once the connections are closed")


# -- X-Forwarded-For ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "client"),
    [(None, "127.0.0.1"), (["127.0.0.1"], "6.6.6.6"), (["127.0.0.0/8"], "6.6.6.6")],
    ids=["untrusted", "trusted-ip", "trusted-cidr"],
)
def test_x_forwarded_for_counts_only_from_trusted_proxies(
    cluster, sim_url: str, tmp_path: Path, trusted: list[str] | None, client: str
) -> None:
    server = f"server: {{trusted_proxies: {json.dumps(trusted)}}}\n" if trusted else ""
    config = (
        server
        + f"state_dir: {tmp_path / 'state'}\nauth: {{enabled: false}}\naudit: {{group_commit_ms: 2}}\n"
        + pools(sim_url)
    )
    url, proc = cluster.gateway(config)
    port = urllib.parse.urlsplit(url).port
    assert port is not None
    audit = "\r\n".join(f"{k}: {v}" for k, v in AUDIT_HEADERS.items())
    with connect(port) as sock:
        data = head(
            "POST", "/v1/chat/completions", audit, "x-forwarded-for: 6.6.6.6", "x-request-id: xff-1",
            length=len(CHAT),
        ) + CHAT  # fmt: skip
        assert request(sock, data)[0] == 200
    proc.stop()  # a clean stop ships every record to the store
    path = tmp_path / "fortress.yaml"
    path.write_text(config)
    out = subprocess.run(
        [
            PYTHON,
            "-m",
            "fortress.cli.main",
            "audit",
            "query",
            "-c",
            str(path),
            "--request-id",
            "xff-1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    [record] = json.loads(out.stdout)
    assert record["client"] == client


# -- in process: the scope marker, quiet disconnects, the counters -----------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: Any, limits: ConnectionLimits) -> Any:
    """An in-process uvicorn with the guarded protocol; yields (port, protocol class)."""
    protocol = guarded_protocol(limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # log_config=None: uvicorn's records reach the root logger, where caplog sees them.
    config = uvicorn.Config(app, http=protocol, lifespan="off", access_log=False, log_config=None)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "the in-process server did not start"
        yield sock.getsockname()[1], protocol
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_body_timeout_marks_the_scope_before_the_app_hears_of_it(caplog) -> None:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seen["marker"] = scope.get("fortress.timeout")
                raise asyncio.CancelledError  # as the gateway does when the client is gone
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async with serving(app, ConnectionLimits(body_timeout=0.5, min_upload_rate=0)) as (port, protocol):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("POST", "/", length=1000) + b"x")
        raw = await asyncio.wait_for(reader.read(), SLACK)  # until the server closes
        writer.close()
        assert_openai_error(raw, 408, "request_timeout")
        for _ in range(100):
            if "marker" in seen:
                break
            await asyncio.sleep(0.05)
        assert seen == {"marker": "body"}
        stats = protocol.stats()
        assert stats["connections_timeouts_total"] == {"header": 0, "body": 1}
    # The application's own CancelledError after the disconnect is no logged traceback.
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")], caplog.text


async def test_bytes_past_max_body_bytes_earn_no_more_time() -> None:
    """5000 B/s keeps well above min_upload_rate, but past max_body_bytes the clock runs out."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limits = ConnectionLimits(body_timeout=0.5, min_upload_rate=1000, max_body_bytes=1024)
    async with serving(app, limits) as (port, protocol):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("POST", "/", length=10**7))
        answer = asyncio.create_task(reader.read())  # until the server closes
        for _ in range(int(SLACK / 0.1)):
            if answer.done():
                break
            writer.write(b"x" * 500)
            await asyncio.sleep(0.1)
        raw = await asyncio.wait_for(answer, 1.0)
        writer.close()
        assert_openai_error(raw, 408, "request_timeout")
        assert protocol.stats()["connections_timeouts_total"]["body"] == 1


async def test_counters_of_the_cap(caplog) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limits = ConnectionLimits(max_connections=1, reserved_connections=1, header_timeout=30)
    async with serving(app, limits) as (port, protocol):
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]

        async def counted() -> dict[str, Any]:
            for _ in range(200):
                stats = protocol.stats()
                if stats["connections_refused_total"] == 1 and stats["connections_open"] == 2:
                    return stats
                await asyncio.sleep(0.02)
            raise AssertionError(protocol.stats())

        stats = await counted()
        assert stats["connections_max"] == 1 and stats["connections_reserved"] == 1
        reader, writer = conns[1]
        writer.write(head("GET", "/v1/models"))
        assert_openai_error(await asyncio.wait_for(reader.read(), SLACK), 503, "server_busy")
        assert protocol.stats()["connections_busy_total"] == 1
        reader, writer = conns[0]
        writer.write(head("GET", "/", *(f"x-h{i}: v" for i in range(100))))
        assert_openai_error(
            await asyncio.wait_for(reader.read(), SLACK), 431, "request_header_fields_too_large"
        )
        for _, w in conns:
            w.close()
        for _ in range(200):
            if protocol.stats()["connections_open"] == 0:
                break
            await asyncio.sleep(0.02)
        assert protocol.stats()["connections_open"] == 0
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT HTTP\r\n\r\n")
        assert_openai_error(await asyncio.wait_for(reader.read(), SLACK), 400, "invalid_http")
        writer.close()
        stats = protocol.stats()
        assert stats["connections_too_large_headers_total"] == 1 and stats["connections_invalid_total"] == 1
        assert stats["connections_refused_total"] == 1
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")], caplog.text


async def test_bodies_reach_the_app_whole_in_any_framing_and_100_continue() -> None:
    """The cycle hands the body over as it comes: a 1 MiB chunked upload (past the read
    back-pressure mark, so reading pauses and resumes), a sized one after ``Expect:
    100-continue`` (the interim answer is sent when the app first reads), and keep-alive."""
    got: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        size, parts = 0, 0
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            size += len(message["body"])
            parts += 1
            if not message["more_body"]:
                break
        got.append(size)
        body = b"%d" % size
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async with serving(app, ConnectionLimits(max_body_bytes=8 << 20)) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(256):
            writer.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        status, _, body = response(
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK) + await reader.readexactly(7)
        )
        assert (status, body) == (200, 1 << 20)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK)
        raw += await reader.readexactly(1)
        assert response(raw)[0] == 200 and raw.endswith(b"5")
        writer.close()
    assert got == [1 << 20, 5]


async def test_whole_body_and_respond_without_messages() -> None:
    """The connection's shortcuts the gateway uses on its hot path: a body that is all there is
    handed over at once (not twice, not while a 100-continue is owed), and a whole response is
    written in one go, after which the connection serves the next request."""
    seen: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        cycle = receive.__self__
        body = cycle.whole_body()
        seen.append(body)
        if body is None:  # owed a 100-continue: read it the ASGI way
            body = (await receive())["body"]
        else:
            assert cycle.whole_body() is None  # handed over once
        assert cycle.respond(
            200, [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))], body
        )
        assert not cycle.respond(200, [], b"")  # a response has started: use send()

    async with serving(app, ConnectionLimits()) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK)
        assert raw.startswith(b"HTTP/1.1 200") and b"content-length: 5" in raw
        assert await reader.readexactly(5) == b"hello"
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n")
        assert (
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK) == b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(b"abc")
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK)
        assert raw.startswith(b"HTTP/1.1 200") and await reader.readexactly(3) == b"abc"
        writer.close()
    assert seen == [b"hello", None]


@pytest.mark.parametrize("failure", ["raises", "silent", "half"])
async def test_an_app_that_fails_gets_an_openai_500_or_a_close(failure: str, caplog) -> None:
    """What the application does wrong is logged; the client gets a 500 in OpenAI's format if
    nothing was sent yet, else the connection is closed (never a half answer on keep-alive)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if failure == "raises":
            raise ValueError("boom")
        if failure == "half":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]}
            )
            await send({"type": "http.response.body", "body": b"12345", "more_body": True})

    async with serving(app, ConnectionLimits()) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("GET", "/"))
        raw = await asyncio.wait_for(reader.read(), SLACK)  # until the server closes
        writer.close()
    if failure == "half":
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"12345")
    else:
        assert_openai_error(raw, 500, "internal_error")
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 1, logged


@pytest.mark.parametrize(
    "header",
    [
        (b"x-bad", b"a\r\nset-cookie: injected=1"),  # a value with CR LF: a header smuggled in
        (b"x-bad", b"a\x00b"),
        (b"x bad", b"v"),  # a name with a separator
        (b"x-bad:", b"v"),
        (b"x-\x7f", b"v"),
    ],
)
async def test_a_response_header_that_is_not_http_is_refused(header: tuple[bytes, bytes], caplog) -> None:
    """A header name with a separator or a value with a control character (other than tab)
    never reaches the wire: the application's answer fails, the client gets OpenAI's 500.
    Names are sent lower-cased, and framing read from them whatever their case."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"Content-Length", b"2"), (b"X-Tab", b"a\tb")]
        if scope["path"] == "/bad":
            headers.append(header)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async with serving(app, ConnectionLimits()) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("GET", "/good"))
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), SLACK)
        assert b"content-length: 2\r\n" in raw and b"x-tab: a\tb\r\n" in raw
        assert b"transfer-encoding" not in raw  # sized by the mixed-case Content-Length
        assert await reader.readexactly(2) == b"ok"
        writer.write(head("GET", "/bad"))
        raw = await asyncio.wait_for(reader.read(), SLACK)
        writer.close()
    assert_openai_error(raw, 500, "internal_error")
    assert b"injected" not in raw and b"x-bad" not in raw
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 1, logged


def test_the_default_cap_follows_the_open_file_limit() -> None:
    server = parse_config("server: {upstream_connections: 100, reserved_connections: 10}\n", env={}).server
    assert ConnectionLimits.from_config(server, nofile=20_000).max_connections == 20_000 - 100 - 10 - 256
    assert ConnectionLimits.from_config(server, nofile=256).max_connections == 64  # the floor
    explicit = server.replace(max_connections=500)
    assert ConnectionLimits.from_config(explicit, nofile=20_000).max_connections == 500


def test_trusted_proxies_are_addresses_or_networks() -> None:
    server = parse_config("server: {trusted_proxies: ['10.1.2.3/8', '::1', 127.0.0.1]}\n", env={}).server
    assert server.trusted_proxies == ["10.0.0.0/8", "::1", "127.0.0.1"]  # as uvicorn matches them
    assert parse_config("", env={}).server.trusted_proxies == []
    for bad in ("'*'", "proxy.internal", "10.0.0.0/33"):
        with pytest.raises(ConfigError, match=r"server\.trusted_proxies"):
            parse_config(f"server: {{trusted_proxies: [{bad}]}}\n", env={})
