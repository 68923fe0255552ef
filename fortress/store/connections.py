"""The WebSocket connection registry: which gateway holds which open connection.

A gateway calls ``opened`` and ``closed`` on its event loop; both only queue. A writer thread
migrates the store, deletes the rows this gateway's previous run left behind (a killed run
could not delete its own), then applies the queue in batches, retrying with backoff while the
store is down. ``listing`` is a blocking read: call it off the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from sqlalchemy import delete, insert, select

from fortress.core.backoff import pause_after_failure
from fortress.core.threads import name_os_thread
from fortress.store.db import describe_error, get_engine, migrate
from fortress.store.tables import ws_connections

log = logging.getLogger("fortress.store.connections")

COLUMNS = ("id", "gateway", "client", "key_id", "key_name", "source", "user", "opened_at")


class ConnectionRegistry:
    """The ``ws_connections`` rows of one gateway, written in the background."""

    def __init__(
        self,
        url: str,
        gateway: str,
        *,
        max_pending: int = 100_000,
        batch: int = 500,
        backoff_max: float = 30.0,
    ) -> None:
        """``url``: the store (``database_url``); ``gateway``: this gateway's name in the rows
        (host:port), the same across its restarts so that stale rows can be found."""
        self.url = url
        self.gateway = gateway
        self.max_pending = max_pending
        self.batch = batch
        self.backoff_max = backoff_max
        self.healthy = True
        self.last_error: str | None = None
        self.dropped = 0  # rows not written because the queue was full
        self._lock = threading.Lock()
        # id → the row to insert, or None to delete: an open and its close fold to nothing.
        self._pending: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._wake = threading.Event()
        self._stopping = False
        self._stop = threading.Event()  # cuts a retry pause short while stopping
        self._deadline = 0.0  # while stopping: the monotonic time the last try may start by
        self._ready = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ws-registry", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Write what is queued, for up to ``timeout`` seconds, then stop the writer."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self._stop.set()
        self._wake.set()
        thread.join(timeout + 1.0)

    def stats(self) -> dict[str, Any]:
        """``ws_registry_pending`` (changes not yet stored), ``ws_registry_ok``, and
        ``ws_registry_dropped``."""
        with self._lock:
            pending = len(self._pending)
        return {
            "ws_registry_pending": pending,
            "ws_registry_ok": self.healthy,
            "ws_registry_dropped": self.dropped,
        }

    # -- the loop's side: queue only ---------------------------------------------------------

    def opened(self, row: dict[str, Any]) -> None:
        """Queue the insert of a connection's row (``COLUMNS``; ``gateway`` is filled in)."""
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                return
            self._pending[row["id"]] = {**row, "gateway": self.gateway}
        self._wake.set()

    def closed(self, conn_id: str) -> None:
        """Queue the delete of a connection's row; an insert still queued is simply dropped."""
        with self._lock:
            if conn_id in self._pending and self._pending[conn_id] is not None:
                del self._pending[conn_id]
                return
            self._pending[conn_id] = None
        self._wake.set()

    # -- reads (blocking) --------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        """Every open connection of every gateway sharing the store, oldest first."""
        engine = migrate(self.url) if not self._ready else get_engine(self.url)
        with engine.connect() as conn:
            rows = conn.execute(select(ws_connections).order_by(ws_connections.c.opened_at)).mappings()
            return [{c: r[c] for c in COLUMNS} for r in rows]

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread()
        delay = 0.5
        while True:
            self._wake.wait(None if not self._stopping else 0)
            self._wake.clear()
            try:
                self._write()
            except Exception as exc:  # the store is down: keep the queue, retry later
                if self.healthy:
                    log.warning("connection registry: store write failed: %s", describe_error(exc))
                self.healthy = False
                self.last_error = describe_error(exc)
                # The shared pause of background writers: spaced retries, the last ones
                # bounded by the stop's deadline.
                if not pause_after_failure(delay, self._stop, self._deadline if self._stopping else None):
                    return
                delay = min(delay * 2, self.backoff_max)
                self._wake.set()
                continue
            self.healthy, delay = True, 0.5
            if self._stopping:
                with self._lock:
                    if not self._pending:
                        return

    def _write(self) -> None:
        if not self._ready:
            engine = migrate(self.url)
            with engine.begin() as conn:
                conn.execute(delete(ws_connections).where(ws_connections.c.gateway == self.gateway))
            self._ready = True
        engine = get_engine(self.url)
        while True:
            with self._lock:
                n = min(self.batch, len(self._pending))
                batch = [self._pending.popitem(last=False) for _ in range(n)]
            if not batch:
                return
            try:
                inserts = [row for _, row in batch if row is not None]
                deletes = [cid for cid, row in batch if row is None]
                with engine.begin() as conn:
                    if deletes:
                        conn.execute(delete(ws_connections).where(ws_connections.c.id.in_(deletes)))
                    if inserts:
                        rows = [{c: r.get(c) for c in COLUMNS} for r in inserts]
                        conn.execute(insert(ws_connections), rows)
            except Exception:
                with self._lock:  # back in front, unless a later change of the same id came
                    for cid, row in reversed(batch):
                        if cid not in self._pending:
                            self._pending[cid] = row
                            self._pending.move_to_end(cid, last=False)
                raise
