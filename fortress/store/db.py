"""Engines and migrations.

``database.url`` picks the database: SQLite by default (``<state_dir>/fortress.db``), PostgreSQL
with ``postgresql+psycopg://user:pass@host/db``. ``migrate(url)`` brings the schema to the latest
Alembic revision; it is safe to call from several processes starting at once (a file lock on
SQLite, an advisory lock on PostgreSQL).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from fortress.config import FortressConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Seconds to wait for a PostgreSQL connection unless the URL says (``?connect_timeout=``): a
# host that drops packets must not hold a key-cache sync or a shipper attempt for minutes.
PG_CONNECT_TIMEOUT = 5
_PG_LOCK_ID = 0x466F7274  # "Fort": the advisory lock that serialises migrations

log = logging.getLogger("fortress.store")
_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def database_url(config: FortressConfig) -> str:
    """The configured SQLAlchemy URL, or the SQLite file under ``state_dir``."""
    if config.database.url:
        return config.database.url
    path = Path(config.state_dir).expanduser().resolve() / "fortress.db"
    return f"sqlite:///{path}"


def describe_error(exc: BaseException) -> str:
    """Why a database call failed, in one line for a log: the driver's own error rather than
    SQLAlchemy's wrapper (which adds the statement and a link), newlines folded."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    if len(text) > 300:
        text = text[:300] + "…"
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


def get_engine(url: str) -> Engine:
    """One pooled engine per URL for the whole process."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create(url)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, shutdown)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _create(url: str) -> Engine:
    """Build an engine without connecting: a database that is down fails on first use, where
    the callers retry, never here."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        args: dict[str, Any] = {}
        if u.get_backend_name() == "postgresql" and "connect_timeout" not in u.query:
            args["connect_timeout"] = PG_CONNECT_TIMEOUT
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=args)
    if u.database and u.database != ":memory:":
        # An unreachable directory (unmounted, no permission) surfaces as the connection's error.
        with contextlib.suppress(OSError):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets gateways read keys while the CLI or the audit shipper writes.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


def alembic_config(connection: Connection) -> Config:
    """An Alembic config built in code (no alembic.ini) bound to ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        with engine.connect() as conn:
            yield conn
        return
    with open(database + ".migrate.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def migrate(url: str, revision: str = "head") -> Engine:
    """Upgrade the database at ``url`` to ``revision`` and return its engine.

    Raises when the database cannot be reached; a gateway's callers (the key cache, the audit
    shipper) retry in the background, while the CLI reports it."""
    from alembic.runtime.migration import MigrationContext

    engine = get_engine(url)
    with _migration_lock(engine) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(alembic_config(conn), revision)
        conn.commit()
        after = MigrationContext.configure(conn).get_current_revision()
    if before != after:
        where = make_url(url).render_as_string(hide_password=True)
        log.info("database %s: schema %s -> %s", where, before or "(empty)", after)
    return engine
