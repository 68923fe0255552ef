"""The audit journal: group commit, durability, torn-tail recovery, rotation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest
from audit_support import SECRET, fill, sample

from fortress.audit.chain import GENESIS, is_sealed
from fortress.audit.journal import (
    Journal,
    JournalError,
    JournalReader,
    frame,
    list_segments,
    load_gateway_id,
    unframe,
)


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def read_all(journal: Journal) -> list[dict]:
    return [rec for rec, _ in JournalReader(journal.dir).read(0, 10**9, journal.durable)]


def check_chain(records: list[dict], first: int = 1) -> None:
    prev = records[0]["prev_hash"] if first != 1 else GENESIS
    for i, rec in enumerate(records):
        assert rec["seq"] == first + i
        assert rec["prev_hash"] == prev
        assert is_sealed(SECRET, rec)
        prev = rec["hash"]


@pytest.fixture
def journal(tmp_path: Path):
    j = Journal(tmp_path / "journal", "gw-test", SECRET, group_commit_ms=5)
    j.open()
    yield j
    j.close()


async def test_concurrent_appends_share_fsyncs(journal: Journal) -> None:
    n = 2000
    seqs = await asyncio.gather(*(journal.append(sample(i)) for i in range(n)))
    assert sorted(seqs) == list(range(1, n + 1))
    # Every append waited for an fsync covering it, yet they shared very few.
    assert journal.fsyncs <= n // 20, journal.fsyncs
    records = read_all(journal)
    assert len(records) == n
    check_chain(records)
    assert {r["request_id"] for r in records} == {f"req-{i}" for i in range(n)}


async def test_lone_append_does_not_wait_for_company(tmp_path: Path) -> None:
    # A group-commit delay of an hour: an append that waited for company would never return in
    # time. (How fast a lone append is: bench/unit_budgets.py.)
    j = Journal(tmp_path / "j", "gw-test", SECRET, group_commit_ms=3_600_000)
    j.open()
    try:
        assert await asyncio.wait_for(fill(j, 5), 60) == [1, 2, 3, 4, 5]
        assert j.fsyncs == 5  # each one synced on its own
    finally:
        j.close()


async def test_group_commit_stops_waiting_when_nobody_else_is_coming(tmp_path: Path) -> None:
    # A group-commit delay of an hour, and appends that would wait for company (a batch of
    # several came before): they commit as soon as no other record is on its way.
    on_the_way = [0]
    j = Journal(
        tmp_path / "j", "gw-test", SECRET, group_commit_ms=3_600_000, on_the_way=lambda: on_the_way[0]
    )
    j.open()
    try:

        async def record(i: int) -> int:
            on_the_way[0] -= 1  # what AuditTrail.record does before it appends
            return await j.append(sample(i))

        for round_ in range(3):
            on_the_way[0] = 8  # eight requests begun
            got = await asyncio.wait_for(asyncio.gather(*(record(round_ * 8 + i) for i in range(8))), 60)
            assert sorted(got) == list(range(round_ * 8 + 1, round_ * 8 + 9))
        assert j.fsyncs <= 3 * 8
        check_chain(read_all(j))
    finally:
        j.close()


async def test_group_commit_waits_while_a_record_is_still_on_its_way(tmp_path: Path) -> None:
    on_the_way = [0]
    j = Journal(tmp_path / "j", "gw-test", SECRET, group_commit_ms=300, on_the_way=lambda: on_the_way[0])
    j.open()
    try:
        await j.append(sample(0))
        j._last_batch = 2  # as after a batch of several: the next append gathers company
        on_the_way[0] = 1  # another request is still on its way: this one waits for it
        t0 = time.monotonic()
        await j.append(sample(2))
        assert time.monotonic() - t0 >= 0.25  # the group-commit delay, not at once
        on_the_way[0] = 0
        j._last_batch = 2
        t0 = time.monotonic()
        await j.append(sample(3))
        assert time.monotonic() - t0 < 0.25  # nobody else coming: no wait
    finally:
        j.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names through /proc are Linux's")
async def test_the_writer_thread_has_its_name_at_the_os_level(journal: Journal) -> None:
    await journal.append(sample(0))  # the thread has run
    names = thread_names()
    assert "audit-journal" in names, names  # what `top -H` and `ps -L` show


def thread_names() -> set[str]:
    """The OS names of this process's threads."""
    return {p.read_text().strip() for p in Path(f"/proc/{os.getpid()}/task").glob("*/comm")}


async def test_append_returns_only_after_fsync(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        real(fd)
        synced.append(journal.fsyncs + 1)

    monkeypatch.setattr(os, "fdatasync", spy)
    await journal.append(sample(0))
    assert synced and journal.durable_seq == 1


async def test_seq_and_chain_continue_after_restart(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = Journal(d, "gw-test", SECRET)
    j.open()
    await fill(j, 10)
    head = j.head_hash
    j.close()
    j2 = Journal(d, "gw-test", SECRET)
    j2.open()
    try:
        assert (j2.head_seq, j2.head_hash) == (10, head)
        assert await j2.append(sample(10)) == 11
        check_chain(read_all(j2))
    finally:
        j2.close()


@pytest.mark.parametrize(
    "tail",
    [
        b'0badc0de {"seq": 11, "partial',  # cut mid-line, no newline
        frame(b'{"seq":11}')[:-5],  # a valid frame cut short
        b"deadbeef " + b'{"seq": 11}' + b"\n",  # complete line, wrong CRC
        b"\x00" * 300,  # zeros from a file extended before the data reached the disk
    ],
)
async def test_torn_tail_is_truncated_on_recovery(tmp_path: Path, tail: bytes) -> None:
    d = tmp_path / "j"
    j = Journal(d, "gw-test", SECRET)
    j.open()
    await fill(j, 10)
    j.close()
    (_, seg), *_ = list_segments(d)
    good = seg.stat().st_size
    append_bytes(seg, tail)
    j2 = Journal(d, "gw-test", SECRET)
    j2.open()
    try:
        assert seg.stat().st_size == good  # the torn bytes are gone
        assert j2.head_seq == 10
        assert await j2.append(sample(10)) == 11
        records = read_all(j2)
        assert len(records) == 11
        check_chain(records)
    finally:
        j2.close()


async def test_empty_segment_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    d = tmp_path / "j"
    j = Journal(d, "gw-test", SECRET, segment_bytes=4096)
    j.open()
    await fill(j, 3)
    j.close()
    (d / "seg-0000000000000004.log").write_bytes(b"0000")  # created, torn before any line
    j2 = Journal(d, "gw-test", SECRET)
    j2.open()
    try:
        assert j2.head_seq == 3
        assert not (d / "seg-0000000000000004.log").exists()
        assert await j2.append(sample(3)) == 4
    finally:
        j2.close()


async def test_the_active_segment_is_zero_filled_ahead_and_trimmed_on_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "j"
    j = Journal(d, "gw-test", SECRET)
    j.open()
    try:
        await fill(j, 5)
        (_, seg), *_ = list_segments(d)
        end = j.durable[1]
        data = seg.read_bytes()
        # Written ahead of the records: the next fdatasyncs have no file size to commit.
        assert len(data) > end and data[end:] == bytes(len(data) - end)
        assert data[:end].endswith(b"\n") and len(read_all(j)) == 5
        # A crash now leaves the zeros on disk: a copy of the directory is that state.
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        (crashed / seg.name).write_bytes(data)
    finally:
        j.close()
    assert seg.read_bytes() == data[:end]  # closed: it ends with its last record
    caplog.set_level("WARNING", logger="fortress.audit.journal")
    for directory in (d, crashed):
        j2 = Journal(directory, "gw-test", SECRET)
        j2.open()
        try:
            assert j2.head_seq == 5 and await j2.append(sample(5)) == 6
            check_chain(read_all(j2))
        finally:
            j2.close()
    assert not [r for r in caplog.records if "torn" in r.getMessage()]  # zeros are not torn
    append_bytes(crashed / seg.name, b"0123")  # a torn record after the last one: that is
    j3 = Journal(crashed, "gw-test", SECRET)
    j3.open()
    j3.close()
    assert [r for r in caplog.records if "torn" in r.getMessage()]


async def test_a_large_batch_extends_the_segment_itself(journal: Journal) -> None:
    # 70 KB in one batch: zeros ahead would double what its fdatasync writes.
    assert await journal.append(sample(0, body={"text": "x" * 70_000})) == 1
    (_, seg), *_ = list_segments(journal.dir)
    assert seg.stat().st_size == journal.durable[1]
    assert await journal.append(sample(1)) == 2  # a small one fills ahead again
    assert seg.stat().st_size > journal.durable[1]
    assert [r["seq"] for r in read_all(journal)] == [1, 2]


FULL_DISK_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, resource, signal, sys
    sys.path.insert(0, {tests!r})
    from audit_support import SECRET, sample
    from fortress.audit.journal import Journal, list_segments

    # Files may not grow past 64 KiB: the zeros written ahead (1 MiB) cannot be, the records can.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails (EFBIG), no signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))

    async def main():
        j = Journal({dir!r}, "gw-test", SECRET)
        j.open()
        seqs = [await j.append(sample(i)) for i in range(20)]
        (_, seg), *_ = list_segments(j.dir)
        size, end = os.path.getsize(seg), j.durable[1]
        j.close()
        print(json.dumps({{"seqs": seqs, "size": size, "end": end}}))

    asyncio.run(main())
    """
)


def test_a_disk_too_small_for_the_zeros_still_takes_every_record(tmp_path: Path) -> None:
    d = tmp_path / "j"
    script = tmp_path / "child.py"
    script.write_text(FULL_DISK_CHILD.format(tests=str(Path(__file__).parent), dir=str(d)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = orjson.loads(done.stdout)
    assert got["seqs"] == list(range(1, 21))
    assert got["size"] == got["end"]  # the records extended the file themselves, no zeros left
    j = Journal(d, "gw-test", SECRET)
    j.open()
    try:
        records = read_all(j)
        assert len(records) == 20
        check_chain(records)
    finally:
        j.close()


async def test_segments_rotate_and_shipped_ones_are_deleted(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", "gw-test", SECRET, segment_bytes=4096)
    j.open()
    try:
        await fill(j, 60)
        segs = list_segments(j.dir)
        assert len(segs) >= 4
        # A finished segment ends with its last record; only the active one has zeros ahead.
        for first, path in segs[:-1]:
            data = path.read_bytes()
            assert data.endswith(b"\n") and b"\0" not in data, first
        active = segs[-1][1].read_bytes()
        assert len(active) > j.durable[1] and b"\0" not in active[: j.durable[1]]
        records = read_all(j)
        assert [r["seq"] for r in records] == list(range(1, 61))
        check_chain(records)
        # Delete what is shipped up to seq 30: whole segments only, never the active one.
        j.delete_through(30)
        left = list_segments(j.dir)
        assert left[0][0] <= 31 and len(left) < len(segs)
        remaining = [rec for rec, _ in JournalReader(j.dir).read(30, 10**9, j.durable)]
        assert [r["seq"] for r in remaining] == list(range(31, 61))
        j.delete_through(10**9)
        assert list_segments(j.dir)[-1] == segs[-1]  # the active segment stays
    finally:
        j.close()


async def test_reader_never_reads_past_durable(journal: Journal) -> None:
    await fill(journal, 5)
    first, size = journal.durable
    # Bytes after the synced size (a write in progress) are not handed out.
    append_bytes(list_segments(journal.dir)[-1][1], frame(b'{"seq": 6, "hash": "x"}'))
    reader = JournalReader(journal.dir)
    assert [r["seq"] for r, _ in reader.read(0, 100, (first, size))] == [1, 2, 3, 4, 5]


async def test_recent_records_are_the_files_and_hand_over_to_the_reader(tmp_path: Path) -> None:
    """What the shipper takes from memory is what the files hold, and the reader goes on exactly
    where memory left off, across batches, partial batches and segment rotations."""
    j = Journal(tmp_path / "j", "gw-test", SECRET, group_commit_ms=2, segment_bytes=4096)
    j.keep_recent = 60
    j.open()
    try:
        await fill(j, 20)  # one record per batch
        for w in range(8):  # batches of several records
            await asyncio.gather(*(j.append(sample(100 * w + i)) for i in range(10)))
        assert j.durable_seq == 100 and len(list_segments(j.dir)) >= 4
        assert j._recent_count <= 60  # bounded: the shipper can fall behind
        on_disk = JournalReader(j.dir).read(0, 10**9, j.durable)
        assert j.recent(0, 10) is None  # the oldest batches were let go: read the file
        kept = j.recent(50, 10**9)
        assert kept is not None
        low = kept[0][0][0]["seq"] - 1
        assert low <= 50 and j.recent(low - 1, 1) is None
        for after in range(low, 100):
            for limit in (1, 3, 7, 10**9):
                got = j.recent(after, limit)
                assert got is not None
                entries, (seg, end) = got
                want = on_disk[after : after + limit]
                assert [(r, b) for r, b in entries] == [(r, b) for r, b in want]
                last, body = entries[-1][0]["seq"], entries[-1][1]
                data = (j.dir / f"seg-{seg:016d}.log").read_bytes()
                assert end == data.index(body + b"\n") + len(body) + 1  # right after its line
                reader = JournalReader(j.dir)
                reader.position(seg, end, last)
                assert reader.read(last, 10**9, j.durable) == on_disk[last:]
        # Asking from a seq lets the batches up to it go.
        assert j.recent(100, 10) is None and j._recent_count == 0
    finally:
        j.close()


async def test_one_process_per_journal(journal: Journal) -> None:
    other = Journal(journal.dir, "gw-test", SECRET)
    with pytest.raises(JournalError, match="in use"):
        other.open()


async def test_floor_from_the_store_avoids_reusing_seqs(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", "gw-test", SECRET)
    j.open(floor=(41, "ab" * 32))
    try:
        assert await j.append(sample(0)) == 42
        (rec,) = read_all(j)
        assert rec["prev_hash"] == "ab" * 32
    finally:
        j.close()


async def test_write_failure_fails_the_append_and_keeps_seqs_dense(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(journal, 2)
    real = os.fdatasync

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(JournalError, match="No space"):
        await journal.append(sample(2))
    monkeypatch.setattr(os, "fdatasync", real)
    assert await journal.append(sample(3)) == 3
    records = read_all(journal)
    assert [r["request_id"] for r in records] == ["req-0", "req-1", "req-3"]
    check_chain(records)


async def test_unserialisable_record_fails_alone(journal: Journal) -> None:
    bad = sample(1, body={"x": object()})
    results = await asyncio.gather(journal.append(sample(0)), journal.append(bad), return_exceptions=True)
    assert results[0] == 1 and isinstance(results[1], JournalError)
    assert await journal.append(sample(2)) == 2


def test_frame_roundtrip() -> None:
    body = orjson.dumps({"seq": 1, "x": "é"})
    line = frame(body)
    assert line.endswith(b"\n") and unframe(line[:-1]) == body
    assert unframe(line[:-2]) is None
    assert unframe(b"zzzzzzzz " + body) is None


def test_gateway_id_is_stable(tmp_path: Path) -> None:
    a = load_gateway_id(tmp_path)
    assert a.startswith("gw-") and load_gateway_id(tmp_path) == a


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {tests!r})
    from audit_support import SECRET, sample
    from fortress.audit.journal import Journal

    async def main():
        j = Journal({dir!r}, "gw-test", SECRET, group_commit_ms=1)
        j.open()
        async def worker(w):
            i = 0
            while True:
                seq = await j.append(sample(w * 1_000_000 + i))
                sys.stdout.write(f"{{seq}}\\n")
                sys.stdout.flush()
                i += 1
        await asyncio.gather(*(worker(w) for w in range(32)))

    asyncio.run(main())
    """
)


def test_kill_9_loses_no_acknowledged_record(tmp_path: Path) -> None:
    d = tmp_path / "j"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), dir=str(d)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    acked: list[int] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while len(acked) < 3000 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 3000, "the child did not acknowledge enough appends"
    j = Journal(d, "gw-test", SECRET)
    j.open()
    try:
        records = read_all(j)
        check_chain(records)
        assert records[-1]["seq"] >= max(acked)  # every acknowledged record survived
        assert await_append(j) == records[-1]["seq"] + 1
    finally:
        j.close()


def await_append(j: Journal) -> int:
    return asyncio.run(j.append(sample(-1)))


async def test_a_waiting_writer_is_woken_once_not_by_every_record(tmp_path: Path) -> None:
    """Records that arrive before the woken writer thread runs do not signal it again (each
    signal was a Python-level Condition.notify on the request path)."""
    import threading

    from fortress.audit import journal as journal_module

    j = Journal(tmp_path / "j", "gw-test", SECRET)
    signals = 0

    class Counting:
        def notify(self) -> None:
            nonlocal signals
            signals += 1

    j._cv = Counting()  # type: ignore[assignment]
    j._thread = threading.current_thread()  # stands in for a started writer that has not run yet
    j._phase = journal_module._IDLE
    futures = [j.submit(sample(i)) for i in range(5)]
    assert signals == 1 and j._phase == journal_module._WOKEN and len(j._queue) == 5
    j._phase = journal_module._BUSY  # writing: records queue up without a signal
    futures.append(j.submit(sample(5)))
    assert signals == 1
    for f in futures:
        f.cancel()
