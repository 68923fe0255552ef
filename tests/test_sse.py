"""StreamTap: whole events pass through unchanged; usage is kept and stripped on request."""

import orjson

from fortress.gateway import sse
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


def counting_loads(monkeypatch) -> list[bytes]:
    """Every JSON parse the tap makes, recorded."""
    parsed: list[bytes] = []
    real = orjson.loads

    def loads(data):
        parsed.append(bytes(data))
        return real(data)

    monkeypatch.setattr(sse.orjson, "loads", loads)
    return parsed


def test_null_usage_is_not_parsed_or_changed(monkeypatch):
    parsed = counting_loads(monkeypatch)
    chunk = {**CHUNK, "usage": None}
    for strip in (True, False):
        tap = StreamTap(strip_usage=strip)
        assert tap.feed(ev(chunk) * 3) == ev(chunk) * 3
        assert tap.usage is None
    assert parsed == []


def test_only_the_usage_chunk_is_parsed(monkeypatch):
    parsed = counting_loads(monkeypatch)
    for strip, step in ((True, 1), (True, len(STREAM)), (False, 5), (False, len(STREAM))):
        parsed.clear()
        tap = StreamTap(strip_usage=strip)
        run(tap, STREAM, step)
        assert tap.usage == USAGE
        assert parsed == [ev(FINAL)[len(b"data:") : -2]], (strip, step)


def test_usage_in_every_chunk_is_parsed_once_when_kept(monkeypatch):
    """A replica that reports usage in each chunk (vLLM's continuous_usage_stats): relayed as
    it is, and only the last report parsed, when the usage is read."""
    parsed = counting_loads(monkeypatch)
    chunks = [{**CHUNK, "usage": {**USAGE, "completion_tokens": n}} for n in range(1, 11)]
    stream = b"".join(ev(c) for c in chunks) + b"data: [DONE]\n\n"
    for step in (1, 40, len(stream)):
        parsed.clear()
        tap = StreamTap(strip_usage=False)
        assert run(tap, stream, step) == stream
        assert parsed == []  # nothing parsed while relaying
        assert tap.usage == chunks[-1]["usage"] and tap.usage["completion_tokens"] == 10
        assert len(parsed) == 1 and tap.usage == chunks[-1]["usage"]  # read twice, parsed once


def test_partial_event_is_held_until_complete():
    tap = StreamTap(strip_usage=True)
    data = ev(CHUNK)
    assert tap.feed(data[:10]) == b""
    assert tap.feed(data[10:]) == data
    assert not tap.done


def _by_events(data: bytes, strip: bool) -> bytes:
    """The tap's output as a plain reading of the spec would give it: split into events, each
    event with a usage object handled on its own, joined again."""
    kept = []
    for e in data.split(b"\n\n")[:-1]:
        if b'"usage":{' in e or b'"usage": {' in e:
            obj = orjson.loads(e.partition(b"data:")[2])
            if strip:
                if not obj.get("choices"):
                    continue
                del obj["usage"]
                e = e.partition(b"data:")[0] + b"data: " + orjson.dumps(obj)
        kept.append(e)
    return b"".join(k + b"\n\n" for k in kept)


def _events(data: bytes) -> list[bytes]:
    return [e.strip(b"\n") for e in data.split(b"\n\n") if e.strip(b"\n")]


def test_many_events_in_one_read_match_event_by_event_handling():
    """A read that brings a whole stream (or any run of events) is handled without splitting
    it: usage events anywhere among others, spaced ``"usage": {`` too, comments and extra
    blank lines, whatever the read sizes."""
    import random

    rnd = random.Random(7)
    spaced = b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 1}}\n\n'
    pool = [
        ev(CHUNK),
        ev({**CHUNK, "usage": None}),
        ev({**CHUNK, "usage": USAGE}),
        ev(FINAL),
        spaced,
        b": keep-alive comment\n\n",
        b"\n\n",
    ]
    for _ in range(200):
        data = b"".join(rnd.choice(pool) for _ in range(rnd.randint(1, 40))) + b"data: [DONE]\n\n"
        for strip in (True, False):
            step = rnd.choice((1, 9, 100, len(data)))
            tap = StreamTap(strip_usage=strip)
            # Compared event by event: blank lines between events may fall on either side of
            # a read's boundary, which moves a newline from one event's bytes to the next.
            got, want = _events(run(tap, data, step)), _events(_by_events(data, strip))
            assert got == want, (strip, step, data)
            assert tap.done and tap.chunks == data.count(b"data:")
