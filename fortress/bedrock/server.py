"""The adapter's HTTP server: the OpenAI API in front of one Bedrock model.

``/health`` (200 once listening: nothing to load, and no AWS call so a check costs nothing),
``/v1/models`` (the served name), ``/v1/chat/completions`` (plain and SSE), and ``/metrics`` in
vLLM's dialect (calls running in Bedrock, calls waiting for a slot, tokens), so Fortress's engine
load and balancers see a Bedrock replica like any other.

boto3 is synchronous: every Bedrock call runs on a thread of a pool of ``max_concurrency``
threads, and a stream's events are handed from its thread to the event loop through a queue, so
the server keeps answering while calls are in flight. Bedrock's errors are answered in OpenAI's
format with the status a client expects (throttling 429, validation 400, access 403, a model not
ready or the service unavailable 503, anything else 502).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from fortress.bedrock.translate import RequestError, StreamTranslator, chat_completion, converse_request

__all__ = ["BedrockSettings", "build_app", "error_status", "make_client", "run"]

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_METRICS_CT = "text/plain; version=0.0.4; charset=utf-8"
_DONE = b"data: [DONE]\n\n"
_END = object()  # a stream's last item on the queue

# Bedrock error code (lower case, without "exception") -> (HTTP status, OpenAI error type).
_ERRORS: dict[str, tuple[int, str]] = {
    "throttling": (429, "requests"),
    "servicequotaexceeded": (429, "requests"),
    "validation": (400, "invalid_request_error"),
    "accessdenied": (403, "invalid_request_error"),
    "unrecognizedclient": (403, "invalid_request_error"),
    "resourcenotfound": (404, "invalid_request_error"),
    "modelnotready": (503, "server_error"),
    "serviceunavailable": (503, "server_error"),
}


@dataclass(frozen=True)
class BedrockSettings:
    """One adapter: the Bedrock ``model_id`` served as ``served_model_name``.

    ``region`` and ``endpoint_url`` default to boto3's own resolution; ``max_concurrency`` bounds
    the Bedrock calls in flight (more wait for a slot); ``max_attempts`` is botocore's attempts
    per call (its standard retry mode backs off on throttling); ``read_timeout`` is the longest
    silence from Bedrock, in seconds.
    """

    model_id: str
    served_model_name: str
    region: str | None = None
    endpoint_url: str | None = None
    max_concurrency: int = 32
    max_attempts: int = 3
    read_timeout: float = 300.0


def make_client(settings: BedrockSettings) -> Any:
    """A ``bedrock-runtime`` client; credentials come from the standard AWS chain. Raises
    botocore's ``NoRegionError`` when no region is configured anywhere."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.region,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        max_pool_connections=settings.max_concurrency,
        connect_timeout=10,
        read_timeout=settings.read_timeout,
    )
    # A session of its own: boto3's default session caches credentials process-wide.
    session = boto3.session.Session()
    return session.client("bedrock-runtime", endpoint_url=settings.endpoint_url, config=config)


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def error_status(exc: BaseException) -> tuple[int, bytes]:
    """(HTTP status, OpenAI error body) for an exception raised by a Bedrock call."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "UnknownError")
        message = str(err.get("Message") or exc)
        key = code.lower().removesuffix("exception")
        status, type_ = _ERRORS.get(key, (502, "server_error"))
        # Stream exception events spell the code in camelCase (throttlingException).
        code = code[:1].upper() + code[1:]
        return status, _error(status, f"Bedrock: {message}", type_, code)
    if isinstance(exc, BotoCoreError):  # no credentials, connection refused, read timeout, ...
        return 502, _error(502, f"Bedrock call failed: {exc}", "server_error", type(exc).__name__)
    return 502, _error(502, f"Bedrock call failed: {exc!r}", "server_error")


class _Adapter:
    def __init__(self, settings: BedrockSettings, client: Any) -> None:
        self.s = settings
        self.client = client
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="bedrock")
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.created = int(time.time())
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.errors = 0
        self._models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": settings.served_model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "bedrock",
                    }
                ],
            }
        )

    async def on_cleanup(self, _app: web.Application) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- plain endpoints ---------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    async def models(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._models, content_type=_JSON)

    async def metrics(self, _request: web.Request) -> web.Response:
        label = '{model_name="' + self.s.served_model_name.replace("\\", "\\\\").replace('"', '\\"') + '"}'
        rows = [
            ("vllm:num_requests_running", "gauge", "Bedrock calls in flight.", self.running),
            ("vllm:num_requests_waiting", "gauge", "Requests waiting for a Bedrock call slot.", self.waiting),
            ("vllm:prompt_tokens_total", "counter", "Prompt tokens reported by Bedrock.", self.prompt_tokens),
            (
                "vllm:generation_tokens_total",
                "counter",
                "Generated tokens reported by Bedrock.",
                self.generation_tokens,
            ),
            ("fortress_bedrock_errors_total", "counter", "Bedrock calls that failed.", self.errors),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {k}\n{n}{label} {float(v)!r}\n" for n, k, h, v in rows)
        return web.Response(body=text.encode(), headers={"Content-Type": _METRICS_CT})

    # -- completions -------------------------------------------------------------------------

    def _count(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens += usage["prompt_tokens"]
            self.generation_tokens += usage["completion_tokens"]

    async def _slot(self) -> None:
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def _release(self) -> None:
        self.running -= 1
        self.slots.release()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            req = orjson.loads(await request.read())
            kwargs = converse_request(req)
        except orjson.JSONDecodeError as exc:
            return _json(400, _error(400, f"Invalid JSON body: {exc}", "invalid_request_error"))
        except RequestError as exc:
            return _json(400, _error(400, exc.message, "invalid_request_error", param=exc.param))
        kwargs["modelId"] = self.s.model_id
        rid = "chatcmpl-" + os.urandom(12).hex()
        created = int(time.time())
        if req.get("stream") is True:
            opts = req.get("stream_options")
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            return await self._stream(
                request, kwargs, StreamTranslator(self.s.served_model_name, rid, created, include_usage)
            )
        await self._slot()
        try:
            loop = asyncio.get_running_loop()
            resp = await loop.run_in_executor(self.pool, functools.partial(self.client.converse, **kwargs))
        except Exception as exc:
            self.errors += 1
            return _json(*error_status(exc))
        finally:
            self._release()
        body = chat_completion(resp, self.s.served_model_name, rid, created)
        self._count(body["usage"])
        return web.Response(body=orjson.dumps(body), content_type=_JSON)

    async def _events(self, kwargs: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """ConverseStream events, read by a pool thread and handed over through a queue.

        The thread stops at the next event once the consumer is gone (a client that went away);
        a call that raises puts its exception on the queue, re-raised here.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed: the server is shutting down
                stop.set()

        def pump() -> None:
            stream = None
            try:
                stream = self.client.converse_stream(**kwargs)["stream"]
                for event in stream:
                    if stop.is_set():
                        break
                    put(event)
                put(_END)
            except Exception as exc:
                put(exc)
            finally:
                if stream is not None:
                    stream.close()

        await self._slot()
        try:
            done = loop.run_in_executor(self.pool, pump)
            try:
                while True:
                    item = await queue.get()
                    if item is _END:
                        break
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                stop.set()
            await done
        finally:
            self._release()

    async def _stream(
        self, request: web.Request, kwargs: dict[str, Any], tr: StreamTranslator
    ) -> web.StreamResponse:
        events = self._events(kwargs)
        try:
            # The first event before the status: an error that comes first (throttling, access,
            # validation) is answered with its own status, so the gateway can retry elsewhere.
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            self.errors += 1
            await events.aclose()
            return _json(*error_status(exc))
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            await resp.prepare(request)
            pending = [first] if first is not None else []
            while True:
                for event in pending:
                    for chunk in tr.translate(event):
                        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                try:
                    pending = [await anext(events)]
                except StopAsyncIteration:
                    break
                except Exception as exc:  # an exception event mid-stream: OpenAI's error event
                    self.errors += 1
                    _, body = error_status(exc)
                    await resp.write(b"data: " + body + b"\n\n")
                    return resp
            await resp.write(_DONE)
            await resp.write_eof()
            return resp
        finally:
            self._count(tr.usage)
            await events.aclose()


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON)


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404/405/413 as OpenAI-format error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        type_ = "invalid_request_error" if exc.status < 500 else "server_error"
        return _json(exc.status, _error(exc.status, exc.reason, type_))


def build_app(settings: BedrockSettings, client: Any | None = None) -> web.Application:
    """The adapter's aiohttp application; ``client`` defaults to ``make_client(settings)``."""
    adapter = _Adapter(settings, client if client is not None else make_client(settings))
    app = web.Application(middlewares=[_openai_errors], client_max_size=64 * 1024 * 1024)
    app.on_cleanup.append(adapter.on_cleanup)
    app.router.add_get("/health", adapter.health)
    app.router.add_get("/v1/models", adapter.models)
    app.router.add_post("/v1/chat/completions", adapter.chat_completions)
    app.router.add_get("/metrics", adapter.metrics)
    return app


def run(settings: BedrockSettings, host: str, port: int, client: Any | None = None) -> None:
    """Serve the adapter on ``host:port`` until interrupted (blocking)."""
    app = build_app(settings, client)
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=None,
        handler_cancellation=True,  # a vanished client frees its handler (and its stream) at once
        shutdown_timeout=1.0,
    )
