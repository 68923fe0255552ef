"""Fixtures for real services: ``redis_url`` and ``postgres_url`` (one server per session), and
``db_url`` / ``pg_url`` (an empty database of its own per test).

Registered from conftest.py (``pytest_plugins``) so any test module can use them. Each
fixture starts one server for the whole session; tests keep their data apart (key prefixes,
fresh tables).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import PostgresServer, RedisServer
from sqlalchemy import create_engine, text

from fortress.store.db import dispose_engines


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real redis-server started for this test session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL (postgresql+psycopg) of a real PostgreSQL started for this session."""
    server = PostgresServer()
    yield server.url
    server.stop()


def fresh_postgres_database(base: str) -> Iterator[str]:
    """Create a database of its own on the session's PostgreSQL, yield its URL, drop it."""
    name = "t_" + os.urandom(6).hex()
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a new database of its own on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fortress.db'}"
        dispose_engines()
        return
    yield from fresh_postgres_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """An empty PostgreSQL database of its own."""
    yield from fresh_postgres_database(postgres_url)
