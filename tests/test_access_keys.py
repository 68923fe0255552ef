"""API keys in the store (SQLite and PostgreSQL): lifecycle, hashing, the cache and migrations."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from fortress.access.keys import KeyCache, KeyStore, digest
from fortress.config import parse_config
from fortress.core.secret import load_secret
from fortress.store import tables
from fortress.store.db import get_engine, migrate

SECRET = b"test-secret"


def test_migration_creates_the_tables_the_model_declares(db_url: str) -> None:
    engine = migrate(db_url)
    migrate(db_url)  # idempotent
    insp = inspect(engine)
    for table in tables.metadata.sorted_tables:
        cols = {c["name"] for c in insp.get_columns(table.name)}
        assert cols == {c.name for c in table.columns}, table.name
        pk = insp.get_pk_constraint(table.name)["constrained_columns"]
        assert set(pk) == {c.name for c in table.primary_key.columns}, table.name
    assert set(insp.get_pk_constraint("audit_records")["constrained_columns"]) == {"gateway_id", "seq"}


def test_migrations_from_many_processes_at_once(db_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: migrate(db_url), range(4)))
    assert "api_keys" in inspect(get_engine(db_url)).get_table_names()


def test_key_lifecycle_in_the_store(db_url: str) -> None:
    store = KeyStore(migrate(db_url), SECRET)
    key, rec = store.create("bot", "default", ["m2", "m1", "m1"])
    assert key.startswith(rec["prefix"] + "_") and len(rec["prefix"]) == len("fk_") + 8
    assert len(key) >= len(rec["prefix"]) + 1 + 32
    assert rec["models"] == ["m1", "m2"] and rec["status"] == "active"
    with get_engine(db_url).connect() as conn:
        row = conn.execute(select(tables.api_keys)).one()
    assert key not in str(tuple(row))  # only the HMAC is stored
    assert row.hash == digest(SECRET, key.encode()).hex()
    assert [r["id"] for r in store.list()] == [rec["id"]]
    new, rotated = store.rotate(rec["id"], 60)  # type: ignore[misc]
    assert new != key and rotated["previous_prefix"] == rec["prefix"]
    revoked = store.revoke(rec["id"])
    assert revoked is not None and revoked["status"] == "revoked"
    assert store.list(include_revoked=False) == []
    with pytest.raises(ValueError, match="revoked"):
        store.rotate(rec["id"], 60)
    assert store.get("key_nope") is None and store.revoke("key_nope") is None


async def eventually(pred: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Poll ``pred`` while the cache's refresh task runs on this loop."""
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_cache_follows_creates_rotations_and_revocations(db_url: str) -> None:
    store = KeyStore(migrate(db_url), SECRET)
    cache = KeyCache(store, 0.05)
    early, _ = store.create("early", "default", [])
    assert cache.lookup(early.encode()) is None  # lookups read memory only: nothing synced yet
    await cache.start()
    try:
        assert cache.lookup(early.encode()) is not None  # start syncs once before serving
        key, rec = await asyncio.to_thread(store.create, "a", "default", [])
        await eventually(lambda: cache.lookup(key.encode()) is not None, "the new key")
        ident = cache.lookup(key.encode())
        assert ident is not None and ident.key_id == rec["id"] and ident.key_name == "a"
        assert cache.lookup(b"fk_00000000_" + b"x" * 32) is None
        # A grace long enough to outlast the sync on a loaded machine; its end is checked exactly.
        done = await asyncio.to_thread(store.rotate, rec["id"], 3.0)
        assert done is not None
        new_key, rotated = done
        grace_end = rotated["previous_expires_at"]
        await eventually(lambda: cache.lookup(new_key.encode()) is not None, "the rotated key")
        assert time.time() < grace_end, "the rotation took its whole grace to reach the cache"
        assert cache.lookup(key.encode()) is not None  # inside its grace
        await eventually(lambda: cache.lookup(key.encode()) is None, "the end of the grace")
        assert time.time() >= grace_end  # not a moment early
        assert cache.lookup(new_key.encode()) is not None
        await asyncio.to_thread(store.revoke, rec["id"])
        await eventually(lambda: cache.lookup(new_key.encode()) is None, "the revocation")
    finally:
        await cache.stop()


async def test_cache_remembers_digests_only_of_keys_that_matched(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key's HMAC is computed once, not per request; unknown keys are never kept (a flood of
    them cannot grow the table); a key that leaves the cache is forgotten in the clear too."""
    store = KeyStore(migrate(db_url), SECRET)
    cache = KeyCache(store, 10)
    key, rec = store.create("a", "default", [])
    other, _ = store.create("b", "default", [])
    await cache.sync()
    import fortress.access.keys as keys_module

    calls = 0
    real = keys_module.hmac.digest

    def counting(*args: object) -> bytes:
        nonlocal calls
        calls += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(keys_module.hmac, "digest", counting)
    for _ in range(50):
        assert cache.lookup(key.encode()) is not None
    assert calls == 1
    for i in range(100):
        assert cache.lookup(b"fk_00000000_%032d" % i) is None
    assert calls == 101 and set(cache._digests) == {key.encode()}
    assert cache.lookup(other.encode()) is not None
    await asyncio.to_thread(store.revoke, rec["id"])
    assert await cache.sync()
    assert key.encode() not in cache._digests
    assert cache.lookup(key.encode()) is None
    assert cache.lookup(other.encode()) is not None
    monkeypatch.setattr(keys_module, "DIGESTS", 2)
    keys = [store.create(f"k{i}", "default", [])[0].encode() for i in range(3)]
    await cache.sync()
    for k in keys:
        assert cache.lookup(k) is not None
    assert len(cache._digests) <= 2
    assert all(cache.lookup(k) is not None for k in keys)


async def test_cache_catches_rows_committed_out_of_order(db_url: str) -> None:
    """A write whose updated_at is older than what the cache has seen is still picked up."""
    store = KeyStore(migrate(db_url), SECRET)
    cache = KeyCache(store, 10)
    key1, _ = store.create("one", "default", [])
    key2, rec2 = store.create("two", "default", [])
    await cache.sync()
    with get_engine(db_url).begin() as conn:  # revoke "two" with an updated_at far in the past
        conn.execute(
            tables.api_keys.update()
            .where(tables.api_keys.c.id == rec2["id"])
            .values(revoked_at=1.0, updated_at=5)
        )
    assert await cache.sync()
    assert cache.lookup(key2.encode()) is None
    assert cache.lookup(key1.encode()) is not None
    assert not await cache.sync()  # nothing changed since


def test_secret_is_generated_once_with_0600(tmp_path: Path) -> None:
    cfg = parse_config(f"state_dir: {tmp_path / 'state'}", env={})
    first = load_secret(cfg)
    assert load_secret(cfg) == first and len(first) >= 32
    mode = stat.S_IMODE((tmp_path / "state" / "secret").stat().st_mode)
    assert mode == 0o600
    cfg2 = parse_config("auth: {secret: s3cret}", env={})
    assert load_secret(cfg2) == b"s3cret"
