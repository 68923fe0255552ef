"""Fill in fields that OpenAI's schema requires and some engines leave out.

llama.cpp's non-stream chat answers lack ``choices[].logprobs`` and ``message.refusal``; the
``openai`` SDK tolerates that, strictly typed clients do not. Only absent keys are added (as
``null``, which is what OpenAI sends when they do not apply); nothing present is changed.
"""

from __future__ import annotations

from typing import Any


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
