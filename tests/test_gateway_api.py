"""The OpenAI API through the gateway, with the official SDK, against a real llama-server.

Every response body and stream chunk is validated against OpenAI's published schemas.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import openai
import pytest
from aiohttp import web
from helpers import assert_schema, free_port, http_get, http_post

PROMPT = [{"role": "user", "content": "Say hello in three words."}]


@pytest.fixture(scope="module")
def gw(llama_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from conftest import Cluster

    c = Cluster(tmp_path_factory.mktemp("gw"))
    url, _ = c.gateway(
        f"""
server: {{max_body_bytes: 65536}}
pools:
  - model: smollm2
    aliases: [gpt-4o-mini]
    health_check: {{interval: 1, timeout: 0.5}}
    replicas: [{{url: "{llama_url}"}}]
"""
    )
    yield url
    c.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def completion_chunk_schema_ok(chunk: dict) -> None:
    # OpenAI's schema requires a finish_reason string on every completion, but OpenAI itself
    # streams `null` until the last chunk; accept exactly that and nothing else.
    for choice in chunk["choices"]:
        if choice.get("finish_reason") is None:
            choice = dict(choice, finish_reason="stop")
            chunk = dict(chunk, choices=[choice])
    assert_schema(chunk, "CreateCompletionResponse")


def test_chat_non_stream_sync_sdk(gw: str) -> None:
    raw = client(gw).chat.completions.with_raw_response.create(
        model="smollm2", messages=PROMPT, max_tokens=8, extra_headers={"x-request-id": "abc-123"}
    )
    body = json.loads(raw.http_response.content)
    assert_schema(body, "CreateChatCompletionResponse")
    assert raw.headers["x-request-id"] == "abc-123"
    assert raw.headers["x-fortress-replica"] == "smollm2-1"  # pool + index, from the config
    assert raw.headers["x-fortress-tier"] == "primary"
    assert float(raw.headers["x-fortress-overhead-ms"]) > 0
    parsed = raw.parse()
    assert parsed.choices[0].message.content
    assert parsed.usage.completion_tokens <= 8 and parsed.usage.prompt_tokens > 0


async def test_chat_stream_async_sdk_without_usage(gw: str) -> None:
    ac = openai.AsyncOpenAI(base_url=gw + "/v1", api_key="unused", max_retries=0)
    stream = await ac.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=8, stream=True)
    text, chunks = "", 0
    async for chunk in stream:
        data = chunk.model_dump(exclude_unset=True)
        assert_schema(data, "CreateChatCompletionStreamResponse")
        assert data["choices"], "the usage-only chunk must not reach a client that did not ask"
        assert "usage" not in data or data["usage"] is None
        chunks += 1
        text += chunk.choices[0].delta.content or ""
    assert chunks >= 3 and text
    await ac.close()


def test_chat_stream_with_usage(gw: str) -> None:
    stream = client(gw).chat.completions.create(
        model="smollm2",
        messages=PROMPT,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c.model_dump(exclude_unset=True) for c in stream]
    for c in chunks:
        assert_schema(c, "CreateChatCompletionStreamResponse")
    last = chunks[-1]
    assert last["choices"] == []
    usage = last["usage"]
    assert 0 < usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The content chunks came through too: one per generated token, plus role/finish chunks.
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) >= 1


def test_completions_non_stream_and_stream(gw: str) -> None:
    c = client(gw)
    raw = c.completions.with_raw_response.create(model="smollm2", prompt="Once upon a time", max_tokens=5)
    body = json.loads(raw.http_response.content)
    assert_schema(body, "CreateCompletionResponse")
    assert body["usage"]["completion_tokens"] == 5
    text = ""
    for chunk in c.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=5, stream=True):
        data = chunk.model_dump(exclude_unset=True)
        completion_chunk_schema_ok(data)
        assert "usage" not in data or data["usage"] is None
        text += data["choices"][0]["text"] if data["choices"] else ""
    assert text


def test_models_list_and_retrieve(gw: str) -> None:
    c = client(gw)
    raw = c.models.with_raw_response.list()
    body = json.loads(raw.http_response.content)
    assert_schema(body, "ListModelsResponse")
    assert sorted(m["id"] for m in body["data"]) == ["gpt-4o-mini", "smollm2"]
    assert c.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_alias_reaches_the_real_model(gw: str) -> None:
    resp = client(gw).chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=4)
    # The replica serves smollm2; the answer says so instead of pretending to be the alias.
    assert resp.model == "smollm2"


def test_errors_in_openai_format(gw: str) -> None:
    def post(body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
        req = urllib.request.Request(gw + path, data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    cases = [
        (b"{not json", 400, None),
        (b"[1,2]", 400, None),
        (b'{"messages": []}', 400, "model"),
        (b'{"model": "smollm2", "stream": "yes"}', 400, "stream"),
        (b'{"model": "smollm2", "max_tokens": -1}', 400, "max_tokens"),
        (b'{"model": "no-such-model", "messages": []}', 404, "model"),
        (b'{"model": "smollm2", "pad": "' + b"x" * 70000 + b'"}', 413, None),
    ]
    for body, status, param in cases:
        code, err = post(body)
        assert code == status, (body[:40], code, err)
        assert_schema(err, "ErrorResponse")
        assert err["error"]["param"] == param
    code, err = post(b"{}", "/v1/nothing")
    assert code == 404 and "error" in err
    assert http_get(gw + "/v1/chat/completions")[0] == 405
    with pytest.raises(openai.NotFoundError) as exc:
        client(gw).chat.completions.create(model="no-such-model", messages=PROMPT)
    assert exc.value.code == "model_not_found"


def test_health_and_ready(gw: str) -> None:
    assert http_get(gw + "/health") == (200, b'{"status":"ok"}')
    code, body = http_get(gw + "/ready")
    assert code == 200 and json.loads(body)["ready"] is True


async def test_body_and_unknown_fields_pass_through_untouched(make_gateway) -> None:
    """A recording upstream shows exactly what the gateway sends to a replica."""
    seen: list[tuple[dict, dict]] = []

    async def models(_r: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]}
        )

    async def chat(r: web.Request) -> web.StreamResponse:
        seen.append((json.loads(await r.read()), {k.lower(): v for k, v in r.headers.items()}))
        body = seen[-1][0]
        if body.get("stream"):
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(r)
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
                ],
            }
        )

    async def health(_r: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        gw = await asyncio.to_thread(
            make_gateway,
            f"pools:\n  - model: m\n    health_check: {{interval: 1, timeout: 0.5}}\n    replicas: [{{url: 'http://127.0.0.1:{port}'}}]\n",
        )
        ac = openai.AsyncOpenAI(base_url=gw + "/v1", api_key="client-key", max_retries=0)
        extra = {"top_k": 7, "repetition_penalty": 1.1, "custom": {"nested": [1, 2]}}
        await ac.chat.completions.create(
            model="m", messages=PROMPT, extra_body=extra, extra_headers={"x-request-id": "rid-1"}
        )
        body, headers = seen[-1]
        assert body == {"model": "m", "messages": PROMPT, **extra}
        assert headers["x-request-id"] == "rid-1"
        assert "authorization" not in headers  # the client's key stays here
        stream = await ac.chat.completions.create(model="m", messages=PROMPT, stream=True, extra_body=extra)
        async for _ in stream:
            pass
        body, _ = seen[-1]
        # Streams ask the replica for usage; everything else is what the client sent.
        assert body == {
            "model": "m",
            "messages": PROMPT,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        await ac.close()
    finally:
        await runner.cleanup()


def test_stream_then_non_stream_on_one_replica_never_fails(gw: str) -> None:
    """llama-server closes its connection after a stream without saying so; the pooled
    connection is dead. The gateway retries once on a fresh connection, without ejecting."""
    c = client(gw)
    for _ in range(6):
        for _chunk in c.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=2, stream=True):
            pass
        resp = c.chat.completions.with_raw_response.create(model="smollm2", messages=PROMPT, max_tokens=2)
        assert resp.http_response.status_code == 200
    _code, body = http_get(gw + "/admin/replicas")
    replica = json.loads(body)["pools"][0]["replicas"][0]
    assert replica["state"] == "healthy" and replica["failures"] == 0


def test_responses_api_through_the_gateway(gw: str) -> None:
    # llama-server serves OpenAI's Responses API too; the gateway relays it like chat.
    c = client(gw)
    resp = c.responses.create(model="smollm2", input="Say hello.", max_output_tokens=8)
    assert resp.output_text and resp.usage.output_tokens <= 8
    events = list(c.responses.create(model="smollm2", input="Say hello.", max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_a_replica_error_reaches_the_client_in_openai_format(gw: str) -> None:
    # llama-server answers a malformed `messages` with its own error shape (an integer code):
    # the gateway relays its message in OpenAI's format.
    status, raw = http_post(
        gw + "/v1/chat/completions", json.dumps({"model": "smollm2", "messages": "hi"}).encode()
    )
    assert status == 400, raw[:300]
    body = json.loads(raw)
    assert_schema(body, "ErrorResponse")
    assert body["error"]["message"] and (
        body["error"]["code"] is None or isinstance(body["error"]["code"], str)
    )
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).chat.completions.create(model="smollm2", messages="hi")  # type: ignore[arg-type]
    assert exc.value.status_code == 400
