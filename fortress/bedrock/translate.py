"""OpenAI chat completions ⇄ the Bedrock Converse API: pure functions, no I/O.

``converse_request`` turns a ``/v1/chat/completions`` body into the keyword arguments of
``bedrock-runtime``'s ``converse`` / ``converse_stream`` (without ``modelId``);
``chat_completion`` turns a Converse response into a ``chat.completion``; ``StreamTranslator``
turns ConverseStream events into ``chat.completion.chunk`` objects. What Converse cannot express
(``n`` > 1, log probabilities, JSON response formats, image URLs that are not ``data:`` URLs) is
a ``RequestError`` (a 400), never silently dropped.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = [
    "FINISH_REASONS",
    "RequestError",
    "StreamTranslator",
    "chat_completion",
    "converse_request",
    "finish_reason",
    "usage",
]

# Converse stopReason -> OpenAI finish_reason.
FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}


class RequestError(Exception):
    """A chat completion request the adapter cannot translate (answered 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def finish_reason(stop_reason: str | None) -> str:
    """OpenAI's finish_reason for a Converse stopReason (an unknown one counts as ``stop``)."""
    return FINISH_REASONS.get(stop_reason or "", "stop")


def usage(u: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI usage from Converse's TokenUsage. Bedrock counts cached prompt tokens apart from
    ``inputTokens``; OpenAI's ``prompt_tokens`` includes them, with the cache reads in
    ``prompt_tokens_details.cached_tokens``."""
    u = u or {}
    cached = int(u.get("cacheReadInputTokens") or 0)
    prompt = int(u.get("inputTokens") or 0) + cached + int(u.get("cacheWriteInputTokens") or 0)
    completion = int(u.get("outputTokens") or 0)
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


# -- request -----------------------------------------------------------------------------------


def _image(part: dict[str, Any]) -> dict[str, Any]:
    url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise RequestError("Only base64 data: URLs are supported for images on Bedrock.", "messages")
    media, _, data = url[5:].partition(";base64,")
    fmt = _IMAGE_FORMATS.get(media.lower())
    if fmt is None:
        raise RequestError(f"Image type {media!r} is not supported (png, jpeg, gif, webp).", "messages")
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error:
        raise RequestError("An image data: URL is not valid base64.", "messages") from None
    return {"image": {"format": fmt, "source": {"bytes": raw}}}


def _blocks(content: Any, role: str) -> list[dict[str, Any]]:
    """Converse content blocks of an OpenAI message content (a string or a list of parts).
    Empty text is dropped: Converse rejects blank text blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise RequestError("A message's content must be a string or an array of parts.", "messages")
    out: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                out.append({"text": part["text"]})
        elif kind == "image_url" and role == "user":
            out.append(_image(part))
        else:
            raise RequestError(f"Content part type {kind!r} is not supported on Bedrock.", "messages")
    return out


def _tool_use(call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not call.get("id"):
        raise RequestError("Each tool call needs an id and a function name.", "messages")
    try:
        args = orjson.loads(fn.get("arguments") or "{}")
    except orjson.JSONDecodeError:
        raise RequestError("A tool call's arguments must be a JSON object.", "messages") from None
    return {"toolUse": {"toolUseId": str(call["id"]), "name": fn["name"], "input": args}}


def _tool_config(req: dict[str, Any], history_has_tools: bool) -> dict[str, Any] | None:
    tools = req.get("tools")
    if not tools:
        return None
    specs = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError("Only function tools with a name are supported on Bedrock.", "tools")
        spec: dict[str, Any] = {
            "name": fn["name"],
            "inputSchema": {"json": fn.get("parameters") or {"type": "object", "properties": {}}},
        }
        if fn.get("description"):
            spec["description"] = fn["description"]
        specs.append({"toolSpec": spec})
    choice = req.get("tool_choice")
    config: dict[str, Any] = {"tools": specs}
    if choice == "none":
        # Converse has no "none": leave the tools out, unless the history uses them (then
        # Converse requires their definitions and the model may still call one).
        return config if history_has_tools else None
    if choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise RequestError("tool_choice must name a function.", "tool_choice")
        config["toolChoice"] = {"tool": {"name": name}}
    elif choice not in (None, "auto"):
        raise RequestError(f"tool_choice {choice!r} is not supported.", "tool_choice")
    return config


def converse_request(req: Any) -> dict[str, Any]:
    """Keyword arguments for ``converse`` / ``converse_stream`` (all but ``modelId``).

    System and developer messages become ``system``; tool results become ``toolResult`` blocks
    of a user turn; consecutive messages of one role are merged into one turn, as Converse wants
    the roles to alternate.
    """
    if not isinstance(req, dict):
        raise RequestError("The request body must be a JSON object.")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array.", "messages")
    if req.get("n") not in (None, 1):
        raise RequestError("Bedrock returns one choice: 'n' must be 1.", "n")
    if req.get("logprobs") or req.get("top_logprobs"):
        raise RequestError("Log probabilities are not available on Bedrock.", "logprobs")
    fmt = req.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise RequestError("Only response_format 'text' is supported on Bedrock.", "response_format")

    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    has_tools = False
    for m in messages:
        if not isinstance(m, dict):
            raise RequestError("Each message must be an object.", "messages")
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(_blocks(m.get("content"), role))
            continue
        if role == "user":
            blocks = _blocks(m.get("content"), role)
        elif role == "assistant":
            blocks = _blocks(m.get("content"), role)
            calls = m.get("tool_calls") or []
            blocks += [_tool_use(c) for c in calls]
            has_tools = has_tools or bool(calls)
        elif role == "tool":
            text = m.get("content")
            result = _blocks(text, "tool") or [{"text": ""}]
            blocks = [{"toolResult": {"toolUseId": str(m.get("tool_call_id") or ""), "content": result}}]
            role, has_tools = "user", True
        else:
            raise RequestError(f"Message role {role!r} is not supported.", "messages")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise RequestError("The messages have no user content.", "messages")

    out: dict[str, Any] = {"messages": turns}
    if system:
        out["system"] = system
    inference: dict[str, Any] = {}
    limit = req.get("max_completion_tokens", req.get("max_tokens"))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise RequestError("'max_tokens' must be a positive integer.", "max_tokens")
        inference["maxTokens"] = limit
    for key, name in (("temperature", "temperature"), ("top_p", "topP")):
        value = req.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RequestError(f"'{key}' must be a number.", key)
            inference[name] = float(value)
    stop = req.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError("'stop' must be a string or an array of strings.", "stop")
        if stops:
            inference["stopSequences"] = stops
    if inference:
        out["inferenceConfig"] = inference
    tool_config = _tool_config(req, has_tools)
    if tool_config is not None:
        out["toolConfig"] = tool_config
    return out


# -- response ----------------------------------------------------------------------------------


def chat_completion(resp: dict[str, Any], model: str, rid: str, created: int) -> dict[str, Any]:
    """A ``chat.completion`` object from a Converse response."""
    content = ((resp.get("output") or {}).get("message") or {}).get("content") or []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        if "text" in block:
            texts.append(block["text"])
        elif "toolUse" in block:
            tu = block["toolUse"]
            args = orjson.dumps(tu.get("input") or {}).decode()
            fn = {"name": tu.get("name", ""), "arguments": args}
            calls.append({"id": tu.get("toolUseId", ""), "type": "function", "function": fn})
        # reasoningContent and other blocks have no place in a chat.completion message.
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(resp.get("stopReason")),
            }
        ],
        "usage": usage(resp.get("usage")),
    }


class StreamTranslator:
    """ConverseStream events → ``chat.completion.chunk`` objects, one stream at a time.

    With ``include_usage`` every chunk carries ``"usage": null`` and the ``metadata`` event
    becomes the last chunk (no choices, the usage), as OpenAI streams it.
    """

    def __init__(self, model: str, rid: str, created: int, include_usage: bool) -> None:
        self.model = model
        self.rid = rid
        self.created = created
        self.include_usage = include_usage
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self._tools: dict[int, int] = {}  # Converse contentBlockIndex -> OpenAI tool call index

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def translate(self, event: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The chunks (zero or more) for one ConverseStream event."""
        if "messageStart" in event:
            yield self._chunk({"role": "assistant", "content": ""})
        elif "contentBlockStart" in event:
            ev = event["contentBlockStart"]
            tu = (ev.get("start") or {}).get("toolUse")
            if tu is not None:
                index = self._tools.setdefault(ev.get("contentBlockIndex", 0), len(self._tools))
                fn = {"name": tu.get("name", ""), "arguments": ""}
                call = {"index": index, "id": tu.get("toolUseId", ""), "type": "function", "function": fn}
                yield self._chunk({"tool_calls": [call]})
        elif "contentBlockDelta" in event:
            ev = event["contentBlockDelta"]
            delta = ev.get("delta") or {}
            if "text" in delta:
                yield self._chunk({"content": delta["text"]})
            elif "toolUse" in delta:
                index = self._tools.setdefault(ev.get("contentBlockIndex", 0), len(self._tools))
                call = {"index": index, "function": {"arguments": delta["toolUse"].get("input", "")}}
                yield self._chunk({"tool_calls": [call]})
        elif "messageStop" in event:
            self.finish = finish_reason(event["messageStop"].get("stopReason"))
            yield self._chunk({}, self.finish)
        elif "metadata" in event:
            self.usage = usage(event["metadata"].get("usage"))
            if self.include_usage:
                yield {
                    "id": self.rid,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self.usage,
                }
