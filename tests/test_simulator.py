"""The replica simulator (``fortress sim``): OpenAI conformance, timing, chaos switches, metrics."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import typer
from aiohttp import web
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from fortress.sim import SimSettings, build_app
from fortress.sim.command import sim

_DOC = json.loads((Path(__file__).parent / "conformance" / "openai-schemas.json").read_text())
_DEFS: dict[str, Any] = copy.deepcopy(_DOC["$defs"])
# The spec has no schema for legacy-completion stream chunks: they are completion objects whose
# finish_reason is null until the last one and whose usage is null with include_usage (what
# OpenAI and vLLM send). Derive that schema from CreateCompletionResponse and nothing more.
_chunk = copy.deepcopy(_DEFS["CreateCompletionResponse"])
_choice = _chunk["properties"]["choices"]["items"]["properties"]
_choice["finish_reason"] = {"anyOf": [_choice["finish_reason"], {"type": "null"}]}
_chunk["properties"]["usage"] = {"anyOf": [_chunk["properties"]["usage"], {"type": "null"}]}
_DEFS["CompletionStreamChunk"] = _chunk


def _check(name: str, body: Any) -> None:
    """Raise ValidationError unless ``body`` is valid against ``$defs/name``."""
    Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": _DEFS}).validate(body)


@asynccontextmanager
async def serve(
    handler_cancellation: bool = False, **settings: Any
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """Run a simulator in this process on a free port; yield its base URL and a session."""
    runner = web.AppRunner(
        build_app(SimSettings(**settings)),
        access_log=None,
        handler_cancellation=handler_cancellation,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as session:
            yield f"http://{host}:{port}", session
    finally:
        await runner.cleanup()


CHAT = {"model": "whatever", "messages": [{"role": "user", "content": "say three words"}]}
COMPLETION = {"model": "whatever", "prompt": "once upon a time"}


async def read_sse(resp: aiohttp.ClientResponse) -> list[tuple[float, str]]:
    """Return (arrival time, data) for every SSE event of a streamed response."""
    events: list[tuple[float, str]] = []
    buf = b""
    async for piece in resp.content.iter_any():
        buf += piece
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            assert event.startswith(b"data: "), event
            events.append((time.monotonic(), event[6:].decode()))
    assert buf == b"", buf
    return events


async def stats(base: str, session: aiohttp.ClientSession) -> dict[str, int]:
    async with session.get(base + "/sim/stats") as r:
        assert r.status == 200
        return await r.json()


async def metric(base: str, session: aiohttp.ClientSession, name: str) -> float:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_models_list() -> None:
    async with serve(model="demo-7b") as (base, s), s.get(base + "/v1/models") as r:
        assert r.status == 200
        body = await r.json()
    _check("ListModelsResponse", body)
    assert [m["id"] for m in body["data"]] == ["demo-7b"]
    assert body["data"][0]["owned_by"] == "fortress-sim"


@pytest.mark.parametrize(
    ("extra", "n", "finish"),
    [
        ({}, 8, "stop"),
        ({"max_tokens": 3}, 3, "length"),
        ({"max_completion_tokens": 5}, 5, "length"),
        ({"max_tokens": 50}, 8, "stop"),
    ],
)
async def test_chat_non_stream(extra: dict[str, Any], n: int, finish: str) -> None:
    async with serve(model="m1", tokens=8) as (base, s):
        async with s.post(base + "/v1/chat/completions", json=CHAT | extra) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            body = await r.json()
    _check("CreateChatCompletionResponse", body)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-sim-")
    assert body["model"] == "m1"  # the configured model, not the requested "whatever"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].split() == [f"tok{i}" for i in range(n)]
    assert choice["finish_reason"] == finish
    usage = body["usage"]
    assert usage["completion_tokens"] == n
    assert usage["prompt_tokens"] >= 3  # "say three words"
    assert usage["total_tokens"] == usage["prompt_tokens"] + n


@pytest.mark.parametrize(("extra", "n"), [({}, 6), ({"max_tokens": 2}, 2)])
async def test_completion_non_stream(extra: dict[str, Any], n: int) -> None:
    async with serve(model="m2", tokens=6) as (base, s):
        async with s.post(base + "/v1/completions", json=COMPLETION | extra) as r:
            assert r.status == 200
            body = await r.json()
    _check("CreateCompletionResponse", body)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-sim-")
    assert body["model"] == "m2"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert len(choice["text"].split()) == n
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream(include_usage: bool) -> None:
    req = CHAT | {"stream": True, "max_tokens": 4}
    if include_usage:
        req["stream_options"] = {"include_usage": True}
    async with serve(model="m3", tokens=10, itl=0.005) as (base, s):
        async with s.post(base + "/v1/chat/completions", json=req) as r:
            assert r.status == 200
            assert r.content_type == "text/event-stream"
            events = await read_sse(r)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    for c in chunks:
        _check("CreateChatCompletionStreamResponse", c)
        assert c["object"] == "chat.completion.chunk" and c["model"] == "m3"
        assert c["id"] == chunks[0]["id"]
        if include_usage:
            assert "usage" in c
        else:
            assert "usage" not in c
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content).split() == [
        "tok0",
        "tok1",
        "tok2",
        "tok3",
    ]
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, None, "length"]
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        assert last["usage"]["completion_tokens"] == 4
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 4
        assert all(c["usage"] is None for c in chunks[:-1])
        assert len(chunks) == 1 + 4 + 1
    else:
        assert len(chunks) == 1 + 4


@pytest.mark.parametrize("include_usage", [False, True])
async def test_completion_stream(include_usage: bool) -> None:
    req = COMPLETION | {"stream": True}
    if include_usage:
        req["stream_options"] = {"include_usage": True}
    async with serve(tokens=3) as (base, s):
        async with s.post(base + "/v1/completions", json=req) as r:
            assert r.status == 200
            events = await read_sse(r)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    for c in chunks:
        _check("CompletionStreamChunk", c)
        assert c["object"] == "text_completion"
    _check("CreateCompletionResponse", chunks[-1])  # the final chunk is a complete object
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert texts == [" tok0", " tok1", " tok2"]
    usage_chunks = [c for c in chunks if not c["choices"]]
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    else:
        assert usage_chunks == []
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_openai_client_streams_with_usage() -> None:
    """The official client parses everything, including the usage-only last chunk."""
    from openai import AsyncOpenAI

    async with serve(model="m4", tokens=5) as (base, _s):
        client = AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model="m4",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        models = await client.models.list()
        await client.close()
    assert text.split() == ["tok0", "tok1", "tok2", "tok3", "tok4"]
    assert usage is not None and usage.completion_tokens == 5
    assert [m.id for m in models.data] == ["m4"]


async def test_ttft_delays_first_chunk() -> None:
    async with serve(ttft=0.3, itl=0.05, tokens=3) as (base, s):
        t0 = time.monotonic()
        async with s.post(base + "/v1/chat/completions", json=CHAT | {"stream": True}) as r:
            events = await read_sse(r)
    first = events[0][0] - t0
    assert first >= 0.25, first
    # The content chunks then arrive about itl apart: 3 tokens -> ~2 * 0.05 s after the first.
    assert events[-2][0] - events[0][0] >= 0.08
    assert len(events) == 1 + 3 + 1


async def test_non_stream_waits_ttft_plus_itl() -> None:
    async with serve(ttft=0.1, itl=0.05, tokens=5) as (base, s):
        t0 = time.monotonic()
        async with s.post(base + "/v1/completions", json=COMPLETION) as r:
            assert r.status == 200
            await r.read()
    assert time.monotonic() - t0 >= 0.1 + 4 * 0.05 - 0.02


async def test_bad_json_and_missing_fields_are_400() -> None:
    async with serve() as (base, s):
        async with s.post(base + "/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400
            body = await r.json()
        _check("ErrorResponse", body)
        assert body["error"]["type"] == "invalid_request_error"
        async with s.post(base + "/v1/chat/completions", json={"model": "x"}) as r:
            assert r.status == 400
            body = await r.json()
        _check("ErrorResponse", body)
        assert body["error"]["param"] == "messages"
        async with s.post(base + "/v1/completions", json=COMPLETION | {"max_tokens": 0}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "max_tokens"
        async with s.get(base + "/v1/nothing-here") as r:
            assert r.status == 404
            _check("ErrorResponse", await r.json())


async def test_startup_delay_gives_503_then_200() -> None:
    async with serve(startup_delay=0.4) as (base, s):
        async with s.get(base + "/health") as r:
            assert r.status == 503
            assert await r.json() == {
                "error": {"message": "Loading model", "type": "unavailable_error", "code": 503}
            }
        async with s.post(base + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503
            _check("ErrorResponse", await r.json())
        await asyncio.sleep(0.45)
        async with s.get(base + "/health") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok"}
        async with s.post(base + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_error_rate_one_gives_openai_500(path: str) -> None:
    req = CHAT if "chat" in path else COMPLETION
    async with serve(error_rate=1.0) as (base, s):
        for stream in (False, True):
            async with s.post(base + path, json=req | {"stream": stream}) as r:
                assert r.status == 500
                assert r.content_type == "application/json"
                body = await r.json()
            _check("ErrorResponse", body)
            assert body["error"]["type"] == "server_error"


async def test_error_rate_is_reproducible_with_seed() -> None:
    async def outcomes() -> list[int]:
        async with serve(error_rate=0.5, seed=7) as (base, s):
            codes = []
            for _ in range(20):
                async with s.post(base + "/v1/completions", json=COMPLETION) as r:
                    codes.append(r.status)
            return codes

    first = await outcomes()
    assert first == await outcomes()
    assert set(first) == {200, 500}


@pytest.mark.parametrize("stream", [False, True])
async def test_poison_marker_gives_500(stream: bool) -> None:
    poisoned = [
        ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "hi [sim:500]"}]}),
        (
            "/v1/chat/completions",
            CHAT
            | {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "fail now [sim:500] please"}]},
                ]
            },
        ),
        ("/v1/completions", COMPLETION | {"prompt": "once [sim:500] upon"}),
        ("/v1/completions", COMPLETION | {"prompt": ["fine", "x[sim:500]y"]}),
    ]
    plain = [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", COMPLETION),
        # Only message content is prompt text, not the role.
        ("/v1/chat/completions", CHAT | {"messages": [{"role": "[sim:500]", "content": "hi"}]}),
    ]
    async with serve(tokens=2) as (base, s):  # error_rate 0: any 500 is the marker's
        for path, req in poisoned:
            async with s.post(base + path, json=req | {"stream": stream}) as r:
                assert r.status == 500, (path, req)
                assert r.content_type == "application/json"
                body = await r.json()
            _check("ErrorResponse", body)
            assert body["error"]["type"] == "server_error"
            assert body["error"]["code"] == "sim_poison"
        for path, req in plain:
            async with s.post(base + path, json=req | {"stream": stream}) as r:
                assert r.status == 200, (path, req)
                await r.read()
        assert await stats(base, s) == {"requests": 7, "in_flight": 0, "cancelled": 0, "poisoned": 4}


async def test_poison_draws_no_random_number() -> None:
    """Poisoned requests between others leave a seeded error_rate sequence as it was."""

    async def outcomes(poison: bool) -> list[int]:
        async with serve(error_rate=0.5, seed=11) as (base, s):
            codes = []
            for i in range(12):
                if poison and i % 3 == 0:
                    async with s.post(base + "/v1/completions", json={"prompt": "[sim:500]"}) as r:
                        assert r.status == 500
                async with s.post(base + "/v1/completions", json=COMPLETION) as r:
                    codes.append(r.status)
            return codes

    first = await outcomes(True)
    assert first == await outcomes(False)
    assert set(first) == {200, 500}


async def test_control_health_down_and_up() -> None:
    async with serve() as (base, s):
        async with s.post(base + "/sim/control", json={"health": "down"}) as r:
            assert r.status == 200
            assert (await r.json())["health"] == "down"
        async with s.get(base + "/health") as r:
            assert r.status == 503
            _check("ErrorResponse", await r.json())
        async with s.post(base + "/sim/control", json={"health": "up", "error_rate": 1}) as r:
            assert r.status == 200
        async with s.get(base + "/health") as r:
            assert r.status == 200
        async with s.post(base + "/v1/completions", json=COMPLETION) as r:
            assert r.status == 500
        async with s.post(base + "/sim/control", json={"error_rate": 0, "tokens": 2}) as r:
            assert r.status == 200
        async with s.post(base + "/v1/completions", json=COMPLETION) as r:
            assert (await r.json())["usage"]["completion_tokens"] == 2
        for bad in ({"error_rate": 2}, {"health": "sideways"}, {"tokens": 0}, {"nope": 1}):
            async with s.post(base + "/sim/control", json=bad) as r:
                assert r.status == 400, bad
                _check("ErrorResponse", await r.json())


@pytest.mark.parametrize(
    ("flavor", "names", "running"),
    [
        (
            "vllm",
            [
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc",
                "vllm:gpu_cache_usage_perc",
                "vllm:prefix_cache_hits_total",
                "vllm:prefix_cache_queries_total",
                "vllm:prompt_tokens_total",
                "vllm:generation_tokens_total",
            ],
            "vllm:num_requests_running",
        ),
        (
            "llamacpp",
            [
                "llamacpp:requests_processing",
                "llamacpp:requests_deferred",
                "llamacpp:prompt_tokens_total",
                "llamacpp:tokens_predicted_total",
            ],
            "llamacpp:requests_processing",
        ),
    ],
)
async def test_metrics(flavor: str, names: list[str], running: str) -> None:
    async with serve(model="mm", metrics_flavor=flavor, tokens=4) as (base, s):
        async with s.get(base + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
        for name in names:
            assert f"# HELP {name} " in text
            assert f"# TYPE {name} " in text
            if flavor == "vllm":
                assert f'{name}{{model_name="mm"}} ' in text
        assert await metric(base, s, running) == 0
        gen = names[-1]
        async with s.post(base + "/v1/completions", json=COMPLETION) as r:
            await r.read()
        assert await metric(base, s, gen) == 4
        assert await metric(base, s, names[-2]) == 4  # prompt tokens: "once upon a time"

        # A slow request is counted as running while it is in flight, and no longer after.
        async with s.post(base + "/sim/control", json={"ttft": 5}) as r:
            assert r.status == 200
        task = asyncio.create_task(s.post(base + "/v1/completions", json=COMPLETION))
        for _ in range(100):
            if await metric(base, s, running) == 1:
                break
            await asyncio.sleep(0.02)
        assert await metric(base, s, running) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("handler_cancellation", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_client_going_away_is_counted(handler_cancellation: bool, stream: bool) -> None:
    async with serve(handler_cancellation=handler_cancellation, hang_rate=1.0) as (base, s):
        async with aiohttp.ClientSession() as other:
            task = asyncio.create_task(
                other.post(base + "/v1/chat/completions", json=CHAT | {"stream": stream})
            )
            for _ in range(100):
                if (await stats(base, s))["in_flight"] == 1:
                    break
                await asyncio.sleep(0.02)
            assert await stats(base, s) == {"requests": 1, "in_flight": 1, "cancelled": 0, "poisoned": 0}
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # The handler notices within its poll interval (or at once when aiohttp cancels it).
        for _ in range(100):
            if (await stats(base, s))["in_flight"] == 0:
                break
            await asyncio.sleep(0.02)
        assert await stats(base, s) == {"requests": 1, "in_flight": 0, "cancelled": 1, "poisoned": 0}
        assert await metric(base, s, "vllm:num_requests_running") == 0


async def test_stream_cut_mid_way_is_counted() -> None:
    async with serve(tokens=50, itl=0.02) as (base, s):
        async with aiohttp.ClientSession() as other:
            r = await other.post(base + "/v1/chat/completions", json=CHAT | {"stream": True})
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")
            r.close()  # drop the connection with the stream half done
        for _ in range(100):
            if (await stats(base, s))["cancelled"] == 1:
                break
            await asyncio.sleep(0.02)
        assert await stats(base, s) == {"requests": 1, "in_flight": 0, "cancelled": 1, "poisoned": 0}
        assert await metric(base, s, "vllm:kv_cache_usage_perc") == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_cli_crash_after_exits_mid_stream() -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fortress.sim",
        "--port",
        str(port),
        "--model",
        "crashy",
        "--crash-after",
        "3",
        "--tokens",
        "10",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.returncode is None, "simulator exited early"
                await asyncio.sleep(0.05)
            async with s.get(base + "/v1/models") as r:
                assert (await r.json())["data"][0]["id"] == "crashy"
            events: list[bytes] = []
            with pytest.raises(aiohttp.ClientError):
                async with s.post(base + "/v1/chat/completions", json=CHAT | {"stream": True}) as r:
                    assert r.status == 200
                    while True:
                        event = await r.content.readuntil(b"\n\n")
                        if not event:
                            break
                        events.append(event)
        code = await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 1
    assert len(events) == 3
    assert all(e.startswith(b"data: {") for e in events)  # no [DONE]: it crashed
    for e in events:
        _check("CreateChatCompletionStreamResponse", json.loads(e[6:]))


def _flat(text: str) -> str:
    """CLI output without rich's box borders and line wrapping."""
    return " ".join(text.replace("│", " ").split())


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(sim)
    return app


def test_cli_help_says_it_is_a_test_tool() -> None:
    result = CliRunner().invoke(_cli(), ["--help"])
    assert result.exit_code == 0
    out = _flat(result.output)
    assert "SIMULATED replica for tests, load and chaos drills" in out
    assert "never a real model" in out
    assert "fortress sim --port 9001 --model demo --ttft 0.2 --itl 0.02 --tokens 64" in out
    assert "A prompt containing [sim:500] is always answered 500 (code sim_poison)" in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "9001", "--error-rate", "1.5"], "between 0 and 1"),
        (["--port", "9001", "--hang-rate", "-0.1"], "between 0 and 1"),
        (["--port", "9001", "--ttft", "-1"], "non-negative"),
        (["--port", "9001", "--tokens", "0"], "at least 1"),
        (["--port", "0"], "between 1 and 65535"),
        (["--port", "9001", "--metrics-flavor", "tgi"], "tgi"),
        ([], "--port"),
    ],
)
def test_cli_rejects_bad_options(args: list[str], words: str) -> None:
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2
    assert words in _flat(result.output)


def test_settings_validate() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        SimSettings(error_rate=1.1)
    with pytest.raises(ValueError, match="metrics_flavor"):
        SimSettings(metrics_flavor="tgi")
