"""The access log: one JSON line per completion request, on the ``fortress.access_log`` logger.

On by default at INFO to stdout (what users of other LLM proxies expect); ``observe.access_log``
turns it off, moves it to stderr, leaves it to your own logging handlers (``stream: none``), or
appends it to a file (``file: PATH``), which ``AccessLog.reopen`` reopens (the runtime calls it
on SIGHUP, after logrotate moved the file away).
With ``emf: true`` every line is also a CloudWatch Embedded Metric Format document: the CloudWatch
agent or a Lambda/ECS log driver turns it into metrics (namespace ``Fortress``, dimensions
``Service`` and ``Service, Model``) without any API call from the gateway. ``emit_gauges`` writes
the periodic gauges (replicas, GPU, memory) that the CloudWatch alarm export refers to.

Batched, because a line per request costs more than it seems: ``AccessLog.observe`` only queues
the finished request; every ``FLUSH_DELAY`` seconds (or ``MAX_PENDING`` requests) the queue is
turned into JSON lines and ``LogRecord``s, and the handler Fortress installs (a
``BatchStreamHandler``) writes them with one write+flush per 4 KiB of whole lines (so the lines
of several gateway workers sharing stdout never interleave). Measured in the gateway benchmark
(``bench/gateway_layers.py``), the same work done per request cost ~36 µs of gateway CPU. The
queue is written on the gateway's shutdown; a crash can lose at most the last ``FLUSH_DELAY``
seconds of access-log lines (the audit trail is the record that loses nothing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
from typing import IO, Any

import orjson

from fortress.config import AccessLog as AccessLogConfig
from fortress.core.context import RequestContext
from fortress.core.loops import running_loop

LOGGER = "fortress.access_log"
SERVICE = "fortress"
FLUSH_DELAY = 0.2  # seconds a finished request may wait before its line is written
MAX_PENDING = 1024  # queued access-log requests that force a write at once

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
    "WrongModelReplicas": "Count",
    "JournalDiskUtilization": "Percent",
    "StoreUnreachable": "Count",
    "LimiterFailOpen": "Count",  # increase since the previous line
    "ConnectionsRefused": "Count",  # increase since the previous line
    "ReplicaRestarts": "Count",
    "GpuUtilization": "Percent",
    "MemoryUtilization": "Percent",
}


# Writes of at most PIPE_BUF bytes to a pipe, or any write to a file opened for appending, are
# never interleaved with another process's: the gateway workers (server.workers) share stdout.
ATOMIC_WRITE = 4096


def _whole_lines(lines: list[str]) -> list[str]:
    """``lines`` joined into pieces of at most ``ATOMIC_WRITE`` bytes, each ending at a line's
    end (a longer line is a piece of its own)."""
    out: list[str] = []
    piece: list[str] = []
    size = 0
    for line in lines:
        n = len(line) if line.isascii() else len(line.encode())
        if piece and size + n > ATOMIC_WRITE:
            out.append("".join(piece))
            piece, size = [], 0
        piece.append(line)
        size += n
    if piece:
        out.append("".join(piece))
    return out


class BatchStreamHandler(logging.StreamHandler[IO[str]]):
    """A ``StreamHandler`` that writes a batch of lines in one call.

    Between ``hold()`` and ``flush()`` formatted lines are kept and then written with one
    ``write`` + ``flush``; otherwise (and for records at WARNING or above, which first write
    what is held) it behaves like ``StreamHandler``. ``AccessLog.write_pending`` holds it while
    it logs a batch of requests.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._held: list[str] | None = None

    def hold(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._held is None:
                self._held = []

    def emit(self, record: logging.LogRecord) -> None:
        held = self._held
        if held is None or record.levelno >= logging.WARNING:
            if held:
                self.flush()
            super().emit(record)
            return
        try:
            held.append(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            held, self._held = self._held, None
            if held:
                try:
                    pieces = _whole_lines(held)
                    for piece in pieces:
                        self.stream.write(piece)
                        if len(pieces) > 1:
                            self.stream.flush()  # one write(2) per piece
                except Exception:  # as StreamHandler: report, never raise into the caller
                    if logging.raiseExceptions and sys.stderr:
                        sys.stderr.write("--- Logging error in BatchStreamHandler ---\n")
                        traceback.print_exc(file=sys.stderr)
            super().flush()

    def close(self) -> None:
        self.flush()  # StreamHandler.close alone would drop what is held
        super().close()


class BatchFileHandler(BatchStreamHandler):
    """A ``BatchStreamHandler`` that appends to a file, opened by ``open`` (or at the first
    line) and swapped for a fresh one by ``reopen`` (after logrotate moved the file away)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        super().__init__(None)  # type: ignore[arg-type]  # opened lazily: building does no I/O
        self.stream = None  # type: ignore[assignment]

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8")  # kept open until reopen

    def open(self) -> None:
        """Open the file now (raises ``OSError``): a bad path fails at start, not at a request."""
        with self.lock:  # type: ignore[union-attr]
            if self.stream is None:
                self.stream = self._open()

    def reopen(self) -> None:
        """Write what is held to the old file, then continue in a newly opened one at ``path``.
        Raises ``OSError`` (and keeps the old file) when the path cannot be opened."""
        new = self._open()
        with self.lock:  # type: ignore[union-attr]
            self.flush()
            old, self.stream = self.stream, new
        if old is not None:
            old.close()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            try:
                self.open()
            except OSError:
                self.handleError(record)
                return
        super().emit(record)

    def flush(self) -> None:
        if self.stream is not None:
            super().flush()

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self.flush()
                if self.stream is not None:
                    self.stream.close()
                    self.stream = None  # type: ignore[assignment]
            finally:
                logging.Handler.close(self)


def _same_target(handler: logging.Handler, cfg: AccessLogConfig) -> bool:
    if isinstance(handler, BatchFileHandler):
        return cfg.file is not None and handler.path == os.path.abspath(os.path.expanduser(cfg.file))
    return cfg.file is None


class AccessLog:
    """The gateway observer that writes the access log."""

    def __init__(self, cfg: AccessLogConfig, logger: logging.Logger | None = None) -> None:
        self.emf = cfg.emf
        self.namespace = cfg.emf_namespace
        self.logger = logger or logging.getLogger(LOGGER)
        if cfg.file is not None or cfg.stream != "none":
            ours = [h for h in self.logger.handlers if getattr(h, "_fortress", False)]
            # One Fortress handler per logger; one writing elsewhere (another file) is replaced.
            for h in ours:
                if not _same_target(h, cfg):
                    self.logger.removeHandler(h)
                    h.close()
            if not any(_same_target(h, cfg) for h in ours):
                handler: BatchStreamHandler
                if cfg.file is not None:
                    handler = BatchFileHandler(cfg.file)
                else:
                    handler = BatchStreamHandler(sys.stdout if cfg.stream == "stdout" else sys.stderr)
                handler.setFormatter(logging.Formatter("%(message)s"))
                handler._fortress = True  # type: ignore[attr-defined]
                self.logger.addHandler(handler)
            self.logger.propagate = False  # one line per request, not also through the root logger
        if self.logger.level == logging.NOTSET:
            self.logger.setLevel(logging.INFO)
        # Requests observed but not yet logged: (context, perf_counter at the end, wall time).
        self.delay = FLUSH_DELAY
        self.max_pending = MAX_PENDING
        self._pending: list[tuple[RequestContext, float, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        # The two EMF directives a request line can need, built once.
        dims = [["Service"], ["Service", "Model"]]
        self._directive = {"Namespace": self.namespace, "Dimensions": dims, "Metrics": _REQUEST_METRICS}
        self._directive_ttft = {**self._directive, "Metrics": [*_REQUEST_METRICS, _TTFT_METRIC]}

    def record(
        self, ctx: RequestContext, now: float | None = None, wall: float | None = None
    ) -> dict[str, Any]:
        """The log record of one request (a dict, written as one JSON line); ``now`` is the
        ``perf_counter`` reading and ``wall`` the ``time.time()`` when the request ended."""
        wall = time.time() if wall is None else wall
        end = time.perf_counter() if now is None else now
        latency = end - ctx.t0
        usage = ctx.usage or {}
        tin = usage.get("prompt_tokens")
        tout = usage.get("completion_tokens")
        replica = ctx.replica
        rec: dict[str, Any] = {
            "ts": round(wall, 3),
            "request_id": ctx.request_id,
            "key_id": ctx.identity.key_id if ctx.identity is not None else None,
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
        """Queue the request's line (the gateway observer); ``write_pending`` logs the queue.

        On the request path this only notes the end time. The lines are built, logged and
        written in one batch every ``FLUSH_DELAY`` seconds (or ``MAX_PENDING`` requests): the
        same work done in a tight loop costs a fraction of what it costs spread between
        requests, where every line would start from cold caches.
        """
        pending = self._pending
        pending.append((ctx, time.perf_counter(), time.time()))
        if len(pending) >= self.max_pending:
            self.write_pending()
            return
        try:
            loop = running_loop()
        except RuntimeError:  # not on an event loop: write at once
            self.write_pending()
            return
        # A timer of another (stopped) loop would never fire: schedule on this one.
        if self._timer is None or self._timer_loop is not loop:
            self._timer = loop.call_later(self.delay, self._on_timer)
            self._timer_loop = loop

    def _on_timer(self) -> None:
        self._timer = self._timer_loop = None
        self.write_pending()

    def write_pending(self) -> None:
        """Log every queued request (one ``LogRecord`` each, stamped with the request's end
        time), then write the installed handler's buffer in one call."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_loop = None
        batch, self._pending = self._pending, []
        logger = self.logger
        if batch and logger.isEnabledFor(logging.INFO):
            for handler in logger.handlers:
                if isinstance(handler, BatchStreamHandler):
                    handler.hold()  # the batch's lines go out in one write, at flush()
            make, handle, name, record = logger.makeRecord, logger.handle, logger.name, self.record
            for ctx, end, wall in batch:
                try:
                    msg = orjson.dumps(record(ctx, end, wall)).decode()
                except Exception:  # one odd request must not cost the batch its lines
                    logging.getLogger("fortress.observe").exception("access log line failed")
                    continue
                # What logger.info does, less the caller lookup (a stack walk): the caller is
                # always this method, and the record carries the request's own end time.
                rec = make(name, logging.INFO, __file__, 0, msg, (), None, "observe")
                rec.created = wall
                rec.msecs = (wall - int(wall)) * 1000.0
                handle(rec)
        self.flush()

    def open(self) -> None:
        """Open the access-log file, if one is configured (raises ``OSError``)."""
        for handler in self.logger.handlers:
            if isinstance(handler, BatchFileHandler):
                handler.open()

    def reopen(self) -> list[str]:
        """Reopen the access-log file (SIGHUP, after logrotate moved it): what is queued goes to
        the old file, later lines to a new one at the same path. Returns the paths reopened;
        raises ``OSError`` (the old file stays in use) when one cannot be opened."""
        self.write_pending()
        paths = []
        for handler in self.logger.handlers:
            if isinstance(handler, BatchFileHandler):
                handler.reopen()
                paths.append(handler.path)
        return paths

    def flush(self) -> None:
        """Flush the logger's handlers (a ``BatchStreamHandler`` writes what it holds in one call)."""
        for handler in self.logger.handlers:
            handler.flush()

    async def shutdown(self) -> None:
        """On shutdown: log what is queued and write it out."""
        self.write_pending()

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
