"""What one audit record holds, built from a finished request's context.

Built with plain dict operations on the request path (no pydantic, no copies unless the body
is captured). ``seq``, ``gateway_id``, ``prev_hash`` and ``hash`` are added by the journal.
"""

from __future__ import annotations

from collections.abc import Iterable
from time import perf_counter, time
from typing import Any

import orjson

from fortress.config import Audit
from fortress.core.context import RequestContext

# Every column of ``audit_records``, in table order; a journal record has exactly these keys.
COLUMNS: tuple[str, ...] = (
    "gateway_id",
    "seq",
    "request_id",
    "ts",
    "key_id",
    "key_name",
    "source",
    "user",
    "request_type",
    "client",
    "model",
    "replica",
    "tier",
    "stream",
    "status",
    "error",
    "latency_ms",
    "ttft_ms",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "bytes_in",
    "bytes_out",
    "retries",
    "body",
    "prev_hash",
    "hash",
)

# The headers that have their own columns; other required headers go to body["headers"].
HEADER_COLUMNS = {b"x-llm-source": "source", b"x-llm-user": "user", b"x-llm-request-type": "request_type"}

# Request fields that carry content: never part of the metadata capture.
CONTENT_FIELDS = frozenset(
    {
        "messages",
        "prompt",
        "input",
        "suffix",
        "tools",
        "functions",
        "tool_choice",
        "response_format",
        "logit_bias",
        "metadata",
        "prediction",
        "audio",
    }
)
REDACTED = "[redacted]"


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) else None


def _clean(text: str | None) -> str | None:
    # An upstream error snippet may hold NUL, which PostgreSQL text refuses (a poison record).
    return text.replace("\x00", "\ufffd") if text and "\x00" in text else text


# Longest ``error`` kept: gateway messages can quote what the client sent (an unknown model name).
MAX_ERROR_CHARS = 1024
# Metadata capture: the body's own keys and roles become dict keys of the record; bound them.
MAX_PARAMS = 32
MAX_ROLES = 8
MAX_NAME_CHARS = 64


def _text(raw: bytes | None, limit: int) -> str | None:
    """A header value as text, cut to ``limit`` bytes (``check_headers`` refuses longer ones,
    but records of requests answered before that check, a 401, still see them)."""
    if raw is None:
        return None
    if len(raw) <= limit:
        return raw.decode("utf-8", "replace")
    return raw[:limit].decode("utf-8", "replace") + f"… [truncated: {len(raw)} bytes]"


def _bounded(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"… [truncated: {len(text)} chars]"


class RecordBuilder:
    """Turns a ``RequestContext`` into a record dict, applying the body capture policy."""

    def __init__(self, audit: Audit) -> None:
        self.capture = audit.body_capture
        self.redact = frozenset(f for f in audit.redact_fields if "." not in f)
        self.redact_paths = [tuple(f.split(".")) for f in audit.redact_fields if "." in f]
        encoded = [(h, h.encode("latin-1")) for h in audit.required_headers]
        self.extra_headers = [(h, raw) for h, raw in encoded if raw not in HEADER_COLUMNS]
        self.max_header = audit.max_header_bytes
        self.max_body = audit.max_body_capture_bytes

    def build(self, ctx: RequestContext) -> dict[str, Any]:
        """The record of one finished request (cheap: a few dozen dict operations)."""
        now = perf_counter()
        h = ctx.headers
        usage = ctx.usage
        inp = out = cached = None
        if usage:
            inp = _int(usage.get("prompt_tokens"))
            out = _int(usage.get("completion_tokens"))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                cached = _int(details.get("cached_tokens"))
        ident = ctx.identity
        replica = ctx.replica
        body: dict[str, Any] | None = None
        if self.capture != "none" and ctx.body is not None:
            body = self.metadata(ctx) if self.capture == "metadata" else self.full_bounded(ctx)
        cap = self.max_header
        if self.extra_headers:
            body = body or {}
            body["headers"] = {name: _text(h.get(raw), cap) for name, raw in self.extra_headers}
        latency = now - ctx.t0
        return {
            "request_id": _bounded(ctx.request_id, cap),
            "ts": round(time() - latency, 6),  # when the request arrived
            "key_id": ident.key_id if ident is not None else None,
            "key_name": ident.key_name if ident is not None else None,
            "source": _text(h.get(b"x-llm-source"), cap),
            "user": _text(h.get(b"x-llm-user"), cap),
            "request_type": _text(h.get(b"x-llm-request-type"), cap),
            "client": _bounded(ctx.client, cap),  # an address, unless a proxy header made it text
            "model": _bounded(ctx.model, cap),
            "replica": replica.name if replica is not None else None,
            "tier": str(replica.tier) if replica is not None else None,
            "stream": bool(ctx.stream),
            "status": int(ctx.status),
            "error": _clean(_bounded(ctx.error, MAX_ERROR_CHARS)),
            "latency_ms": round(latency * 1000.0, 3),
            "ttft_ms": round(ctx.ttfb * 1000.0, 3) if ctx.ttfb is not None else None,
            "input_tokens": inp,
            "output_tokens": out,
            "cached_tokens": cached,
            "bytes_in": int(ctx.bytes_in),
            "bytes_out": int(ctx.bytes_out),
            "retries": max(0, ctx.attempts - 1),
            "body": body,
        }

    # body capture ------------------------------------------------------------------------

    @staticmethod
    def metadata(ctx: RequestContext) -> dict[str, Any]:
        """Shape without content: message count, roles, sizes, scalar parameters."""
        body = ctx.body or {}
        meta: dict[str, Any] = {}
        messages = body.get("messages")
        if isinstance(messages, list):
            roles: dict[str, int] = {}
            chars = 0
            for m in messages:
                if isinstance(m, dict):
                    role = str(m.get("role"))[:MAX_NAME_CHARS]
                    if role not in roles and len(roles) >= MAX_ROLES:
                        role = "(other)"  # a client can invent any number of roles
                    roles[role] = roles.get(role, 0) + 1
                    chars += _content_chars(m.get("content"))
            meta["messages"] = len(messages)
            meta["roles"] = roles
            meta["chars"] = chars
        prompt = body.get("prompt")
        if prompt is not None:
            meta["prompt_chars"] = _content_chars(prompt)
        tools = body.get("tools")
        if isinstance(tools, list):
            meta["tools"] = len(tools)
        params = {}
        for k, v in body.items():
            if k in CONTENT_FIELDS or k == "model" or len(k) > MAX_NAME_CHARS:
                continue
            if isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= 64) or v is None:
                params[k] = v
                if len(params) >= MAX_PARAMS:
                    meta["params_truncated"] = True
                    break
        meta["params"] = params
        return meta

    def full_bounded(self, ctx: RequestContext) -> dict[str, Any]:
        """``full``, unless what it keeps is over ``max_body_capture_bytes``: then the metadata,
        marked ``truncated``; the metadata too for a body JSON cannot re-encode (nested past
        orjson's 254 levels: the gateway relays such a body as received)."""
        out = self.full(ctx)
        try:
            size = len(orjson.dumps(out))
        except orjson.JSONEncodeError:
            meta = self.metadata(ctx)
            meta["truncated"] = "captured body nested too deep to store"
            return meta
        if size > self.max_body:
            meta = self.metadata(ctx)
            meta["truncated"] = f"captured body of {size} bytes over the {self.max_body}-byte bound"
            return meta
        return out

    def full(self, ctx: RequestContext) -> dict[str, Any]:
        """The request body as the client sent it, with ``redact_fields`` replaced."""
        body = dict(ctx.body or {})
        if ctx.model is not None:
            body["model"] = ctx.model  # the relay swaps an alias for the upstream model id
        if ctx.stream and not ctx.want_usage:
            _strip_added_usage(body)
        out = _redact(body, self.redact)
        for path in self.redact_paths:
            _redact_path(out, path)
        return out


def _strip_added_usage(body: dict[str, Any]) -> None:
    # The relay asks streaming replicas for usage; that is the gateway's, not the client's.
    so = body.get("stream_options")
    if isinstance(so, dict) and "include_usage" in so:
        rest = {k: v for k, v in so.items() if k != "include_usage"}
        if rest:
            body["stream_options"] = rest
        else:
            body.pop("stream_options", None)


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(_content_chars(p.get("text") if isinstance(p, dict) else p) for p in content)
    return 0


def _redact(value: Any, names: frozenset[str]) -> Any:
    """A copy of ``value`` with every key in ``names`` (at any depth) replaced by REDACTED."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in names else _redact(v, names)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, names) for v in value]
    return value


def _redact_path(value: Any, path: Iterable[str]) -> None:
    keys = list(path)
    node = value
    for k in keys[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(k), dict):
            return
        node = node[k]
    if isinstance(node, dict) and keys[-1] in node:
        node[keys[-1]] = REDACTED
