"""The store sink: audit records into ``audit_records`` (SQLite or PostgreSQL via fortress.store).

One transaction per batch holds the records, the shipper's offset and, now and then, an anchor,
so the offset can never claim more than the table holds. Inserts ignore rows whose
(gateway_id, seq) already exists: replaying a batch after a crash is harmless.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy import Engine, func, select, update
from sqlalchemy.sql.dml import Insert

from fortress.audit.records import COLUMNS
from fortress.store import tables
from fortress.store.db import migrate

# Fault injection for tests: called at "inserted" (inside the transaction) and "committed".
FaultHook = Callable[[str], None]


def insert_ignoring_duplicates(engine: Engine, table: Any) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the engine's dialect."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    raise ValueError(f"the audit store supports SQLite and PostgreSQL, not {engine.dialect.name}")


def _insert_sql(engine: Engine, columns: tuple[str, ...]) -> str:
    """A driver-level ``INSERT ... ON CONFLICT DO NOTHING`` into ``audit_records`` of ``columns``.
    SQLAlchemy's per-row parameter processing costs more than SQLite's insert itself; rows are
    prepared here as plain tuples instead."""
    quote = engine.dialect.identifier_preparer.quote
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    cols = ", ".join(quote(c) for c in columns)
    marks = ", ".join([mark] * len(columns))
    return f"INSERT INTO audit_records ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING"


# Columns a record often leaves empty. Python's sqlite3 binds a None through its adapter
# lookup, about 0.3 µs each (a batch with four per row took twice as long to insert), so a
# batch is inserted per *shape* (which of these are None) with those columns left out: they
# are NULL all the same. Other columns are rarely None; when they are, they are bound as None.
OPTIONAL = (
    "key_id",
    "key_name",
    "error",
    "ttft_ms",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "body",
)
_OPTIONAL_VALUES = operator.itemgetter(*OPTIONAL)
_NONE = itertools.repeat(None)


class _Shape:
    """The insert of the records whose None columns among ``OPTIONAL`` are ``absent``."""

    __slots__ = ("body", "columns", "sql", "values")

    def __init__(self, engine: Engine, absent: frozenset[str]) -> None:
        self.columns = tuple(c for c in COLUMNS if c not in absent)
        self.sql = _insert_sql(engine, self.columns)
        self.values = operator.itemgetter(*self.columns)
        self.body = self.columns.index("body") if "body" in self.columns else -1

    def row(self, rec: dict[str, Any]) -> tuple[Any, ...]:
        """A record's values in this shape's column order. ``stream`` stays a bool: sqlite3
        binds it as 0/1 and PostgreSQL as a boolean."""
        try:
            row: tuple[Any, ...] = self.values(rec)
        except KeyError:
            row = tuple(rec.get(c) for c in self.columns)
        at = self.body
        if at < 0:
            return row  # the common case (body_capture: none): the itemgetter's tuple as it is
        body = row[at]
        if body is None:
            return row
        # Sorted like the journal's JSON, whether the record was parsed from it or kept in memory.
        return (*row[:at], orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode(), *row[at + 1 :])


class SqlSink:
    """Writes one gateway's records to the database at ``url``."""

    name = "store"

    def __init__(self, url: str, gateway_id: str, fault: FaultHook | None = None) -> None:
        self.url = url
        self.gateway_id = gateway_id
        self.fault = fault
        self.engine: Engine | None = None
        self._insert: Insert | None = None
        self._shapes: dict[tuple[bool, ...], _Shape] = {}
        self._offset_insert: Insert | None = None
        self._anchor_insert: Insert | None = None

    def connect(self) -> Engine:
        """Migrate the schema (once) and return the engine."""
        if self.engine is None:
            engine = migrate(self.url)
            self._insert = insert_ignoring_duplicates(engine, tables.audit_records)
            self._offset_insert = insert_ignoring_duplicates(engine, tables.shipper_offsets)
            self._anchor_insert = insert_ignoring_duplicates(engine, tables.audit_anchors)
            self.engine = engine
        return self.engine

    def offset(self) -> int:
        """The last seq this gateway shipped here (0: none)."""
        engine = self.connect()
        t = tables.shipper_offsets
        with engine.connect() as conn:
            value = conn.execute(select(t.c.seq).where(t.c.gateway_id == self.gateway_id)).scalar()
        return int(value or 0)

    def head(self) -> tuple[int, str] | None:
        """(seq, hash) of this gateway's newest stored record."""
        engine = self.connect()
        t = tables.audit_records
        with engine.connect() as conn:
            top = conn.execute(select(func.max(t.c.seq)).where(t.c.gateway_id == self.gateway_id)).scalar()
            if top is None:
                return None
            h = conn.execute(
                select(t.c.hash).where(t.c.gateway_id == self.gateway_id, t.c.seq == top)
            ).scalar()
        return int(top), str(h)

    def _by_shape(
        self, engine: Engine, records: list[dict[str, Any]]
    ) -> list[tuple[_Shape, list[tuple[Any, ...]]]]:
        """The records as rows grouped by shape (which OPTIONAL columns they leave None)."""
        groups: dict[tuple[bool, ...], list[dict[str, Any]]] = {}
        for rec in records:
            try:
                key = tuple(map(operator.is_, _OPTIONAL_VALUES(rec), _NONE))
            except KeyError:
                key = tuple(rec.get(c) is None for c in OPTIONAL)
            group = groups.get(key)
            if group is None:
                group = groups[key] = []
            group.append(rec)
        out = []
        for key, recs in groups.items():
            shape = self._shapes.get(key)
            if shape is None:
                absent = frozenset(c for c, none in zip(OPTIONAL, key, strict=True) if none)
                shape = self._shapes[key] = _Shape(engine, absent)
            out.append((shape, list(map(shape.row, recs))))
        return out

    def write(self, records: list[dict[str, Any]], anchor: tuple[int, str, float] | None = None) -> None:
        """Insert ``records`` (ignoring ones already there), advance the offset, add the anchor."""
        if not records and anchor is None:
            return
        engine = self.connect()
        assert self._insert is not None and self._offset_insert is not None
        t = tables.shipper_offsets
        with engine.begin() as conn:
            if records:
                last = records[-1]["seq"]
                for shape, rows in self._by_shape(engine, records):
                    conn.exec_driver_sql(shape.sql, rows)
                if self.fault is not None:
                    self.fault("inserted")
                moved = conn.execute(
                    update(t).where(t.c.gateway_id == self.gateway_id, t.c.seq < last).values(seq=last)
                ).rowcount
                if not moved:
                    conn.execute(self._offset_insert, {"gateway_id": self.gateway_id, "seq": last})
            if anchor is not None:
                assert self._anchor_insert is not None
                seq, h, ts = anchor
                row = {"gateway_id": self.gateway_id, "seq": seq, "hash": h, "ts": ts}
                conn.execute(self._anchor_insert, row)
        if self.fault is not None:
            self.fault("committed")
