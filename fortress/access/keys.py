"""API keys: generation, hashing, the database operations and the in-memory cache.

A key looks like ``fk_<8-char prefix>_<32 random chars>`` (about 190 random bits). Only
HMAC-SHA-256(server secret, key) is stored, with the prefix for people to recognise a key in
listings; the plaintext is shown once, at creation or rotation.

The gateway never reads the database per request: ``KeyCache`` maps digest → ``Identity`` in
memory and a background task re-syncs it every ``auth.cache_refresh`` seconds (at most 5)
with one aggregate query, reloading rows only when something changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import string
import time
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from fortress.core.context import Identity
from fortress.store.tables import api_keys

log = logging.getLogger("fortress.access")

KEY_PREFIX = "fk_"
_ALPHABET = string.ascii_letters + string.digits
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_RESYNC_WINDOW_MS = 60_000  # rows committed late (out of updated_at order) are caught by this


def new_key() -> tuple[str, str]:
    """(plaintext key, its visible prefix ``fk_xxxxxxxx``)."""
    prefix = KEY_PREFIX + "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    body = "".join(secrets.choice(_ALPHABET) for _ in range(32))
    return f"{prefix}_{body}", prefix


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def digest(secret: bytes, key: bytes) -> bytes:
    """HMAC-SHA-256 of a presented key: what is stored and looked up."""
    return hmac.new(secret, key, hashlib.sha256).digest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def row_to_dict(row: Any) -> dict[str, Any]:
    """A key row as the admin API and CLI show it (never the hash)."""
    now = time.time()
    prev = row.prev_prefix if row.prev_expires_at and row.prev_expires_at > now else None
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "plan": row.plan,
        "models": list(row.models or []),
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
        "status": "revoked" if row.revoked_at else "active",
        "previous_prefix": prev,
        "previous_expires_at": row.prev_expires_at if prev else None,
    }


class KeyStore:
    """The ``api_keys`` table. Blocking: call from a thread on the event loop's side."""

    def __init__(self, engine: Engine, secret: bytes) -> None:
        self.engine = engine
        self.secret = secret

    def _hash(self, key: str) -> str:
        return digest(self.secret, key.encode()).hex()

    def create(self, name: str, plan: str, models: list[str] | None = None) -> tuple[str, dict[str, Any]]:
        """Create a key; returns (plaintext, record). The plaintext is not stored anywhere."""
        key, prefix = new_key()
        now = time.time()
        row = {
            "id": new_key_id(),
            "name": name,
            "prefix": prefix,
            "hash": self._hash(key),
            "plan": plan,
            "models": sorted(set(models or [])),
            "created_at": now,
            "updated_at": _now_ms(),
            "revoked_at": None,
            "prev_hash": None,
            "prev_prefix": None,
            "prev_expires_at": None,
        }
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**row))
            stored = conn.execute(select(api_keys).where(api_keys.c.id == row["id"])).one()
        return key, row_to_dict(stored)

    def list(self, include_revoked: bool = True) -> list[dict[str, Any]]:
        q = select(api_keys).order_by(api_keys.c.created_at)
        if not include_revoked:
            q = q.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [row_to_dict(r) for r in conn.execute(q)]

    def get(self, key_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
        return row_to_dict(row) if row is not None else None

    def revoke(self, key_id: str) -> dict[str, Any] | None:
        """Revoke a key (and its pre-rotation predecessor); None when there is no such key."""
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
            if row is None:
                return None
            if row.revoked_at is None:
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == key_id)
                    .values(revoked_at=time.time(), updated_at=max(_now_ms(), row.updated_at + 1))
                )
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
        return row_to_dict(row)

    def rotate(self, key_id: str, grace: float) -> tuple[str, dict[str, Any]] | None:
        """Give the key a new secret value; the old one keeps working for ``grace`` seconds.

        Rotating again within the grace period ends the older value at once: only the value
        just replaced is kept. None when there is no such key; ValueError when it is revoked.
        """
        key, prefix = new_key()
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
            if row is None:
                return None
            if row.revoked_at is not None:
                raise ValueError(f"key {key_id} is revoked")
            keep = grace > 0
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(
                    hash=self._hash(key),
                    prefix=prefix,
                    prev_hash=row.hash if keep else None,
                    prev_prefix=row.prefix if keep else None,
                    prev_expires_at=now + grace if keep else None,
                    updated_at=max(_now_ms(), row.updated_at + 1),
                )
            )
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
        return key, row_to_dict(row)

    # -- what the cache reads ------------------------------------------------------------

    def fingerprint(self) -> tuple[int, int, int]:
        """(count, max, sum) of ``updated_at``: exact integers, so any write changes it."""
        q = select(
            func.count(),
            func.coalesce(func.max(api_keys.c.updated_at), 0),
            func.coalesce(func.sum(api_keys.c.updated_at), 0),
        )
        with self.engine.connect() as conn:
            n, hi, total = conn.execute(q).one()
        return int(n), int(hi), int(total)

    def rows_since(self, updated_at: int | None) -> list[Any]:
        q = select(api_keys)
        if updated_at is not None:
            q = q.where(api_keys.c.updated_at > updated_at)
        with self.engine.connect() as conn:
            return list(conn.execute(q))


FIRST_KEY_NAME = "first-key"


def ensure_first_key(store: KeyStore, plans: list[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """Create a first key when the store has no active key (what ``fortress up`` does).

    Returns (plaintext of the new key, or None when active keys already exist; the active keys).
    The key gets the plan named ``default`` when there is one, else the first plan by name.
    """
    active = store.list(include_revoked=False)
    if active:
        return None, active
    if not plans:
        raise ValueError("no usage plans are configured: add one under `plans:`")
    plan = "default" if "default" in plans else sorted(plans)[0]
    key, rec = store.create(FIRST_KEY_NAME, plan)
    return key, [rec]


class _Entry:
    __slots__ = ("expires_at", "hash", "record")

    def __init__(self, record: Identity, hash_: bytes, expires_at: float | None) -> None:
        self.record = record
        self.hash = hash_
        self.expires_at = expires_at  # set on a rotated-out value


class KeyCache:
    """Digest → key, in memory, kept in step with the database by a background task.

    Lookup is by HMAC digest, so its timing depends only on the HMAC of what the client sent,
    which reveals nothing about stored keys without the server secret: it is constant-time
    with respect to the secret. The final check uses ``hmac.compare_digest`` all the same.
    """

    def __init__(self, store: KeyStore, refresh: float) -> None:
        self.store = store
        self.refresh = refresh
        self.secret = store.secret
        self.by_hash: dict[bytes, _Entry] = {}
        self._versions: dict[str, int] = {}  # key id → updated_at of every row seen (revoked too)
        self._hashes: dict[str, tuple[bytes, ...]] = {}  # key id → its digests in by_hash
        self._expiring: dict[bytes, float] = {}  # rotated-out digests → end of their grace
        self._fingerprint: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.synced_at = 0.0

    def lookup(self, key: bytes) -> Identity | None:
        """The key's record, or None (unknown, revoked or past its rotation grace)."""
        d = hmac.digest(self.secret, key, "sha256")  # one-shot OpenSSL HMAC: the fast path
        entry = self.by_hash.get(d)
        if entry is None or not hmac.compare_digest(entry.hash, d):
            return None
        if entry.expires_at is not None and time.time() >= entry.expires_at:
            return None
        return entry.record

    # -- syncing ---------------------------------------------------------------------------
    # The database is read in a thread; the cache is changed only on the event loop's thread,
    # between two requests, so a lookup never sees a key half-updated.

    async def sync(self) -> bool:
        """Bring the cache up to date. True if anything changed."""
        fp = await asyncio.to_thread(self.store.fingerprint)
        if fp == self._fingerprint:
            self._sweep()
            self.synced_at = time.time()
            return False
        hi = max(self._versions.values(), default=None)
        since = None if hi is None else hi - _RESYNC_WINDOW_MS
        for row in await asyncio.to_thread(self.store.rows_since, since):
            self.apply(row)
        if self._local_fingerprint() != fp:
            # A write committed out of updated_at order, beyond the window: reload everything.
            rows = await asyncio.to_thread(self.store.rows_since, None)
            self.by_hash.clear()
            self._hashes.clear()
            self._expiring.clear()
            self._versions.clear()
            for row in rows:
                self.apply(row)
        self._fingerprint = self._local_fingerprint()
        self._sweep()
        self.synced_at = time.time()
        return True

    def _sweep(self) -> None:
        """Forget rotated-out values whose grace has passed."""
        now = time.time()
        for h in [h for h, t in self._expiring.items() if t <= now]:
            del self._expiring[h]
            entry = self.by_hash.pop(h, None)
            if entry is not None:
                kid = entry.record.key_id
                self._hashes[kid] = tuple(x for x in self._hashes.get(kid, ()) if x != h)

    def _local_fingerprint(self) -> tuple[int, int, int]:
        v = self._versions.values()
        return len(v), max(v, default=0), sum(v)

    def apply(self, row: Any) -> None:
        """Put one database row into the cache (also used right after an admin write)."""
        if self._versions.get(row.id, -1) > row.updated_at:
            return
        self._versions[row.id] = row.updated_at
        self._drop(row.id)
        if row.revoked_at is not None:
            return
        record = Identity(row.id, row.name, row.plan, frozenset(row.models or ()), row.prefix)
        hashes = [bytes.fromhex(row.hash)]
        self.by_hash[hashes[0]] = _Entry(record, hashes[0], None)
        if row.prev_hash and row.prev_expires_at and row.prev_expires_at > time.time():
            old = bytes.fromhex(row.prev_hash)
            self.by_hash[old] = _Entry(record, old, row.prev_expires_at)
            self._expiring[old] = row.prev_expires_at
            hashes.append(old)
        self._hashes[row.id] = tuple(hashes)

    def _drop(self, key_id: str) -> None:
        for h in self._hashes.pop(key_id, ()):
            self.by_hash.pop(h, None)
            self._expiring.pop(h, None)

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fortress-key-cache")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.refresh)
            try:
                await self.sync()
                if failing:
                    log.warning("key cache: database reachable again")
                failing = False
            except Exception as exc:  # keep serving the last known keys
                if not failing:
                    log.error("key cache: cannot sync with the database, serving cached keys: %s", exc)
                failing = True
