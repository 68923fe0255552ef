"""Mid-stream continuation: carry a chat stream on to another replica when its replica dies.

A pool with ``continuation: true`` keeps, for each chat completion stream it relays, the
content deltas the client has received (a list of strings, not the events) and the ``id``,
``created`` and ``model`` of the first chunk. When the replica dies mid-stream, the relay asks
another replica of the pool for the same request with that text as the start of the
assistant's answer (vLLM's ``continue_final_message: true`` with ``add_generation_prompt:
false``; llama-server prefills a final assistant message the same way and ignores the two
fields), and relays the new replica's events rewritten to read as the same stream: the first
chunk's ids, no second role chunk, usage summed. Sampling state is not carried over: the rest
of the answer is a new sampling from the text so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from fortress.core.context import Target

_EVENT_END = b"\n\n"
_DONE = b"data: [DONE]\n\n"
# Delta fields a continuation can carry on; any other (tool calls, reasoning) cannot be re-sent
# as the start of an assistant message.
_TEXT_FIELDS = frozenset(("role", "content", "refusal"))


@dataclass(frozen=True, slots=True)
class Served:
    """The replicas that answered one continued stream, as audit and logs see one replica:
    their names joined by ``,`` in the order they served; the last one's url and tier."""

    name: str
    url: str
    tier: str


class Continuation:
    """What one stream of a pool with continuation has sent so far, and how to go on."""

    __slots__ = (
        "cut_tokens",
        "events",
        "finish",
        "ident",
        "names",
        "ok",
        "parts",
        "resuming",
        "tokens",
        "usage",
    )

    def __init__(self) -> None:
        self.parts: list[str] = []  # content deltas the client has received, in order
        self.ident: tuple[Any, Any, Any] | None = None  # id, created, model of the first chunk
        self.tokens = 0  # chunks with content the client has received (one token each)
        self.cut_tokens = 0  # of those, the ones the replicas that were cut generated
        self.events = 0  # events the current attempt has relayed
        self.finish: str | None = None  # a finish_reason the client has received
        self.ok = True  # False once the stream carried something only text can't continue
        self.resuming = False  # the current attempt continues a cut one
        self.names: list[str] = []  # replicas that served this stream, in order
        self.usage: dict[str, Any] | None = None  # summed, once the continuing replica reports

    @property
    def text(self) -> str:
        """The answer's text the client has received."""
        return "".join(self.parts)

    def can_continue(self) -> bool:
        """A cut stream this can carry on: plain text so far, and not finished."""
        return self.ok and self.ident is not None and self.finish is None

    def cut(self, replica: str) -> None:
        """The current attempt's replica died mid-stream."""
        if self.events and (not self.names or self.names[-1] != replica):
            self.names.append(replica)  # named when it served part of the answer
        self.events = 0
        self.cut_tokens = self.tokens
        self.resuming = True

    def served(self, replica: Target) -> Target:
        """The replica to record for this stream: ``replica``, or every one that served it."""
        if not self.names:
            return replica
        names = self.names if self.names[-1] == replica.name else [*self.names, replica.name]
        return Served(",".join(names), replica.url, str(replica.tier))

    def body(self, upstream: bytes) -> bytes | None:
        """The request that continues the stream on another replica, from the body sent to
        the first one; None when nothing is left to generate (``max_tokens`` used up)."""
        req = orjson.loads(upstream)
        messages = list(req.get("messages") or [])
        text = self.text
        last = messages[-1] if messages else None
        if (
            req.get("continue_final_message") is True
            and isinstance(last, dict)
            and last.get("role") == "assistant"
            and isinstance(last.get("content"), str)
        ):
            # The client continued a message itself: the new text goes after its own.
            messages[-1] = {**last, "content": last["content"] + text}
        else:
            messages.append({"role": "assistant", "content": text})
        req["messages"] = messages
        req["continue_final_message"] = True
        req["add_generation_prompt"] = False
        for key in ("max_tokens", "max_completion_tokens"):
            limit = req.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool):
                if limit - self.tokens < 1:
                    return None
                req[key] = limit - self.tokens
        return orjson.dumps(req)

    def feed(self, out: bytes, want_usage: bool) -> bytes:
        """Note what whole SSE events ``out`` tell the client; while resuming, rewrite them
        into the client's stream (first ids, no role chunk, usage summed). Returns the bytes
        for the client."""
        events = out.split(_EVENT_END)
        kept: list[bytes] = []
        changed = False
        for ev in events[:-1]:  # `out` ends with "\n\n": the last element is b""
            new = self._event(ev, want_usage)
            if new is not ev:
                changed = True
            if new:
                kept.append(new)
                self.events += 1
        if not changed:
            return out
        return b"".join(e + _EVENT_END for e in kept)

    def _event(self, ev: bytes, want_usage: bool) -> bytes:
        head, sep, payload = ev.partition(b"data:")
        if not sep:
            return ev
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ev  # [DONE], or not JSON: as it came
        if not isinstance(obj, dict):
            return ev
        if self.ident is None:
            self.ident = (obj.get("id"), obj.get("created"), obj.get("model"))
        choices = obj.get("choices")
        content = False
        if isinstance(choices, list):
            if len(choices) > 1:
                self.ok = False
            for ch in choices:
                if not isinstance(ch, dict):
                    continue
                delta = ch.get("delta")
                if isinstance(delta, dict):
                    for k, v in delta.items():
                        if k not in _TEXT_FIELDS and v not in (None, "", []):
                            self.ok = False
                    text = delta.get("content")
                    if isinstance(text, str) and text:
                        self.parts.append(text)
                        content = True
                        self.tokens += 1
                if ch.get("finish_reason"):
                    self.finish = ch["finish_reason"]
        if not self.resuming:
            return ev
        # The continuing replica's event, as the client's stream goes on.
        if isinstance(choices, list) and choices and not content and not self._finishing(choices):
            return b""  # its role chunk: the client has had one
        for ch in choices if isinstance(choices, list) else ():
            delta = ch.get("delta") if isinstance(ch, dict) else None
            if isinstance(delta, dict):
                delta.pop("role", None)
        obj["id"], obj["created"], obj["model"] = self.ident
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = self._summed(usage)
            if want_usage:
                obj["usage"] = self.usage
            elif not choices:
                return b""  # the usage-only chunk the client did not ask for
            else:
                del obj["usage"]
        return head + b"data: " + orjson.dumps(obj)

    @staticmethod
    def _finishing(choices: list[Any]) -> bool:
        return any(isinstance(ch, dict) and ch.get("finish_reason") for ch in choices)

    def _summed(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The continuing replica's usage plus the tokens the cut replicas generated (they
        never reported theirs: counted as their content chunks). Prompt tokens are the
        continuing replica's: it read the prompt and the text so far again."""
        out = dict(usage)
        done = usage.get("completion_tokens")
        if isinstance(done, int):
            out["completion_tokens"] = done + self.cut_tokens
            prompt = usage.get("prompt_tokens")
            if isinstance(prompt, int):
                out["total_tokens"] = prompt + done + self.cut_tokens
        return out

    def done_events(self, want_usage: bool) -> bytes:
        """How a stream whose text was complete when its replica died ends: ``[DONE]``
        (after a usage chunk of the generated tokens, when the client asked for usage)."""
        self.usage = {"prompt_tokens": 0, "completion_tokens": self.tokens, "total_tokens": self.tokens}
        if not want_usage or self.ident is None:
            return _DONE
        cid, created, model = self.ident
        chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": self.usage,
        }
        return b"data: " + orjson.dumps(chunk) + _EVENT_END + _DONE
