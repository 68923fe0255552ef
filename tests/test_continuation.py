"""Mid-stream continuation through real gateway processes: simulated replicas SIGKILLed under
load (every stream ends whole, with the text of an uninterrupted answer), a pool without it
(today's error event), the audit record naming both replicas, and real llama-server replicas.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Cluster, embedded_llama
from helpers import AUDIT_HEADERS, PYTHON, Proc, assert_schema, free_port, replica_table, wait_for, wait_http

TOKENS = 200
FULL = "".join(f" tok{i}" for i in range(TOKENS))  # the simulator's uninterrupted answer


def config(urls: list[str], continuation: bool, tmp: Path, model: str = "m") -> str:
    reps = "\n".join(f"      - {{url: '{u}'}}" for u in urls)
    return (
        f"state_dir: {tmp / 'state'}\n"
        "auth: {enabled: false}\n"
        "audit: {group_commit_ms: 2}\n"
        "routing: {max_attempts: 5}\n"
        f"pools:\n  - model: {model}\n    continuation: {str(continuation).lower()}\n"
        "    health_check: {interval: 0.5, timeout: 0.5}\n"
        f"    replicas:\n{reps}\n"
    )


class Stream:
    """One client's streamed answer: its events, as parsed."""

    def __init__(self) -> None:
        self.first_replica = ""
        self.events: list[Any] = []  # dicts, or "[DONE]"
        self.content: list[str] = []  # content deltas, in order, as they arrived

    @property
    def text(self) -> str:
        return "".join(self.content)

    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict)]


async def stream(session: aiohttp.ClientSession, gw: str, body: dict[str, Any], rid: str) -> Stream:
    out = Stream()
    headers = {**AUDIT_HEADERS, "x-request-id": rid}
    async with session.post(gw + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        out.first_replica = r.headers["x-fortress-replica"]
        buf = b""
        async for data in r.content.iter_any():
            buf += data
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                payload = ev.partition(b"data: ")[2]
                if payload == b"[DONE]":
                    out.events.append("[DONE]")
                    continue
                obj = json.loads(payload)
                out.events.append(obj)
                for ch in obj.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        out.content.append(text)
    return out


def audit_records(cfg: Path, expect: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def shipped() -> bool:
        nonlocal rows
        run = subprocess.run(
            [
                PYTHON,
                "-m",
                "fortress.cli.main",
                "audit",
                "query",
                "-c",
                str(cfg),
                "--json",
                "--limit",
                "1000",
            ],
            capture_output=True,
            text=True,
        )
        rows = json.loads(run.stdout or "[]") if run.returncode == 0 else []
        return len(rows) >= expect

    wait_for(shipped, timeout=30, what=f"{expect} audit records")
    return rows


def check_whole(s: Stream, want_usage: bool, text: str = FULL) -> None:
    """A well-formed stream: schema-valid chunks with one id, one role chunk, one finish, the
    whole text, usage summed, one [DONE] at the end, no error event."""
    assert s.events and s.events[-1] == "[DONE]" and s.events.count("[DONE]") == 1, s.events[-3:]
    chunks = s.chunks()
    for c in chunks:
        assert "error" not in c, c
        assert_schema(c, "CreateChatCompletionStreamResponse")
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert len(roles) == 1 and roles[0] is chunks[0]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["stop"] and finishes[-1] == "stop"
    assert s.text == text
    usage = [c["usage"] for c in chunks if c.get("usage")]
    if want_usage:
        assert len(usage) == 1 and chunks[-1]["usage"] is usage[0] and not chunks[-1]["choices"]
        assert usage[0]["completion_tokens"] == TOKENS
        assert usage[0]["total_tokens"] == usage[0]["prompt_tokens"] + TOKENS
    else:
        assert not usage


async def run_drill(cluster: Cluster, tmp_path: Path, continuation: bool, n: int) -> tuple[list, dict, Path]:
    """``n`` long streams over three sim replicas; SIGKILL two of them, one after the other."""
    sims = [cluster.sim("m", "--itl", "0.01", "--tokens", str(TOKENS)) for _ in range(3)]
    cfg_text = config([u for u, _ in sims], continuation, tmp_path)
    gw, _ = cluster.gateway(cfg_text)
    cfg = tmp_path / f"fortress-{gw.rsplit(':', 1)[1]}.yaml"
    table = replica_table(gw)
    names = {table[u]["name"]: p for u, p in sims}
    wait_for(lambda: all(r["state"] == "healthy" for r in replica_table(gw).values()), 30, what="healthy")

    async def one(session: aiohttp.ClientSession, i: int) -> Stream | BaseException:
        body: dict[str, Any] = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": f"question {i}"}],
        }
        if i % 2:
            body["stream_options"] = {"include_usage": True}
        try:
            return await stream(session, gw, body, f"r{i}")
        except (aiohttp.ClientError, AssertionError) as exc:
            return exc

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks = [asyncio.create_task(one(session, i)) for i in range(n)]
        await asyncio.sleep(0.6)  # every stream is well under way (200 tokens take > 2 s)
        victims = list(names)[:2]  # least outstanding spread the streams over all three
        names[victims[0]].kill(signal.SIGKILL)
        await asyncio.sleep(0.5)
        names[victims[1]].kill(signal.SIGKILL)
        results = await asyncio.gather(*tasks)
    return results, {"victims": victims}, cfg


async def test_sigkilled_replicas_cut_no_stream(cluster: Cluster, tmp_path: Path) -> None:
    n = 16
    results, info, cfg = await run_drill(cluster, tmp_path, True, n)
    victims = info["victims"]
    errors = [r for r in results if not isinstance(r, Stream)]
    assert not errors, errors
    streams = [r for r in results if isinstance(r, Stream)]
    for i, s in enumerate(streams):
        check_whole(s, want_usage=bool(i % 2))
    continued = {f"r{i}": s.first_replica for i, s in enumerate(streams) if s.first_replica in victims}
    assert continued, "no stream was on a killed replica"
    # The audit record of a continued stream names the replicas that served it, in order.
    records = {r["request_id"]: r for r in audit_records(cfg, n)}
    for rid, first in continued.items():
        served = records[rid]["replica"].split(",")
        assert served[0] == first and len(served) >= 2 and len(set(served)) == len(served), served
        assert records[rid]["status"] == 200 and records[rid]["output_tokens"] == TOKENS
    for rid, rec in records.items():
        if rid not in continued:
            assert "," not in rec["replica"]


async def test_without_continuation_a_cut_stream_ends_with_an_error_event(
    cluster: Cluster, tmp_path: Path
) -> None:
    results, info, _ = await run_drill(cluster, tmp_path, False, 6)
    streams = [r for r in results if isinstance(r, Stream)]
    assert len(streams) == 6
    cut = [s for s in streams if s.first_replica in info["victims"]]
    assert cut
    for s in cut:
        assert "[DONE]" not in s.events
        last = s.events[-1]
        assert isinstance(last, dict) and last["error"]["code"] == "bad_gateway", last
        assert len(s.text) < len(FULL) and FULL.startswith(s.text)
    for i, s in enumerate(streams):
        if s not in cut:
            check_whole(s, want_usage=bool(i % 2))


# -- real llama-server replicas -------------------------------------------------------------


def llama(tmp_path: Path, port: int) -> Proc:
    binary, gguf = embedded_llama()
    argv = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--alias", "smollm2"]
    argv += ["-c", "2048", "-np", "2", "-t", "1"]
    return Proc(argv, tmp_path / f"llama-{port}.log")


async def test_llama_server_continues_a_cut_stream(cluster: Cluster, tmp_path: Path) -> None:
    """llama-server prefills a final assistant message (its default): the stream goes on from
    the other replica; at temperature 0 the text is the uninterrupted answer's."""
    ports = [free_port() for _ in range(2)]
    procs = {f"http://127.0.0.1:{p}": llama(tmp_path, p) for p in ports}
    cluster.procs.extend(procs.values())
    for url in procs:
        wait_http(url + "/health", timeout=120)
    gw, _ = cluster.gateway(config(list(procs), True, tmp_path, model="smollm2"))
    wait_for(lambda: all(r["state"] == "healthy" for r in replica_table(gw).values()), 30, what="healthy")
    by_name = {r["name"]: procs[u] for u, r in replica_table(gw).items()}
    messages = [{"role": "user", "content": "Name three colours and say one thing about each."}]
    body = {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 48, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        reference = await stream(session, gw, body, "ref")
        check_whole_llama(reference)
        out = Stream()
        headers = {**AUDIT_HEADERS, "x-request-id": "cut"}
        async with session.post(gw + "/v1/chat/completions", json=body, headers=headers) as r:
            out.first_replica = r.headers["x-fortress-replica"]
            buf = b""
            killed_at: int | None = None
            async for data in r.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    payload = ev.partition(b"data: ")[2]
                    if payload == b"[DONE]":
                        out.events.append("[DONE]")
                        continue
                    obj = json.loads(payload)
                    out.events.append(obj)
                    for ch in obj.get("choices") or []:
                        if text := (ch.get("delta") or {}).get("content"):
                            out.content.append(text)
                if killed_at is None and len(out.content) >= 8:
                    killed_at = len(out.content)
                    by_name[out.first_replica].kill(signal.SIGKILL)
    assert killed_at is not None
    sent = "".join(out.content[:killed_at])
    check_whole_llama(out)
    assert out.text.startswith(sent) and out.text != sent
    rest = out.text[len(sent) :]
    assert not rest.startswith(sent), "the continuation repeated the text already sent"
    # Temperature 0: the continuation is the uninterrupted answer's (same tokens, new sampling).
    assert out.text == reference.text, (out.text, reference.text)
    usage = out.chunks()[-1]["usage"]
    assert usage["completion_tokens"] == reference.chunks()[-1]["usage"]["completion_tokens"]


def check_whole_llama(s: Stream) -> None:
    assert s.events[-1] == "[DONE]" and s.events.count("[DONE]") == 1
    chunks = s.chunks()
    for c in chunks:
        assert "error" not in c, c
        assert_schema(c, "CreateChatCompletionStreamResponse")
    # One id and model; llama-server stamps each chunk with the second it was made, so a stream
    # that crosses a second has several `created` values (a continuation carries the first's).
    assert len({(c["id"], c["model"]) for c in chunks}) == 1
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert len([f for f in finishes if f]) == 1
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
