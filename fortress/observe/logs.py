"""The access log: one JSON line per completion request, on the ``fortress.access_log`` logger.

On by default at INFO to stdout (what users of other LLM proxies expect); ``observe.access_log``
turns it off, moves it to stderr, or leaves it to your own logging handlers (``stream: none``).
With ``emf: true`` every line is also a CloudWatch Embedded Metric Format document: the CloudWatch
agent or a Lambda/ECS log driver turns it into metrics (namespace ``Fortress``, dimensions
``Service`` and ``Service, Model``) without any API call from the gateway. ``emit_gauges`` writes
the periodic gauges (replicas, GPU, memory) that the CloudWatch alarm export refers to.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from fortress.config import AccessLog as AccessLogConfig
from fortress.gateway.context import RequestContext

LOGGER = "fortress.access_log"
SERVICE = "fortress"

_REQUEST_METRICS = [
    {"Name": "Requests", "Unit": "Count"},
    {"Name": "Latency", "Unit": "Seconds"},
    {"Name": "Errors4xx", "Unit": "Count"},
    {"Name": "Errors5xx", "Unit": "Count"},
    {"Name": "RateLimited", "Unit": "Count"},
    {"Name": "InputTokens", "Unit": "Count"},
    {"Name": "OutputTokens", "Unit": "Count"},
]
_TTFT_METRIC = {"Name": "TimeToFirstToken", "Unit": "Seconds"}
GAUGE_METRICS = {
    "UnhealthyReplicas": "Count",
    "HealthyReplicas": "Count",
    "GpuUtilization": "Percent",
    "MemoryUtilization": "Percent",
}


def key_id(identity: Any) -> str | None:
    """The API key id of the caller, whatever shape the access layer gives its identity."""
    if identity is None:
        return None
    if isinstance(identity, dict):
        value = identity.get("key_id")
    else:
        value = getattr(identity, "key_id", None)
    return None if value is None else str(value)


class AccessLog:
    """The gateway observer that writes the access log."""

    def __init__(self, cfg: AccessLogConfig, logger: logging.Logger | None = None) -> None:
        self.emf = cfg.emf
        self.namespace = cfg.emf_namespace
        self.logger = logger or logging.getLogger(LOGGER)
        if cfg.stream != "none" and not any(getattr(h, "_fortress", False) for h in self.logger.handlers):
            handler = logging.StreamHandler(sys.stdout if cfg.stream == "stdout" else sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler._fortress = True  # type: ignore[attr-defined]
            self.logger.addHandler(handler)
            self.logger.propagate = False  # one line per request, not also through the root logger
        if self.logger.level == logging.NOTSET:
            self.logger.setLevel(logging.INFO)
        # The two EMF directives a request line can need, built once.
        dims = [["Service"], ["Service", "Model"]]
        self._directive = {"Namespace": self.namespace, "Dimensions": dims, "Metrics": _REQUEST_METRICS}
        self._directive_ttft = {**self._directive, "Metrics": [*_REQUEST_METRICS, _TTFT_METRIC]}

    def record(self, ctx: RequestContext, now: float | None = None) -> dict[str, Any]:
        """The log record of one request (a dict; ``observe`` writes it as one JSON line)."""
        wall = time.time()
        end = time.perf_counter() if now is None else now
        latency = end - ctx.t0
        usage = ctx.usage or {}
        tin = usage.get("prompt_tokens")
        tout = usage.get("completion_tokens")
        replica = ctx.replica
        rec: dict[str, Any] = {
            "ts": round(wall, 3),
            "request_id": ctx.request_id,
            "key_id": key_id(ctx.identity),
            "client": ctx.client,
            "path": ctx.path,
            "model": ctx.model,
            "stream": ctx.stream,
            "status": ctx.status,
            "replica": replica.name if replica is not None else None,
            "tier": str(replica.tier) if replica is not None else None,
            "attempts": ctx.attempts,
            "latency_ms": round(latency * 1000, 2),
            "ttft_ms": round(ctx.ttfb * 1000, 2) if ctx.stream and ctx.ttfb is not None else None,
            "tokens_in": tin,
            "tokens_out": tout,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "overhead_ms": round(ctx.overhead * 1000, 3),
            "error": ctx.error if ctx.status >= 400 else None,
        }
        if self.emf:
            status = ctx.status
            ttft = ctx.ttfb if ctx.stream else None
            rec["_aws"] = {
                "Timestamp": int(wall * 1000),
                "CloudWatchMetrics": [self._directive_ttft if ttft is not None else self._directive],
            }
            rec["Service"] = SERVICE
            rec["Model"] = ctx.model or "unknown"
            rec["Requests"] = 1
            rec["Latency"] = latency
            rec["Errors4xx"] = 1 if 400 <= status < 500 else 0
            rec["Errors5xx"] = 1 if status >= 500 else 0
            rec["RateLimited"] = 1 if status == 429 else 0
            rec["InputTokens"] = tin if type(tin) is int else 0
            rec["OutputTokens"] = tout if type(tout) is int else 0
            if ttft is not None:
                rec["TimeToFirstToken"] = ttft
        return rec

    def observe(self, ctx: RequestContext) -> None:
        """Write the request's line (the gateway observer)."""
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(orjson.dumps(self.record(ctx)).decode())

    def emit_gauges(self, values: dict[str, float | None]) -> None:
        """One EMF line with the periodic gauges (names from ``GAUGE_METRICS``); None skipped."""
        present = {k: v for k, v in values.items() if v is not None and k in GAUGE_METRICS}
        if not self.emf or not present:
            return
        doc: dict[str, Any] = {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": self.namespace,
                        "Dimensions": [["Service"]],
                        "Metrics": [{"Name": k, "Unit": GAUGE_METRICS[k]} for k in present],
                    }
                ],
            },
            "Service": SERVICE,
            **present,
        }
        self.logger.info(orjson.dumps(doc).decode())
