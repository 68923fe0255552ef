"""The local, append-only audit journal: a record is durable before its response completes.

Layout: ``<journal_dir>/seg-<first seq>.log`` segment files, rotated by size. Each line is one
sealed record framed with its CRC-32, so a line torn by a crash is recognised::

    <crc32 of JSON, 8 hex> <JSON record>\\n

**Group commit.** ``await journal.append(record)`` hands the record to one writer thread and
returns after an ``fdatasync`` that covers it. The thread takes every record queued so far
and, when it has seen concurrent appends, waits up to ``group_commit_ms`` for more, then
writes and syncs them together: N concurrent requests cost one fsync, and a lone request
pays no extra wait (like PostgreSQL's ``commit_delay`` with ``commit_siblings``). Waiters are
woken with one ``loop.call_soon_threadsafe`` per batch; the event loop never blocks on disk.

**Hand-off to the shipper.** With ``keep_recent`` set (the shipper sets it), each committed
record is also kept in memory, as the parsed dict and its JSON bytes, until the shipper has
taken it or the bound is reached: the shipper reads the file back only when it is behind that
window (a backlog, an outage, a restart), never to re-parse what this process just wrote.

**Disk space.** The writer thread reads the free space of the journal's file system (statvfs)
at most once per ``space_every`` seconds, before a batch or while idle, never on the event loop;
``low_space`` says it is below ``min_free_bytes``. The audit layer then refuses new requests
(503) so the journal keeps a reserve for the records of requests already admitted, instead of
failing every request on a full disk.

**Zero-filled ahead.** The active segment is extended with zeros (``_ZERO_STEP`` at a time)
before small batches reach the end of what is already written, and trimmed to its last record
when it is rotated or closed, as PostgreSQL fills its WAL segments: an ``fdatasync`` of records
that land in blocks already written, inside the file's size, has no file-system metadata to
commit. Measured here (ext4 on a virtual disk): half the system time and half the wall time of
an ``fdatasync`` that extends the file. Large batches (``_FILL_BELOW``) extend it themselves.

**Recovery.** On open the newest segment is scanned; anything after its last valid line (zeros
written ahead, or a write torn by ``kill -9`` or power loss) is truncated, and ``seq`` and the
chain head continue from the last record. One process at a time owns a journal directory
(``flock``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from fortress.audit.chain import GENESIS, seal
from fortress.core.loops import running_loop
from fortress.core.threads import name_os_thread

log = logging.getLogger("fortress.audit.journal")

# The writer thread: waiting for records, woken (a record came while it waited: told once,
# not by every record until it runs), gathering a batch, writing one.
_IDLE, _WOKEN, _GATHER, _BUSY = 0, 1, 2, 3
_READ_CHUNK = 1 << 20
# How far ahead of the records the active segment is zero-filled (less for smaller segments).
_ZERO_STEP = 1 << 20
# Batches at least this large extend the file themselves: the zeros would double the bytes
# their fdatasync writes, and one metadata commit is little among that many records (measured:
# batches of ~350 KB took ~10 % more CPU per record with zeros ahead).
_FILL_BELOW = 64 << 10
_ZEROS = memoryview(bytes(_ZERO_STEP))

_Pending = tuple[dict[str, Any], "asyncio.Future[int]", asyncio.AbstractEventLoop]
_Waiter = tuple["asyncio.Future[int]", asyncio.AbstractEventLoop, int | None]
Entry = tuple[dict[str, Any], bytes]
"""A record read back from the journal, parsed and as its JSON bytes."""
_Kept = tuple[int, list[Entry], int, int]
"""A committed batch kept for the shipper: first seq, entries, segment (first seq), start byte."""


DiskUsage = Callable[[Path], tuple[int, int]]
"""(free bytes for unprivileged writers, total bytes) of the file system holding a path."""


def statvfs_usage(path: Path) -> tuple[int, int]:
    """``DiskUsage`` by ``os.statvfs``: a few microseconds, no I/O on a local file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class JournalError(RuntimeError):
    """The journal cannot take records (disk full, closed, owned by another process).

    Deliberately not an ``OSError``: the relay must not mistake it for a replica failure.
    """


# -- files ------------------------------------------------------------------------------------


def segment_path(directory: Path, first_seq: int) -> Path:
    return directory / f"seg-{first_seq:016d}.log"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of every segment, oldest first."""
    out: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            name = entry.name
            if name.startswith("seg-") and name.endswith(".log") and name[4:-4].isdigit():
                out.append((int(name[4:-4]), Path(entry.path)))
    out.sort()
    return out


def frame(body: bytes) -> bytes:
    """One journal line: CRC-32 of the JSON, a space, the JSON, a newline."""
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def unframe(line: bytes) -> bytes | None:
    """The JSON of a journal line (without its newline), or None when it is torn or corrupt."""
    if len(line) < 11 or line[8] != 0x20:
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    body = line[9:]
    return body if zlib.crc32(body) == crc else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_gateway_id(state_dir: str | Path) -> str:
    """This gateway's id, stable per state dir (``<state_dir>/gateway_id``, created once)."""
    path = Path(state_dir).expanduser() / "gateway_id"
    path.parent.mkdir(parents=True, exist_ok=True)
    value = "gw-" + secrets.token_hex(6)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        deadline = time.monotonic() + 5
        while not (text := path.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.01)  # another process is writing it
        if not text:
            raise JournalError(f"{path} is empty: delete it") from None
        return text
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return value


def _last_valid(data: bytes) -> tuple[int, bytes | None]:
    """(end of the last valid line, its JSON) in a segment's bytes."""
    pos = end = 0
    last = None
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return end, last
        body = unframe(data[pos:nl])
        if body is not None:
            last, end = body, nl + 1
        pos = nl + 1


# -- the writer -------------------------------------------------------------------------------


class Journal:
    """Group-committed, hash-chained, size-rotated journal of one gateway."""

    def __init__(
        self,
        directory: str | Path,
        gateway_id: str,
        secret: bytes,
        group_commit_ms: float = 2.0,
        segment_bytes: int = 64 << 20,
        max_batch: int = 4096,
        min_free_bytes: int = 0,
        disk_usage: DiskUsage = statvfs_usage,
        space_every: float = 1.0,
        on_the_way: Callable[[], int] | None = None,
    ) -> None:
        self.dir = Path(directory).expanduser()
        self.gateway_id = gateway_id
        self.secret = secret
        self.delay = group_commit_ms / 1000.0
        self.segment_bytes = segment_bytes
        self.max_batch = max_batch
        self.min_free_bytes = min_free_bytes
        self.disk_usage = disk_usage
        self.space_every = space_every
        # The journal's file system as last read by the writer thread (plain reads elsewhere).
        self.disk_free = 0
        self.disk_total = 0
        self.low_space = False
        self._space_at = -1e9
        # Called from the writer thread after each fsync with the last durable seq.
        self.on_commit: Callable[[int], None] | None = None
        # How many records are still on their way (requests begun, not yet appended); 0 ends a
        # group-commit wait at once: nobody else is coming, waiting would only add latency and
        # leave the CPU idle. None: always wait the full ``group_commit_ms``.
        self.on_the_way = on_the_way
        self.fsyncs = 0
        self.appended = 0
        self.head_seq = 0
        self.head_hash = GENESIS
        self.durable_seq = 0
        # (first seq of the active segment, bytes of it that are synced): the reader's limit.
        self.durable: tuple[int, int] = (0, 0)
        # The lock itself on the request path (``with`` a Condition costs two Python calls).
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queue: list[_Pending] = []
        self._since = 0.0
        self._phase = _BUSY
        self._closing = False
        self._last_batch = 0
        self._fd = -1
        self._seg_first = 0
        self._size = 0  # bytes of records in the active segment (where the next batch goes)
        self._zeroed = 0  # the active segment's length: zeros from _size on
        self._lock_fd = -1
        self._thread: threading.Thread | None = None
        # Committed records kept for the shipper (``recent``); 0: none kept.
        self.keep_recent = 0
        self._recent: collections.deque[_Kept] = collections.deque()
        self._recent_count = 0
        self._recent_lock = threading.Lock()

    # lifecycle ---------------------------------------------------------------------------

    def open(self, floor: tuple[int, str] | None = None) -> None:
        """Lock the directory, recover the tail, start the writer thread.

        ``floor`` is the store's (seq, hash) head for this gateway: if the journal is behind it
        (its files were lost), numbering continues after the store so nothing collides.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise JournalError(f"journal {self.dir} is in use by another process") from None
        self._recover()
        self._check_space(force=True)
        if floor is not None and floor[0] > self.head_seq:
            log.warning(
                "journal %s ends at seq %d but the store has seq %d: continuing after the store",
                self.dir,
                self.head_seq,
                floor[0],
            )
            self.head_seq, self.head_hash = floor
            if self._fd >= 0:
                self._trim()
                os.close(self._fd)
                self._fd = -1  # the next batch starts a segment named after its first seq
        self.durable_seq = self.head_seq
        self.durable = (self._seg_first, self._size)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="audit-journal", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, stop the thread, release the directory."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # the zeros written ahead are not records
                self._trim()
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _recover(self) -> None:
        segs = list_segments(self.dir)
        while segs:
            first, path = segs[-1]
            data = path.read_bytes()
            end, last = _last_valid(data)
            if end < len(data):
                if data.count(0, end) != len(data) - end:  # not just zeros written ahead
                    log.warning("journal %s: truncating %d bytes of torn tail", path.name, len(data) - end)
                with open(path, "r+b") as fh:
                    fh.truncate(end)
                    fh.flush()
                    os.fsync(fh.fileno())
            if last is not None:
                rec = orjson.loads(last)
                self.head_seq, self.head_hash = int(rec["seq"]), str(rec["hash"])
                if rec.get("gateway_id") != self.gateway_id:
                    log.warning(
                        "journal %s belongs to gateway %s, not %s: keeping its id",
                        self.dir,
                        rec.get("gateway_id"),
                        self.gateway_id,
                    )
                    self.gateway_id = str(rec["gateway_id"])
                self._fd = os.open(path, os.O_WRONLY)
                self._seg_first, self._size, self._zeroed = first, end, end
                return
            path.unlink()  # nothing valid in it: a segment created just before a crash
            segs.pop()
        self.head_seq, self.head_hash = 0, GENESIS

    # appending ---------------------------------------------------------------------------

    async def append(self, record: dict[str, Any]) -> int:
        """Journal ``record`` (adds gateway_id, seq, prev_hash, hash); return its seq once synced."""
        return await self.submit(record)

    def submit(self, record: dict[str, Any]) -> asyncio.Future[int]:
        """``append`` without the coroutine: queue ``record`` and return the future of its seq,
        resolved once it is synced (``JournalError`` at once when the journal is closed)."""
        loop = running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        with self._lock:
            if self._closing or self._thread is None:
                raise JournalError("the audit journal is closed")
            if not self._queue:
                self._since = time.monotonic()
            self._queue.append((record, fut, loop))
            phase = self._phase
            if phase == _IDLE:
                self._phase = _WOKEN
                self._cv.notify()
            elif phase == _GATHER and (len(self._queue) >= self.max_batch or self._nobody_coming()):
                self._cv.notify()
        return fut

    def _run(self) -> None:
        name_os_thread()  # `top -H` shows it by name
        cv = self._cv
        while True:
            batch: list[_Pending] | None = None
            with cv:
                self._phase = _IDLE
                while not self._queue and not self._closing:
                    if not cv.wait(self.space_every):
                        break  # idle for a while: look at the disk (outside the lock)
                if self._queue:
                    if self.delay > 0 and (len(self._queue) > 1 or self._last_batch > 1):
                        # Others are appending too: give them until `delay` after the first
                        # arrival, or until no other record is on its way.
                        self._phase = _GATHER
                        deadline = self._since + self.delay
                        while len(self._queue) < self.max_batch and not self._closing:
                            if self._nobody_coming():
                                break
                            left = deadline - time.monotonic()
                            if left <= 0:
                                break
                            cv.wait(left)
                    self._phase = _BUSY
                    batch, self._queue = self._queue, []
                elif self._closing:
                    return
            if batch is None:
                self._check_space()
                continue
            self._last_batch = len(batch)
            try:
                self._commit(batch)
            except Exception as exc:  # never let the thread die with waiters hanging
                log.exception("audit journal write failed")
                self._settle([(f, lp, None) for _, f, lp in batch], JournalError(str(exc)))

    def _nobody_coming(self) -> bool:
        on_the_way = self.on_the_way
        return on_the_way is not None and on_the_way() <= 0

    def _check_space(self, force: bool = False) -> None:
        """Refresh ``disk_free`` / ``low_space`` if the last reading is ``space_every`` old."""
        now = time.monotonic()
        if not force and now - self._space_at < self.space_every:
            return
        self._space_at = now
        try:
            free, total = self.disk_usage(self.dir)
        except OSError as exc:  # keep the last reading; the write itself reports real trouble
            log.warning("audit journal: cannot read the free space of %s: %s", self.dir, exc)
            return
        low = free < self.min_free_bytes
        changed = low != self.low_space
        # The flag before the reading: whoever sees the new reading sees its verdict too.
        self.low_space = low
        self.disk_free, self.disk_total = free, total
        if changed:
            if low:
                log.error(
                    "audit journal %s: %d bytes free, below audit.min_free_bytes (%d): new requests "
                    "are refused (503) until space is freed",
                    self.dir,
                    free,
                    self.min_free_bytes,
                )
            else:
                log.warning("audit journal %s: %d bytes free again: accepting requests", self.dir, free)

    def _commit(self, batch: list[_Pending]) -> None:
        self._check_space()
        seq, prev = self.head_seq, self.head_hash
        lines: list[bytes] = []
        entries: list[Entry] = []
        done: list[_Waiter] = []
        gid = self.gateway_id
        secret = self.secret
        for rec, fut, loop in batch:
            rec["gateway_id"] = gid
            rec["seq"] = seq + 1
            try:
                body = seal(secret, rec, prev)
            except TypeError as exc:  # orjson.JSONEncodeError: a value that is not JSON
                self._settle([(fut, loop, None)], JournalError(f"audit record is not serialisable: {exc}"))
                continue
            seq += 1
            prev = rec["hash"]
            lines.append(frame(body))
            entries.append((rec, body))
            done.append((fut, loop, seq))
        if not lines:
            return
        data = b"".join(lines)
        if self._fd < 0 or self._size >= self.segment_bytes:
            self._rotate(self.head_seq + 1)
        start = self._size
        if start + len(data) > self._zeroed and len(data) < _FILL_BELOW:
            self._zero_fill(start + len(data))
        try:
            view = memoryview(data)
            at = start
            while view:
                n = os.pwrite(self._fd, view, at)
                view = view[n:]
                at += n
            os.fdatasync(self._fd)
        except OSError as exc:
            # Undo the partial write so that seqs stay dense; these requests fail instead.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            self._zeroed = start
            log.error("audit journal write failed: %s", exc)
            self._settle(done, JournalError(f"audit journal write failed: {exc}"))
            return
        self._size += len(data)
        if self._zeroed < self._size:  # written past the zeros (none, or a fill that failed)
            self._zeroed = self._size
        self.fsyncs += 1
        self.appended += len(lines)
        self.head_seq, self.head_hash = seq, prev
        self.durable_seq = seq
        self.durable = (self._seg_first, self._size)
        self._settle(done)
        if self.keep_recent:
            self._keep(entries, start)
        if self.on_commit is not None:
            self.on_commit(seq)

    def _keep(self, entries: list[Entry], start: int) -> None:
        first = entries[0][0]["seq"]
        with self._recent_lock:
            recent = self._recent
            recent.append((first, entries, self._seg_first, start))
            self._recent_count += len(entries)
            while self._recent_count > self.keep_recent and len(recent) > 1:
                # The shipper is far behind: it reads these from the file.
                self._recent_count -= len(recent.popleft()[1])

    def recent(self, after: int, limit: int) -> tuple[list[Entry], tuple[int, int]] | None:
        """Up to ``limit`` committed records from seq ``after + 1`` on, from memory, with where
        the last one's line ends (segment, byte); None when the memory does not start there
        (read the file). Batches up to ``after`` are let go."""
        with self._recent_lock:
            recent = self._recent
            while recent and recent[0][0] + len(recent[0][1]) - 1 <= after:
                self._recent_count -= len(recent.popleft()[1])
            if not recent or not recent[0][0] <= after + 1:
                return None
            out: list[Entry] = []
            skip = after + 1 - recent[0][0]
            for batch in recent:
                entries = batch[1]
                taken = entries[skip : skip + limit - len(out)]
                out += taken
                used = skip + len(taken)  # of this batch's records
                if len(out) >= limit:
                    break
                skip = 0
            # The last batch used: its lines up to the last one taken, each its JSON and 10 bytes
            # (CRC, space, newline), follow its start in the file.
            _, _, seg, start = batch
            end = start + sum(len(body) + 10 for _, body in entries[:used])
        return out, (seg, end)

    def _rotate(self, first_seq: int) -> None:
        if self._fd >= 0:
            self._trim()  # a finished segment ends with its last record: read whole
            os.close(self._fd)  # already synced
        path = segment_path(self.dir, first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        size = os.fstat(self._fd).st_size
        self._seg_first, self._size, self._zeroed = first_seq, size, size
        _fsync_dir(self.dir)  # the new file's name must survive a crash too

    def _zero_fill(self, end: int) -> None:
        """Extend the active segment with zeros past ``end`` (see the module's docstring). If
        that fails (the disk is full), the records extend the file themselves, as they would
        without it; a part written is cut off again."""
        target = end + min(_ZERO_STEP, self.segment_bytes)
        at = max(self._zeroed, self._size)  # never over a record
        try:
            while at < target:
                at += os.pwrite(self._fd, _ZEROS[: target - at], at)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            self._zeroed = self._size
            return
        self._zeroed = target

    def _trim(self) -> None:
        """Cut the zeros written ahead off the active segment (synced: a reader of a finished
        segment reads it to its end)."""
        if self._zeroed > self._size:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
            self._zeroed = self._size

    @staticmethod
    def _settle(
        items: list[_Waiter],
        error: BaseException | None = None,
    ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int | None]]] = {}
        for fut, loop, seq in items:
            by_loop.setdefault(loop, []).append((fut, seq))
        for loop, futs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_wake, futs, error)

    # housekeeping ------------------------------------------------------------------------

    def delete_through(self, seq: int) -> int:
        """Delete segments whose every record has ``seq`` ≤ the given one (never the active one)."""
        segs = list_segments(self.dir)
        removed = 0
        for (_first, path), (next_first, _) in itertools.pairwise(segs):
            if next_first - 1 <= seq and next_first <= self.durable[0]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed


def _wake(futs: list[tuple[asyncio.Future[int], int | None]], error: BaseException | None) -> None:
    for fut, seq in futs:
        if fut.done():
            continue
        if error is not None or seq is None:
            fut.set_exception(error or JournalError("record not written"))
        else:
            fut.set_result(seq)


# -- the reader -------------------------------------------------------------------------------


class JournalReader:
    """Reads records back in seq order for the shipper, never past what the writer has synced."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()
        self._first = -1  # first seq of the segment being read
        self._pos = 0
        self._last = -1  # seq of the last record returned

    def read(self, after: int, limit: int, durable: tuple[int, int]) -> list[Entry]:
        """Up to ``limit`` records with seq > ``after``, as (record, JSON bytes).

        ``durable`` is the writer's (active segment, synced size): the active segment is read
        no further than that, so a record is never shipped before it is on disk.
        """
        if after != self._last or self._first < 0:
            self._seek(after)
        out: list[Entry] = []
        while self._first >= 0 and len(out) < limit:
            if self._read_segment(out, limit, durable):
                continue
            if self._first >= durable[0]:
                break  # the active segment: the rest is not written yet
            # An older segment is complete once a later one exists: go on to the next.
            nxt = [f for f, _ in list_segments(self.dir) if f > self._first]
            if not nxt:
                break
            self._first, self._pos = nxt[0], 0
        return out

    def position(self, first: int, pos: int, last: int) -> None:
        """Go on after the record with seq ``last``, whose line ends at byte ``pos`` of the
        segment starting at seq ``first`` (the records were taken from ``Journal.recent``)."""
        self._first, self._pos, self._last = first, pos, last

    def _seek(self, after: int) -> None:
        segs = list_segments(self.dir)
        start = [f for f, _ in segs if f <= after + 1]
        if segs and not start:
            log.warning(
                "journal %s starts at seq %d, after %d: records in between are gone",
                self.dir,
                segs[0][0],
                after + 1,
            )
        self._first = start[-1] if start else (segs[0][0] if segs else -1)
        self._pos = 0
        self._last = after

    def _read_segment(self, out: list[Entry], limit: int, durable: tuple[int, int]) -> bool:
        """Read on in the current segment; True when something was consumed."""
        if self._first > durable[0]:
            return False
        end = durable[1] if self._first == durable[0] else None
        if end is not None and self._pos >= end:
            return False
        path = segment_path(self.dir, self._first)
        chunk = _READ_CHUNK
        try:
            with open(path, "rb") as fh:
                while True:
                    fh.seek(self._pos)
                    size = chunk if end is None else min(chunk, end - self._pos)
                    data = fh.read(size)
                    if b"\n" in data or len(data) < size:
                        break
                    chunk *= 2  # one record longer than the chunk (a captured big body)
        except FileNotFoundError:
            return False
        pos = 0
        last = self._last
        while len(out) < limit:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            body = unframe(data[pos:nl])
            if body is None:
                log.error("journal %s: corrupt line at byte %d skipped", path.name, self._pos + pos)
                pos = nl + 1
                continue
            pos = nl + 1
            rec = orjson.loads(body)
            if rec["seq"] <= last:
                continue
            out.append((rec, body))
            last = rec["seq"]
        self._last = last
        self._pos += pos
        return pos > 0
