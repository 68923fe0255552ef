"""The archive sink: records as gzipped JSON lines, partitioned by UTC day, in a directory or S3.

``audit.archive_dir`` is a directory, or ``s3://bucket/prefix`` (boto3; credentials and region
from the usual AWS chain, ``AWS_ENDPOINT_URL_S3`` for an S3-compatible store). Layout::

    <archive>/<YYYY-MM-DD>/<gateway_id>-<first seq>-<last seq>.jsonl.gz

Records are compressed as they arrive and written as one immutable part file per day every
``audit.archive_every`` seconds (or at 8 MiB compressed, or on shutdown). In a local directory
the parts of a closed day are then merged into one file per gateway and day (gzip members
concatenate); in S3 the part objects stay as they are. Either way ``zcat <day>/*.jsonl.gz`` is
that day's records. Each line is exactly the journal's sealed record, so the archive can be
verified like the store.

Exactly once: the archive keeps its own position in ``<journal_dir>/archive-state.json``
(with the last seq archived per day). Before a part is written its name is saved there as
pending; parts land atomically (local: write, fsync, rename; S3: one PUT), so after a crash a
pending part either exists, and its records are not archived again, or does not, and they are.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Protocol

import orjson

from fortress.audit.journal import Entry

log = logging.getLogger("fortress.audit.archive")

_MAX_BUFFER = 8 << 20  # compressed bytes buffered per day before a part is written early
_COMPACT_EVERY = 600.0  # seconds between looks for closed days to merge
_CLOSE_AFTER = 3600.0  # a UTC day is closed this long after it ends


class Target(Protocol):
    """Where part files go."""

    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def keys(self, prefix: str) -> list[str]: ...
    def get(self, key: str) -> bytes: ...


class LocalTarget:
    """A directory on this machine."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root.resolve())

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        # 0600 like the journal: records may hold captured request bodies.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        parent = base if prefix.endswith("/") else base.parent
        if not parent.is_dir():
            return []
        out = []
        for path in parent.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not path.name.startswith("."):
                out.append(key)
        return sorted(out)

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def days(self) -> list[str]:
        """The day directories present, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _DAY.fullmatch(p.name))

    def compact(self, day: str, gateway_id: str) -> int:
        """Merge one gateway's parts of a closed day into one part spanning them all.

        The merged file is written (fsync, rename) before the parts are deleted, and a part
        whose seq range lies inside another's is known to be merged already: a crash in between
        leaves nothing counted twice (``read_day`` skips such parts; the next run deletes them).
        Returns how many parts went away.
        """
        folder = self.root / day
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)  # a merge or a put cut short by a crash
        parts = _without_contained(
            [(key, *_range(key)) for key in self.keys(f"{day}/") if _ours(key, gateway_id)]
        )
        removed = 0
        for key in {k for k in self.keys(f"{day}/") if _ours(k, gateway_id)} - {k for k, _, _ in parts}:
            (self.root / key).unlink(missing_ok=True)  # merged before a crash
            removed += 1
        if len(parts) < 2:
            return removed
        first, last = parts[0][1], max(p[2] for p in parts)
        merged = self.root / part_key(day, gateway_id, first, last)
        tmp = folder / f".{merged.name}.tmp"
        with open(tmp, "wb") as out:
            for key, _, _ in parts:
                with open(self.root / key, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)  # gzip members concatenate
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, merged)
        _fsync_dir(folder)
        for key, _, _ in parts:
            (self.root / key).unlink(missing_ok=True)
        return removed + len(parts)


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_PART = re.compile(r"(?P<gw>.+)-(?P<first>\d{12})-(?P<last>\d{12})\.jsonl\.gz")


def _ours(key: str, gateway_id: str) -> bool:
    m = _PART.fullmatch(key.rsplit("/", 1)[-1])
    return m is not None and m.group("gw") == gateway_id


def _range(key: str) -> tuple[int, int]:
    m = _PART.fullmatch(key.rsplit("/", 1)[-1])
    assert m is not None
    return int(m.group("first")), int(m.group("last"))


def _without_contained(parts: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Parts (key, first, last) of one gateway and day, minus those inside another's range."""
    keep: list[tuple[str, int, int]] = []
    for part in sorted(parts, key=lambda p: (p[1], -p[2])):
        if keep and part[2] <= keep[-1][2]:
            continue
        keep.append(part)
    return keep


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Target:
    """``s3://bucket/prefix`` through boto3."""

    def __init__(self, url: str, client: Any = None) -> None:
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"bad S3 archive URL {url!r}: expected s3://bucket/prefix")
        self.url = url
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.client = client

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.prefix + key,
            Body=data,
            ContentType="application/x-ndjson",
            ContentEncoding="gzip",
        )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            out += [obj["Key"][len(self.prefix) :] for obj in page.get("Contents", [])]
        return sorted(out)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()


def open_target(archive_dir: str) -> Target:
    """The target ``audit.archive_dir`` names."""
    if archive_dir.startswith("s3://"):
        return S3Target(archive_dir)
    return LocalTarget(archive_dir)


def day_of(ts: float) -> str:
    """The UTC day of an epoch timestamp, as YYYY-MM-DD."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def part_key(day: str, gateway_id: str, first: int, last: int) -> str:
    return f"{day}/{gateway_id}-{first:012d}-{last:012d}.jsonl.gz"


class _DayBuffer:
    """One day's records since the last part, compressed as they come."""

    __slots__ = ("chunks", "count", "first", "last", "size", "zc")

    def __init__(self, first: int) -> None:
        self.first = first
        self.last = first
        self.count = 0
        self.size = 0
        self.chunks: list[bytes] = []
        self.zc = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: a gzip member

    def add(self, seq: int, line: bytes) -> None:
        out = self.zc.compress(line)
        if out:
            self.chunks.append(out)
            self.size += len(out)
        self.last = seq
        self.count += 1

    def finish(self) -> bytes:
        self.chunks.append(self.zc.flush())
        return b"".join(self.chunks)


class ArchiveSink:
    """Buffers records per UTC day and writes part files (see the module docstring)."""

    name = "archive"

    def __init__(self, target: Target, gateway_id: str, state_file: str | Path, every: float = 300.0) -> None:
        self.target = target
        self.gateway_id = gateway_id
        self.state_file = Path(state_file)
        self.every = every
        self.durable = 0  # every record with seq <= this is in a part file
        self.accepted = 0  # last seq buffered
        self.parts = 0
        self._days_done: dict[str, int] = {}  # day -> last seq written for it (see module doc)
        self._buffers: dict[str, _DayBuffer] = {}
        self._since = 0.0
        self._compacted_at = 0.0

    def open(self) -> int:
        """Load the position; return it (0 for a new archive)."""
        state: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError):
            state = orjson.loads(self.state_file.read_bytes())
        if state and state.get("target") != self.target.url:
            log.warning("archive target changed to %s: archiving from the journal's start", self.target.url)
            state = {}
        self.durable = self.accepted = int(state.get("seq", 0))
        self._days_done = {str(k): int(v) for k, v in state.get("days", {}).items()}
        pending = state.get("pending")
        if pending:
            # A part was being written when the process died: if it landed, it counts.
            key, day, last = pending
            if self.target.exists(key):
                self._days_done[day] = max(self._days_done.get(day, 0), int(last))
        self._buffers.clear()
        return self.durable

    def write(self, entries: list[Entry]) -> None:
        """Buffer records (seq order) beyond what is archived; write parts that are due."""
        for rec, raw in entries:
            seq = rec["seq"]
            if seq <= self.accepted:
                continue
            day = day_of(rec["ts"])
            self.accepted = seq
            if seq <= self._days_done.get(day, 0):
                continue  # in a part written just before a crash
            buf = self._buffers.get(day)
            if buf is None:
                if not self._buffers:
                    self._since = time.monotonic()
                buf = self._buffers[day] = _DayBuffer(seq)
            buf.add(seq, raw + b"\n")
            if buf.size >= _MAX_BUFFER:
                self.flush()
        if not self._buffers and self.accepted > self.durable:
            self._save(self.accepted)  # everything was in parts already

    def tick(self) -> None:
        """Write parts when the oldest buffered record has waited ``every`` seconds; now and
        then, merge the parts of closed days (local directories only)."""
        now = time.monotonic()
        if self._buffers and now - self._since >= self.every:
            self.flush()
        if now - self._compacted_at >= _COMPACT_EVERY:
            self._compacted_at = now
            self.compact_closed_days()

    def compact_closed_days(self, now: float | None = None) -> int:
        """Merge each closed day's parts into one ``.jsonl.gz`` per day (local target only).

        A day is closed an hour after it ends: records are stamped with their request's start,
        so a long request may still add to the day before.
        """
        target = self.target
        if not isinstance(target, LocalTarget):
            return 0  # S3 keeps its part objects: merging would mean downloading them
        cutoff = day_of((time.time() if now is None else now) - _CLOSE_AFTER)
        removed = 0
        for day in target.days():
            if day < cutoff and day not in self._buffers:
                removed += target.compact(day, self.gateway_id)
        return removed

    def flush(self) -> None:
        """Write every buffered day as a part file, then record the new position."""
        for day in sorted(self._buffers):
            buf = self._buffers[day]
            key = part_key(day, self.gateway_id, buf.first, buf.last)
            self._save(None, pending=(key, day, buf.last))  # intent first: see open()
            self.target.put(key, buf.finish())
            self.parts += 1
            del self._buffers[day]
            self._days_done[day] = buf.last
        self._save(self.accepted)

    def close(self) -> None:
        self.flush()

    def _save(self, seq: int | None, pending: tuple[str, str, int] | None = None) -> None:
        if seq is not None:
            self.durable = seq
            # Per-day marks are only needed above the position.
            self._days_done = {d: s for d, s in self._days_done.items() if s > seq}
        state = {"target": self.target.url, "seq": self.durable, "days": self._days_done, "pending": pending}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(state))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)


def read_day(target: Target, day: str, gateway_id: str | None = None) -> list[dict[str, Any]]:
    """Every record archived for ``day`` (optionally one gateway's), in seq order per gateway."""
    import gzip

    records: list[dict[str, Any]] = []
    by_gateway: dict[str, list[tuple[str, int, int]]] = {}
    for key in target.keys(f"{day}/"):
        m = _PART.fullmatch(key.rsplit("/", 1)[-1])
        if m is None or (gateway_id is not None and m.group("gw") != gateway_id):
            continue
        by_gateway.setdefault(m.group("gw"), []).append((key, *_range(key)))
    keys = [k for parts in by_gateway.values() for k, _, _ in _without_contained(parts)]
    for key in keys:
        for line in gzip.decompress(target.get(key)).splitlines():
            if line:
                records.append(orjson.loads(line))
    records.sort(key=lambda r: (r["gateway_id"], r["seq"]))
    return records
