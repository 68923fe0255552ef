"""The Bedrock engine: the OpenAI ⇄ Converse adapter (``python -m fortress.bedrock``), its config and
engine, and a gateway started by ``fortress up -c`` with an ``engine: bedrock`` pool.

No AWS account is used. Bedrock is played by a stub of the ``bedrock-runtime`` REST API written
here from the documented shapes: ``POST /model/{modelId}/converse`` answers JSON, and
``POST /model/{modelId}/converse-stream`` answers the AWS event-stream binary framing (prelude
with lengths and CRC32, typed headers, JSON payload, message CRC32), which botocore itself parses.
A marker in the last user message picks the stub's behaviour (``[throttle]``, ``[denied]``, ...).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from helpers import (
    PYTHON,
    Proc,
    assert_schema,
    fortress_argv,
    free_port,
    http_get,
    http_post,
    wait_http,
    write_up_config,
)

from fortress.bedrock.server import BedrockSettings, build_app, make_client
from fortress.bedrock.translate import RequestError, converse_request
from fortress.config import ConfigError, parse_config
from fortress.config.engines import BedrockReplicaConfig
from fortress.engines import BedrockEngine, engine_for

MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
ANSWER = ["Hello", "! How can I", " help you today?"]
USAGE = {"inputTokens": 25, "outputTokens": 9, "totalTokens": 34}
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIDFORTRESSTEST",
    "AWS_SECRET_ACCESS_KEY": "fortress-test-secret",
    # Nothing of the machine's own AWS setup may leak into the tests.
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# -- a stub of the bedrock-runtime REST API -------------------------------------------------


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v  # 7: string


def event_message(headers: dict[str, str], payload: dict[str, Any]) -> bytes:
    """One AWS event-stream message: total and headers length, prelude CRC32, headers, payload,
    message CRC32 (all big-endian)."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    body = json.dumps(payload).encode()
    prelude = struct.pack(">II", 12 + len(head) + len(body) + 4, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + head + body
    return message + struct.pack(">I", zlib.crc32(message))


def event(kind: str, payload: dict[str, Any]) -> bytes:
    # Bedrock pads every event with a "p" member of varying length; clients must ignore it.
    return event_message(
        {":event-type": kind, ":content-type": "application/json", ":message-type": "event"},
        {**payload, "p": "abcdefghijkl"[: len(kind) % 12]},
    )


def exception_event(kind: str, message: str) -> bytes:
    return event_message(
        {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"},
        {"message": message},
    )


ERRORS = {  # marker -> (status, x-amzn-ErrorType, message), as Bedrock answers them
    "[throttle]": (429, "ThrottlingException", "Too many requests, please wait before trying again."),
    "[denied]": (
        403,
        "AccessDeniedException",
        "You don't have access to the model with the specified model ID.",
    ),
    "[invalid]": (400, "ValidationException", "The provided model identifier is invalid."),
    "[not-ready]": (429, "ModelNotReadyException", "Model is not ready for inference."),
    "[unavailable]": (503, "ServiceUnavailableException", "Bedrock is unable to process your request."),
    "[internal]": (500, "InternalServerException", "The server encountered an internal error."),
}


class BedrockStub:
    """The two Converse routes, recording every request (path, headers, JSON body)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.throttled_once: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/model/{model_id}/converse", self.converse)
        app.router.add_post("/model/{model_id}/converse-stream", self.converse_stream)
        return app

    async def _record(self, request: web.Request) -> tuple[dict[str, Any], str]:
        body = await request.json()
        self.requests.append(
            {
                "path": request.path,
                "model_id": request.match_info["model_id"],
                "headers": dict(request.headers),
                "body": body,
            }
        )
        last = body["messages"][-1]["content"]
        prompt = " ".join(b.get("text", "") for b in last)
        return body, prompt

    def _error(self, prompt: str) -> web.Response | None:
        if "[throttle-once]" in prompt and prompt not in self.throttled_once:
            self.throttled_once.add(prompt)
            prompt = "[throttle]"
        for marker, (status, code, message) in ERRORS.items():
            if marker in prompt:
                return web.json_response(
                    {"message": message},
                    status=status,
                    headers={
                        "x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/"
                    },
                )
        return None

    async def converse(self, request: web.Request) -> web.Response:
        _, prompt = await self._record(request)
        if (err := self._error(prompt)) is not None:
            return err
        if "[tool]" in prompt:
            content: list[dict[str, Any]] = [
                {"text": "Let me look that up."},
                {
                    "toolUse": {
                        "toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q",
                        "name": "top_song",
                        "input": {"sign": "WZPZ"},
                    }
                },
            ]
            stop = "tool_use"
        else:
            content, stop = [{"text": "".join(ANSWER)}], "max_tokens" if "[long]" in prompt else "end_turn"
        return web.json_response(
            {
                "output": {"message": {"role": "assistant", "content": content}},
                "stopReason": stop,
                "usage": USAGE,
                "metrics": {"latencyMs": 412},
            },
            headers={"x-amzn-RequestId": "5ab6ba9e-6e55-4a0b-9e4f-6b1e6a2b9a39"},
        )

    async def converse_stream(self, request: web.Request) -> web.StreamResponse:
        _, prompt = await self._record(request)
        if (err := self._error(prompt)) is not None:
            return err
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await resp.prepare(request)
        if "[stream-throttle]" in prompt:  # an error as the stream's first event
            await resp.write(exception_event("throttlingException", "Too many tokens, please wait."))
            await resp.write_eof()
            return resp
        await resp.write(event("messageStart", {"role": "assistant"}))
        for i, text in enumerate(ANSWER):
            await resp.write(event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}}))
            if i == 0 and "[stream-break]" in prompt:
                await resp.write(exception_event("modelStreamErrorException", "The model stream broke."))
                await resp.write_eof()
                return resp
            await asyncio.sleep(5 if "[slow]" in prompt else 0.01)
        await resp.write(event("contentBlockStop", {"contentBlockIndex": 0}))
        if "[tool]" in prompt:
            tool = {"toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "name": "top_song"}
            await resp.write(event("contentBlockStart", {"contentBlockIndex": 1, "start": {"toolUse": tool}}))
            for part in ('{"sign": ', '"WZPZ"}'):
                delta = {"toolUse": {"input": part}}
                await resp.write(event("contentBlockDelta", {"contentBlockIndex": 1, "delta": delta}))
            await resp.write(event("contentBlockStop", {"contentBlockIndex": 1}))
        stop = "tool_use" if "[tool]" in prompt else "end_turn"
        await resp.write(event("messageStop", {"stopReason": stop}))
        await resp.write(event("metadata", {"usage": USAGE, "metrics": {"latencyMs": 398}}))
        await resp.write_eof()
        return resp


class Background:
    """aiohttp apps served on 127.0.0.1 by an event loop in a thread, so synchronous clients (the
    openai SDK, a ``fortress up`` child) can reach them while the test runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def serve(self, app: web.Application) -> str:
        port = free_port()

        async def start() -> None:
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for runner in reversed(self.runners):
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
            mp.delenv(name, raising=False)
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def stack(aws_env: None) -> Iterator[tuple[BedrockStub, str, str, str]]:
    """(stub, stub URL, adapter URL with one attempt per call, adapter URL with two)."""
    bg = Background()
    stub = BedrockStub()
    try:
        stub_url = bg.serve(stub.app())
        urls = []
        for attempts in (1, 2):
            settings = BedrockSettings(
                model_id=MODEL_ID,
                served_model_name="claude-haiku",
                region="us-east-1",
                endpoint_url=stub_url,
                max_attempts=attempts,
                max_concurrency=4,
            )
            urls.append(bg.serve(build_app(settings, make_client(settings))))
        yield stub, stub_url, urls[0], urls[1]
    finally:
        bg.close()


def chat(prompt: str, **extra: Any) -> bytes:
    return json.dumps(
        {"model": "claude-haiku", "messages": [{"role": "user", "content": prompt}], **extra}
    ).encode()


def sse(body: bytes) -> list[Any]:
    """The data of each SSE event; ``[DONE]`` as the string."""
    out: list[Any] = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- translation: OpenAI request -> Converse request ------------------------------------------


def test_a_chat_request_becomes_a_converse_request() -> None:
    png = base64.b64encode(b"\x89PNG fake").decode()
    req = {
        "model": "claude-haiku",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
            {"role": "user", "content": "What is the top song on WZPZ?"},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "top_song", "arguments": '{"sign": "WZPZ"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Elemental Hotel"},
        ],
        "max_tokens": 128,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": "END",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "top_song",
                    "description": "The top song.",
                    "parameters": {"type": "object", "properties": {"sign": {"type": "string"}}},
                },
            }
        ],
        "tool_choice": "required",
    }
    out = converse_request(req)
    assert out["system"] == [{"text": "You are terse."}, {"text": "Answer in English."}]
    user, assistant, tool = out["messages"]
    assert user == {
        "role": "user",
        "content": [
            {"text": "What is the top song on WZPZ?"},  # two user messages merged into one turn
            {"image": {"format": "png", "source": {"bytes": b"\x89PNG fake"}}},
        ],
    }
    assert assistant == {
        "role": "assistant",
        "content": [{"toolUse": {"toolUseId": "call_1", "name": "top_song", "input": {"sign": "WZPZ"}}}],
    }
    assert tool == {
        "role": "user",
        "content": [{"toolResult": {"toolUseId": "call_1", "content": [{"text": "Elemental Hotel"}]}}],
    }
    assert out["inferenceConfig"] == {
        "maxTokens": 128,
        "temperature": 0.2,
        "topP": 0.9,
        "stopSequences": ["END"],
    }
    spec = out["toolConfig"]["tools"][0]["toolSpec"]
    assert spec["name"] == "top_song" and spec["inputSchema"]["json"]["properties"] == {
        "sign": {"type": "string"}
    }
    assert out["toolConfig"]["toolChoice"] == {"any": {}}
    assert "modelId" not in out


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                    }
                ]
            },
            "messages",
        ),
    ],
)
def test_what_converse_cannot_express_is_refused(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as err:
        converse_request({"messages": [{"role": "user", "content": "hi"}], **extra})
    assert err.value.param == param


# -- the adapter against the stub -------------------------------------------------------------


def test_chat_completion_is_translated(stack: tuple[BedrockStub, str, str, str]) -> None:
    stub, _, url, _ = stack
    n = len(stub.requests)
    status, body = http_post(
        url + "/v1/chat/completions",
        json.dumps(
            {
                "model": "claude-haiku",
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "max_completion_tokens": 50,
                "temperature": 0.5,
                "stop": ["\n\nHuman:"],
            }
        ).encode(),
    )
    assert status == 200, body
    doc = json.loads(body)
    assert_schema(doc, "CreateChatCompletionResponse")
    assert doc["model"] == "claude-haiku" and doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["content"] == "".join(ANSWER)
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"] == {"prompt_tokens": 25, "completion_tokens": 9, "total_tokens": 34}
    (sent,) = stub.requests[n:]
    # botocore quotes the model id in the path; aiohttp decodes it back.
    assert sent["path"].endswith("/converse") and sent["model_id"] == MODEL_ID
    assert sent["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDFORTRESSTEST/")
    assert "/us-east-1/bedrock/aws4_request" in sent["headers"]["Authorization"]
    assert sent["body"]["system"] == [{"text": "Be brief."}]
    assert sent["body"]["messages"] == [{"role": "user", "content": [{"text": "Hi"}]}]
    assert sent["body"]["inferenceConfig"] == {
        "maxTokens": 50,
        "temperature": 0.5,
        "stopSequences": ["\n\nHuman:"],
    }


def test_finish_reasons_and_tool_calls(stack: tuple[BedrockStub, str, str, str]) -> None:
    _, _, url, _ = stack
    status, body = http_post(url + "/v1/chat/completions", chat("[long] go on"))
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "length"
    status, body = http_post(url + "/v1/chat/completions", chat("[tool] top song?"))
    doc = json.loads(body)
    assert_schema(doc, "CreateChatCompletionResponse")
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look that up."
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q" and call["function"]["name"] == "top_song"
    assert json.loads(call["function"]["arguments"]) == {"sign": "WZPZ"}


def test_stream_is_translated_with_usage(stack: tuple[BedrockStub, str, str, str]) -> None:
    stub, _, url, _ = stack
    n = len(stub.requests)
    status, body = http_post(
        url + "/v1/chat/completions", chat("Hi", stream=True, stream_options={"include_usage": True})
    )
    assert status == 200, body
    events = sse(body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        assert_schema(c, "CreateChatCompletionStreamResponse")
        assert c["model"] == "claude-haiku" and c["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "".join(ANSWER)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 25,
        "completion_tokens": 9,
        "total_tokens": 34,
    }
    assert stub.requests[n]["path"].endswith("/converse-stream")
    # Without include_usage: no usage anywhere.
    plain = sse(http_post(url + "/v1/chat/completions", chat("Hi", stream=True))[1])
    assert all("usage" not in c for c in plain[:-1]) and plain[-1] == "[DONE]"


def test_streamed_tool_calls(stack: tuple[BedrockStub, str, str, str]) -> None:
    _, _, url, _ = stack
    chunks = sse(http_post(url + "/v1/chat/completions", chat("[tool] top song?", stream=True))[1])[:-1]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    for c in chunks:
        assert_schema(c, "CreateChatCompletionStreamResponse")
    assert calls[0]["id"] == "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q" and calls[0]["function"]["name"] == "top_song"
    assert {tc["index"] for tc in calls} == {0}
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"sign": "WZPZ"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("marker", "status", "type_"),
    [
        ("[throttle]", 429, "requests"),
        ("[invalid]", 400, "invalid_request_error"),
        ("[denied]", 403, "invalid_request_error"),
        ("[not-ready]", 503, "server_error"),
        ("[unavailable]", 503, "server_error"),
        ("[internal]", 502, "server_error"),
    ],
)
def test_bedrock_errors_become_openai_errors(
    stack: tuple[BedrockStub, str, str, str], marker: str, status: int, type_: str
) -> None:
    _, _, url, _ = stack
    for stream in (False, True):
        got, body = http_post(url + "/v1/chat/completions", chat(f"{marker} hi", stream=stream))
        assert got == status, body
        doc = json.loads(body)
        assert_schema(doc, "ErrorResponse")
        assert doc["error"]["type"] == type_ and doc["error"]["message"].startswith("Bedrock: ")


def test_a_throttling_event_first_in_the_stream_is_a_429(stack: tuple[BedrockStub, str, str, str]) -> None:
    _, _, url, _ = stack
    status, body = http_post(url + "/v1/chat/completions", chat("[stream-throttle] hi", stream=True))
    assert status == 429, body
    assert json.loads(body)["error"]["code"] == "ThrottlingException"


def test_an_error_mid_stream_ends_it_with_an_openai_error_event(
    stack: tuple[BedrockStub, str, str, str],
) -> None:
    _, _, url, _ = stack
    status, body = http_post(url + "/v1/chat/completions", chat("[stream-break] hi", stream=True))
    assert status == 200
    events = sse(body)
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "ModelStreamErrorException"
    assert_schema(events[-1], "ErrorResponse")


def test_botocore_retries_a_throttled_call(stack: tuple[BedrockStub, str, str, str]) -> None:
    stub, _, once, twice = stack
    n = len(stub.requests)
    status, _ = http_post(twice + "/v1/chat/completions", chat("[throttle-once] a"))
    assert status == 200 and len(stub.requests) - n == 2
    status, _ = http_post(once + "/v1/chat/completions", chat("[throttle-once] b"))
    assert status == 429


def test_models_health_and_metrics(stack: tuple[BedrockStub, str, str, str]) -> None:
    _, _, url, _ = stack
    assert http_get(url + "/health")[0] == 200
    status, body = http_get(url + "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["claude-haiku"]
    http_post(url + "/v1/chat/completions", chat("Hi"))
    text = http_get(url + "/metrics")[1].decode()
    assert 'vllm:num_requests_running{model_name="claude-haiku"} 0.0' in text
    tokens = [line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total")]
    assert tokens and float(tokens[0].split()[-1]) >= 9


def test_a_slow_stream_does_not_block_the_server(stack: tuple[BedrockStub, str, str, str]) -> None:
    """Calls run on threads: health answers at once while requests are in flight."""
    _, _, url, _ = stack
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                http_post(url + "/v1/chat/completions", chat("[slow] Hi", stream=True), timeout=60)[0]
            )
        )
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    assert http_get(url + "/health", timeout=30)[0] == 200
    # Answered while the streams (5 s per event) were still running: not queued behind them.
    assert any(t.is_alive() for t in threads)
    for t in threads:
        t.join(60)
    assert results == [200] * 6


def test_a_client_that_leaves_mid_stream_frees_its_slot(stack: tuple[BedrockStub, str, str, str]) -> None:
    _, _, url, _ = stack
    host, port = url.removeprefix("http://").split(":")
    body = chat("[slow] hi", stream=True)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while b"data: " not in seen:  # the stream started; Bedrock's next event is 5 s away
            data = sock.recv(65536)
            assert data, "the adapter closed the stream"
            seen += data

        def running() -> float:
            text = http_get(url + "/metrics")[1].decode()
            line = next(x for x in text.splitlines() if x.startswith("vllm:num_requests_running"))
            return float(line.split()[-1])

        assert running() == 1
    t0 = time.monotonic()
    while running() != 0:
        assert time.monotonic() - t0 < 10, "the slot of a vanished client was not freed"
        time.sleep(0.05)


# -- config and engine -----------------------------------------------------------------------


def test_config_and_engine_command_line() -> None:
    cfg = parse_config(
        """
pools:
  - model: claude-haiku
    replicas:
      - engine: bedrock
        count: 2
        options: {model_id: "anthropic.claude-3-haiku-20240307-v1:0", region: eu-west-1,
                  endpoint-url: "https://vpce-1.bedrock-runtime.eu-west-1.vpce.amazonaws.com",
                  max_concurrency: 8, read_timeout: 2m, env: {AWS_PROFILE: prod}}
""",
        env={},
    )
    rc = cfg.pools[0].replicas[0]
    assert isinstance(rc, BedrockReplicaConfig) and rc.count == 2
    eng = engine_for(rc, "claude-haiku")
    assert isinstance(eng, BedrockEngine) and eng.kind == "bedrock" and eng.model == "claude-haiku"
    launch = eng.launch(9300)
    argv = launch.argv
    assert argv[:3] == (PYTHON, "-m", "fortress.bedrock")

    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert (
        flag("--port") == "9300"
        and flag("--model-id") == MODEL_ID
        and flag("--served-model-name") == "claude-haiku"
    )
    assert flag("--region") == "eu-west-1" and flag("--endpoint-url").startswith("https://vpce-1.")
    assert (
        flag("--max-concurrency") == "8" and flag("--max-attempts") == "3" and flag("--read-timeout") == "120"
    )
    assert launch.env == {"AWS_PROFILE": "prod"} and launch.url == "http://127.0.0.1:9300"
    assert not any("AWS_SECRET" in a for a in argv)
    # No pool model, no served name: the model id is served.
    assert engine_for(BedrockReplicaConfig.model_validate({"options": {"model_id": "m.x"}})).model == "m.x"


@pytest.mark.parametrize(
    ("replica", "message"),
    [
        ("{engine: bedrock}", "a bedrock replica needs options.model_id"),
        (
            "{engine: bedrock, options: {model_id: m, endpoint_url: vpce.local}}",
            "must start with http:// or https://",
        ),
        ("{engine: bedrock, options: {model_id: m, max_concurrency: 0}}", "greater than or equal to 1"),
        (
            "{engine: bedrock, options: {model_id: m, aws_secret_access_key: x}}",
            "Extra inputs are not permitted",
        ),
        ("{engine: bedrock, url: 'http://a:1', options: {model_id: m}}", "gets its port from Fortress"),
    ],
)
def test_config_errors(replica: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"pools:\n  - model: m\n    replicas:\n      - {replica}\n", env={})
    assert message in str(err.value)


def test_the_adapter_exits_2_without_a_region(tmp_path: Path, aws_env: None) -> None:
    proc = Proc(
        [PYTHON, "-m", "fortress.bedrock", "--port", str(free_port()), "--model-id", "m"], tmp_path / "a.log"
    )
    try:
        assert proc.p.wait(30) == 2
        assert "no AWS region" in proc.output()
    finally:
        proc.stop()


# -- end to end: fortress up -c with an engine: bedrock pool, the openai SDK as client ------


def test_fortress_up_serves_a_bedrock_pool(tmp_path: Path, stack: tuple[BedrockStub, str, str, str]) -> None:
    stub, stub_url, _, _ = stack
    config = write_up_config(
        tmp_path,
        "claude-haiku",
        {
            "engine": "bedrock",
            "options": {"model_id": MODEL_ID, "region": "us-east-1", "endpoint_url": stub_url},
        },
        health_check={"interval": 0.5, "timeout": 0.5},
    )
    port = free_port()
    # Credentials reach the adapter through the environment it inherits: the standard AWS chain.
    proc = Proc(
        fortress_argv("up", "-c", str(config), "--port", str(port), "-q"),
        tmp_path / "up.log",
        env=CREDENTIALS,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/ready", timeout=60)
        except AssertionError:
            raise AssertionError("fortress up did not start:\n" + proc.output()[-3000:]) from None
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        n = len(stub.requests)
        reply = client.chat.completions.create(
            model="claude-haiku", messages=[{"role": "user", "content": "Say hello."}], max_tokens=20
        )
        assert reply.choices[0].message.content == "".join(ANSWER)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage is not None and reply.usage.total_tokens == 34
        assert stub.requests[n]["body"]["inferenceConfig"] == {"maxTokens": 20}

        stream = client.chat.completions.create(
            model="claude-haiku",
            messages=[{"role": "user", "content": "Say hello."}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(ANSWER)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9

        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(
                model="claude-haiku", messages=[{"role": "user", "content": "[throttle] hi"}]
            )
        assert err.value.status_code == 429
        assert "Too many requests" in str(err.value)
    finally:
        proc.stop()
