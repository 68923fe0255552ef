"""Reading the audit trail back from the store: filters, query, export, chain verification."""

from __future__ import annotations

import csv
import datetime as dt
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Engine, Select, and_, or_, select

from fortress.audit.chain import ChainVerifier, Problem
from fortress.audit.records import COLUMNS
from fortress.store import tables

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds from ``15m`` / ``2h`` / ``7d`` (ago), an ISO date or time (UTC unless it
    says otherwise), or a number of epoch seconds."""
    s = text.strip()
    m = _RELATIVE.match(s.lower())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(s)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: use 15m, 2h, 7d, 2025-01-31, 2025-01-31T12:00 or epoch seconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@dataclass
class Filters:
    """What ``fortress audit query`` / ``export`` select; None means any."""

    since: float | None = None
    until: float | None = None
    key: str | None = None  # key id or key name
    user: str | None = None
    source: str | None = None
    model: str | None = None
    status: str | None = None  # "200", "429" or a class: "4xx", "5xx"
    request_id: str | None = None
    gateway: str | None = None

    def where(self) -> Any:
        t = tables.audit_records
        conds: list[Any] = []
        if self.since is not None:
            conds.append(t.c.ts >= self.since)
        if self.until is not None:
            conds.append(t.c.ts < self.until)
        if self.key:
            conds.append(or_(t.c.key_id == self.key, t.c.key_name == self.key))
        for col, value in (
            (t.c.user, self.user),
            (t.c.source, self.source),
            (t.c.model, self.model),
            (t.c.request_id, self.request_id),
            (t.c.gateway_id, self.gateway),
        ):
            if value:
                conds.append(col == value)
        if self.status:
            s = self.status.strip().lower()
            if re.fullmatch(r"[1-5]xx", s):
                lo = int(s[0]) * 100
                conds.append(and_(t.c.status >= lo, t.c.status < lo + 100))
            elif s.isdigit():
                conds.append(t.c.status == int(s))
            else:
                raise ValueError(f"bad status {self.status!r}: use a code (429) or a class (5xx)")
        return and_(*conds) if conds else None


def _select(filters: Filters, newest_first: bool) -> Select[Any]:
    t = tables.audit_records
    stmt = select(*(t.c[c] for c in COLUMNS))
    where = filters.where()
    if where is not None:
        stmt = stmt.where(where)
    if newest_first:
        return stmt.order_by(t.c.ts.desc(), t.c.gateway_id, t.c.seq.desc())
    return stmt.order_by(t.c.ts, t.c.gateway_id, t.c.seq)


def query_records(engine: Engine, filters: Filters, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` records matching ``filters``."""
    with engine.connect() as conn:
        return [dict(zip(COLUMNS, r, strict=True)) for r in conn.execute(_select(filters, True).limit(limit))]


def iter_records(engine: Engine, filters: Filters) -> Iterator[dict[str, Any]]:
    """Every matching record, oldest first, streamed."""
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=2000).execute(_select(filters, False))
        for r in result:
            yield dict(zip(COLUMNS, r, strict=True))


def export(engine: Engine, filters: Filters, fmt: str, out: IO[str]) -> int:
    """Write matching records as JSON lines or CSV (body as JSON text); return how many."""
    n = 0
    if fmt == "jsonl":
        for rec in iter_records(engine, filters):
            out.write(orjson.dumps(rec).decode() + "\n")
            n += 1
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        for rec in iter_records(engine, filters):
            if rec["body"] is not None:
                rec["body"] = orjson.dumps(rec["body"]).decode()
            writer.writerow([rec[c] for c in COLUMNS])
            n += 1
    else:
        raise ValueError(f"unknown format {fmt!r}: use jsonl or csv")
    return n


# -- verification -----------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What ``verify`` found: records checked per gateway, and every problem."""

    records: dict[str, int]
    anchors: dict[str, int]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def read_local_anchors(path: Path) -> dict[str, dict[int, str]]:
    """gateway id → {seq: hash} from an ``anchors.jsonl`` file (torn lines ignored)."""
    out: dict[str, dict[int, str]] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.splitlines():
        try:
            a = orjson.loads(line)
            out.setdefault(str(a["gateway_id"]), {})[int(a["seq"])] = str(a["hash"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return out


def verify(
    engine: Engine, secret: bytes, gateway: str | None = None, anchors_file: Path | None = None
) -> VerifyReport:
    """Recompute every gateway's chain from the store; check anchors (store and local file)."""
    t, ta = tables.audit_records, tables.audit_anchors
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    anchor_counts: dict[str, int] = {}
    local = read_local_anchors(anchors_file) if anchors_file else {}
    with engine.connect() as conn:
        gateways = {r[0] for r in conn.execute(select(t.c.gateway_id).distinct())}
        stored: dict[str, dict[int, str]] = {}
        for g, seq, h in conn.execute(select(ta.c.gateway_id, ta.c.seq, ta.c.hash)):
            stored.setdefault(g, {})[int(seq)] = h
    gateways |= set(stored) | set(local)
    if gateway is not None:
        gateways &= {gateway}
    for g in sorted(gateways):
        anchors = dict(stored.get(g, {}))
        for seq, h in local.get(g, {}).items():
            if anchors.setdefault(seq, h) != h:
                problems.append(Problem(g, seq, "anchor", "the store's and the local anchors file's differ"))
        anchor_counts[g] = len(anchors)
        verifier = ChainVerifier(secret, g, anchors)
        with engine.connect() as conn:
            result = conn.execution_options(yield_per=5000).execute(
                select(*(t.c[c] for c in COLUMNS)).where(t.c.gateway_id == g).order_by(t.c.seq)
            )
            for r in result:
                # Plain str keys (SQLAlchemy's key objects are str subclasses orjson refuses).
                verifier.feed(dict(zip(COLUMNS, r, strict=True)))
        problems += verifier.finish()
        counts[g] = verifier.count
    return VerifyReport(counts, anchor_counts, problems)
