"""The fleet's persisted state: every instance with the states it went through, and every
decision, in the store (``fleet_instances``, ``fleet_decisions``; migration 0003).

``FleetStore.observe`` and ``FleetStore.decision`` run on the event loop at every controller
tick: they compare the instances with what the last call saw, in memory, and queue the
changes; an unchanged instance costs a tuple comparison. One writer thread moves the queue to
the store, one transaction per batch (SQLAlchemy and SQLite are synchronous: the loop never
waits on the database). The readers (``adopt``, ``close_orphans``, ``history``,
``decisions``) block: call them through ``asyncio.to_thread``.

**Local instances.** A local slot keeps its name across its processes; each process is an
instance of its own, ``<gateway>/<slot>/<n>``. ``n`` is the slot's process number on this host:
the supervisor's ``incarnation`` (which starts again at 1 when the gateway restarts) plus the
highest number an earlier run of this gateway stored for the slot, so that a restarted gateway
adds rows instead of writing over the previous run's. A slot that has not run (incarnation 0)
has no row. A process's row ends in a final state: terminated or failed as the provider reports
it, failed when the slot waits to restart it (no pid: it exited), terminated when the slot
already runs a newer process and the end of this one was not seen. Once final, a row is not
reopened: the provider reports a slot as starting before the supervisor numbers its next
process, and that is the next process, not this one.

**Outages.** The writer migrates the store first, then writes; when either fails it keeps the
batch, retries with a backoff that doubles from ``backoff_min`` to ``backoff_max`` (new changes
do not cut it short), logs one WARNING when writes start failing and one INFO when they work
again (with how many writes waited). The queue is bounded: past ``max_pending`` writes (history
entries and decisions) the oldest history entries go first, those of an instance with several
queued, so that every row still gets its latest state; then the oldest instance updates whole
(such a row catches up at the instance's next change); decisions last. Drops are counted in
``fleet_store_dropped`` and logged once until the queue empties. ``stop`` writes what is
queued, for a bounded time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, select, update

from fortress.core.backoff import pause_after_failure
from fortress.core.threads import name_os_thread
from fortress.fleet.providers.base import FAILED, PREEMPTED, READY, STARTING, TERMINATED
from fortress.store import tables
from fortress.store.db import describe_error, get_engine, migrate

log = logging.getLogger("fortress.fleet.store")

FINAL = frozenset({TERMINATED, FAILED, PREEMPTED})  # an instance in these is gone for good
HISTORY_LIMIT = 200  # entries kept per row, the newest: a row stays small whatever happens
LOCAL = "local"
REPLACED = "gone: the slot started a new process"

_instances = tables.fleet_instances
_decisions = tables.fleet_decisions


class InstanceLike(Protocol):
    """What ``observe`` reads of an instance (``fortress.fleet.providers.base.Instance``).
    ``version`` is read from the attribute if there is one, else from ``extra["version"]``."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def capacity(self) -> str: ...
    @property
    def detail(self) -> str: ...
    @property
    def url(self) -> str | None: ...
    @property
    def extra(self) -> dict[str, Any] | None: ...


@dataclass
class _Seen:
    """What the last ``observe`` saw of one instance (a local slot: of its current process)."""

    incarnation: int | None
    state: str
    capacity: str
    version: str | None
    url: str | None


@dataclass
class _Change:
    """Queued writes to one instance's row: its latest fields and the history entries to add."""

    pool: str
    provider: str
    name: str  # the provider's id (a local slot's name)
    incarnation: int | None  # local only
    capacity: str
    state: str
    version: str | None
    url: str | None
    first: float  # when this run first saw it: created_at of a new row
    at: float  # updated_at
    entries: list[list[Any]]

    @property
    def key(self) -> tuple[str, str, str, int | None]:
        return (self.pool, self.provider, self.name, self.incarnation)

    def then(self, newer: _Change) -> None:
        """Fold a later change of the same instance into this one."""
        self.entries.extend(newer.entries)
        self.capacity, self.state, self.version = newer.capacity, newer.state, newer.version
        self.url, self.at = newer.url, newer.at


class FleetStore:
    """The persisted fleet state of one gateway, written in the background."""

    def __init__(
        self,
        url: str,
        gateway: str,
        clock: Callable[[], float] = time.time,
        *,
        max_pending: int = 10_000,
        batch: int = 500,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        """``url``: the store (``database_url``); ``gateway``: this gateway's name, stable
        across restarts (its host name), which ``adopt`` looks for; ``clock``: epoch seconds."""
        self.url = url
        self.gateway = gateway
        self.clock = clock
        self.max_pending = max_pending
        self.batch = batch
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.healthy = True  # False from a failed write until the next one that works
        self.last_error: str | None = None
        self.failures = 0
        self.outages = 0
        self.written = 0  # writes stored (history entries and decisions)
        self.dropped = 0  # writes dropped because the queue was full
        # Loop side: the last state seen of each instance, (pool, provider) → id → _Seen.
        self._seen: dict[tuple[str, str], dict[str, _Seen]] = {}
        # Shared with the writer, under _lock: the queue and its size in writes.
        self._lock = threading.Lock()
        self._changes: OrderedDict[tuple[str, str, str, int | None], _Change] = OrderedDict()
        self._decisions: deque[dict[str, Any]] = deque()
        self._pending = 0  # writes queued
        self._inflight = 0  # writes of the batch being written
        self._overflowing = False
        self._written_ids: set[tuple[str, str]] = set()  # (provider, id) rows this run wrote
        # Writer side.
        self._bases: dict[tuple[str, str], int] = {}  # (pool, slot) → earlier runs' highest n
        self._ready = False  # migrated since the last failure
        self._migrate_lock = threading.Lock()
        self._waiting = 0
        self._failing_since: float | None = None
        self._outage_failures = 0
        self._wake = threading.Event()
        self._stop_event = threading.Event()
        self._stopping = False
        self._deadline = 0.0
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread; it migrates the store first (retrying while it is down)."""
        self._thread = threading.Thread(target=self._run, name="fleet-store", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued, for up to ``timeout`` seconds, then stop the writer. What the
        store did not take by then is lost (a WARNING says how much)."""
        if self._thread is None:
            return
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        # A connection attempt under way may last its connect timeout past the deadline.
        self._thread.join(timeout + 10)
        self._thread = None
        left = self.stats()["fleet_store_pending"]
        if left:
            log.warning("fleet state: %d writes not stored at stop (%s)", left, self.last_error)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """``fleet_store_pending`` (writes not yet stored), ``fleet_store_ok`` (the last write
        or migration worked), ``fleet_store_dropped`` (writes dropped on a full queue)."""
        with self._lock:
            pending = self._pending + self._inflight
        return {
            "fleet_store_pending": pending,
            "fleet_store_ok": self.healthy,
            "fleet_store_dropped": self.dropped,
        }

    # -- the loop's side: in memory ------------------------------------------------------------

    def observe(
        self, pool: str, provider: str, instances: Sequence[InstanceLike], now: float | None = None
    ) -> None:
        """Queue the changes among ``instances`` (every instance of ``pool`` as ``provider``
        reports it) since the last call: for each whose state, url, capacity or version
        changed, a ``[now, state, detail]`` history entry and an update of its row. ``now`` is
        epoch seconds (default: the clock). Local instances come with the slot's name as id
        and ``extra["incarnation"]``; the store names each process (see the module doc)."""
        at = self.clock() if now is None else now
        local = provider == LOCAL
        known = self._seen.setdefault((pool, provider), {})
        listed: set[str] = set()
        for inst in instances:
            extra = inst.extra or {}
            version = getattr(inst, "version", None) or extra.get("version")
            version = None if version is None else str(version)
            listed.add(inst.id)
            seen = known.get(inst.id)
            state = inst.state
            incarnation: int | None = None
            if local:
                incarnation = int(extra.get("incarnation") or 0)
                if incarnation == 0:
                    continue  # never started: no process, no row
                if seen is not None and seen.incarnation != incarnation:
                    if seen.state not in FINAL:  # its end fell between two ticks
                        self._queue(self._change(pool, provider, inst.id, seen, TERMINATED, REPLACED, at))
                    seen = None
                elif seen is not None and seen.state in FINAL:
                    continue  # the slot's next process, before the supervisor numbers it
                if state in (STARTING, READY) and "pid" in extra and extra["pid"] is None:
                    state = FAILED  # the slot waits to restart it: this process exited
            now_seen = _Seen(incarnation, state, inst.capacity, version, inst.url)
            if seen == now_seen:
                continue
            known[inst.id] = now_seen
            # The history tells states; a new url (or version) alone only updates the row.
            moved = seen is None or seen.state != state
            self._queue(self._change(pool, provider, inst.id, now_seen, state, inst.detail, at, moved))
        # Forget instances the provider no longer lists once they are gone for good.
        if len(known) > len(listed):
            for name in [n for n, s in known.items() if n not in listed and s.state in FINAL]:
                del known[name]

    def _change(
        self,
        pool: str,
        provider: str,
        name: str,
        seen: _Seen,
        state: str,
        detail: str,
        at: float,
        history: bool = True,
    ) -> _Change:
        return _Change(
            pool=pool,
            provider=provider,
            name=name,
            incarnation=seen.incarnation,
            capacity=seen.capacity,
            state=state,
            version=seen.version,
            url=seen.url,
            first=at,
            at=at,
            entries=[[at, state, detail]] if history else [],
        )

    def decision(self, pool: str, entry: dict[str, Any]) -> None:
        """Queue one decision as the controller records it (``from``, ``to``, ``kind``,
        ``reason``; its ``at`` is not kept: the row's ``ts`` is the clock now)."""
        row = {
            "ts": self.clock(),
            "pool": pool,
            "gateway": self.gateway,
            "before": int(entry["from"]),
            "after": int(entry["to"]),
            "kind": str(entry["kind"]),
            "reason": str(entry.get("reason", "")),
        }
        with self._lock:
            self._make_room(1)
            self._decisions.append(row)
            self._pending += 1
        self._wake.set()

    def _queue(self, change: _Change) -> None:
        with self._lock:
            self._make_room(len(change.entries))
            queued = self._changes.get(change.key)
            if queued is None:
                self._changes[change.key] = change
            else:
                queued.then(change)
                self._changes.move_to_end(change.key)  # the oldest stays first, to drop first
            self._pending += len(change.entries)
        self._wake.set()

    def _make_room(self, n: int) -> None:
        """Drop the oldest queued writes until ``n`` more fit (under ``_lock``): first the
        oldest history entry of an instance with several queued (its row still gets its latest
        state), then the oldest instance update whole, a decision only when no update is left."""
        while self._pending + self._inflight + n > self.max_pending and self._pending:
            # A scan of the queued instances (a few per fleet instance), only while overflowing.
            trimmed = next((c for c in self._changes.values() if len(c.entries) > 1), None)
            if trimmed is not None:
                del trimmed.entries[0]
            elif self._changes:
                self._changes.popitem(last=False)
            else:
                self._decisions.popleft()
            self._pending -= 1
            self.dropped += 1
            if not self._overflowing:
                self._overflowing = True
                log.warning(
                    "fleet state: %d writes wait for the store, the most it keeps; dropping the oldest "
                    "instance updates (fleet_store_dropped counts them)",
                    self.max_pending,
                )

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread()
        backoff = self.backoff_min
        while True:
            self._wake.clear()
            try:
                self._engine()
                self._flush()
            except Exception as exc:  # the store is down or refuses: keep the batch, retry
                self._failed(exc, backoff)
                if not pause_after_failure(
                    backoff, self._stop_event, self._deadline if self._stopping else None
                ):
                    return
                backoff = min(backoff * 2, self.backoff_max)
                continue
            if not self.healthy:
                self._recovered()
            backoff = self.backoff_min
            with self._lock:
                more = self._pending > 0
            if more:
                continue
            if self._stopping:
                return
            self._wake.wait()

    def _engine(self) -> Engine:
        """The store's engine, migrated (again after a failure: a store that comes back may be
        a new, empty one)."""
        with self._migrate_lock:
            engine = migrate(self.url) if not self._ready else get_engine(self.url)
            self._ready = True
            return engine

    def _flush(self) -> int:
        """Write one batch of queued writes in one transaction; return how many."""
        with self._lock:
            waiting = self._pending
            changes = [
                self._changes.popitem(last=False)[1] for _ in range(min(self.batch, len(self._changes)))
            ]
            decisions = [self._decisions.popleft() for _ in range(min(self.batch, len(self._decisions)))]
            n = sum(len(c.entries) for c in changes) + len(decisions)
            self._pending -= n
            self._inflight = n
        if not n:
            self._waiting = 0
            return 0
        try:
            written = self._write(changes, decisions)
        except BaseException:
            with self._lock:
                self._inflight = 0
                self._put_back(changes, decisions, n)
            raise
        with self._lock:
            self._inflight = 0
            self._written_ids.update(written)
            self.written += n
            if not self._pending:
                self._overflowing = False
        self._waiting = waiting
        return n

    def _put_back(self, changes: list[_Change], decisions: list[dict[str, Any]], n: int) -> None:
        """Return a failed batch to the front of the queue, before what came in meanwhile."""
        for change in reversed(changes):
            newer = self._changes.pop(change.key, None)
            if newer is not None:
                change.then(newer)
            self._changes[change.key] = change
            self._changes.move_to_end(change.key, last=False)
        self._decisions.extendleft(reversed(decisions))
        self._pending += n

    def _write(self, changes: list[_Change], decisions: list[dict[str, Any]]) -> set[tuple[str, str]]:
        engine = self._engine()
        bases: dict[tuple[str, str], int] = {}
        with engine.begin() as conn:
            if decisions:
                conn.execute(_decisions.insert(), decisions)
            ids = [self._row_id(conn, c, bases) for c in changes]
            known: dict[tuple[str, str], list[Any]] = {}
            for provider in {c.provider for c in changes}:
                wanted = [i for c, i in zip(changes, ids, strict=True) if c.provider == provider]
                for start in range(0, len(wanted), 500):
                    rows = conn.execute(
                        select(_instances.c.id, _instances.c.history).where(
                            _instances.c.provider == provider,
                            _instances.c.id.in_(wanted[start : start + 500]),
                        )
                    )
                    known.update({(provider, r.id): list(r.history or []) for r in rows})
            new = []
            for c, row_id in zip(changes, ids, strict=True):
                fields = {
                    "pool": c.pool,
                    "gateway": self.gateway,
                    "capacity": c.capacity,
                    "state": c.state,
                    "version": c.version,
                    "url": c.url,
                    "updated_at": c.at,
                }
                old = known.get((c.provider, row_id))
                if old is None:
                    history = c.entries[-HISTORY_LIMIT:]
                    new.append({"provider": c.provider, "id": row_id, "created_at": c.first, **fields})
                    new[-1]["history"] = history
                else:
                    conn.execute(
                        update(_instances)
                        .where(_instances.c.provider == c.provider, _instances.c.id == row_id)
                        .values(history=(old + c.entries)[-HISTORY_LIMIT:], **fields)
                    )
            if new:
                conn.execute(_instances.insert(), new)
        self._bases.update(bases)  # only once committed: a failed batch looks them up again
        return {(c.provider, i) for c, i in zip(changes, ids, strict=True)}

    def _row_id(self, conn: Connection, change: _Change, bases: dict[tuple[str, str], int]) -> str:
        """The row's id: the provider's, or ``<gateway>/<slot>/<n>`` for a local process."""
        if change.incarnation is None:
            return change.name
        slot = (change.pool, change.name)
        base = self._bases.get(slot, bases.get(slot))
        if base is None:
            base = bases[slot] = self._highest(conn, change.pool, change.name)
        return f"{self.gateway}/{change.name}/{base + change.incarnation}"

    def _highest(self, conn: Connection, pool: str, slot: str) -> int:
        """The highest process number earlier runs of this gateway stored for ``slot``."""
        prefix = f"{self.gateway}/{slot}/"
        rows = conn.execute(
            select(_instances.c.id).where(
                _instances.c.pool == pool,
                _instances.c.provider == LOCAL,
                _instances.c.gateway == self.gateway,
            )
        )
        tails = (r.id[len(prefix) :] for r in rows if r.id.startswith(prefix))
        return max((int(t) for t in tails if t.isdigit()), default=0)

    def _failed(self, exc: Exception, backoff: float) -> None:
        self.last_error = describe_error(exc)
        self._ready = False
        self.failures += 1
        if self.healthy:
            self.healthy = False
            self.outages += 1
            self._failing_since = time.monotonic()
            self._outage_failures = 0
            log.warning(
                "fleet state: cannot write to the store (%s); %d writes wait in memory, retrying "
                "with backoff up to %.0fs",
                self.last_error,
                self.stats()["fleet_store_pending"],
                self.backoff_max,
            )
        else:
            log.debug("fleet state: still failing (%s), next try in %.1fs", self.last_error, backoff)
        self._outage_failures += 1

    def _recovered(self) -> None:
        waited = time.monotonic() - (self._failing_since or time.monotonic())
        log.info(
            "fleet state: store reachable again, %d writes were waiting (after %.1fs, %d failed attempts)",
            self._waiting,
            waited,
            self._outage_failures,
        )
        self.healthy = True
        self.last_error = None
        self._failing_since = None

    # -- readers (blocking: call through asyncio.to_thread) ----------------------------------------

    def adopt(self, pool: str, provider: str) -> list[dict[str, Any]]:
        """This gateway's rows of ``pool`` and ``provider`` that are not terminated, failed or
        preempted, oldest first: what a restarted gateway finds. Raises when the store cannot
        be reached."""
        stmt = (
            select(_instances)
            .where(
                _instances.c.pool == pool,
                _instances.c.provider == provider,
                _instances.c.gateway == self.gateway,
                _instances.c.state.not_in(sorted(FINAL)),
            )
            .order_by(_instances.c.created_at, _instances.c.id)
        )
        with self._engine().connect() as conn:
            return [_instance_row(r._mapping) for r in conn.execute(stmt)]

    def close_orphans(self, pool: str, provider: str, detail: str = "the gateway restarted") -> int:
        """Mark terminated (with a history entry saying ``detail``) this gateway's rows of
        ``pool`` and ``provider`` that an earlier run left open: local processes die with the
        gateway that ran them. Rows this run wrote are left alone. Returns how many were
        closed; raises when the store cannot be reached. Call it once, at start."""
        now = self.clock()
        with self._lock:
            mine = {i for p, i in self._written_ids if p == provider}
        stmt = select(_instances.c.id, _instances.c.history).where(
            _instances.c.pool == pool,
            _instances.c.provider == provider,
            _instances.c.gateway == self.gateway,
            _instances.c.state.not_in(sorted(FINAL)),
        )
        closed = 0
        with self._engine().begin() as conn:
            for row in conn.execute(stmt).all():
                if row.id in mine:
                    continue
                history = [*(row.history or []), [now, TERMINATED, detail]][-HISTORY_LIMIT:]
                conn.execute(
                    update(_instances)
                    .where(_instances.c.provider == provider, _instances.c.id == row.id)
                    .values(state=TERMINATED, updated_at=now, history=history)
                )
                closed += 1
        if closed:
            log.info("fleet %s: %d %s instances of an earlier run marked terminated", pool, closed, provider)
        return closed

    def history(self, pool: str, limit: int = 50, *, gateway: str | None = None) -> list[dict[str, Any]]:
        """The rows of ``pool`` (of every gateway, or of ``gateway``), the most recently
        changed first, each with its history."""
        stmt = select(_instances).where(_instances.c.pool == pool)
        if gateway is not None:
            stmt = stmt.where(_instances.c.gateway == gateway)
        stmt = stmt.order_by(_instances.c.updated_at.desc(), _instances.c.id).limit(limit)
        with self._engine().connect() as conn:
            return [_instance_row(r._mapping) for r in conn.execute(stmt)]

    def decisions(self, pool: str, limit: int = 50) -> list[dict[str, Any]]:
        """The latest ``limit`` decisions of ``pool`` in the order they were made, shaped as
        the controller keeps them (``at``, ``from``, ``to``, ``kind``, ``reason``) plus
        ``ts``, ``pool`` and ``gateway``."""
        stmt = (
            select(_decisions).where(_decisions.c.pool == pool).order_by(_decisions.c.id.desc()).limit(limit)
        )
        with self._engine().connect() as conn:
            rows = conn.execute(stmt).all()
        return [
            {
                "at": datetime.fromtimestamp(r.ts, UTC).isoformat(timespec="seconds"),
                "from": r.before,
                "to": r.after,
                "kind": r.kind,
                "reason": r.reason,
                "ts": r.ts,
                "pool": r.pool,
                "gateway": r.gateway,
            }
            for r in reversed(rows)
        ]


def _instance_row(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["history"] = list(out.get("history") or [])
    return out
