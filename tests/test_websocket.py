"""The WebSocket endpoint /v1/ws through a real gateway process (keys, plans, audit on) in
front of a simulated replica, with the ``websockets`` client library."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster
from helpers import AUDIT_HEADERS, fortress_argv, wait_for
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

CONFIG = """
state_dir: {state}
# Short enough to test, long enough for every other test's pauses.
server: {{websocket: {{idle_timeout: 3s, auth_timeout: 1s}}}}
auth: {{cache_refresh: 1}}
audit: {{group_commit_ms: 2}}
plans:
  default: {{rate: 1000, burst: 1000}}
  tight: {{rate: 0.01, burst: 2}}
pools:
  - model: sim-model
    health_check: {{interval: 1, timeout: 0.5, healthy_threshold: 1}}
    replicas: [{{url: '{sim}'}}]
"""
CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


class Gateway:
    def __init__(self, url: str, state: Path) -> None:
        self.url = url
        self.ws = url.replace("http://", "ws://") + "/v1/ws"
        self.state = state

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def key(self, plan: str = "default") -> str:
        return str(self.admin("POST", "/admin/keys", {"name": f"ws-{plan}", "plan": plan})["key"])

    def connections(self) -> list[dict[str, Any]]:
        return list(self.admin("GET", "/admin/connections")["connections"])

    def audit_rows(self, request_ids: list[str]) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.state / "fortress.db", timeout=10)
        try:
            marks = ",".join("?" * len(request_ids))
            sql = f"SELECT request_id, status, user, source FROM audit_records WHERE request_id IN ({marks})"
            return con.execute(sql, request_ids).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("ws")
    cluster = Cluster(tmp)
    try:
        sim, _ = cluster.sim("sim-model", "--tokens", "6", "--itl", "0.01")
        url, _ = cluster.gateway(CONFIG.format(state=tmp / "state", sim=sim))
        yield Gateway(url, tmp / "state")
    finally:
        cluster.stop()


def headers(key: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **AUDIT_HEADERS, **extra}


async def answer(ws: ClientConnection, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Every message for ``ids`` until each ended (done or error), by id."""
    got: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    open_ = set(ids)
    while open_:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
        got[msg["id"]].append(msg)
        if msg["type"] in ("done", "error"):
            open_.discard(msg["id"])
    return got


def test_flow_two_concurrent_requests_usage_audit_and_registry(gw: Gateway) -> None:
    key = gw.key()

    async def main() -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
        async with connect(gw.ws, additional_headers=headers(key)) as ws:
            await ws.send(json.dumps({"type": "ping", "id": "p"}))
            assert json.loads(await ws.recv()) == {"type": "pong", "id": "p"}
            for rid in ("a", "b"):
                await ws.send(json.dumps({"type": "request", "id": rid, "body": CHAT}))
            got = await answer(ws, {"a", "b"})
            listed = await asyncio.to_thread(
                lambda: (
                    wait_for(lambda: gw.connections(), timeout=5, what="registry row"),
                    gw.connections(),
                )[1]
            )
            return got, listed

    got, listed = asyncio.run(main())
    request_ids = []
    for rid in ("a", "b"):
        msgs = got[rid]
        chunks, done = msgs[:-1], msgs[-1]
        assert done["type"] == "done", done
        assert chunks and all(m["type"] == "chunk" for m in chunks)
        assert all(m["data"]["object"] == "chat.completion.chunk" for m in chunks)
        assert all(m["data"]["choices"] for m in chunks)  # the usage chunk was not asked for
        assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0
        request_ids.append(done["request_id"])
    assert len(set(request_ids)) == 2
    # The registry listed the connection while it was open; it is gone once closed.
    assert len(listed) == 1 and listed[0]["user"] == "alice" and listed[0]["key_name"] == "ws-default"
    assert listed[0]["gateway"] and listed[0]["requests"] == 2
    wait_for(lambda: gw.connections() == [], timeout=5, what="the row to be deleted on close")
    # One audit record per request, with the upgrade's audit headers.
    wait_for(lambda: len(gw.audit_rows(request_ids)) == 2, timeout=10, what="two audit records")
    assert {(r[1], r[2], r[3]) for r in gw.audit_rows(request_ids)} == {(200, "alice", "tests")}


def test_auth_in_the_first_message(gw: Gateway) -> None:
    key = gw.key()

    async def main() -> list[dict[str, Any]]:
        async with connect(gw.ws) as ws:  # a browser: no headers of its own
            await ws.send(json.dumps({"type": "auth", "api_key": key, "headers": AUDIT_HEADERS}))
            assert json.loads(await ws.recv()) == {"type": "auth_ok"}
            await ws.send(json.dumps({"type": "request", "id": "x", "body": CHAT}))
            return (await answer(ws, {"x"}))["x"]

    msgs = asyncio.run(main())
    assert msgs[-1]["type"] == "done" and msgs[-1]["usage"]["total_tokens"] > 0

    async def bad() -> tuple[dict[str, Any], int]:
        async with connect(gw.ws) as ws:
            await ws.send(
                json.dumps({"type": "auth", "api_key": key[:-4] + "abcd", "headers": AUDIT_HEADERS})
            )
            msg = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            return msg, closed.value.rcvd.code

    msg, code = asyncio.run(bad())
    assert msg["type"] == "error" and msg["error"]["code"] == "invalid_api_key" and code == 4401

    async def silent() -> int:
        async with connect(gw.ws) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code

    assert asyncio.run(silent()) == 4408


def test_bad_key_and_missing_audit_headers_refused_at_upgrade(gw: Gateway) -> None:
    key = gw.key()

    ids: list[str] = []

    async def refused(hdrs: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with pytest.raises(InvalidStatus) as exc:
            async with connect(gw.ws, additional_headers=hdrs):
                pass
        resp = exc.value.response
        ids.append(resp.headers["x-request-id"])
        return resp.status_code, json.loads(resp.body)

    status, body = asyncio.run(refused(headers(key[:-4] + "abcd")))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert key[:-4] not in body["error"]["message"]
    status, body = asyncio.run(refused({"authorization": f"Bearer {key}"}))
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "x-llm-source" in body["error"]["message"]
    # Each refused upgrade is recorded like a refused HTTP request.
    wait_for(lambda: len(gw.audit_rows(ids)) == 2, timeout=10, what="the refusals' audit records")
    assert sorted(r[1] for r in gw.audit_rows(ids)) == [400, 401]


def test_idle_timeout_closes_the_socket(gw: Gateway) -> None:
    key = gw.key()

    async def main() -> tuple[int, str, float]:
        async with connect(gw.ws, additional_headers=headers(key)) as ws:
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 15)
            assert closed.value.rcvd is not None
            return closed.value.rcvd.code, closed.value.rcvd.reason, asyncio.get_running_loop().time() - t0

    code, reason, waited = asyncio.run(main())
    assert code == 1000 and reason == "idle timeout" and 2.5 < waited < 10


def test_plan_limit_answered_per_message(gw: Gateway) -> None:
    key = gw.key("tight")  # burst 2

    async def main() -> dict[str, list[dict[str, Any]]]:
        async with connect(gw.ws, additional_headers=headers(key)) as ws:
            got: dict[str, list[dict[str, Any]]] = {}
            for rid in ("1", "2", "3"):
                await ws.send(json.dumps({"type": "request", "id": rid, "body": CHAT}))
                got.update(await answer(ws, {rid}))
            return got

    got = asyncio.run(main())
    assert got["1"][-1]["type"] == "done" and got["2"][-1]["type"] == "done"
    err = got["3"][-1]
    assert err["type"] == "error" and err["status"] == 429
    assert err["error"]["code"] == "rate_limit_exceeded" and int(err["retry_after"]) >= 1
    # Refused requests are audited too, as on HTTP.
    wait_for(lambda: gw.audit_rows([err["request_id"]]), timeout=10, what="the 429's audit record")


def test_hundred_concurrent_connections(gw: Gateway) -> None:
    key = gw.key()

    async def one(i: int) -> dict[str, Any]:
        async with connect(gw.ws, additional_headers=headers(key), open_timeout=30) as ws:
            await ws.send(json.dumps({"type": "request", "id": f"r{i}", "body": CHAT}))
            return (await answer(ws, {f"r{i}"}))[f"r{i}"][-1]

    async def main() -> list[dict[str, Any]]:
        return await asyncio.gather(*(one(i) for i in range(100)))

    ends = asyncio.run(main())
    assert [e["type"] for e in ends] == ["done"] * 100
    assert len({e["request_id"] for e in ends}) == 100
    wait_for(lambda: gw.connections() == [], timeout=10, what="every row deleted")
    # Upgraded connections leave the connection cap's count when they close.
    wait_for(lambda: open_connections(gw) <= 2, timeout=10, what="fortress_connections_open to fall back")


def open_connections(gw: Gateway) -> float:
    with urllib.request.urlopen(gw.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("fortress_connections_open "))
    return float(line.split()[1])


def test_fortress_status_lists_connections(gw: Gateway) -> None:
    key = gw.key()

    def status(*args: str) -> str:
        argv = fortress_argv("status", "--url", gw.url, *args)
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"}
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    async def main() -> tuple[str, str]:
        async with connect(gw.ws, additional_headers=headers(key, **{"x-llm-user": "bob"})):
            await asyncio.to_thread(wait_for, lambda: gw.connections(), 5, 0.05, "registry row")
            return await asyncio.to_thread(status, "--json"), await asyncio.to_thread(status)

    as_json, table = asyncio.run(main())
    conns = json.loads(as_json)["connections"]["connections"]
    assert len(conns) == 1 and conns[0]["user"] == "bob" and conns[0]["in_flight"] == 0
    assert "WebSocket connections (1)" in table and conns[0]["id"] in table


def test_a_session_cookie_set_on_a_connection_holds_its_session(tmp_path: Any) -> None:
    # A cookie-mode session pool: the gateway sets the cookie on the connection's first answer;
    # the connection sends it back with its later requests, so they stay on one replica.
    cluster = Cluster(tmp_path)
    try:
        sims = [cluster.sim("sim-model", "--tokens", "3", "--itl", "0.001")[0] for _ in range(3)]
        replicas = ", ".join(f"{{url: '{u}'}}" for u in sims)
        url, _ = cluster.gateway(
            "pools:\n  - model: sim-model\n    balancer: session\n"
            "    session: {source: cookie, cookie: sess}\n"
            "    health_check: {interval: 1, timeout: 0.5, healthy_threshold: 1}\n"
            f"    replicas: [{replicas}]\n"
        )
        ws_url = url.replace("http://", "ws://") + "/v1/ws"

        async def run() -> list[str]:
            served: list[str] = []
            async with connect(ws_url, additional_headers=AUDIT_HEADERS) as ws:
                for n in range(8):
                    got = await answer_one(ws, f"r{n}")
                    served.append(got["replica"])
            return served

        served = asyncio.run(run())
        assert len(served) == 8 and len(set(served)) == 1, served
    finally:
        cluster.stop()


async def answer_one(ws: ClientConnection, rid: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "request", "id": rid, "body": CHAT}))
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if msg.get("id") == rid and msg["type"] in ("done", "error"):
            assert msg["type"] == "done", msg
            return dict(msg)
