"""A simulated OpenAI-compatible replica, for tests, load and chaos drills only.

THIS IS A TEST TOOL, NOT A MODEL. It never runs a model and is never a default backend: it answers
``/v1/chat/completions`` and ``/v1/completions`` with placeholder tokens (`` tok0 tok1 ...``) on a
configurable schedule (time to first token, inter-token latency, output length), and it can be made
to misbehave on purpose: a loading period (``/health`` answers 503 like llama.cpp), injected 500s,
requests that never answer, a crash mid-stream, or, at runtime through ``POST /sim/control``,
health forced down, another model served (``model``) or another model named in answers only
(``answer_model``: a replica lying about its model), or vLLM's 404 for a request naming
another model than the one answered (``model_check``). ``GET /metrics`` speaks the vLLM or
llama.cpp Prometheus dialect with real in-flight and token counts, and ``GET /sim/stats`` reports
what happened, including requests whose client went away.

Poisoned requests, for outlier-detection tests: a completion whose prompt (a chat message's content
or the completion ``prompt``) contains the marker ``[sim:500]`` is answered 500 in OpenAI's error
format (code ``sim_poison``) whatever ``error_rate`` says, and counted as ``poisoned`` in
``/sim/stats``. The check draws no random number, so a seeded error/hang sequence is unchanged.

Answers are deterministic: token i of an answer is `` tok<i>`` whatever the sampling settings, so
a chat request with vLLM's ``continue_final_message: true`` (and ``add_generation_prompt:
false``) whose last message is the assistant's partial answer of k tokens (words) goes on with
tokens k, k+1, ... of the answer the same request would have had uninterrupted; ``max_tokens``
then counts the new tokens only, as in vLLM.

Every body and stream chunk follows the OpenAI schemas (``tests/conformance/openai-schemas.json``).
Run it with ``fortress sim --port 9001`` or ``python -m fortress.sim --port 9001``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from fortress.sim import apis
from fortress.sim.wire import JSON as _JSON
from fortress.sim.wire import ClientGone as _ClientGone
from fortress.sim.wire import error as _error
from fortress.sim.wire import gone as _gone
from fortress.sim.wire import sleep_until as _sleep_until
from fortress.sim.wire import token as _token

__all__ = ["POISON_MARKER", "SimSettings", "build_app", "run"]

_FLAVORS = ("vllm", "llamacpp")
# Prompt text that makes a completion fail with 500: a bad replica on demand, for outlier tests.
POISON_MARKER = "[sim:500]"
# Simulated KV-cache size, only to give kv_cache_usage_perc a plausible moving value.
_KV_CAPACITY_TOKENS = 262_144
# Prefix-cache model: vLLM-style chained hashes of fixed word blocks, bounded LRU.
_PREFIX_BLOCK_WORDS = 16
_PREFIX_CACHE_BLOCKS = 65_536

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_METRICS_CT = "text/plain; version=0.0.4; charset=utf-8"
_DONE = b"data: [DONE]\n\n"
# llama.cpp's exact body while loading; health checkers in the wild parse it.
_LOADING_HEALTH = orjson.dumps(
    {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
)
_HEALTH_OK = orjson.dumps({"status": "ok"})


@dataclass
class SimSettings:
    """How the simulated replica behaves. All times are in seconds.

    ``tokens`` is the output length when the request sets no lower ``max_tokens``;
    ``startup_delay`` is how long after start ``/health`` and completions answer 503;
    ``error_rate`` / ``hang_rate`` are the fractions of completion requests answered 500 / never
    answered; ``crash_after`` makes the process ``os._exit(1)`` after that many stream chunks in
    total; ``metrics_flavor`` picks the ``/metrics`` dialect; ``seed`` fixes the random draws.
    """

    model: str = "sim-model"
    ttft: float = 0.0
    itl: float = 0.0
    tokens: int = 16
    startup_delay: float = 0.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    crash_after: int | None = None
    metrics_flavor: str = "vllm"
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must not be empty")
        for name in ("ttft", "itl", "startup_delay"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
        for name in ("error_rate", "hang_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction between 0 and 1, got {value!r}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {self.tokens!r}")
        if self.crash_after is not None and self.crash_after < 1:
            raise ValueError(f"crash_after must be at least 1, got {self.crash_after!r}")
        if self.metrics_flavor not in _FLAVORS:
            raise ValueError(f"metrics_flavor must be one of {_FLAVORS}, got {self.metrics_flavor!r}")


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _words(value: Any) -> int:
    """Rough token count of a prompt or message content: words, or ids for token-id prompts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(1 if isinstance(v, int) else _words(v) for v in value)
    if isinstance(value, dict):  # a content part: {"type": "text", "text": ...}
        return _words(value.get("text"))
    return 0


def _prompt_text(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, int):
                out.append(str(v))
            else:
                _prompt_text(v, out)
    elif isinstance(value, dict):
        text = value.get("text")
        if isinstance(text, str):
            out.append(text)


@dataclass(slots=True)
class _Job:
    """One parsed completion request."""

    chat: bool
    stream: bool
    include_usage: bool
    limit: int | None
    prompt_tokens: int
    prompt_words: list[str]
    poisoned: bool
    start: int = 0  # continue_final_message: tokens of the answer already in the last message
    emitted: int = 0  # streamed tokens so far, held in live_tokens until the request ends


def _parse(req: Any, chat: bool) -> _Job:
    if not isinstance(req, dict):
        raise _BadRequest("The request body must be a JSON object.")
    parts: list[str] = []
    poisoned = False
    if chat:
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty array.", "messages")
        for m in messages:
            if not isinstance(m, dict):
                raise _BadRequest("Each message must be an object.", "messages")
            if "role" in m:
                parts.append(str(m["role"]))
            start = len(parts)  # only the content may carry the marker, not the role
            _prompt_text(m.get("content"), parts)
            poisoned = poisoned or any(POISON_MARKER in p for p in parts[start:])
    else:
        if "prompt" not in req or req["prompt"] is None:
            raise _BadRequest("'prompt' is required.", "prompt")
        _prompt_text(req["prompt"], parts)
        poisoned = any(POISON_MARKER in p for p in parts)
    limit: int | None = None
    for key in ("max_completion_tokens", "max_tokens"):
        value = req.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"'{key}' must be a positive integer.", key)
        limit = value if limit is None else min(limit, value)
    start = _continued(req) if chat else 0
    stream = req.get("stream") is True
    opts = req.get("stream_options")
    include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
    words = " ".join(parts).split()
    return _Job(chat, stream, include_usage, limit, max(1, len(words)), words, poisoned, start)


def _continued(req: dict[str, Any]) -> int:
    """Tokens of the answer the request's last (assistant) message already holds, for
    ``continue_final_message``; 0 for a plain request. vLLM's own checks, same messages."""
    if req.get("continue_final_message") is not True:
        return 0
    if req.get("add_generation_prompt", True) is not False:
        raise _BadRequest(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            "continue_final_message",
        )
    last = req["messages"][-1]
    if last.get("role") != "assistant":
        raise _BadRequest(
            "`continue_final_message` needs the final message to be from the assistant.",
            "continue_final_message",
        )
    return _words(last.get("content"))


class _Sim:
    """Runtime state of one simulated replica: settings, counters, chaos switches."""

    def __init__(self, settings: SimSettings) -> None:
        # A private copy: /sim/control mutates it, the caller's object stays as given.
        self.cfg = dataclasses.replace(settings)
        self.rng = random.Random(settings.seed)
        self.created = int(time.time())
        self.ready_at = math.inf  # set on startup; loading until then
        self.loaded = False
        self.health_down = False
        self.health_delay = 0.0
        self.model_check = False  # answer 404 for another model than the one served, as vLLM does
        self.requests = 0
        self.in_flight = 0
        self.cancelled = 0
        self.poisoned = 0
        self.chunks = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.live_tokens = 0  # prompt + generated tokens of requests in flight
        self._prefix: OrderedDict[int, None] = OrderedDict()
        self._set_identity(self.cfg.model, None)

    def _set_identity(self, model: str, answer_model: str | None) -> None:
        """Serve ``model`` (/v1/models, /metrics); name ``answer_model`` (default: the same) in
        answers. A different answer model is a replica lying about what it serves."""
        self.cfg = dataclasses.replace(self.cfg, model=model)
        self.answer_model = answer_model or model
        self.model_json = orjson.dumps(self.answer_model)
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": model, "object": "model", "created": self.created, "owned_by": "fortress-sim"}
                ],
            }
        )
        label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        self._label = '{model_name="' + label + '"}'

    # -- lifecycle ---------------------------------------------------------------------------

    async def on_startup(self, _app: web.Application) -> None:
        self.ready_at = asyncio.get_running_loop().time() + self.cfg.startup_delay

    def loading(self) -> bool:
        if self.loaded:
            return False
        if asyncio.get_running_loop().time() >= self.ready_at:
            self.loaded = True  # checked on every request; stop asking the clock once loaded
            return False
        return True

    # -- plain endpoints ---------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        if self.health_delay:
            await asyncio.sleep(self.health_delay)  # a slow replica: checks may time out
        if self.loading():
            return web.Response(status=503, body=_LOADING_HEALTH, content_type=_JSON)
        if self.health_down:
            return _error(503, "Health forced down via /sim/control.", "unavailable_error", "sim_health_down")
        return web.Response(body=_HEALTH_OK, content_type=_JSON)

    async def models(self, _request: web.Request) -> web.Response:
        if self.loading():
            return _error(503, "Loading model", "unavailable_error", "model_loading")
        return web.Response(body=self._models_body, content_type=_JSON)

    async def stats(self, _request: web.Request) -> web.Response:
        body = {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "poisoned": self.poisoned,
        }
        return web.Response(body=orjson.dumps(body), content_type=_JSON)

    async def control(self, request: web.Request) -> web.Response:
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error(400, f"Invalid JSON body: {exc}", "invalid_request_error")
        if not isinstance(req, dict):
            return _error(400, "The request body must be a JSON object.", "invalid_request_error")
        changes: dict[str, Any] = {}
        health: bool | None = None
        identity: dict[str, str] = {}
        for key, value in req.items():
            if key == "health":
                if value not in ("up", "down"):
                    return _error(
                        400, '\'health\' must be "up" or "down".', "invalid_request_error", param=key
                    )
                health = value == "down"
            elif key == "health_delay":
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    return _error(
                        400, "'health_delay' must be a number >= 0.", "invalid_request_error", param=key
                    )
                self.health_delay = float(value)
            elif key in ("error_rate", "hang_rate", "ttft", "itl"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    return _error(400, f"'{key}' must be a number.", "invalid_request_error", param=key)
                changes[key] = float(value)
            elif key == "model_check":
                if not isinstance(value, bool):
                    return _error(400, "'model_check' must be a boolean.", "invalid_request_error", param=key)
                self.model_check = value
            elif key in ("model", "answer_model"):
                if not isinstance(value, str) or not value or len(value) > 200:
                    return _error(400, f"'{key}' must be a model id.", "invalid_request_error", param=key)
                identity[key] = value
            elif key == "tokens":
                if isinstance(value, bool) or not isinstance(value, int):
                    return _error(400, "'tokens' must be an integer.", "invalid_request_error", param=key)
                changes[key] = value
            else:
                return _error(400, f"Unknown control field {key!r}.", "invalid_request_error", param=key)
        try:
            # Re-run SimSettings' validation on the would-be settings before applying anything.
            new_cfg = dataclasses.replace(self.cfg, **changes)
        except ValueError as exc:
            return _error(400, str(exc), "invalid_request_error")
        self.cfg = new_cfg
        if identity:
            self._set_identity(identity.get("model", self.cfg.model), identity.get("answer_model"))
        if health is not None:
            self.health_down = health
        cfg = self.cfg
        body = {
            "health": "down" if self.health_down else "up",
            "health_delay": self.health_delay,
            "error_rate": cfg.error_rate,
            "hang_rate": cfg.hang_rate,
            "ttft": cfg.ttft,
            "itl": cfg.itl,
            "tokens": cfg.tokens,
            "model": cfg.model,
            "answer_model": self.answer_model,
            "model_check": self.model_check,
        }
        return web.Response(body=orjson.dumps(body), content_type=_JSON)

    async def metrics(self, _request: web.Request) -> web.Response:
        if self.cfg.metrics_flavor == "llamacpp":
            text = self._metrics_llamacpp()
        else:
            text = self._metrics_vllm()
        return web.Response(body=text.encode(), headers={"Content-Type": _METRICS_CT})

    def _metrics_vllm(self) -> str:
        kv = min(1.0, self.live_tokens / _KV_CAPACITY_TOKENS)
        rows: list[tuple[str, str, str, float]] = [
            (
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                self.in_flight,
            ),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", 0),
            ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", kv),
            ("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage.", kv),
            (
                "vllm:prefix_cache_hits_total",
                "counter",
                "Prefix cache hits, in terms of number of cached tokens.",
                self.prefix_hits,
            ),
            (
                "vllm:prefix_cache_queries_total",
                "counter",
                "Prefix cache queries, in terms of number of queried tokens.",
                self.prefix_queries,
            ),
            (
                "vllm:prompt_tokens_total",
                "counter",
                "Number of prefill tokens processed.",
                self.prompt_tokens_total,
            ),
            (
                "vllm:generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                self.generation_tokens_total,
            ),
        ]
        out: list[str] = []
        for name, kind, help_, value in rows:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name}{self._label} {float(value)!r}\n")
        return "".join(out)

    def _metrics_llamacpp(self) -> str:
        rows: list[tuple[str, str, str, int]] = [
            (
                "llamacpp:prompt_tokens_total",
                "counter",
                "Number of prompt tokens processed.",
                self.prompt_tokens_total,
            ),
            (
                "llamacpp:tokens_predicted_total",
                "counter",
                "Number of generation tokens processed.",
                self.generation_tokens_total,
            ),
            ("llamacpp:requests_processing", "gauge", "Number of requests processing.", self.in_flight),
            ("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", 0),
        ]
        return "".join(
            f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name} {value}\n"
            for name, kind, help_, value in rows
        )

    # -- completions -------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    def _prefix_lookup(self, words: list[str]) -> int:
        """Cached prompt tokens: leading full blocks whose chained hash was seen before."""
        cache = self._prefix
        h = 0
        hits = 0
        matching = True
        for start in range(0, len(words) - _PREFIX_BLOCK_WORDS + 1, _PREFIX_BLOCK_WORDS):
            h = hash((h, *words[start : start + _PREFIX_BLOCK_WORDS]))
            if matching and h in cache:
                cache.move_to_end(h)
                hits += _PREFIX_BLOCK_WORDS
            else:
                matching = False
                cache[h] = None
                if len(cache) > _PREFIX_CACHE_BLOCKS:
                    cache.popitem(last=False)
        return hits

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        held = 0  # prompt tokens this request adds to live_tokens, released in finally
        job: _Job | None = None
        resp: web.StreamResponse | None = None
        try:
            if self.loading():
                return _error(503, "Loading model", "unavailable_error", "model_loading")
            try:
                req = orjson.loads(await request.read())
                job = _parse(req, chat)
            except orjson.JSONDecodeError as exc:
                return _error(400, f"Invalid JSON body: {exc}", "invalid_request_error")
            except _BadRequest as exc:
                return _error(400, exc.message, "invalid_request_error", param=exc.param)
            cfg = self.cfg  # snapshot: /sim/control changes apply to later requests
            if self.model_check and req.get("model") != self.answer_model:
                # vLLM's answer to a model it does not serve.
                return _error(404, f"The model `{req.get('model')}` does not exist.", "NotFoundError")
            if job.poisoned:
                # Before the random draws: a poisoned request must not shift a seeded sequence.
                self.poisoned += 1
                return _error(
                    500,
                    f"Simulated internal error (prompt contains {POISON_MARKER}).",
                    "server_error",
                    "sim_poison",
                )
            if cfg.error_rate > 0 and self.rng.random() < cfg.error_rate:
                return _error(
                    500,
                    "Simulated internal error (fortress sim error_rate).",
                    "server_error",
                    "sim_injected_error",
                )
            if cfg.hang_rate > 0 and self.rng.random() < cfg.hang_rate:
                await _sleep_until(request, math.inf)  # returns only by _ClientGone / cancel
            self.prompt_tokens_total += job.prompt_tokens
            self.prefix_queries += job.prompt_tokens
            self.prefix_hits += min(job.prompt_tokens, self._prefix_lookup(job.prompt_words))
            self.live_tokens += job.prompt_tokens
            held += job.prompt_tokens
            # Tokens start..end-1 of the answer: a continuation goes on where its text stops.
            end = cfg.tokens if job.limit is None else min(cfg.tokens, job.start + job.limit)
            n = max(0, end - job.start)
            finish = "length" if job.limit is not None and job.start + job.limit <= cfg.tokens else "stop"
            if job.stream:
                resp = web.StreamResponse(headers=_SSE_HEADERS)
                await resp.prepare(request)
                await self._stream(request, resp, job, cfg, n, finish)
                return resp
            loop = asyncio.get_running_loop()
            await _sleep_until(request, loop.time() + cfg.ttft + cfg.itl * max(0, n - 1))
            if _gone(request):
                raise _ClientGone("client went away")
            self.generation_tokens_total += n
            return web.Response(body=self._body(job, n, finish), content_type=_JSON)
        except ConnectionResetError:  # _ClientGone, or a write to a closed transport
            self.cancelled += 1
            return resp if resp is not None else web.Response(status=499)
        except asyncio.CancelledError:  # handler_cancellation=True: aiohttp cancels on disconnect
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
            self.live_tokens -= held + (job.emitted if job is not None else 0)

    def _body(self, job: _Job, n: int, finish: str) -> bytes:
        text = b"".join(_token(job.start + i) for i in range(n)).decode()
        usage = {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": job.prompt_tokens + n,
        }
        if job.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
            kind, prefix = "chat.completion", "chatcmpl-sim-"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind, prefix = "text_completion", "cmpl-sim-"
        return orjson.dumps(
            {
                "id": prefix + os.urandom(12).hex(),
                "object": kind,
                "created": int(time.time()),
                "model": self.answer_model,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def _stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        job: _Job,
        cfg: SimSettings,
        n: int,
        finish: str,
    ) -> None:
        """Write the SSE events, one per chunk; count tokens in ``job.emitted`` as they go."""
        rid = ("chatcmpl-sim-" if job.chat else "cmpl-sim-") + os.urandom(12).hex()
        created = int(time.time())
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        usage_null = b',"usage":null' if job.include_usage else b""
        # Token chunks differ only in the token and finish_reason: build them from byte templates.
        head = b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"choices":[{"index":0,' % (
            rid.encode(),
            obj.encode(),
            created,
            self.model_json,
        )
        head += b'"delta":{"content":"' if job.chat else b'"text":"'
        close = b'"}' if job.chat else b'"'
        mid = close + b',"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
        last = (
            close + b',"logprobs":null,"finish_reason":"' + finish.encode() + b'"}]' + usage_null + b"}\n\n"
        )
        write = self._writer(resp)
        loop = asyncio.get_running_loop()
        first_at = loop.time() + cfg.ttft
        # A continuation with nothing left to say still ends with a (empty) finishing chunk.
        for i in range(max(1, n)):
            await _sleep_until(request, first_at + i * cfg.itl)
            if i == 0 and job.chat:
                role: dict[str, Any] = {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": self.answer_model,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
                if job.include_usage:
                    role["usage"] = None
                await write(b"data: " + orjson.dumps(role) + b"\n\n")
            if n == 0:
                await write(head + last)
                break
            await write(head + _token(job.start + i) + (last if i == n - 1 else mid))
            job.emitted += 1
            self.generation_tokens_total += 1
            self.live_tokens += 1
        if job.include_usage:
            await write(
                b"data: "
                + orjson.dumps(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": self.answer_model,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": job.prompt_tokens,
                            "completion_tokens": n,
                            "total_tokens": job.prompt_tokens + n,
                        },
                    }
                )
                + b"\n\n"
            )
        await resp.write(_DONE)
        await resp.write_eof()

    def _writer(self, resp: web.StreamResponse) -> Callable[[bytes], Awaitable[None]]:
        crash_after = self.cfg.crash_after

        async def write(event: bytes) -> None:
            await resp.write(event)
            self.chunks += 1
            if crash_after is not None and self.chunks >= crash_after:
                # A crash, not a shutdown: no cleanup, no [DONE], the connection just drops.
                os._exit(1)

        return write


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn aiohttp's own 404/405/413 into OpenAI-format error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        type_ = "invalid_request_error" if exc.status < 500 else "server_error"
        return _error(exc.status, exc.reason, type_)


def build_app(settings: SimSettings) -> web.Application:
    """Build the simulator's aiohttp application (serve it with ``run`` or an ``AppRunner``)."""
    sim = _Sim(settings)
    # Large client_max_size: load drills send long prompts.
    app = web.Application(middlewares=[_openai_errors], client_max_size=64 * 1024 * 1024)
    app.on_startup.append(sim.on_startup)
    app.router.add_get("/health", sim.health)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_post("/v1/chat/completions", sim.chat_completions)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/embeddings", functools.partial(apis.embeddings, sim))
    app.router.add_post("/v1/responses", functools.partial(apis.responses, sim))
    app.router.add_get("/metrics", sim.metrics)
    app.router.add_post("/sim/control", sim.control)
    app.router.add_get("/sim/stats", sim.stats)
    return app


def run(settings: SimSettings, host: str, port: int) -> None:
    """Serve the simulator on ``host:port`` until interrupted (blocking; uvloop when available)."""
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop
    except ImportError:
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    web.run_app(
        build_app(settings),
        host=host,
        port=port,
        access_log=None,
        print=None,
        handler_cancellation=True,  # a vanished client frees its handler at once
        shutdown_timeout=1.0,  # hung requests must not delay Ctrl-C / SIGTERM
        loop=loop,
    )
