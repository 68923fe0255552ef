"""The audit layer the gateway calls (``AuditLayer``): required headers, then one durable record
per request.

``record`` builds the record from the request context with plain dict operations and awaits
the journal's group commit; the store and archive are fed by the shipper thread, never on the
request path. If the journal cannot write, ``record`` raises ``JournalError`` and the request
fails rather than complete without a record.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fortress.audit.archive import ArchiveSink, open_target
from fortress.audit.journal import Journal, JournalError, load_gateway_id
from fortress.audit.records import RecordBuilder
from fortress.audit.shipper import Shipper
from fortress.audit.sql import SqlSink
from fortress.config import FortressConfig
from fortress.core.context import RequestContext
from fortress.core.errors import GatewayError
from fortress.core.secret import load_secret
from fortress.store.db import database_url

log = logging.getLogger("fortress.audit")


def journal_dir(config: FortressConfig) -> Path:
    """``audit.journal_dir``, by default ``<state_dir>/journal``."""
    if config.audit.journal_dir:
        return Path(config.audit.journal_dir).expanduser()
    return Path(config.state_dir).expanduser() / "journal"


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

    def __init__(self, config: FortressConfig) -> None:
        self.config = config
        self.required = [(h, h.encode("latin-1")) for h in config.audit.required_headers]
        self.builder = RecordBuilder(config.audit)
        self.journal_dir = journal_dir(config)
        self.journal: Journal | None = None
        self.shipper: Shipper | None = None

    async def start(self) -> None:
        """Recover the journal, start its writer thread and the shipper."""
        await asyncio.to_thread(self._start)

    async def stop(self) -> None:
        """Write what is queued, ship what is left (bounded), flush the archive, close."""
        await asyncio.to_thread(self._stop)

    def check_headers(self, ctx: RequestContext) -> None:
        headers = ctx.headers
        missing = [name for name, raw in self.required if not headers.get(raw, b"").strip()]
        if missing:
            raise missing_headers_error(missing, [name for name, _ in self.required])

    async def record(self, ctx: RequestContext) -> None:
        journal = self.journal
        if journal is None:
            raise JournalError("the audit layer is not started")
        await journal.append(self.builder.build(ctx))

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: journal head, fsyncs, what the store has, shipper state."""
        j, s = self.journal, self.shipper
        return {
            "journal_seq": j.durable_seq if j else 0,
            "journal_fsyncs": j.fsyncs if j else 0,
            "store_seq": s.store_pos if s else 0,
            "backlog": (j.durable_seq - s.store_pos) if j and s else 0,
            "shipper_error": s.last_error if s else None,
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
            floor = store.head()
        except Exception as exc:  # the journal works without the store; the shipper retries
            log.warning("audit store unreachable at start (%s): records wait in the journal", exc)
        journal = Journal(self.journal_dir, gateway_id, secret, a.group_commit_ms, a.segment_bytes)
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
