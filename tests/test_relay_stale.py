"""A replica that closes a pooled keep-alive connection under the gateway's next request.

llama-server closes its end after streams without saying so; a request sent on such a
connection fails before the replica read it ("Can not write request body", a reset, a
disconnect). That is not the replica's fault: the gateway tries the same replica again on a
fresh connection and holds nothing against it. A replica that is really gone refuses that
connect and is ejected at once, as before.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cluster
from helpers import free_port, http_post, replica_table

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "ok", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "t"}]}


class StaleReplica:
    """An OpenAI-compatible replica that serves one completion per connection and resets the
    connection on the next one it receives there (health checks and /v1/models are served)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.completions = 0
        self.resets = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()
        server.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                if method == "POST" and served:
                    # The connection the replica had closed: reset before the body is read, so
                    # a large body is still being written ("Can not write request body").
                    self.resets += 1
                    writer.transport.abort()
                    return
                if length:
                    await reader.readexactly(length)
                if method == "POST":
                    served = True
                    self.completions += 1
                    body = json.dumps(ANSWER).encode()
                elif path.startswith("/v1/models"):
                    body = json.dumps(MODELS).encode()
                else:
                    body = b'{"status":"ok"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def stale() -> Iterator[StaleReplica]:
    r = StaleReplica()
    yield r
    r.stop()


# A small body is written before the reset lands (the gateway then sees a disconnect or a
# reset while it waits for the answer); a 3 MB one is still being written when it lands.
@pytest.mark.parametrize("size", [0, 3_000_000], ids=["small-body", "large-body"])
def test_a_closed_keepalive_connection_is_retried_fresh_and_not_held_against_the_replica(
    tmp_path: Path, stale: StaleReplica, size: int
) -> None:
    cluster = Cluster(tmp_path)
    try:
        url = f"http://127.0.0.1:{stale.port}"
        gw, _ = cluster.gateway(
            "pools:\n  - model: m\n"
            "    health_check: {interval: 1, timeout: 0.5, healthy_threshold: 1}\n"
            f"    replicas: [{{url: '{url}'}}]\n"
        )
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi" + "x" * size}]}
        ).encode()
        statuses = [http_post(gw + "/v1/chat/completions", body)[0] for _ in range(8)]
        assert statuses == [200] * 8, statuses
        assert stale.resets >= 1, "the gateway never reused a connection: nothing was tested"
        row = replica_table(gw)[url]
        assert row["state"] == "healthy" and not row.get("ejected"), row
    finally:
        cluster.stop()
