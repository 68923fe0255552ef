"""Store migrations on SQLite and real PostgreSQL: the audit_records indexes of 0002, up and
down, in step with tables.py, and used by the queries ``fortress audit`` issues."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, event, func, inspect, select
from typer.testing import CliRunner

from fortress.audit.query import Filters, query_records, verify
from fortress.store import tables
from fortress.store.db import alembic_config, dispose_engines, get_engine, migrate

# Stated here rather than imported from the migration, so a typo in either is caught.
AUDIT_INDEXES = {
    "ix_audit_records_ts": ["ts"],
    "ix_audit_records_request_id": ["request_id"],
    "ix_audit_records_key_id_ts": ["key_id", "ts"],
    "ix_audit_records_key_name_ts": ["key_name", "ts"],
    "ix_audit_records_user_ts": ["user", "ts"],
}
KEY_INDEXES = {"ix_audit_records_key_id_ts", "ix_audit_records_key_name_ts"}
HEAD = "0004"  # the latest revision (0004 adds ws_connections and leaves audit_records alone)


def audit_indexes(engine: Engine) -> dict[str, list[str]]:
    """name → columns of every secondary index on audit_records, as the database reports them."""
    found = inspect(engine).get_indexes("audit_records")
    assert not any(ix["unique"] for ix in found)
    return {str(ix["name"]): list(ix["column_names"]) for ix in found}


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def downgrade(url: str, to: str) -> None:
    with get_engine(url).connect() as conn:
        command.downgrade(alembic_config(conn), to)
        conn.commit()


def add_records(engine: Engine, *rows: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(tables.audit_records.insert(), list(rows))


def record(seq: int, ts: float, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"gateway_id": "gw-1", "seq": seq, "request_id": f"req-{seq}", "ts": ts}
    row.update({"key_id": "key_1", "key_name": "billing-prod", "user": "alice", "status": 200})
    row.update(over)
    return row


def capture_selects(engine: Engine, run: Callable[[], object]) -> list[tuple[str, Any]]:
    """The SELECTs on audit_records that ``run`` sends through ``engine``, with parameters."""
    seen: list[tuple[str, Any]] = []

    def listen(_conn: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM audit_records" in statement:
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", listen)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert seen, "nothing read audit_records"
    return seen


def sqlite_plan(engine: Engine, statement: str, params: Any) -> list[str]:
    """The detail lines of SQLite's EXPLAIN QUERY PLAN for one statement, on a new connection
    (a pooled one may hold the EXPLAIN prepared before a migration, plan included)."""
    con = sqlite3.connect(str(engine.url.database))
    try:
        return [str(r[-1]) for r in con.execute("EXPLAIN QUERY PLAN " + statement, params)]
    finally:
        con.close()


def pg_plan(engine: Engine, statement: str, params: Any) -> str:
    """PostgreSQL's plan for one statement with sequential scans priced out, so that the plan
    of an almost empty table shows what it would do with a large one: an index where one fits,
    ``Seq Scan`` where none does."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        return "\n".join(str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + statement, params))


def test_upgrade_to_head_creates_the_audit_indexes(db_url: str) -> None:
    engine = migrate(db_url, "0002")
    assert revision(engine) == "0002"
    assert audit_indexes(engine) == AUDIT_INDEXES
    migrate(db_url)
    assert revision(engine) == HEAD
    assert audit_indexes(engine) == AUDIT_INDEXES
    migrate(db_url)  # at head already: nothing to do
    assert audit_indexes(engine) == AUDIT_INDEXES


def test_downgrade_to_0001_drops_them_and_upgrade_brings_them_back(db_url: str) -> None:
    engine = migrate(db_url)
    add_records(engine, record(1, 100.0), record(2, 200.0, key_id=None, key_name=None, user=None))
    downgrade(db_url, "0001")
    assert revision(engine) == "0001"
    assert audit_indexes(engine) == {}
    assert "ix_api_keys_updated_at" in {ix["name"] for ix in inspect(engine).get_indexes("api_keys")}
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tables.audit_records)).scalar() == 2
    migrate(db_url)  # builds the indexes over the rows already there
    assert revision(engine) == HEAD
    assert audit_indexes(engine) == AUDIT_INDEXES
    assert [r["seq"] for r in query_records(engine, Filters(key="billing-prod"))] == [1]


def test_tables_py_and_the_migrated_schema_agree(db_url: str) -> None:
    declared = {ix.name: [c.name for c in ix.columns] for ix in tables.audit_records.indexes}
    assert declared == AUDIT_INDEXES
    engine = migrate(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), tables.metadata)
    assert diff == []


def test_audit_query_for_a_key_and_a_time_window_searches_the_key_indexes_on_sqlite(tmp_path: Path) -> None:
    from fortress.cli.main import app

    tmp_path = tmp_path.resolve()  # as database_url() spells it: the CLI then uses this engine
    url = f"sqlite:///{tmp_path / 'fortress.db'}"
    engine = migrate(url)
    add_records(
        engine,
        record(1, 1000.0),
        record(2, 2000.0),  # by key id
        record(3, 2500.0, key_id="key_2", key_name="other"),
        record(4, 2600.0, key_id="billing-prod", key_name="renamed"),  # an id that is the name
        record(5, 4000.0),
    )
    config = tmp_path / "fortress.yaml"
    config.write_text(f"state_dir: {tmp_path}\n")
    args = ["audit", "query", "-c", str(config), "--key", "billing-prod"]
    args += ["--since", "1500", "--until", "3000", "--json"]
    result: Any = None

    def run() -> None:
        nonlocal result
        result = CliRunner().invoke(app, args)

    try:
        (statement, params), *_ = capture_selects(engine, run)
        assert result.exit_code == 0, result.output
        assert '"seq": 4' in result.output and '"seq": 2' in result.output
        assert '"seq": 1' not in result.output and '"seq": 3' not in result.output

        plan = sqlite_plan(engine, statement, params)
        on_table = [line for line in plan if "audit_records" in line]
        assert on_table, plan
        assert all(line.startswith("SEARCH audit_records USING INDEX ") for line in on_table), plan
        assert {line.split()[4] for line in on_table} == KEY_INDEXES, plan

        # The same statement without 0002's indexes reads the whole table: the check above can fail.
        downgrade(url, "0001")
        assert "SCAN audit_records" in sqlite_plan(engine, statement, params)
    finally:
        dispose_engines()


def test_audit_verify_reads_each_chain_through_the_primary_key_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fortress.db'}"
    engine = migrate(url)
    add_records(engine, *(record(i, float(i)) for i in range(1, 6)))
    try:
        selects = capture_selects(engine, lambda: verify(engine, b"secret"))
        for statement, params in selects:
            plan = sqlite_plan(engine, statement, params)
            # An index (the primary key) for every read, in its order: no table scan, no sort.
            assert all("USING" in line and "INDEX" in line for line in plan if "audit_records" in line), plan
            assert not any("TEMP B-TREE" in line for line in plan), plan
    finally:
        dispose_engines()


def test_audit_query_uses_the_indexes_on_postgresql(pg_url: str) -> None:
    engine = migrate(pg_url)
    add_records(engine, record(1, 1000.0), record(2, 2000.0, key_id="key_2", key_name="other"))

    def statement(filters: Filters) -> tuple[str, Any]:
        return capture_selects(engine, lambda: query_records(engine, filters))[0]

    by_key = statement(Filters(key="billing-prod"))
    by_key_and_time = statement(Filters(key="billing-prod", since=500.0, until=1500.0))
    by_user = statement(Filters(user="alice", since=500.0))
    by_request = statement(Filters(request_id="req-2"))

    plan = pg_plan(engine, *by_key)
    assert "Seq Scan" not in plan and all(name in plan for name in KEY_INDEXES), plan
    for stmt in (by_key_and_time, by_user, by_request):
        plan = pg_plan(engine, *stmt)
        assert "Seq Scan" not in plan and "ix_audit_records_" in plan, plan

    downgrade(pg_url, "0001")
    assert "Seq Scan on audit_records" in pg_plan(engine, *by_key)
