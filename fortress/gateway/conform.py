"""Fill in fields that OpenAI's schema requires and some engines leave out, and put replicas'
error answers in OpenAI's error format.

llama.cpp's non-stream chat answers lack ``choices[].logprobs`` and ``message.refusal``; the
``openai`` SDK tolerates that, strictly typed clients do not. Only absent keys are added (as
``null``, which is what OpenAI sends when they do not apply); nothing present is changed.
"""

from __future__ import annotations

from typing import Any

import orjson

from fortress.core.errors import error_body


def fix_chat_completion(obj: dict[str, Any]) -> bool:
    """Add the missing required keys of a ``chat.completion`` body. True when it changed."""
    changed = False
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if "logprobs" not in choice:
            choice["logprobs"] = None
            changed = True
        message = choice.get("message")
        if isinstance(message, dict) and "refusal" not in message:
            message["refusal"] = None
            changed = True
    return changed


def openai_error(data: bytes, status: int) -> bytes | None:
    """A replica's error answer in OpenAI's format, its message kept; None when it already is.

    Engines differ: llama.cpp sends ``code`` as the HTTP status (an integer) and no ``param``,
    vLLM ``{"object": "error", ...}`` without an ``error`` envelope, others plain text.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = None
    inner = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(inner, dict) and _is_openai(inner):
        return None
    src = inner if isinstance(inner, dict) else obj if isinstance(obj, dict) else {}
    message = src.get("message") if isinstance(src.get("message"), str) else None
    if message is None:
        message = inner if isinstance(inner, str) else data[:500].decode("utf-8", "replace").strip()
    type_ = src.get("type")
    if not isinstance(type_, str) or not type_:
        type_ = "invalid_request_error" if status < 500 else "server_error"
    code = src.get("code")
    param = src.get("param")
    return error_body(
        message or f"The replica answered {status}.",
        type_,
        code if isinstance(code, str) else None,
        param if isinstance(param, str) else None,
    )


def _is_openai(err: dict[str, Any]) -> bool:
    return (
        isinstance(err.get("message"), str)
        and isinstance(err.get("type"), str)
        and "param" in err
        and "code" in err
        and (err["code"] is None or isinstance(err["code"], str))
        and (err["param"] is None or isinstance(err["param"], str))
    )
