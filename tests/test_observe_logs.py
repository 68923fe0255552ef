"""The access log: finished requests are queued and logged in batches, written in one call by
the handler Fortress installs; nothing is lost on flush, close, shutdown or a warning."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from fortress.config import AccessLog as AccessLogConfig
from fortress.config import parse_config
from fortress.core.context import RequestContext
from fortress.observe.logs import LOGGER, AccessLog, BatchStreamHandler
from fortress.runtime import Runtime


class Stream(io.StringIO):
    """A text stream that remembers each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


def make_ctx(status: int, error: str | None = None) -> RequestContext:
    ctx = RequestContext("req-1", "/v1/chat/completions", 0.0, "127.0.0.1")
    ctx.status, ctx.model, ctx.error = status, "m", error
    return ctx


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    lg = logging.getLogger("test.buffered_access_log")
    lg.setLevel(logging.INFO)
    lg.propagate = False
    yield lg
    for h in list(lg.handlers):
        if isinstance(h, BatchStreamHandler):  # not pytest's own capture handlers
            lg.removeHandler(h)
            with contextlib.suppress(ValueError):  # a stream already closed (capsys's)
                h.close()


def attach_handler(lg: logging.Logger, stream: Stream) -> BatchStreamHandler:
    handler = BatchStreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(message)s"))
    lg.addHandler(handler)
    return handler


def test_held_lines_go_out_in_one_write_at_flush(logger: logging.Logger) -> None:
    stream = Stream()
    handler = attach_handler(logger, stream)
    handler.hold()
    for i in range(5):
        logger.info(json.dumps({"n": i}))
    assert stream.getvalue() == "" and stream.writes == []  # held
    handler.flush()
    assert len(stream.writes) == 1  # the five lines, one write call
    assert [rec["n"] for rec in stream.lines()] == [0, 1, 2, 3, 4]
    # After a flush it is a plain StreamHandler again, until the next hold().
    logger.info(json.dumps({"n": 5}))
    assert len(stream.writes) == 2
    assert [rec["n"] for rec in stream.lines()] == [0, 1, 2, 3, 4, 5]


def test_without_hold_each_line_is_written_at_once(logger: logging.Logger) -> None:
    stream = Stream()
    attach_handler(logger, stream)
    logger.info('{"n": 0}')
    assert stream.writes == ['{"n": 0}\n']
    logger.info('{"n": 1}')
    assert [rec["n"] for rec in stream.lines()] == [0, 1]


def test_close_and_shutdown_write_held_lines(logger: logging.Logger) -> None:
    stream = Stream()
    handler = attach_handler(logger, stream)
    handler.hold()
    logger.info('{"n": 0}')
    logger.info('{"n": 1}')
    assert stream.getvalue() == ""
    logger.removeHandler(handler)
    handler.close()
    assert [rec["n"] for rec in stream.lines()] == [0, 1]
    # What the interpreter does at exit: logging.shutdown flushes and closes every handler.
    handler = attach_handler(logger, stream)
    handler.hold()
    logger.info('{"n": 2}')
    logging.shutdown([weakref.ref(handler)])
    assert [rec["n"] for rec in stream.lines()] == [0, 1, 2]


def test_warning_flushes_held_lines_first(logger: logging.Logger) -> None:
    stream = Stream()
    handler = attach_handler(logger, stream)
    handler.hold()
    logger.info('{"n": 0}')
    logger.info('{"n": 1}')
    assert stream.writes == []
    logger.warning('{"n": 2}')
    assert [rec["n"] for rec in stream.lines()] == [0, 1, 2]


def test_other_thread_lines_keep_their_order(logger: logging.Logger) -> None:
    stream = Stream()
    handler = attach_handler(logger, stream)
    handler.hold()
    logger.info('{"n": 0}')
    thread = threading.Thread(target=logger.info, args=('{"n": 1}',))
    thread.start()
    thread.join()
    handler.flush()
    assert [rec["n"] for rec in stream.lines()] == [0, 1]


async def test_access_log_buffers_and_flushes_on_gateway_shutdown(
    logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    log = AccessLog(AccessLogConfig(stream="stdout"), logger=logger)
    (handler,) = [h for h in logger.handlers if getattr(h, "_fortress", False)]
    assert isinstance(handler, BatchStreamHandler)
    log.observe(make_ctx(200))
    log.observe(make_ctx(502, error="upstream"))
    assert capsys.readouterr().out == ""
    await log.shutdown()
    logger.removeHandler(handler)  # it writes to capsys's stream, closed before our fixture ends
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (first["status"], second["status"], second["error"]) == (200, 502, "upstream")

    # The runtime writes what is queued when it stops.
    access_logger = logging.getLogger(LOGGER)
    level, handlers = access_logger.level, list(access_logger.handlers)
    config = parse_config(
        "pools: [{model: m, replicas: [{url: 'http://127.0.0.1:9'}]}]\n"
        "auth: {enabled: false}\naudit: {enabled: false}\n"
        "routing: {engine_metrics_interval: 0}\n"
        "observe: {access_log: {stream: none}}\n"
    )
    mine = Records()
    try:
        runtime = Runtime(config)
        assert runtime.observe is not None and runtime.observe.access_log is not None
        access_logger.addHandler(mine)
        await runtime.start()
        for observe in runtime.gateway.observers:
            observe(make_ctx(200))
        assert mine.records == []  # queued, not yet written
        await runtime.stop()
        assert [json.loads(r.getMessage())["status"] for r in mine.records] == [200]
    finally:
        access_logger.setLevel(level)
        access_logger.handlers[:] = handlers


async def until(pred: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Poll ``pred`` while the access log's timer runs on this loop."""
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.02)


class Records(logging.Handler):
    """A user's own handler: gets every access-log record."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_access_log_queues_requests_and_logs_them_in_one_batch(logger: logging.Logger) -> None:
    stream = Stream()
    handler = attach_handler(logger, stream)
    mine = Records()
    logger.addHandler(mine)
    log = AccessLog(AccessLogConfig(stream="none"), logger=logger)
    log.delay = 0.1
    ended = []  # (before, after) each request's end was noted
    for status in (200, 429, 502):
        before = time.time()
        log.observe(make_ctx(status))
        ended.append((before, time.time()))
    assert stream.writes == [] and mine.records == []  # nothing formatted on the request path
    await until(lambda: bool(stream.writes), "the batch to be written")
    assert len(stream.writes) == 1  # one write for the batch
    assert [rec["status"] for rec in stream.lines()] == [200, 429, 502]
    # Users' handlers get one LogRecord per request, stamped with the request's end, not the batch's
    # (written later: the loop ran the batch's timer only once this test awaited).
    assert [json.loads(r.getMessage())["status"] for r in mine.records] == [200, 429, 502]
    for r, (before, after) in zip(mine.records, ended, strict=True):
        assert before <= r.created <= after
    logger.removeHandler(mine)
    assert handler in logger.handlers


async def test_access_log_writes_a_full_queue_at_once(logger: logging.Logger) -> None:
    stream = Stream()
    attach_handler(logger, stream)
    log = AccessLog(AccessLogConfig(stream="none"), logger=logger)
    log.delay, log.max_pending = 60.0, 3
    log.observe(make_ctx(200))
    log.observe(make_ctx(200))
    assert stream.writes == []
    log.observe(make_ctx(500))
    assert [rec["status"] for rec in stream.lines()] == [200, 200, 500]


def test_access_log_without_a_loop_writes_each_line_at_once(logger: logging.Logger) -> None:
    stream = Stream()
    attach_handler(logger, stream)
    log = AccessLog(AccessLogConfig(stream="none"), logger=logger)
    log.observe(make_ctx(404))
    assert [rec["status"] for rec in stream.lines()] == [404]


def test_access_log_queue_moves_on_to_a_new_loop(logger: logging.Logger) -> None:
    """A timer left on a loop that stopped must not hold the next loop's lines forever."""
    stream = Stream()
    attach_handler(logger, stream)
    log = AccessLog(AccessLogConfig(stream="none"), logger=logger)
    log.delay = 30.0

    async def first() -> None:
        log.observe(make_ctx(200))  # its timer dies with this loop

    async def second() -> None:
        log.delay = 0.05
        log.observe(make_ctx(201))
        await until(lambda: len(stream.lines()) >= 2, "both queued lines to be written")

    asyncio.run(first())
    assert stream.writes == []
    asyncio.run(second())
    assert [rec["status"] for rec in stream.lines()] == [200, 201]


async def test_a_line_that_fails_does_not_cost_the_batch(logger: logging.Logger) -> None:
    stream = Stream()
    attach_handler(logger, stream)
    log = AccessLog(AccessLogConfig(stream="none"), logger=logger)
    bad = make_ctx(200)
    bad.usage = {"prompt_tokens": object()}  # not JSON
    log.observe(make_ctx(200))
    log.observe(bad)
    log.observe(make_ctx(503))
    log.write_pending()
    assert [rec["status"] for rec in stream.lines()] == [200, 503]
