"""Shared bits of the audit tests: sample records, a journal + store in a tmp dir, tampering."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from fortress.audit.journal import Journal
from fortress.audit.sql import SqlSink

SECRET = b"test-secret-0123456789abcdef"


def sample(i: int, ts: float | None = None, **over: Any) -> dict[str, Any]:
    """A record as the audit layer builds it (before the journal seals it)."""
    rec: dict[str, Any] = {
        "request_id": f"req-{i}",
        "ts": time.time() if ts is None else ts,
        "key_id": "key_1",
        "key_name": "alice-laptop",
        "source": "tests",
        "user": "alice",
        "request_type": "chat",
        "client": "127.0.0.1",
        "model": "m",
        "replica": "r1",
        "tier": "primary",
        "stream": i % 2 == 0,
        "status": 200,
        "error": None,
        "latency_ms": 12.5 + i,
        "ttft_ms": 3.25,
        "input_tokens": 10,
        "output_tokens": 20,
        "cached_tokens": 0,
        "bytes_in": 100,
        "bytes_out": 200,
        "retries": 0,
        "body": {"messages": 1, "params": {"temperature": 0.7}} if i % 3 == 0 else None,
    }
    rec.update(over)
    return rec


async def fill(journal: Journal, n: int, start: int = 0, **over: Any) -> list[int]:
    """Append ``n`` sample records one after the other; return their seqs."""
    return [await journal.append(sample(start + i, **over)) for i in range(n)]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def ship_all(journal: Journal, store: SqlSink) -> int:
    """Copy every durable journal record into the store synchronously (no shipper thread)."""
    from fortress.audit.journal import JournalReader

    reader = JournalReader(journal.dir)
    entries = reader.read(0, 10**9, journal.durable)
    store.write([rec for rec, _ in entries])
    return len(entries)


def sql(db: Path, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement with the sqlite3 module, as someone tampering with the file would."""
    con = sqlite3.connect(db)
    try:
        with con:
            return con.execute(statement, args).fetchall()
    finally:
        con.close()


def renumber(db: Path, from_seq: int, delta: int) -> None:
    """Shift the seq of every record >= from_seq by delta, one row at a time (no PK clash)."""
    rows = sql(db, "SELECT seq FROM audit_records WHERE seq >= ? ORDER BY seq", from_seq)
    order = reversed(rows) if delta > 0 else rows
    for (seq,) in order:
        sql(db, "UPDATE audit_records SET seq = ? WHERE seq = ?", seq + delta, seq)
