"""The audit layer in process: the record of a request, body capture, required headers, lifecycle."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from audit_support import sql

from fortress.audit.layer import build_audit
from fortress.audit.query import verify
from fortress.audit.records import COLUMNS, REDACTED, RecordBuilder
from fortress.config import HealthCheck, Tier, parse_config
from fortress.core.context import Identity, RequestContext
from fortress.core.errors import GatewayError
from fortress.routing.replica import Replica
from fortress.store.db import database_url, get_engine

HEADERS = {b"x-llm-source": b"billing-service", b"x-llm-user": b"alice", b"x-llm-request-type": b"chat"}


def config(tmp_path: Path, audit: str = "{}") -> Any:
    return parse_config(
        f"state_dir: {tmp_path / 'state'}\nauth: {{enabled: false}}\naudit: {audit}\n", env={}
    )


def finished_ctx(**over: Any) -> RequestContext:
    ctx = RequestContext("req-abc", "/v1/chat/completions", time.perf_counter() - 0.25, "10.0.0.7")
    ctx.headers = dict(HEADERS)
    ctx.body = {
        "model": "smollm2",  # the relay swapped the alias for the upstream id
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "user", "content": [{"type": "text", "text": "and you"}]},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},  # added by the relay
        "user": "end-user-42",
        "metadata": {"ticket": "T-1", "email": "alice@example.com"},
    }
    ctx.model = "gpt-4o-mini"
    ctx.stream = True
    ctx.want_usage = False
    ctx.replica = Replica("r7", "http://127.0.0.1:9", Tier.SECONDARY, HealthCheck())
    ctx.attempts = 2
    ctx.status = 200
    ctx.usage = {"prompt_tokens": 12, "completion_tokens": 34, "prompt_tokens_details": {"cached_tokens": 8}}
    ctx.ttfb = 0.05
    ctx.bytes_in = 321
    ctx.bytes_out = 4567
    ctx.identity = Identity("key_9", "alice-laptop", "default", frozenset(), "fk_abcd")
    for k, v in over.items():
        setattr(ctx, k, v)
    return ctx


def test_record_fields(tmp_path: Path) -> None:
    rec = RecordBuilder(config(tmp_path).audit).build(finished_ctx())
    assert set(rec) == set(COLUMNS) - {"gateway_id", "seq", "prev_hash", "hash"}
    assert rec["request_id"] == "req-abc"
    assert abs(rec["ts"] - (time.time() - 0.25)) < 0.5  # when the request arrived
    assert (rec["key_id"], rec["key_name"]) == ("key_9", "alice-laptop")
    assert (rec["source"], rec["user"], rec["request_type"]) == ("billing-service", "alice", "chat")
    assert rec["client"] == "10.0.0.7"
    assert (rec["model"], rec["replica"], rec["tier"]) == ("gpt-4o-mini", "r7", "secondary")
    assert rec["stream"] is True
    assert (rec["status"], rec["error"], rec["retries"]) == (200, None, 1)
    assert 240 < rec["latency_ms"] < 1000 and rec["ttft_ms"] == 50.0
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_tokens"]) == (12, 34, 8)
    assert (rec["bytes_in"], rec["bytes_out"]) == (321, 4567)
    assert rec["body"] is None  # body_capture: none is the default


def test_record_of_a_request_rejected_early(tmp_path: Path) -> None:
    ctx = RequestContext("req-x", "/v1/chat/completions", time.perf_counter(), None)
    ctx.status, ctx.error = 400, "Missing required audit header: x-llm-user."
    rec = RecordBuilder(config(tmp_path, "{body_capture: full}").audit).build(ctx)
    assert rec["status"] == 400 and rec["model"] is None and rec["key_id"] is None
    assert rec["replica"] is None and rec["input_tokens"] is None
    assert rec["retries"] == 0 and rec["body"] is None


def test_nul_in_an_upstream_error_does_not_poison_the_store(tmp_path: Path) -> None:
    rec = RecordBuilder(config(tmp_path).audit).build(finished_ctx(error="Replica r1 answered 500: a\x00b"))
    assert rec["error"] == "Replica r1 answered 500: a\ufffdb"


def test_metadata_capture_has_shape_not_content(tmp_path: Path) -> None:
    rec = RecordBuilder(config(tmp_path, "{body_capture: metadata}").audit).build(finished_ctx())
    body = rec["body"]
    assert body == {
        "messages": 3,
        "roles": {"system": 1, "user": 2},
        "chars": len("Be brief.") + len("Hello there") + len("and you"),
        "params": {"temperature": 0.7, "max_tokens": 64, "stream": True, "user": "end-user-42"},
    }
    assert "Hello" not in str(body) and "alice@example.com" not in str(body)


def test_full_capture_redacts_and_shows_what_the_client_sent(tmp_path: Path) -> None:
    cfg = config(tmp_path, "{body_capture: full, redact_fields: [messages, metadata.email]}")
    ctx = finished_ctx()
    rec = RecordBuilder(cfg.audit).build(ctx)
    body = rec["body"]
    assert body["messages"] == REDACTED
    assert body["metadata"] == {"ticket": "T-1", "email": REDACTED}
    assert body["model"] == "gpt-4o-mini"  # the alias the client used
    assert "stream_options" not in body  # the relay's usage request is not the client's
    assert body["temperature"] == 0.7
    assert ctx.body is not None and ctx.body["messages"][0]["content"] == "Be brief."  # untouched


def test_full_capture_without_redaction(tmp_path: Path) -> None:
    cfg = config(tmp_path, "{body_capture: full, redact_fields: []}")
    rec = RecordBuilder(cfg.audit).build(finished_ctx(want_usage=True))
    assert rec["body"]["messages"][1]["content"] == "Hello there"
    assert rec["body"]["stream_options"] == {"include_usage": True}  # the client asked for it


def test_extra_required_headers_are_kept(tmp_path: Path) -> None:
    cfg = config(tmp_path, "{required_headers: [x-llm-source, X-Team]}")
    ctx = finished_ctx()
    ctx.headers[b"x-team"] = b"search"
    rec = RecordBuilder(cfg.audit).build(ctx)
    assert rec["body"] == {"headers": {"x-team": "search"}}


def test_missing_headers_are_all_named(tmp_path: Path) -> None:
    layer = build_audit(config(tmp_path))
    ctx = finished_ctx()
    layer.check_headers(ctx)  # all there
    ctx.headers = {b"x-llm-user": b"alice", b"x-llm-source": b"  "}
    with pytest.raises(GatewayError) as exc:
        layer.check_headers(ctx)
    err = exc.value
    assert err.status == 400 and err.code == "missing_audit_headers" and err.type == "invalid_request_error"
    assert "x-llm-source" in err.message and "x-llm-request-type" in err.message
    assert "x-llm-user," not in err.message.split(":")[1].split(".")[0]
    assert err.param == "x-llm-source,x-llm-request-type"


async def test_layer_lifecycle(tmp_path: Path) -> None:
    cfg = config(tmp_path, "{anchor_every: 3600}")
    layer = build_audit(cfg)
    await layer.start()
    for i in range(5):
        await layer.record(finished_ctx(request_id=f"req-{i}"))
    await layer.stop()
    db = Path(cfg.state_dir) / "fortress.db"
    rows = sql(db, "SELECT seq, request_id, status FROM audit_records ORDER BY seq")
    assert rows == [(i + 1, f"req-{i}", 200) for i in range(5)]
    assert sql(db, "SELECT seq FROM audit_anchors") == [(5,)]  # the head, anchored at stop
    # A restart continues the same chain.
    layer2 = build_audit(cfg)
    await layer2.start()
    await layer2.record(finished_ctx(request_id="req-5"))
    stats = layer2.stats()
    assert stats["journal_seq"] == 6
    await layer2.stop()
    assert sql(db, "SELECT max(seq), count(DISTINCT gateway_id) FROM audit_records") == [(6, 1)]
    from fortress.core.secret import load_secret

    report = verify(get_engine(database_url(cfg)), load_secret(cfg))
    assert report.ok, report.problems


async def test_requests_on_their_way_to_the_journal_are_counted(tmp_path: Path) -> None:
    layer = build_audit(config(tmp_path))
    await layer.start()
    try:
        assert layer.journal is not None and layer.journal.on_the_way is not None
        a, b, c = finished_ctx(request_id="a"), finished_ctx(request_id="b"), finished_ctx(request_id="c")
        for ctx in (a, b, c):
            layer.begin(ctx)
        layer.begin(a)  # counted once per request
        assert layer.journal.on_the_way() == 3
        await layer.record(a)  # handed over: no longer on its way
        assert layer.journal.on_the_way() == 2
        layer.end(a)  # already recorded: nothing more
        layer.end(b)  # ended without a record (never reached the journal)
        assert layer.journal.on_the_way() == 1
        await layer.record(finished_ctx(request_id="ws"))  # a record nobody began (a WebSocket message)
        assert layer.journal.on_the_way() == 1
        await layer.record(c)
        layer.end(c)
        assert layer.journal.on_the_way() == 0
    finally:
        await layer.stop()


async def test_record_before_start_fails_loudly(tmp_path: Path) -> None:
    from fortress.audit.journal import JournalError

    layer = build_audit(config(tmp_path))
    with pytest.raises(JournalError):
        await layer.record(finished_ctx())
