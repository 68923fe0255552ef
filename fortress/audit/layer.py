"""The audit layer the gateway calls (``AuditLayer``): required headers, then one durable record
per request.

``record`` builds the record from the request context with plain dict operations and awaits
the journal's group commit; the store and archive are fed by the shipper thread, never on the
request path. If the journal cannot write, ``record`` raises ``JournalError`` and the request
fails rather than complete without a record.

Bounds: ``check_headers`` refuses audit headers longer than ``audit.max_header_bytes`` (400),
and answers 503 while the journal's disk is below ``audit.min_free_bytes``, so that what is
left is kept for the records of requests already admitted. Both read only memory.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fortress.audit.archive import ArchiveSink, open_target
from fortress.audit.journal import DiskUsage, Journal, JournalError, load_gateway_id, statvfs_usage
from fortress.audit.records import RecordBuilder
from fortress.audit.shipper import Shipper
from fortress.audit.sql import SqlSink
from fortress.config import FortressConfig
from fortress.core.context import RequestContext
from fortress.core.errors import GatewayError
from fortress.core.loops import running_loop
from fortress.core.secret import load_secret
from fortress.store.db import database_url, describe_error

log = logging.getLogger("fortress.audit")


def journal_dir(config: FortressConfig) -> Path:
    """``audit.journal_dir``, by default ``<state_dir>/journal``."""
    if config.audit.journal_dir:
        return Path(config.audit.journal_dir).expanduser()
    return Path(config.state_dir).expanduser() / "journal"


# The headers a record stores beside the required ones: each is bounded like them.
OPTIONAL_HEADERS = ("x-request-id",)
JOURNAL_FULL_RETRY_AFTER = 10


def header_too_long_error(name: str, size: int, limit: int) -> GatewayError:
    """400 in OpenAI's format naming the audit header over ``audit.max_header_bytes``."""
    return GatewayError(
        400,
        f"The {name} header is {size} bytes long; audit headers may be at most {limit} bytes.",
        "invalid_request_error",
        "header_too_long",
        name,
    )


def journal_full_error(free: int, floor: int) -> GatewayError:
    """503 in OpenAI's format: the journal's disk is below its free-space floor."""
    return GatewayError(
        503,
        f"The gateway cannot record requests right now: its audit journal's disk has {free} bytes "
        f"free, below the {floor} it keeps in reserve. Please try again later.",
        "service_unavailable",
        "audit_journal_full",
        headers=[(b"retry-after", str(JOURNAL_FULL_RETRY_AFTER).encode())],
    )


USER_HEADER = "x-llm-user"
USER_HEADER_RAW = USER_HEADER.encode()


def missing_headers_error(missing: list[str], required: list[str]) -> GatewayError:
    """400 in OpenAI's format naming every missing audit header."""
    plural = "s" if len(missing) > 1 else ""
    return GatewayError(
        400,
        f"Missing required audit header{plural}: {', '.join(missing)}. Every request must send "
        f"{', '.join(required)} (x-request-id is optional).",
        "invalid_request_error",
        "missing_audit_headers",
        ",".join(missing),
    )


class AuditTrail:
    """Journal + shipper for one gateway process (implements ``AuditLayer``)."""

    def __init__(self, config: FortressConfig, disk_usage: DiskUsage = statvfs_usage) -> None:
        self.config = config
        self.disk_usage = disk_usage  # how the journal reads its free space (tests replace it)
        self.required = [(h, h.encode("latin-1")) for h in config.audit.required_headers]
        required = USER_HEADER in config.audit.required_headers
        self.user_from_body = config.audit.user_from_body and required
        # Plans whose keys may use the body's `user` (UsagePlan.user_from_body).
        self.body_user_plans = frozenset(n for n, p in config.plans.items() if p.user_from_body and required)
        names = [*config.audit.required_headers, *OPTIONAL_HEADERS]
        self.bounded = [(h, h.encode("latin-1")) for h in dict.fromkeys(names)]
        self.max_header = config.audit.max_header_bytes
        self.builder = RecordBuilder(config.audit)
        self.journal_dir = journal_dir(config)
        self.journal: Journal | None = None
        self.shipper: Shipper | None = None
        self.refused = 0  # requests answered 503 because the journal's disk was low
        self.unrecorded = 0  # gateway-refused requests left without a record for the same reason
        self.write_failures = 0  # requests that failed because the journal could not write
        # Requests begun whose record is not appended yet: the journal's group commit stops
        # waiting for more when this is 0 (``Journal.on_the_way``).
        self.on_the_way = 0
        self._failure_logged = float("-inf")  # loop time of the last ERROR about it

    async def start(self) -> None:
        """Recover the journal, start its writer thread and the shipper."""
        await asyncio.to_thread(self._start)

    async def stop(self) -> None:
        """Write what is queued, ship what is left (bounded), flush the archive, close."""
        await asyncio.to_thread(self._stop)

    def begin(self, ctx: RequestContext) -> None:
        """Count ``ctx`` as on its way to the journal until ``record`` or ``end``."""
        if not ctx.unrecorded:
            ctx.unrecorded = True
            self.on_the_way += 1

    def end(self, ctx: RequestContext) -> None:
        """Stop counting ``ctx`` if it never reached ``record``."""
        if ctx.unrecorded:
            ctx.unrecorded = False
            self.on_the_way -= 1

    def check_headers(self, ctx: RequestContext) -> None:
        """Raise a 400 naming the audit headers that are missing or longer than
        ``audit.max_header_bytes``, or a 503 while the journal's disk is below its floor."""
        headers = ctx.headers
        missing = [name for name, raw in self.required if not headers.get(raw, b"").strip()]
        if USER_HEADER in missing and self._body_user_allowed(ctx):
            missing.remove(USER_HEADER)  # the body's `user` may stand in: check_body decides
        if missing:
            raise missing_headers_error(missing, [name for name, _ in self.required])
        limit = self.max_header
        for name, raw in self.bounded:
            value = headers.get(raw)
            if value is not None and len(value) > limit:
                raise header_too_long_error(name, len(value), limit)
        journal = self.journal
        if journal is not None and journal.low_space:
            self.refused += 1
            raise journal_full_error(journal.disk_free, journal.min_free_bytes)

    def check_body(self, ctx: RequestContext) -> None:
        """With ``audit.user_from_body``, a request without ``x-llm-user`` is attributed to the
        body's standard ``user`` field (many clients can set only that); 400 when it has neither."""
        if ctx.headers.get(USER_HEADER_RAW, b"").strip() or not self._body_user_allowed(ctx):
            return
        user = ctx.body.get("user") if ctx.body is not None else None
        if not isinstance(user, str) or not user.strip():
            raise GatewayError(
                400,
                f"Missing the end user: send the {USER_HEADER} header or the body's 'user' field.",
                "invalid_request_error",
                "missing_audit_headers",
                "user",
            )
        raw = user.encode()
        if len(raw) > self.max_header:
            raise header_too_long_error("user", len(raw), self.max_header)
        ctx.headers[USER_HEADER_RAW] = raw  # recorded as if it came in the header

    def _body_user_allowed(self, ctx: RequestContext) -> bool:
        if self.user_from_body:
            return True
        ident = ctx.identity  # set by the access layer, which checks the key first
        return ident is not None and ident.plan in self.body_user_plans

    async def record(self, ctx: RequestContext) -> None:
        """Append the request's record; returns once it is durable. While the journal's disk is
        below its floor, a request the gateway refused before any replica saw it (this layer's
        503, a 401, a 429) is left unrecorded and counted, so a flood of refused requests cannot
        eat the reserve kept for the records of admitted ones."""
        self.end(ctx)  # handed over: no longer on its way
        journal = self.journal
        if journal is None:
            raise JournalError("the audit layer is not started")
        if journal.low_space and ctx.attempts == 0 and ctx.status >= 400:
            self.unrecorded += 1
            return
        try:
            await journal.submit(self.builder.build(ctx))
        except JournalError as exc:
            # Nothing is answered that is not recorded: the request ends with this 503 instead
            # of its answer (or with an error event, a stream that has started), unrecorded.
            self.write_failures += 1
            now = running_loop().time()
            if now - self._failure_logged >= 60.0:
                self._failure_logged = now
                log.error("audit journal cannot write: %s; requests fail until it can", exc)
            raise GatewayError(
                503,
                f"The gateway cannot record requests right now: its audit journal failed to write "
                f"({exc}). The answer was withheld; please try again later.",
                "service_unavailable",
                "audit_journal_unavailable",
                headers=[(b"retry-after", b"10")],
            ) from None

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: journal head, fsyncs and disk, what the store has, shipper state.

        ``journal_disk_*`` is the journal's file system as last read (at most a second old);
        ``journal_refused_total`` counts requests answered 503 ``audit_journal_full`` and
        ``journal_unrecorded_total`` the refused requests left without a record meanwhile.
        ``shipper_healthy`` is false from a failed attempt to the next one that works;
        ``shipper_backoff_seconds`` is the wait between attempts then (0 while healthy).
        """
        j, s = self.journal, self.shipper
        return {
            "journal_seq": j.durable_seq if j else 0,
            "journal_fsyncs": j.fsyncs if j else 0,
            "journal_disk_free_bytes": j.disk_free if j else 0,
            "journal_disk_total_bytes": j.disk_total if j else 0,
            "journal_min_free_bytes": self.config.audit.min_free_bytes,
            "journal_low_space": j.low_space if j else False,
            "journal_refused_total": self.refused,
            "journal_unrecorded_total": self.unrecorded,
            "journal_write_failures_total": self.write_failures,
            "store_seq": s.store_pos if s else 0,
            "backlog": (j.durable_seq - s.store_pos) if j and s else 0,
            "shipper_error": s.last_error if s else None,
            "shipper_healthy": s.healthy if s else False,
            "shipper_backoff_seconds": s.backoff if s else 0.0,
            "shipper_failures_total": s.failures if s else 0,
            "shipper_outages_total": s.outages if s else 0,
        }

    # internals ---------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.config
        a = cfg.audit
        secret = load_secret(cfg)
        gateway_id = load_gateway_id(cfg.state_dir)
        store = SqlSink(database_url(cfg), gateway_id)
        floor = None
        try:
            floor = store.head()  # migrates the store first
        except Exception as exc:  # the journal works without the store; the shipper retries
            # The shipper logs the outage (one WARNING) when its first attempt fails too.
            log.info(
                "audit store unreachable at start (%s): records wait in the journal", describe_error(exc)
            )
        journal = Journal(
            self.journal_dir,
            gateway_id,
            secret,
            a.group_commit_ms,
            a.segment_bytes,
            min_free_bytes=a.min_free_bytes,
            disk_usage=self.disk_usage,
            on_the_way=lambda: self.on_the_way,
        )
        journal.open(floor)
        store.gateway_id = journal.gateway_id
        archive = None
        if a.archive_dir:
            state = journal.dir / "archive-state.json"
            archive = ArchiveSink(open_target(a.archive_dir), journal.gateway_id, state, a.archive_every)
        shipper = Shipper(journal, store, archive, a.ship_batch, a.anchor_every, interval=a.ship_interval)
        shipper.start()
        self.journal, self.shipper = journal, shipper
        log.info("audit journal %s at seq %d (gateway %s)", journal.dir, journal.head_seq, journal.gateway_id)

    def _stop(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.shipper is not None:
            self.shipper.stop(timeout=10.0)


def build_audit(config: FortressConfig) -> AuditTrail:
    """The audit layer for ``config`` (the runtime builds it when ``audit.enabled``)."""
    return AuditTrail(config)
