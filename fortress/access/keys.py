"""API keys: generation, hashing, the database operations and the in-memory cache.

A key looks like ``fk_<8-char prefix>_<32 random chars>`` (about 190 random bits). Only
HMAC-SHA-256(server secret, key) is stored, with the prefix for people to recognise a key in
listings; the plaintext is shown once, at creation or rotation.

The gateway never reads the database per request: ``KeyCache`` maps digest → ``Identity`` in
memory and a background task re-syncs it every ``auth.cache_refresh`` seconds (at most 5)
with one aggregate query, reloading rows only when something changed.

**Store outages.** Each time the cache changes it writes a snapshot of what it holds (HMAC
digests and key metadata, never a plaintext key) to ``<state_dir>/key-cache.json``: mode 0600,
written atomically, sealed with an HMAC under the server secret. A gateway that starts while the
store is unreachable loads it, so keys it knew keep working; its first sync (with the schema
migration before it) is retried in the background. While the store is unreachable a key the
cache does not know may be one created meanwhile, so the access layer answers 503 rather than
401 for it (``reachable``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import string
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
from sqlalchemy import Engine, func, insert, select, update

from fortress.core.context import Identity
from fortress.core.secret import private_temp_file
from fortress.store.db import describe_error
from fortress.store.tables import api_keys

log = logging.getLogger("fortress.access")

KEY_PREFIX = "fk_"
_ALPHABET = string.ascii_letters + string.digits
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_RESYNC_WINDOW_MS = 60_000  # rows committed late (out of updated_at order) are caught by this
_RETRY_MAX = 5.0  # longest wait between syncs while the store is unreachable
SNAPSHOT_VERSION = 1
# The columns a snapshot keeps of an active key: what ``KeyCache.apply`` reads.
_SNAPSHOT_COLUMNS = (
    "id",
    "name",
    "prefix",
    "hash",
    "plan",
    "models",
    "updated_at",
    "revoked_at",
    "prev_hash",
    "prev_prefix",
    "prev_expires_at",
)


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


# Keys (as presented) whose digest a KeyCache remembers; past it the table starts over.
DIGESTS = 4096


class KeyCache:
    """Digest → key, in memory, kept in step with the database by a background task.

    Lookup is by HMAC digest, so its timing depends only on the HMAC of what the client sent,
    which reveals nothing about stored keys without the server secret: it is constant-time
    with respect to the secret. The final check uses ``hmac.compare_digest`` all the same.

    The digests of keys that matched are remembered by the key as presented (``DIGESTS`` of
    them at most, all forgotten whenever a key leaves the cache): an HMAC per request was 2 %
    of the event loop's CPU with keys on (``perf``: libcrypto), a dict lookup is nothing. The
    price is that those keys stay in this process's memory in the clear, as every request
    briefly holds them anyway; a key that never matched is never kept, so the table cannot be
    flooded. A dict looks a key up by its randomised (SipHash) hash first, so its timing says
    nothing about the keys it holds.

    ``prepare`` (the schema migration) runs before the first sync and again until it works;
    ``snapshot`` is the file the cache persists itself to, for starts while the store is down;
    ``source`` names the store (no password) so a snapshot of another store is never loaded.
    """

    def __init__(
        self,
        store: KeyStore,
        refresh: float,
        *,
        snapshot: str | Path | None = None,
        prepare: Callable[[], Any] | None = None,
        source: str = "",
    ) -> None:
        self.store = store
        self.refresh = refresh
        self.secret = store.secret
        self.snapshot = Path(snapshot) if snapshot is not None else None
        self.prepare = prepare
        self.source = source
        self.by_hash: dict[bytes, _Entry] = {}
        self._digests: dict[bytes, bytes] = {}  # key as presented → its digest, once it matched
        self._versions: dict[str, int] = {}  # key id → updated_at of every row seen (revoked too)
        self._hashes: dict[str, tuple[bytes, ...]] = {}  # key id → its digests in by_hash
        self._expiring: dict[bytes, float] = {}  # rotated-out digests → end of their grace
        self._rows: dict[str, dict[str, Any]] = {}  # key id → active row, for the snapshot
        self._fingerprint: tuple[int, int, int] | None = None
        self._prepared = prepare is None
        self._task: asyncio.Task[None] | None = None
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_failing = False
        self.synced_at = 0.0  # wall time of the data the cache holds (0: none yet)
        self.reachable = True  # the last attempt to read the store worked
        self.last_error: str | None = None

    def lookup(self, key: bytes) -> Identity | None:
        """The key's record, or None (unknown, revoked or past its rotation grace)."""
        d = self._digests.get(key)
        if d is not None:
            entry = self.by_hash.get(d)
            if entry is None:
                return None
        else:
            d = hmac.digest(self.secret, key, "sha256")
            entry = self.by_hash.get(d)
            if entry is None or not hmac.compare_digest(entry.hash, d):
                return None
            digests = self._digests
            if len(digests) >= DIGESTS:
                digests.clear()
            digests[key] = d
        if entry.expires_at is not None and time.time() >= entry.expires_at:
            return None
        return entry.record

    @property
    def size(self) -> int:
        """Active keys in the cache."""
        return len(self._hashes)

    @property
    def age(self) -> float | None:
        """Seconds since the data in the cache was read from the store (None: never)."""
        return max(0.0, time.time() - self.synced_at) if self.synced_at else None

    # -- syncing ---------------------------------------------------------------------------
    # The database is read in a thread; the cache is changed only on the event loop's thread,
    # between two requests, so a lookup never sees a key half-updated.

    async def sync(self) -> bool:
        """Bring the cache up to date. True if anything changed. Raises when the store cannot
        be read (``reachable`` turns false until a sync works again)."""
        try:
            if not self._prepared:
                assert self.prepare is not None
                await asyncio.to_thread(self.prepare)
                self._prepared = True
            changed = await self._sync()
        except Exception as exc:
            self._set_reachable(False, exc)
            raise
        self._set_reachable(True)
        if changed:
            await self.save_snapshot()
        return changed

    async def _sync(self) -> bool:
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
            self._clear()
            for row in rows:
                self.apply(row)
        self._fingerprint = self._local_fingerprint()
        self._sweep()
        self.synced_at = time.time()
        return True

    def _set_reachable(self, ok: bool, exc: BaseException | None = None) -> None:
        if ok:
            if not self.reachable:
                log.info("key cache: the key store is reachable again (%d keys)", self.size)
            self.reachable, self.last_error = True, None
            return
        self.last_error = describe_error(exc) if exc is not None else "unknown"
        if self.reachable:
            age = self.age
            log.warning(
                "key cache: the key store is unreachable (%s): serving the %d cached keys (%s); "
                "unknown keys get 503 until it is back",
                self.last_error,
                self.size,
                f"read {age:.0f}s ago" if age is not None else "none read yet",
            )
        self.reachable = False

    def _clear(self) -> None:
        self._digests.clear()
        self.by_hash.clear()
        self._hashes.clear()
        self._expiring.clear()
        self._versions.clear()
        self._rows.clear()

    def _sweep(self) -> None:
        """Forget rotated-out values whose grace has passed."""
        now = time.time()
        for h in [h for h, t in self._expiring.items() if t <= now]:
            del self._expiring[h]
            entry = self.by_hash.pop(h, None)
            self._digests.clear()
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
        self._rows[row.id] = {c: _plain(getattr(row, c)) for c in _SNAPSHOT_COLUMNS}

    def _drop(self, key_id: str) -> None:
        self._rows.pop(key_id, None)
        self._digests.clear()  # its value in the clear, if it was used, goes too
        for h in self._hashes.pop(key_id, ()):
            self.by_hash.pop(h, None)
            self._expiring.pop(h, None)

    # -- the snapshot ----------------------------------------------------------------------

    def _seal(self, data: dict[str, Any]) -> str:
        return hmac.new(self.secret, orjson.dumps(data, option=orjson.OPT_SORT_KEYS), "sha256").hexdigest()

    async def save_snapshot(self) -> None:
        """Persist what the cache holds (in a thread); a failure is logged, never raised."""
        if self.snapshot is None:
            return
        async with self._snapshot_lock:  # one writer at a time: the newest content lands last
            data = {
                "version": SNAPSHOT_VERSION,
                "source": self.source,
                "saved_at": self.synced_at,
                "fingerprint": list(self._fingerprint) if self._fingerprint else None,
                "versions": dict(self._versions),
                "rows": list(self._rows.values()),
            }
            try:
                await asyncio.to_thread(self._write_snapshot, data)
            except OSError as exc:
                if not self._snapshot_failing:
                    log.warning("key cache: cannot write %s: %s", self.snapshot, exc)
                self._snapshot_failing = True
            else:
                self._snapshot_failing = False

    def _write_snapshot(self, data: dict[str, Any]) -> None:
        assert self.snapshot is not None
        path = self.snapshot
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = orjson.dumps({"mac": self._seal(data), "data": data})
        tmp = private_temp_file(path, blob)
        try:
            os.replace(tmp, path)  # readers see the old snapshot or the new one, whole
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _read_snapshot(self) -> dict[str, Any] | None:
        """The snapshot's data if it is there, sealed under this secret and of this store."""
        if self.snapshot is None:
            return None
        try:
            doc = orjson.loads(self.snapshot.read_bytes())
            data, mac = doc["data"], doc["mac"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("key cache: ignoring %s: unreadable (%s)", self.snapshot, exc)
            return None
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._seal(data)):
            log.warning("key cache: ignoring %s: not sealed with this server secret", self.snapshot)
            return None
        if data.get("version") != SNAPSHOT_VERSION or data.get("source") != self.source:
            log.warning("key cache: ignoring %s: written for another store", self.snapshot)
            return None
        return data

    def load_snapshot(self, data: dict[str, Any]) -> None:
        """Fill the (empty) cache from a snapshot's data."""
        self._clear()
        for row in data["rows"]:
            self.apply(SimpleNamespace(**row))
        self._versions.update({k: int(v) for k, v in data["versions"].items()})
        fp = data.get("fingerprint")
        self._fingerprint = (int(fp[0]), int(fp[1]), int(fp[2])) if fp else None
        self.synced_at = float(data["saved_at"])
        self._sweep()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Sync once; if the store cannot be read, serve the snapshot. Then keep syncing."""
        try:
            await self.sync()
        except Exception:
            data = await asyncio.to_thread(self._read_snapshot)
            if data is not None:
                self.load_snapshot(data)
                log.warning(
                    "key cache: started from %s: %d keys as of %.0fs ago",
                    self.snapshot,
                    self.size,
                    self.age or 0.0,
                )
            else:
                log.warning(
                    "key cache: no snapshot to start from: every key gets 503 until the store is back"
                )
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
        delay = self.refresh
        while True:
            await asyncio.sleep(delay)
            try:
                await self.sync()
                delay = self.refresh
            except Exception as exc:  # keep serving the last known keys; sync logged the change
                delay = min(delay * 2, max(self.refresh, _RETRY_MAX))
                log.debug("key cache: sync failed (%s), next try in %.1fs", describe_error(exc), delay)


def _plain(value: Any) -> Any:
    """A column value as JSON can hold it (``models`` may come back as a tuple or list)."""
    return list(value) if isinstance(value, tuple | list | frozenset | set) else value
