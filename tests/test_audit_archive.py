"""Archive files: JSONL.gz per UTC day, in a directory and in S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
from collections.abc import Iterator
from pathlib import Path

import boto3
import orjson
import pytest
from audit_support import SECRET, fill, sqlite_url
from helpers import free_port

from fortress.audit.archive import ArchiveSink, LocalTarget, S3Target, open_target, read_day
from fortress.audit.chain import is_sealed
from fortress.audit.journal import Journal, list_segments
from fortress.audit.shipper import Shipper
from fortress.audit.sql import SqlSink

# 30 s before and after midnight UTC, 2025-03-01 → 2025-03-02.
MIDNIGHT = dt.datetime(2025, 3, 2, tzinfo=dt.UTC).timestamp()
DAY1, DAY2 = "2025-03-01", "2025-03-02"


class Killed(BaseException):
    pass


async def journal_across_midnight(tmp_path: Path, n: int = 40) -> Journal:
    j = Journal(tmp_path / "j", "gw-a", SECRET, segment_bytes=8192)
    j.open()
    for i in range(n):
        await fill(j, 1, start=i, ts=MIDNIGHT - 30 + i * (60 / n))
    return j


async def run_shipper(j: Journal, db: Path, archive: ArchiveSink) -> Shipper:
    sh = Shipper(j, SqlSink(sqlite_url(db), j.gateway_id), archive, batch=7)
    sh.start()
    return sh


async def wait_for(pred, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def check_days(target, n: int = 40) -> None:
    day1, day2 = read_day(target, DAY1), read_day(target, DAY2)
    assert all(r["ts"] < MIDNIGHT for r in day1) and all(r["ts"] >= MIDNIGHT for r in day2)
    seqs = [r["seq"] for r in day1 + day2]
    assert sorted(seqs) == list(range(1, n + 1))  # every record exactly once
    assert all(is_sealed(SECRET, r) for r in day1 + day2)


async def test_local_archive_one_gz_per_day(tmp_path: Path) -> None:
    j = await journal_across_midnight(tmp_path)
    root = tmp_path / "archive"
    archive = ArchiveSink(LocalTarget(root), "gw-a", j.dir / "archive-state.json", every=3600)
    sh = await run_shipper(j, tmp_path / "f.db", archive)
    await wait_for(lambda: sh.store_pos >= 40)
    assert archive.parts == 0  # buffered until `every` passes or shutdown
    j.close()
    sh.stop()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jsonl.gz"))
    assert files == [
        f"{DAY1}/gw-a-000000000001-000000000020.jsonl.gz",
        f"{DAY2}/gw-a-000000000021-000000000040.jsonl.gz",
    ]
    lines = gzip.decompress((root / files[0]).read_bytes()).splitlines()
    assert [orjson.loads(x)["seq"] for x in lines] == list(range(1, 21))
    check_days(LocalTarget(root))
    # Both sinks have everything: only the active journal segment is left.
    assert len(list_segments(j.dir)) == 1


async def test_periodic_parts(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", "gw-a", SECRET)
    j.open()
    root = tmp_path / "archive"
    archive = ArchiveSink(LocalTarget(root), "gw-a", j.dir / "archive-state.json", every=0.05)
    sh = await run_shipper(j, tmp_path / "f.db", archive)
    for k in range(4):
        await fill(j, 10, start=k * 10, ts=MIDNIGHT + k)
        await wait_for(lambda k=k: archive.durable >= (k + 1) * 10)
    j.close()
    sh.stop()
    assert archive.parts >= 4
    records = read_day(LocalTarget(root), DAY2)
    assert [r["seq"] for r in records] == list(range(1, 41))


async def test_closed_days_are_merged_into_one_file(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", "gw-a", SECRET)
    j.open()
    root = tmp_path / "archive"
    archive = ArchiveSink(LocalTarget(root), "gw-a", j.dir / "archive-state.json", every=0.05)
    sh = await run_shipper(j, tmp_path / "f.db", archive)
    for k in range(3):  # day 1, both days, day 2
        for i in range(10):
            await fill(j, 1, start=k * 10 + i, ts=MIDNIGHT - 15 + k * 10 + i)
        await wait_for(lambda k=k: archive.durable >= (k + 1) * 10)
    j.close()
    sh.stop()
    before = sorted(p.name for p in root.rglob("*.jsonl.gz"))
    assert len(before) >= 4
    # Today's parts stay as they are; the two closed days become one file each.
    assert archive.compact_closed_days(now=MIDNIGHT + 1800) == 0
    assert archive.compact_closed_days() >= 2
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jsonl.gz")) == [
        f"{DAY1}/gw-a-000000000001-000000000015.jsonl.gz",
        f"{DAY2}/gw-a-000000000016-000000000030.jsonl.gz",
    ]
    check_days(LocalTarget(root), 30)


def test_a_merge_cut_short_counts_nothing_twice(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    target = LocalTarget(root)
    lines = [orjson.dumps({"gateway_id": "gw-a", "seq": s, "ts": MIDNIGHT + s}) + b"\n" for s in range(1, 7)]
    target.put(f"{DAY2}/gw-a-000000000001-000000000003.jsonl.gz", gzip.compress(b"".join(lines[:3])))
    target.put(f"{DAY2}/gw-a-000000000004-000000000006.jsonl.gz", gzip.compress(b"".join(lines[3:])))
    # The merged file landed, the parts were not deleted yet when the process died.
    merged = gzip.compress(b"".join(lines[:3])) + gzip.compress(b"".join(lines[3:]))
    target.put(f"{DAY2}/gw-a-000000000001-000000000006.jsonl.gz", merged)
    (root / DAY2 / ".gw-a-000000000001-000000000006.jsonl.gz.tmp").write_bytes(b"partial")
    assert [r["seq"] for r in read_day(target, DAY2)] == [1, 2, 3, 4, 5, 6]
    assert target.compact(DAY2, "gw-a") == 2
    assert sorted(p.name for p in (root / DAY2).iterdir()) == ["gw-a-000000000001-000000000006.jsonl.gz"]
    assert [r["seq"] for r in read_day(target, DAY2)] == [1, 2, 3, 4, 5, 6]


class CrashingTarget(LocalTarget):
    """Dies on the n-th put, before or after the part is stored."""

    def __init__(self, root: Path, n: int, after: bool) -> None:
        super().__init__(root)
        self.n, self.after = n, after

    def put(self, key: str, data: bytes) -> None:
        self.n -= 1
        if self.n == 0 and not self.after:
            raise Killed
        super().put(key, data)
        if self.n == 0:
            raise Killed


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("after", [False, True], ids=["before-put", "after-put"])
@pytest.mark.parametrize("nth", [1, 2])
async def test_crash_while_writing_parts_archives_each_record_once(
    tmp_path: Path, nth: int, after: bool
) -> None:
    j = await journal_across_midnight(tmp_path)
    root = tmp_path / "archive"
    state = j.dir / "archive-state.json"
    archive = ArchiveSink(CrashingTarget(root, nth, after), "gw-a", state, every=3600)
    sh = await run_shipper(j, tmp_path / "f.db", archive)
    await wait_for(lambda: sh.store_pos >= 40)
    sh.stop()  # the final flush dies on the nth part
    assert not sh.alive
    # The restarted process: the store has everything, the archive resumes on its own.
    archive2 = ArchiveSink(LocalTarget(root), "gw-a", state, every=3600)
    sh2 = await run_shipper(j, tmp_path / "f.db", archive2)
    await wait_for(lambda: archive2.accepted >= 40)
    j.close()
    sh2.stop()
    check_days(LocalTarget(root))


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a local fake; nothing reaches AWS)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


async def test_s3_archive(tmp_path: Path, s3_env: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="audit-bucket")
    target = open_target("s3://audit-bucket/fortress/prod")
    assert isinstance(target, S3Target)
    j = await journal_across_midnight(tmp_path)
    archive = ArchiveSink(target, "gw-a", j.dir / "archive-state.json", every=3600)
    sh = await run_shipper(j, tmp_path / "f.db", archive)
    await wait_for(lambda: sh.store_pos >= 40)
    j.close()
    sh.stop()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="audit-bucket")["Contents"])
    assert keys == [
        f"fortress/prod/{DAY1}/gw-a-000000000001-000000000020.jsonl.gz",
        f"fortress/prod/{DAY2}/gw-a-000000000021-000000000040.jsonl.gz",
    ]
    check_days(target)
    assert target.exists(keys[0][len("fortress/prod/") :]) and not target.exists("nope")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_s3_crash_after_upload_is_not_uploaded_twice(tmp_path: Path, s3_env: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="audit-crash")
    j = await journal_across_midnight(tmp_path)
    state = j.dir / "archive-state.json"

    class Dies(S3Target):
        def put(self, key: str, data: bytes) -> None:
            super().put(key, data)
            raise Killed

    archive = ArchiveSink(Dies("s3://audit-crash/a"), "gw-a", state, every=3600)
    sh = await run_shipper(j, tmp_path / "f.db", archive)
    await wait_for(lambda: sh.store_pos >= 40)
    sh.stop()
    assert not sh.alive
    archive2 = ArchiveSink(S3Target("s3://audit-crash/a"), "gw-a", state, every=3600)
    sh2 = await run_shipper(j, tmp_path / "f.db", archive2)
    await wait_for(lambda: archive2.accepted >= 40)
    j.close()
    sh2.stop()
    check_days(S3Target("s3://audit-crash/a"))
