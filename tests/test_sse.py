"""StreamTap: whole events pass through unchanged; usage is kept and stripped on request."""

import orjson

from fortress.gateway.sse import StreamTap


def ev(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNK = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
FINAL = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
STREAM = ev(CHUNK) + ev(CHUNK) + ev(FINAL) + b"data: [DONE]\n\n"


def run(tap: StreamTap, data: bytes, step: int) -> bytes:
    out = b"".join(tap.feed(data[i : i + step]) for i in range(0, len(data), step))
    return out + tap.flush()


def test_events_are_relayed_unchanged_when_client_wants_usage():
    for step in (1, 7, 64, len(STREAM)):
        tap = StreamTap(strip_usage=False)
        assert run(tap, STREAM, step) == STREAM
        assert tap.usage == USAGE and tap.done and tap.chunks == 4


def test_usage_chunk_removed_when_not_asked_for():
    for step in (1, 13, len(STREAM)):
        tap = StreamTap(strip_usage=True)
        out = run(tap, STREAM, step)
        assert out == ev(CHUNK) + ev(CHUNK) + b"data: [DONE]\n\n"
        assert tap.usage == USAGE


def test_usage_field_removed_from_a_chunk_with_choices():
    chunk = {**CHUNK, "usage": USAGE}
    tap = StreamTap(strip_usage=True)
    out = tap.feed(ev(chunk))
    assert orjson.loads(out[len(b"data: ") :]) == CHUNK
    assert tap.usage == USAGE


def test_null_usage_is_not_parsed_or_changed():
    chunk = {**CHUNK, "usage": None}
    tap = StreamTap(strip_usage=True)
    assert tap.feed(ev(chunk)) == ev(chunk)
    assert tap.usage is None


def test_partial_event_is_held_until_complete():
    tap = StreamTap(strip_usage=True)
    data = ev(CHUNK)
    assert tap.feed(data[:10]) == b""
    assert tap.feed(data[10:]) == data
    assert not tap.done
