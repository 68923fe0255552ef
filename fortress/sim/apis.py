"""The simulator's other OpenAI endpoints: ``/v1/embeddings`` and ``/v1/responses``.

Embeddings are deterministic unit vectors derived from a hash of each input (``dimensions``
long, 8 by default), as floats or base64 float32 (the ``openai`` SDK asks for base64). The
Responses API answers placeholder tokens on the same schedule as chat completions, as one
``response`` object or as typed SSE events (``response.created``, ``response.output_text.delta``
..., ``response.completed`` with usage). A test tool, never a model.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import os
import struct
import time
from typing import Any, Protocol

import orjson
from aiohttp import web

from fortress.sim.wire import error as _error
from fortress.sim.wire import sleep_until as _sleep_until
from fortress.sim.wire import token as _token


class _Sim(Protocol):
    """What these endpoints use of the simulator's state (``fortress.sim.server``)."""

    requests: int
    model_check: bool
    answer_model: str
    cfg: Any  # SimSettings: ttft, itl, tokens
    prompt_tokens_total: int
    generation_tokens_total: int

    def loading(self) -> bool: ...


_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _vector(text: str, dims: int) -> list[float]:
    raw = b""
    counter = 0
    while len(raw) < dims * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(b - 127.5) for b in raw[:dims]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _inputs(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    return None


async def _request(sim: _Sim, request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the error answer: loading, bad JSON, another model."""
    sim.requests += 1
    if sim.loading():
        return _error(503, "Loading model", "unavailable_error", "model_loading")
    try:
        req = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return _error(400, f"Invalid JSON body: {exc}", "invalid_request_error")
    if not isinstance(req, dict):
        return _error(400, "The request body must be a JSON object.", "invalid_request_error")
    if sim.model_check and req.get("model") != sim.answer_model:
        return _error(404, f"The model `{req.get('model')}` does not exist.", "NotFoundError")
    return req


async def embeddings(sim: _Sim, request: web.Request) -> web.Response:
    """``POST /v1/embeddings``."""
    req = await _request(sim, request)
    if isinstance(req, web.Response):
        return req
    texts = _inputs(req.get("input"))
    if texts is None:
        return _error(
            400,
            "'input' must be a string or an array of strings or tokens.",
            "invalid_request_error",
            param="input",
        )
    dims = req.get("dimensions", 8)
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= 4096:
        return _error(
            400,
            "'dimensions' must be an integer from 1 to 4096.",
            "invalid_request_error",
            param="dimensions",
        )
    b64 = req.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for i, text in enumerate(texts):
        vec = _vector(text, dims)
        tokens += max(1, len(text.split()))
        emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    sim.prompt_tokens_total += tokens
    body = {
        "object": "list",
        "data": data,
        "model": sim.answer_model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return web.Response(body=orjson.dumps(body), content_type=_JSON)


def _response_input_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_response_input_words(v) for v in value)
    if isinstance(value, dict):
        return _response_input_words(value.get("content")) + _response_input_words(value.get("text"))
    return 0


def _response(sim: _Sim, rid: str, mid: str, status: str, text: str | None, usage: Any) -> dict[str, Any]:
    output = []
    if text is not None:
        output = [
            {
                "type": "message",
                "id": mid,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": sim.answer_model,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
    }


async def responses(sim: _Sim, request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: placeholder tokens, whole or as typed SSE events."""
    req = await _request(sim, request)
    if isinstance(req, web.Response):
        return req
    if req.get("input") in (None, "", []):
        return _error(400, "'input' is required.", "invalid_request_error", param="input")
    cfg = sim.cfg
    limit = req.get("max_output_tokens")
    n = (
        cfg.tokens
        if not isinstance(limit, int) or isinstance(limit, bool)
        else max(1, min(cfg.tokens, limit))
    )
    prompt = max(1, _response_input_words(req.get("input")))
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + n,
    }
    rid, mid = "resp_sim" + os.urandom(12).hex(), "msg_sim" + os.urandom(12).hex()
    text = "".join(_token(i).decode() for i in range(n))
    loop = asyncio.get_running_loop()
    sim.prompt_tokens_total += prompt
    if req.get("stream") is not True:
        await _sleep_until(request, loop.time() + cfg.ttft + cfg.itl * (n - 1))
        sim.generation_tokens_total += n
        body = _response(sim, rid, mid, "completed", text, usage)
        return web.Response(body=orjson.dumps(body), content_type=_JSON)
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    seq = 0

    async def event(kind: str, data: dict[str, Any]) -> None:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **data}
        seq += 1
        await resp.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n")

    await event("response.created", {"response": _response(sim, rid, mid, "in_progress", None, None)})
    first_at = loop.time() + cfg.ttft
    for i in range(n):
        await _sleep_until(request, first_at + i * cfg.itl)
        delta = {
            "item_id": mid,
            "output_index": 0,
            "content_index": 0,
            "delta": _token(i).decode(),
            "logprobs": [],
        }
        await event("response.output_text.delta", delta)
        sim.generation_tokens_total += 1
    done = {"item_id": mid, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}
    await event("response.output_text.done", done)
    await event("response.completed", {"response": _response(sim, rid, mid, "completed", text, usage)})
    await resp.write_eof()
    return resp
