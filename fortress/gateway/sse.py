"""Server-sent-event handling for relayed streams.

The gateway always asks the replica for usage (``stream_options.include_usage``) so that every
stream is accounted for. ``StreamTap`` passes upstream bytes through at SSE event boundaries,
keeps the usage it sees, and removes what the client did not ask for: the usage-only chunk and
the ``usage`` field of other chunks. Only events that carry a usage object are parsed; every
other byte is forwarded as received. When nothing is stripped (the client asked for usage),
only the last such event is parsed, once its usage is read: a replica that reports usage in
every chunk (vLLM's ``continuous_usage_stats``) costs one parse per stream, not one per chunk.
"""

from __future__ import annotations

from typing import Any

import orjson

_USAGE_MARKS = (b'"usage":{', b'"usage": {')
_EVENT_END = b"\n\n"


def _find_usage(data: bytes, start: int) -> int:
    """Where the first usage mark at or after ``start`` is; -1 when there is none."""
    a = data.find(_USAGE_MARKS[0], start)
    b = data.find(_USAGE_MARKS[1], start)
    return b if a < 0 else a if b < 0 else min(a, b)


# How a stream says it is complete: chat/completions end with [DONE]; the Responses API with a
# terminal event (and no [DONE]).
CHAT_DONE = (b"[DONE]",)
RESPONSES_DONE = (b'"response.completed"', b'"response.failed"', b'"response.incomplete"')


class StreamTap:
    """Split an SSE byte stream into whole events, keep usage, strip it if unwanted."""

    __slots__ = ("_pending", "_usage", "_usage_event_raw", "chunks", "done", "done_marks", "strip_usage")

    def __init__(self, strip_usage: bool, done_marks: tuple[bytes, ...] = CHAT_DONE) -> None:
        self.strip_usage = strip_usage
        self.done_marks = done_marks
        self.chunks = 0  # data events relayed (for metrics and audit)
        self.done = False  # saw "data: [DONE]" (or the Responses API's terminal event)
        self._pending = b""
        self._usage: dict[str, Any] | None = None
        self._usage_event_raw: bytes | None = None  # the last event with usage, not parsed yet

    @property
    def usage(self) -> dict[str, Any] | None:
        """The usage the replica reported last (None: none yet)."""
        raw = self._usage_event_raw
        if raw is not None:
            self._usage_event_raw = None
            self._usage_event(raw)
        return self._usage

    def feed(self, data: bytes) -> bytes:
        """Return the bytes that are ready to go to the client (complete events only)."""
        if self._pending:
            data = self._pending + data
        end = data.rfind(_EVENT_END)
        if end < 0:
            self._pending = data
            return b""
        end += 2
        out, self._pending = data[:end], data[end:]
        self.chunks += out.count(b"data:")
        at = _find_usage(out, 0)
        if at >= 0:
            if self.strip_usage:
                out = self._take_usage(out, at)
            else:  # passed through as it is; parsed when the usage is read
                self._usage_event_raw = _last_usage_event(out)
        if not self.done:
            for mark in self.done_marks:
                if mark in out:
                    self.done = True
        return out

    def flush(self) -> bytes:
        """What is left when the upstream closed (an unterminated last event)."""
        rest, self._pending = self._pending, b""
        return rest

    def _take_usage(self, out: bytes, at: int) -> bytes:
        """``out`` with each event that holds a usage mark (the first at ``at``) passed through
        ``_usage_event``; the bytes between those events are kept as they are, unsplit (when a
        read brings a whole stream, splitting it into events cost ~1 µs each)."""
        pieces: list[bytes] = []
        pos = 0
        while at >= 0:
            start, end = _event_at(out, at, pos)
            pieces.append(out[pos:start])
            ev = self._usage_event(out[start:end])
            if ev:
                pieces += (ev, _EVENT_END)
            pos = end + 2
            at = _find_usage(out, pos)
        pieces.append(out[pos:])
        return b"".join(pieces)

    def _usage_event(self, ev: bytes) -> bytes:
        head, sep, payload = ev.partition(b"data:")
        if not sep:
            return ev
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ev
        if not isinstance(obj, dict):
            return ev
        if not isinstance(obj.get("usage"), dict):
            # The Responses API: usage inside the terminal event's response object; kept as is.
            inner = obj.get("response")
            if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                self._usage = inner["usage"]
            return ev
        self._usage = obj["usage"]
        if not self.strip_usage:
            return ev
        if not obj.get("choices"):
            return b""  # the usage-only chunk the client did not ask for
        del obj["usage"]
        return head + b"data: " + orjson.dumps(obj)


def _event_at(out: bytes, at: int, lo: int = 0) -> tuple[int, int]:
    """Where the event around byte ``at`` of ``out`` (whole events; none starts before ``lo``)
    starts and where its ending blank line is."""
    start = out.rfind(_EVENT_END, lo, at)
    # `out` ends with a blank line: the end is always found.
    return (lo if start < 0 else start + 2), out.find(_EVENT_END, at)


def _last_usage_event(out: bytes) -> bytes:
    """The last event of ``out`` (whole events) that holds a usage mark."""
    start, end = _event_at(out, max(out.rfind(mark) for mark in _USAGE_MARKS))
    return out[start:end]


def first_event_model(data: bytes) -> str | None:
    """The ``model`` named by the first event of an SSE byte stream, None when it names none
    (an error event, ``[DONE]``, not JSON)."""
    event = data.split(_EVENT_END, 1)[0]
    _, sep, payload = event.partition(b"data:")
    if not sep:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    model = obj.get("model")
    if model is None and isinstance(obj.get("response"), dict):  # Responses API events
        model = obj["response"].get("model")
    return model if isinstance(model, str) else None
