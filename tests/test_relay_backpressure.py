"""A client that stops reading a long stream: the gateway stops reading from the replica
(bounded memory) instead of buffering the whole answer, and the client later gets every event
in order, once, with [DONE]. The stream is pumped from the replica's read callback straight to
the client's socket; this drives its hold-and-drain path for real."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from conftest import Cluster

TOKENS = 40_000  # ~7 MB of SSE: far more than the socket buffers and the pool's high water


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_pauses_the_replica_and_loses_nothing(cluster: Cluster) -> None:
    sim, _ = cluster.sim("m", "--ttft", "0", "--itl", "0", "--tokens", str(TOKENS))
    gw, proc = cluster.gateway(
        "pools:\n  - model: m\n    health_check: {interval: 60, timeout: 1}\n"
        f"    replicas: [{{url: '{sim}'}}]\n"
        "timeouts: {idle: 60, total: 120}\nrouting: {engine_metrics_interval: 0}\n"
    )
    host, port = gw.removeprefix("http://").split(":")
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": TOKENS}
    ).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    # A small receive buffer: the client's side fills quickly, as a slow mobile client's would.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    before = rss_kib(proc.p.pid)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    time.sleep(3)  # not reading: the replica would have sent everything by now
    grew = rss_kib(proc.p.pid) - before
    chunks = []
    tail = b""
    while not tail.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
        data = sock.recv(1 << 20)
        assert data, "the gateway closed the connection before the end of the stream"
        chunks.append(data)
        tail = (tail + data)[-16:]
    sock.close()
    raw = b"".join(chunks)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    # Undo the chunked framing, then count the events.
    text = bytearray()
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text += rest[:size]
        rest = rest[size + 2 :]
    events = [e for e in bytes(text).split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    contents = [
        json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1] if b'"choices":[{' in e
    ]
    tokens = [c for c in contents if c]
    assert len(tokens) == TOKENS, len(tokens)
    # ~10 MB went through; while the client did not read, the gateway held at most a few MB.
    assert len(text) > 5_000_000
    assert grew < 4096, f"the gateway grew by {grew} KiB while its client did not read"
