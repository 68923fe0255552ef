"""Engine load: the model servers' own ``/metrics`` (vLLM, llama.cpp), read beside the path.

Every ``interval`` seconds each replica's ``/metrics`` is read once and the few series that tell
its load (requests running and queued, KV-cache use, prefix-cache hits, token counters) are kept
on the replica as ``replica.load``. Balancers read it on the request path at no cost; observe
re-exports it under one name whatever the engine. It runs whether or not observe is on. Lines
are filtered by name before parsing, so a vLLM page of several hundred histogram lines costs
little.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("fortress.load")

# Engine series → the EngineSample field they feed. vLLM renamed a few series over releases;
# the newer name wins when a server reports both.
VLLM_SERIES: dict[str, str] = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage_deprecated",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:gpu_prefix_cache_hits_total": "prefix_hits_deprecated",
    "vllm:gpu_prefix_cache_queries_total": "prefix_queries_deprecated",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
}
LLAMACPP_SERIES: dict[str, str] = {
    "llamacpp:requests_processing": "running",
    "llamacpp:requests_deferred": "waiting",
    "llamacpp:kv_cache_usage_ratio": "kv_usage",
    "llamacpp:prompt_tokens_total": "prompt_tokens",
    "llamacpp:tokens_predicted_total": "generation_tokens",
}
_SERIES = {**VLLM_SERIES, **LLAMACPP_SERIES}


@dataclass
class EngineSample:
    """What one scrape of one replica found. Fields are None when the engine lacks the series."""

    ok: bool
    at: float  # wall-clock time of the scrape
    engine: str = "unknown"  # vllm | llamacpp | unknown
    error: str = ""
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None  # 0..1
    prefix_hits: float | None = None
    prefix_queries: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def parse_engine_metrics(text: str, at: float | None = None) -> EngineSample:
    """Read the series Fortress re-exports from an engine's Prometheus text."""
    wanted = []
    for line in text.splitlines():
        if line.startswith(("vllm:", "llamacpp:")):
            end = len(line)
            for sep in ("{", " "):
                i = line.find(sep)
                if 0 < i < end:
                    end = i
            if line[:end] in _SERIES:
                wanted.append(line)
    sample = EngineSample(ok=True, at=time.time() if at is None else at)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(wanted) + "\n"):
        for s in family.samples:
            key = _SERIES.get(s.name)
            if key is not None:
                # Sum over label sets (vLLM labels per model and per engine core).
                values[key] = values.get(key, 0.0) + float(s.value)
    if any(name.startswith("vllm:") for name in (w.split("{", 1)[0] for w in wanted)):
        sample.engine = "vllm"
    elif wanted:
        sample.engine = "llamacpp"
    for key in ("running", "waiting", "kv_usage", "prefix_hits", "prefix_queries"):
        value = values.get(key, values.get(key + "_deprecated"))
        if value is not None:
            setattr(sample, key, value)
    sample.prompt_tokens = values.get("prompt_tokens")
    sample.generation_tokens = values.get("generation_tokens")
    return sample


class Scraped(Protocol):
    """What the scraper needs of a replica (``routing.replica.Replica``)."""

    url: str
    load: EngineSample | None


class EngineLoad:
    """Scrapes every replica ``replicas()`` returns, every ``interval`` seconds."""

    def __init__(
        self, replicas: Callable[[], Iterable[Scraped]], interval: float = 10.0, timeout: float = 3.0
    ) -> None:
        self.replicas = replicas
        self.interval = interval
        self.timeout = min(timeout, interval) if interval > 0 else timeout
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    async def start(self) -> None:
        if self.interval <= 0:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16, keepalive_timeout=self.interval * 2),
            skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        self._task = asyncio.create_task(self._loop(), name="engine-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.scrape_all()
            except Exception:  # never let one bad round stop the scraper
                log.exception("engine metrics round failed")
            await asyncio.sleep(self.interval)

    async def scrape_all(self) -> None:
        """Scrape every replica once, concurrently, and keep each result on its replica."""
        replicas = list(self.replicas())
        results = await asyncio.gather(*(self.scrape_one(r) for r in replicas))
        for r, sample in zip(replicas, results, strict=True):
            r.load = sample

    async def scrape_one(self, replica: Scraped) -> EngineSample:
        assert self._session is not None
        try:
            async with self._session.get(replica.url + "/metrics") as resp:
                body = await resp.read()
                if resp.status != 200:
                    return EngineSample(ok=False, at=time.time(), error=f"status {resp.status}")
            return parse_engine_metrics(body.decode("utf-8", "replace"))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return EngineSample(ok=False, at=time.time(), error=type(exc).__name__)
