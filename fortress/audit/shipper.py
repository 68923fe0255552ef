"""Moves journaled records to the store and the archive, in the background.

One thread (SQLAlchemy and SQLite are synchronous; keeping them off the event loop keeps the
request path free of database latency). It wakes after a journal commit, waits until
``audit.ship_interval`` has passed since its last store transaction (so that a busy gateway
pays one transaction per interval, not one per group commit: each has a fixed cost in the
gateway's CPU), takes what is durable from the journal in batches of ``audit.ship_batch``
records (from the journal's memory while it keeps up, else from its files) and:

* inserts them into the store in one transaction with its offset (``shipper_offsets``), and an
  anchor (the chain head) every ``audit.anchor_every`` seconds, also appended to
  ``<journal_dir>/anchors.jsonl``;
* hands them to the archive sink, which writes part files on its own schedule;
* deletes journal segments that both have fully.

After a crash each sink resumes from its own persisted position; a batch replayed into the
store is ignored row by row (primary key (gateway_id, seq)), so nothing is duplicated.

**Outages.** The first step of every (re)connection is the store's schema migration, so nothing
is shipped into a store that is not migrated. When the store (or the archive) fails, the shipper
retries with a backoff that doubles from ``backoff_min`` to ``backoff_max``; journal commits do
not cut it short (they wake the shipper only while it is healthy), and only ``stop()`` does. It
logs one WARNING when shipping stops (with the reason) and one INFO when it works again (with
how many records waited); the attempts in between log at DEBUG.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import orjson

from fortress.audit.archive import ArchiveSink
from fortress.audit.journal import Journal, JournalReader
from fortress.audit.sql import SqlSink
from fortress.core.backoff import pause_after_failure
from fortress.core.threads import name_os_thread
from fortress.store.db import describe_error

log = logging.getLogger("fortress.audit.shipper")


class Shipper:
    """Ships one journal to a ``SqlSink`` and optionally an ``ArchiveSink``."""

    def __init__(
        self,
        journal: Journal,
        store: SqlSink,
        archive: ArchiveSink | None = None,
        batch: int = 1000,
        anchor_every: float = 60.0,
        anchors_file: str | Path | None = None,
        interval: float = 0.0,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.journal = journal
        self.store = store
        self.archive = archive
        self.batch = batch
        self.interval = interval  # least time between store transactions while records trickle in
        self.anchor_every = anchor_every
        self.anchors_file = Path(anchors_file) if anchors_file else journal.dir / "anchors.jsonl"
        self.reader = JournalReader(journal.dir)
        self.shipped = 0  # records written to the store by this shipper
        self.batches = 0
        self.store_pos = 0
        self.last_error: str | None = None
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.healthy = True  # False from a failed attempt until the next one that works
        self.failures = 0  # failed attempts, all outages together
        self.outages = 0
        self.backoff = 0.0  # the current wait between attempts (0 while healthy)
        self.failing_since: float | None = None  # monotonic time of the outage's first failure
        self._ready = False
        self._waiting = 0  # records the journal held beyond the store at the last (re)connection
        self._outage_failures = 0
        self._event = threading.Event()
        self._stop_event = threading.Event()
        self._last_ship = 0.0
        self._stopping = False
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self._last_anchor = time.monotonic()
        self._head: tuple[int, str] | None = None  # last record shipped, not yet anchored
        self.caught_up = threading.Event()

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        # Room for a few batches (a few MB): enough to ship from memory while the store keeps up.
        self.journal.keep_recent = min(max(4 * self.batch, 4096), 16384)
        self.journal.on_commit = self.wake
        self._thread = threading.Thread(target=self._run, name="audit-shipper", daemon=True)
        self._thread.start()

    def wake(self, _seq: int = 0) -> None:
        """A journal commit: ship soon. Ignored while failing, so commits never cut the backoff."""
        if self.healthy:
            self._event.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Ship what the journal holds (for up to ``timeout`` seconds), flush the archive, stop."""
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self._stop_event.set()
        self._event.set()
        if self._thread is not None:
            self._thread.join(timeout + 5)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_caught_up(self, seq: int, timeout: float = 10.0) -> bool:
        """Block until the store holds every record up to ``seq`` (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self.store_pos < seq:
            if time.monotonic() > deadline or not self.alive:
                return False
            time.sleep(0.005)
        return True

    # the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread()  # `top -H` shows it by name
        backoff = self.backoff_min
        while True:
            self._event.clear()
            # A stop asked while this pass ships gets one more pass: what this one read of the
            # journal may predate the last commits (stop() follows the journal's close).
            stopping = self._stopping
            try:
                if not self._ready:
                    self._open()
                moved = self.ship_once()
                self._housekeeping()
            except Exception as exc:  # the store is down, the disk is full: retry, never die
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
            if moved >= self.batch:
                continue  # a backlog: ship the next full batch at once
            if self._stopping:
                if moved or not stopping:
                    continue
                self._finish()
                return
            if self.journal.durable_seq <= self.store_pos:
                self._event.wait(1.0)  # caught up: until the next commit
            gap = self.interval - (time.monotonic() - self._last_ship)
            if gap > 0:
                self._stop_event.wait(gap)  # gather more records for the next transaction

    def _failed(self, exc: Exception, backoff: float) -> None:
        self.last_error = describe_error(exc)
        self._ready = False
        self.failures += 1
        self.backoff = backoff
        if self.healthy:
            self.healthy = False
            self.outages += 1
            self.failing_since = time.monotonic()
            self._outage_failures = 0
            log.warning(
                "audit shipper: cannot ship (%s); records wait in the journal, retrying with backoff "
                "up to %.0fs",
                self.last_error,
                self.backoff_max,
            )
        else:
            log.debug("audit shipper: still failing (%s), next try in %.1fs", self.last_error, backoff)
        self._outage_failures += 1

    def _recovered(self) -> None:
        # ``_open`` has read the store's offset: what the journal held beyond it was waiting.
        waited = time.monotonic() - (self.failing_since or time.monotonic())
        log.info(
            "audit shipper: shipping again after %.1fs (%d failed attempts); %d records were waiting",
            waited,
            self._outage_failures,
            self._waiting,
        )
        self.healthy = True
        self.backoff = 0.0
        self.last_error = None
        self.failing_since = None

    def _open(self) -> None:
        self.store_pos = self.store.offset()  # migrates the store first (SqlSink.connect)
        self._waiting = max(0, self.journal.durable_seq - self.store_pos)
        if self.archive is not None:
            self.archive.open()
        self._ready = True

    def ship_once(self) -> int:
        """Ship one batch of durable records; return how many were read."""
        archive = self.archive
        after = self.store_pos if archive is None else min(self.store_pos, archive.accepted)
        kept = self.journal.recent(after, self.batch)
        if kept is not None:
            entries, (seg, end) = kept
            self.reader.position(seg, end, entries[-1][0]["seq"])  # where the file would go on
        else:
            entries = self.reader.read(after, self.batch, self.journal.durable)
        if not entries:
            self.caught_up.set()
            return 0
        self.caught_up.clear()
        last = entries[-1][0]
        if last["seq"] > self.store_pos:
            records = [rec for rec, _ in entries if rec["seq"] > self.store_pos]
            anchor = None
            now = time.monotonic()
            if now - self._last_anchor >= self.anchor_every:
                anchor = (last["seq"], last["hash"], time.time())
            self.store.write(records, anchor)
            self._last_ship = time.monotonic()
            self.store_pos = last["seq"]
            self.shipped += len(records)
            self.batches += 1
            self._head = (last["seq"], last["hash"])
            if anchor is not None:
                self._anchor_locally(anchor)
        if archive is not None:
            archive.write(entries)
        return len(entries)

    def _housekeeping(self) -> None:
        if self.archive is not None:
            self.archive.tick()
        done = self.store_pos if self.archive is None else min(self.store_pos, self.archive.durable)
        if done:
            self.journal.delete_through(done)

    def _finish(self) -> None:
        try:
            if self.archive is not None:
                self.archive.close()
            if self._head is not None:
                anchor = (*self._head, time.time())
                self.store.write([], anchor)
                self._anchor_locally(anchor)
            self._housekeeping()
        except Exception as exc:
            log.warning("audit shipper: final flush failed (the journal keeps the records): %s", exc)

    def _anchor_locally(self, anchor: tuple[int, str, float]) -> None:
        self._last_anchor = time.monotonic()
        self._head = None
        seq, h, ts = anchor
        line = orjson.dumps({"gateway_id": self.journal.gateway_id, "seq": seq, "hash": h, "ts": ts}) + b"\n"
        fd = os.open(self.anchors_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
