"""The shipper: journal → store (SQLite and real PostgreSQL), resume after a crash, no duplicates."""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path

import pytest
from audit_support import SECRET, fill, sample, sql, sqlite_url
from sqlalchemy import func, select

from fortress.audit.journal import Entry, Journal, list_segments
from fortress.audit.query import verify
from fortress.audit.shipper import Shipper
from fortress.audit.sql import SqlSink
from fortress.store import tables


class Killed(BaseException):
    """Stands in for kill -9: not an Exception, so nothing in the shipper catches it."""


def stored(url: str, gateway_id: str) -> list[int]:
    store = SqlSink(url, gateway_id)
    t = tables.audit_records
    with store.connect().connect() as conn:
        rows = conn.execute(select(t.c.seq).where(t.c.gateway_id == gateway_id).order_by(t.c.seq))
        return [r[0] for r in rows]


def offset(url: str, gateway_id: str) -> int:
    return SqlSink(url, gateway_id).offset()


async def wait_for(pred, seconds: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not pred():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def gid() -> str:
    return "gw-" + secrets.token_hex(4)


async def ship_and_check(tmp_path: Path, url: str, n: int = 2500) -> None:
    g = gid()
    j = Journal(tmp_path / "j", g, SECRET, group_commit_ms=1, segment_bytes=64 * 1024)
    j.open()
    sh = Shipper(j, SqlSink(url, g), batch=400, anchor_every=0.05)
    sh.start()
    await asyncio.gather(*(fill(j, n // 50, start=w * 1000) for w in range(50)))
    await wait_for(lambda: sh.store_pos >= n)
    j.close()
    sh.stop()
    assert stored(url, g) == list(range(1, n + 1))
    assert offset(url, g) == n
    # Shipped segments are gone, the active one stays.
    assert len(list_segments(j.dir)) == 1
    report = verify(SqlSink(url, g).connect(), SECRET, gateway=g, anchors_file=j.dir / "anchors.jsonl")
    assert report.ok, report.problems
    assert report.anchors[g] >= 1


async def test_ships_to_sqlite(tmp_path: Path) -> None:
    await ship_and_check(tmp_path, sqlite_url(tmp_path / "fortress.db"))


async def test_ships_to_postgres(tmp_path: Path, postgres_url: str) -> None:
    await ship_and_check(tmp_path, postgres_url)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("where", ["inserted", "committed"])
async def test_resumes_after_kill_mid_batch_without_duplicates(tmp_path: Path, where: str) -> None:
    url = sqlite_url(tmp_path / "fortress.db")
    j = Journal(tmp_path / "j", "gw-a", SECRET, group_commit_ms=1)
    j.open()
    await fill(j, 1000)
    calls = 0

    def fault(point: str) -> None:
        nonlocal calls
        if point == where:
            calls += 1
            if calls == 3:
                raise Killed  # dies in the 3rd batch: inside its transaction, or just after commit

    store = SqlSink(url, "gw-a", fault=fault)
    sh = Shipper(j, store, batch=100)
    sh.start()
    await wait_for(lambda: not sh.alive)
    done = stored(url, "gw-a")
    assert done == list(range(1, (300 if where == "committed" else 200) + 1))
    assert offset(url, "gw-a") == len(done)
    # A new shipper (the restarted process) carries on from the persisted offset.
    await fill(j, 200, start=1000)
    sh2 = Shipper(j, SqlSink(url, "gw-a"), batch=100)
    sh2.start()
    await wait_for(lambda: sh2.store_pos >= 1200)
    j.close()
    sh2.stop()
    assert stored(url, "gw-a") == list(range(1, 1201))
    assert verify(SqlSink(url, "gw-a").connect(), SECRET).ok


async def test_replaying_shipped_records_is_harmless(tmp_path: Path, postgres_url: str) -> None:
    for url in (sqlite_url(tmp_path / "fortress.db"), postgres_url):
        g = gid()
        j = Journal(tmp_path / g, g, SECRET)
        j.open()
        await fill(j, 300)
        sh = Shipper(j, SqlSink(url, g), batch=64)
        sh.start()
        await wait_for(lambda sh=sh: sh.store_pos >= 300)
        sh.stop()
        # As if the offset had been lost: everything is shipped a second time.
        t = tables.shipper_offsets
        store = SqlSink(url, g)
        with store.connect().begin() as conn:
            conn.execute(t.delete().where(t.c.gateway_id == g))
        sh2 = Shipper(j, SqlSink(url, g), batch=64)
        sh2.start()
        await wait_for(lambda sh2=sh2: sh2.store_pos >= 300)
        sh2.stop()
        j.close()
        assert stored(url, g) == list(range(1, 301))
        assert sh2.shipped == 300 and offset(url, g) == 300


async def test_store_outage_is_retried_while_the_journal_keeps_going(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "fortress.db")
    failures = 2

    def fault(point: str) -> None:
        nonlocal failures
        if point == "inserted" and failures:
            failures -= 1
            raise ConnectionError("database is down")

    j = Journal(tmp_path / "j", "gw-a", SECRET)
    j.open()
    sh = Shipper(j, SqlSink(url, "gw-a", fault=fault), batch=50)
    sh.start()
    await fill(j, 120)  # appends are not held up by the store
    await wait_for(lambda: sh.store_pos >= 120, seconds=30)
    assert failures == 0
    j.close()
    sh.stop()
    assert stored(url, "gw-a") == list(range(1, 121))


async def test_stop_ships_the_rest_and_anchors_the_head(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "fortress.db")
    j = Journal(tmp_path / "j", "gw-a", SECRET)
    j.open()
    sh = Shipper(j, SqlSink(url, "gw-a"), anchor_every=3600)
    sh.start()
    await fill(j, 10)
    j.close()
    sh.stop()
    assert stored(url, "gw-a") == list(range(1, 11))
    anchors = sql(tmp_path / "fortress.db", "SELECT seq, hash FROM audit_anchors")
    assert anchors == [(10, j.head_hash)]
    assert (j.dir / "anchors.jsonl").read_text().count("\n") == 1


async def test_restarted_journal_without_files_continues_after_the_store(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "fortress.db")
    j = Journal(tmp_path / "j", "gw-a", SECRET)
    j.open()
    sh = Shipper(j, SqlSink(url, "gw-a"))
    sh.start()
    await fill(j, 5)
    j.close()
    sh.stop()
    # The journal directory is lost; the store still has seq 1..5.
    for _, p in list_segments(j.dir):
        p.unlink()
    store = SqlSink(url, "gw-a")
    j2 = Journal(tmp_path / "j", "gw-a", SECRET)
    j2.open(store.head())
    sh2 = Shipper(j2, SqlSink(url, "gw-a"))
    sh2.start()
    assert await j2.append(sample(5)) == 6
    await wait_for(lambda: sh2.store_pos >= 6)
    j2.close()
    sh2.stop()
    assert stored(url, "gw-a") == [1, 2, 3, 4, 5, 6]
    assert verify(store.connect(), SECRET).ok


def test_postgres_and_sqlite_store_the_same_values(tmp_path: Path, postgres_url: str) -> None:
    rec = {**sample(3), "gateway_id": gid(), "seq": 1, "prev_hash": "0" * 64, "hash": "1" * 64}
    rec["body"] = {"messages": [{"role": "user", "content": "nul \x00 and ünïcode ✓"}], "temperature": 0.7}
    for url in (sqlite_url(tmp_path / "f.db"), postgres_url):
        store = SqlSink(url, rec["gateway_id"])
        store.write([rec])
        t = tables.audit_records
        with store.connect().connect() as conn:
            row = conn.execute(select(t).where(t.c.gateway_id == rec["gateway_id"])).one()
            count = conn.execute(select(func.count()).select_from(t)).scalar()
        assert count >= 1
        assert {k: row._mapping[k] for k in rec} == rec


def test_records_of_every_shape_in_one_batch_are_stored_as_they_are(
    tmp_path: Path, postgres_url: str
) -> None:
    """The sink inserts a batch per shape (which optional columns are None): a batch mixing
    all of them, interleaved in seq order, reads back value for value, NULLs where None."""
    import itertools

    from fortress.audit.sql import OPTIONAL

    g = gid()
    recs = []
    for seq, nones in enumerate(itertools.product((False, True), repeat=len(OPTIONAL)), start=1):
        rec = {**sample(seq), "gateway_id": g, "seq": seq, "prev_hash": "0" * 64, "hash": f"{seq:064x}"}
        rec["body"] = {"messages": seq}
        rec.update({c: None for c, none in zip(OPTIONAL, nones, strict=True) if none})
        recs.append(rec)
    recs[7]["model"] = None  # a column outside OPTIONAL left None: bound as NULL all the same
    for url in (sqlite_url(tmp_path / "shapes.db"), postgres_url):
        store = SqlSink(url, g)
        store.write(recs)
        t = tables.audit_records
        with store.connect().connect() as conn:
            rows = conn.execute(select(t).where(t.c.gateway_id == g).order_by(t.c.seq)).all()
        assert len(rows) == len(recs) == 2 ** len(OPTIONAL)
        by_seq = {r["seq"]: r for r in recs}
        for row in rows:
            assert {k: row._mapping[k] for k in by_seq[row.seq]} == by_seq[row.seq]
        assert store.offset() == max(by_seq)


async def test_ship_interval_gathers_trickling_records_into_few_transactions(tmp_path: Path) -> None:
    """Records committed one by one for ~1 s go to the store in about 1 s / interval transactions,
    and stop() still ships the last ones at once."""
    g = gid()
    url = sqlite_url(tmp_path / "a.db")
    j = Journal(tmp_path / "j", g, SECRET, group_commit_ms=0)
    j.open()
    sh = Shipper(j, SqlSink(url, g), interval=0.3)
    sh.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    n = 0
    while loop.time() - t0 < 1.0:
        await j.append(sample(n))
        n += 1
        await asyncio.sleep(0.01)
    await wait_for(lambda: sh.store_pos >= n, 5)  # within about one interval of the last commit
    assert n > 50 and sh.batches <= 6, (n, sh.batches)  # ~1 s / 0.3 s, not one per commit
    await j.append(sample(n))
    j.close()
    sh.stop()
    assert stored(url, g) == list(range(1, n + 2))


async def test_ships_from_memory_and_from_the_files_when_behind(tmp_path: Path) -> None:
    """A backlog from before the shipper started and records it fell behind on come from the
    files, the rest from the journal's memory: all of them once, in order, the chain intact."""
    g = gid()
    url = sqlite_url(tmp_path / "a.db")
    j = Journal(tmp_path / "j", g, SECRET, group_commit_ms=1, segment_bytes=16 * 1024)
    j.open()
    await fill(j, 150)  # nothing kept in memory before a shipper asks for it
    sh = Shipper(j, SqlSink(url, g), batch=40, anchor_every=0.05)
    sh.start()
    assert j.keep_recent >= 4 * 40
    j.keep_recent = 30  # smaller than a batch: the shipper falls behind the memory now and then
    sources = {"memory": 0, "files": 0}
    recent, read = j.recent, sh.reader.read

    def from_memory(after: int, limit: int) -> tuple[list[Entry], tuple[int, int]] | None:
        got = recent(after, limit)
        sources["memory"] += got is not None and bool(got[0])
        return got

    def from_files(after: int, limit: int, durable: tuple[int, int]) -> list[Entry]:
        got = read(after, limit, durable)
        sources["files"] += bool(got)
        return got

    j.recent, sh.reader.read = from_memory, from_files  # type: ignore[method-assign]
    for _ in range(30):
        await asyncio.gather(*(j.append(sample(i)) for i in range(15)))
        await asyncio.sleep(0.01)
    n = 150 + 30 * 15
    await wait_for(lambda: sh.store_pos >= n)
    j.close()
    sh.stop()
    assert stored(url, g) == list(range(1, n + 1))
    assert sources["memory"] and sources["files"], sources
    report = verify(SqlSink(url, g).connect(), SECRET, gateway=g, anchors_file=j.dir / "anchors.jsonl")
    assert report.ok, report.problems


async def test_stop_ships_a_record_committed_while_the_last_pass_read(tmp_path: Path) -> None:
    """A pass that read the journal before the last commit and returns after stop() was asked
    must not be the last one: stop() ships everything the closed journal holds."""
    g = gid()
    url = sqlite_url(tmp_path / "a.db")
    j = Journal(tmp_path / "j", g, SECRET, group_commit_ms=0)
    j.open()
    sh = Shipper(j, SqlSink(url, g))
    entered, go = threading.Event(), threading.Event()
    read = sh.reader.read

    def slow_first_read(after: int, limit: int, durable: tuple[int, int]) -> list[Entry]:
        if not entered.is_set():  # the first pass: its view of the journal is from before seq 1
            entered.set()
            go.wait(10)
        return read(after, limit, durable)

    sh.reader.read = slow_first_read  # type: ignore[method-assign]
    sh.start()
    assert await asyncio.to_thread(entered.wait, 10)
    await j.append(sample(0))
    j.close()
    stopper = threading.Thread(target=sh.stop)
    stopper.start()
    await wait_for(lambda: sh._stopping)
    go.set()  # the stale pass returns nothing, with the stop already asked
    await asyncio.to_thread(stopper.join, 15)
    assert stored(url, g) == [1]
