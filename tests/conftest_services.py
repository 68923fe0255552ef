"""Session fixtures for real services: ``redis_url`` and ``postgres_url``.

Registered from conftest.py (``pytest_plugins``) so any test module can use them. Each
fixture starts one server for the whole session; tests keep their data apart (key prefixes,
fresh tables).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from services import PostgresServer, RedisServer


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
