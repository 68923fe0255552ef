"""The archive sink: records as gzipped JSON lines, partitioned by UTC day, in a directory or S3.

``audit.archive_dir`` is a directory, or ``s3://bucket/prefix`` (boto3; credentials and region
from the usual AWS chain, ``AWS_ENDPOINT_URL_S3`` for an S3-compatible store). Layout::

    <archive>/<YYYY-MM-DD>/<gateway_id>-<first seq>-<last seq>.jsonl.gz

Records are compressed as they arrive and written as one immutable part file per day every
``audit.archive_every`` seconds (or at 8 MiB compressed, or on shutdown); a day's archive is
the concatenation of its parts in seq order (``zcat 2025-01-31/*.jsonl.gz``; gzip members
concatenate). Each line is exactly the journal's sealed record, so the archive can be verified
like the store.

Exactly once: the archive keeps its own position in ``<journal_dir>/archive-state.json``,
updated after each part lands (local: write, fsync, rename; S3: one PUT, atomic), together with
the last seq archived per day, so parts written just before a crash are not written again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any, Protocol

import orjson

from fortress.audit.journal import Entry

log = logging.getLogger("fortress.audit.archive")

_MAX_BUFFER = 8 << 20  # compressed bytes buffered per day before a part is written early


class Target(Protocol):
    """Where part files go."""

    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
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
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def list(self, prefix: str) -> list[str]:
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
            Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType="application/x-ndjson",
            ContentEncoding="gzip",
        )

    def list(self, prefix: str) -> list[str]:
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
        """Write parts when the oldest buffered record has waited ``every`` seconds."""
        if self._buffers and time.monotonic() - self._since >= self.every:
            self.flush()

    def flush(self) -> None:
        """Write every buffered day as a part file, then record the new position."""
        for day in sorted(self._buffers):
            buf = self._buffers[day]
            self.target.put(part_key(day, self.gateway_id, buf.first, buf.last), buf.finish())
            self.parts += 1
            del self._buffers[day]
            self._days_done[day] = buf.last
            self._save(None)  # this day's part is in: never write it twice
        self._save(self.accepted)

    def close(self) -> None:
        self.flush()

    def _save(self, seq: int | None) -> None:
        if seq is not None:
            self.durable = seq
            # Per-day marks are only needed above the position.
            self._days_done = {d: s for d, s in self._days_done.items() if s > seq}
        state = {"target": self.target.url, "seq": self.durable, "days": self._days_done}
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
    for key in target.list(f"{day}/"):
        name = key.rsplit("/", 1)[-1]
        if gateway_id is not None and not name.startswith(gateway_id + "-"):
            continue
        for line in gzip.decompress(target.get(key)).splitlines():
            if line:
                records.append(orjson.loads(line))
    records.sort(key=lambda r: (r["gateway_id"], r["seq"]))
    return records
