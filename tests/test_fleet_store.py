"""The persisted fleet state (``fortress.fleet.instances.FleetStore``, migration 0003) on SQLite
and a real PostgreSQL: the schema up and down, instance rows and their histories from a
sequence of ticks, decisions in order, a restarted gateway's orphans, and the store down,
hanging or overflowing without the loop ever waiting on it and without losing a decision.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.migration import MigrationContext
from helpers import free_port, wait_for
from sqlalchemy import inspect
from test_hostile_store import PostgresStore, SqliteStore, Store

from fortress.fleet.instances import REPLACED, FleetStore
from fortress.fleet.providers.base import Instance
from fortress.store import tables
from fortress.store.db import alembic_config, dispose_engines, get_engine, migrate

POOL = "m"
LOGGER = "fortress.fleet.store"


class Clock:
    """Epoch seconds that the test sets."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def local(slot: str, state: str, incarnation: int, pid: int | None = 100, detail: str = "") -> Instance:
    """A local slot as ``LocalProvider.instances()`` reports it."""
    url = f"http://127.0.0.1:{9000 + incarnation}" if pid is not None else None
    extra = {"pid": pid, "incarnation": incarnation, "restarts": max(0, incarnation - 1)}
    return Instance(slot, state, slot, detail=detail or state, url=url, extra=extra)


def cloud(iid: str, state: str, url: str | None = None, version: str = "v1") -> Instance:
    return Instance(iid, state, iid, capacity="spot", detail=state, url=url, extra={"version": version})


def decision(n: int) -> dict[str, Any]:
    """An entry as ``PoolController._record`` makes it."""
    return {"at": "2030-01-01T00:00:00+00:00", "from": n, "to": n + 1, "kind": "scale_up", "reason": f"r{n}"}


def flushed(store: FleetStore, timeout: float = 30.0) -> None:
    """Until the store holds every queued write."""
    wait_for(
        lambda: store.stats()["fleet_store_pending"] == 0 and store.stats()["fleet_store_ok"],
        timeout=timeout,
        what="the queued writes in the store",
    )


def rows(store: FleetStore) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in store.history(POOL, limit=1000)}


def states(row: dict[str, Any]) -> list[str]:
    return [state for _, state, _ in row["history"]]


@pytest.fixture
def started() -> Iterator[list[FleetStore]]:
    """FleetStores the test starts, stopped at its end."""
    stores: list[FleetStore] = []
    yield stores
    for s in stores:
        s.stop(1.0)


def start(stores: list[FleetStore], url: str, gateway: str = "gw-a", **kw: Any) -> FleetStore:
    kw.setdefault("clock", Clock())
    kw.setdefault("backoff_min", 0.1)
    kw.setdefault("backoff_max", 0.5)
    store = FleetStore(url, gateway, **kw)
    store.start()
    stores.append(store)
    return store


# -- the schema ----------------------------------------------------------------------------------


def revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def downgrade(url: str, to: str) -> None:
    with get_engine(url).connect() as conn:
        command.downgrade(alembic_config(conn), to)
        conn.commit()


def head() -> str | None:
    """The newest migration (later ones add other tables; 0003's must survive them)."""
    from alembic.script import ScriptDirectory

    with get_engine("sqlite://").connect() as conn:
        return ScriptDirectory.from_config(alembic_config(conn)).get_current_head()


def test_0003_creates_the_fleet_tables_down_to_0002_and_up_again(db_url: str) -> None:
    engine = migrate(db_url)
    assert revision(db_url) == head() and head() >= "0003"
    insp = inspect(engine)
    assert insp.get_pk_constraint("fleet_instances")["constrained_columns"] == ["provider", "id"]
    assert {ix["name"]: ix["column_names"] for ix in insp.get_indexes("fleet_instances")} == {
        "ix_fleet_instances_pool_state": ["pool", "state"]
    }
    assert {ix["name"]: ix["column_names"] for ix in insp.get_indexes("fleet_decisions")} == {
        "ix_fleet_decisions_pool_ts": ["pool", "ts"]
    }
    # The database numbers decisions (SERIAL on PostgreSQL, the rowid on SQLite).
    row = {"ts": 1.0, "pool": "m", "gateway": "g", "before": 0, "after": 1, "kind": "k", "reason": "r"}
    with engine.begin() as conn:
        conn.execute(tables.fleet_decisions.insert(), [row, {**row, "ts": 2.0}])
        ids = [
            r.id for r in conn.execute(tables.fleet_decisions.select().order_by(tables.fleet_decisions.c.ts))
        ]
    assert ids[0] < ids[1]

    downgrade(db_url, "0002")
    assert revision(db_url) == "0002"
    names = set(inspect(engine).get_table_names())
    assert "fleet_instances" not in names and "fleet_decisions" not in names
    assert {"api_keys", "audit_records", "audit_anchors", "shipper_offsets"} <= names
    assert len(inspect(engine).get_indexes("audit_records")) == 5  # 0002's indexes stay

    migrate(db_url)
    assert revision(db_url) == head()
    assert {"fleet_instances", "fleet_decisions"} <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        assert conn.execute(tables.fleet_decisions.select()).all() == []


# -- instances -----------------------------------------------------------------------------------


def test_local_processes_become_rows_with_their_states_in_order(
    db_url: str, started: list[FleetStore]
) -> None:
    clock = Clock()
    store = start(started, db_url, clock=clock)
    ticks: list[list[Instance]] = [
        # t=1: nothing has run yet (incarnation 0): no rows.
        [local("m-1", "terminated", 0, None), local("m-2", "terminated", 0, None)],
        [local("m-1", "starting", 1, 101), local("m-2", "starting", 1, 201)],
        [local("m-1", "starting", 1, 101), local("m-2", "starting", 1, 201)],  # unchanged
        [local("m-1", "ready", 1, 101), local("m-2", "ready", 1, 201)],
        [local("m-1", "ready", 1, 101), local("m-2", "ready", 1, 201)],  # unchanged
        # m-2's process exits and the slot waits to restart it (no pid): that process failed.
        [local("m-1", "draining", 1, 101), local("m-2", "starting", 1, None, "exited with status 1")],
        [local("m-1", "terminated", 1, None), local("m-2", "starting", 1, None, "exited with status 1")],
        # m-1 is launched again: "starting" before the supervisor numbers the new process.
        [local("m-1", "starting", 1, 101), local("m-2", "starting", 2, 202)],
        [local("m-1", "starting", 2, 102), local("m-2", "ready", 2, 202)],
        [local("m-1", "ready", 2, 102), local("m-2", "ready", 2, 202)],
        # m-2's second process ended between two ticks: its row is closed when the third shows.
        [local("m-1", "ready", 2, 102), local("m-2", "starting", 3, 203)],
    ]
    for t, instances in enumerate(ticks, start=1):
        clock.t = float(t)
        store.observe(POOL, "local", instances, now=float(t))
    flushed(store)

    got = rows(store)
    assert set(got) == {"gw-a/m-1/1", "gw-a/m-1/2", "gw-a/m-2/1", "gw-a/m-2/2", "gw-a/m-2/3"}
    assert got["gw-a/m-1/1"]["history"] == [
        [2.0, "starting", "starting"],
        [4.0, "ready", "ready"],
        [6.0, "draining", "draining"],
        [7.0, "terminated", "terminated"],
    ]
    assert states(got["gw-a/m-1/2"]) == ["starting", "ready"]
    assert [h[0] for h in got["gw-a/m-1/2"]["history"]] == [9.0, 10.0]
    assert got["gw-a/m-2/1"]["history"][-1] == [6.0, "failed", "exited with status 1"]
    assert states(got["gw-a/m-2/1"]) == ["starting", "ready", "failed"]
    assert got["gw-a/m-2/2"]["history"] == [
        [8.0, "starting", "starting"],
        [9.0, "ready", "ready"],
        [11.0, "terminated", REPLACED],
    ]
    assert states(got["gw-a/m-2/3"]) == ["starting"]
    one = got["gw-a/m-1/2"]
    assert (one["provider"], one["pool"], one["gateway"], one["capacity"]) == ("local", POOL, "gw-a", "local")
    assert (one["state"], one["url"], one["created_at"], one["updated_at"]) == (
        "ready",
        "http://127.0.0.1:9002",
        9.0,
        10.0,
    )
    assert got["gw-a/m-1/1"]["url"] is None

    # An unchanged tick queues nothing and writes nothing.
    written = store.written
    store.observe(POOL, "local", ticks[-1], now=12.0)
    assert store.stats()["fleet_store_pending"] == 0
    assert store.written == written


def test_cloud_instances_keep_their_ids_and_a_restart_appends_to_their_history(
    db_url: str, started: list[FleetStore]
) -> None:
    first = start(started, db_url)
    url = "http://10.0.0.5:8000"
    for t, inst in enumerate(
        [
            cloud("i-0abc", "provisioning"),
            cloud("i-0abc", "starting", url),
            cloud("i-0abc", "ready", url),
            cloud("i-0abc", "ready", url),  # unchanged
            cloud("i-0abc", "ready", url, version="v2"),  # what it runs changed: the row only
        ],
        start=1,
    ):
        first.observe(POOL, "aws", [inst], now=float(t))
    flushed(first)
    row = rows(first)["i-0abc"]
    assert (row["provider"], row["capacity"], row["version"], row["url"]) == ("aws", "spot", "v2", url)
    assert [h[:2] for h in row["history"]] == [
        [1.0, "provisioning"],
        [2.0, "starting"],
        [3.0, "ready"],
    ]
    assert [r["id"] for r in first.adopt(POOL, "aws")] == ["i-0abc"]
    first.stop()

    # The next run finds the instance, keeps its row and adds to its history.
    second = start(started, db_url)
    assert [r["id"] for r in second.adopt(POOL, "aws")] == ["i-0abc"]
    second.observe(POOL, "aws", [cloud("i-0abc", "ready", url, version="v2")], now=20.0)
    second.observe(POOL, "aws", [cloud("i-0abc", "preempted", url, version="v2")], now=21.0)
    flushed(second)
    row = rows(second)["i-0abc"]
    # The new run's first sight is an entry of its own (the gateway restarted in between).
    assert states(row) == ["provisioning", "starting", "ready", "ready", "preempted"]
    assert (row["state"], row["created_at"], row["updated_at"]) == ("preempted", 1.0, 21.0)
    assert second.adopt(POOL, "aws") == []


# -- decisions -----------------------------------------------------------------------------------


def test_decisions_are_stored_in_order_and_stop_writes_what_is_queued(
    db_url: str, started: list[FleetStore]
) -> None:
    clock = Clock(5_000.0)
    store = start(started, db_url, clock=clock)
    for n in range(30):
        clock.t = 5_000.0 + n // 10  # several in the same second: the order is the insertion's
        store.decision(POOL, decision(n))
    store.decision("other", decision(99))
    store.stop()  # writes the queue before it returns
    assert store.stats() == {"fleet_store_pending": 0, "fleet_store_ok": True, "fleet_store_dropped": 0}

    got = store.decisions(POOL, limit=100)
    assert [d["reason"] for d in got] == [f"r{n}" for n in range(30)]
    assert got[0] == {
        "at": "1970-01-01T01:23:20+00:00",
        "from": 0,
        "to": 1,
        "kind": "scale_up",
        "reason": "r0",
        "ts": 5_000.0,
        "pool": POOL,
        "gateway": "gw-a",
    }
    assert [d["reason"] for d in store.decisions(POOL, limit=3)] == ["r27", "r28", "r29"]
    assert [d["reason"] for d in store.decisions("other")] == ["r99"]


# -- a restarted gateway -------------------------------------------------------------------------


def test_a_restarted_gateway_closes_its_orphans_and_numbers_its_processes_after_them(
    db_url: str, started: list[FleetStore]
) -> None:
    first = start(started, db_url)
    first.observe(POOL, "local", [local("m-1", "ready", 1), local("m-2", "starting", 2)], now=10.0)
    neighbour = start(started, db_url, gateway="gw-b")  # another host on the same database
    neighbour.observe(POOL, "local", [local("m-1", "ready", 1)], now=10.0)
    flushed(first)
    flushed(neighbour)
    first.stop()  # the gateway dies; its processes with it

    clock = Clock(50.0)
    second = start(started, db_url, clock=clock)
    assert [r["id"] for r in second.adopt(POOL, "local")] == ["gw-a/m-1/1", "gw-a/m-2/2"]
    assert second.close_orphans(POOL, "local") == 2
    assert second.adopt(POOL, "local") == []
    got = rows(second)
    for rid in ("gw-a/m-1/1", "gw-a/m-2/2"):
        assert got[rid]["state"] == "terminated"
        assert got[rid]["history"][-1] == [50.0, "terminated", "the gateway restarted"]
    assert got["gw-b/m-1/1"]["state"] == "ready"  # another gateway's are left alone

    # The supervisor numbers processes from 1 again: the rows go after the earlier run's.
    second.observe(POOL, "local", [local("m-1", "starting", 1), local("m-2", "starting", 1)], now=60.0)
    flushed(second)
    got = rows(second)
    assert states(got["gw-a/m-1/2"]) == ["starting"]
    assert states(got["gw-a/m-2/3"]) == ["starting"]
    assert states(got["gw-a/m-1/1"]) == ["ready", "terminated"]  # untouched
    assert second.close_orphans(POOL, "local") == 0  # this run's own rows are not orphans
    assert [r["id"] for r in second.adopt(POOL, "local")] == ["gw-a/m-1/2", "gw-a/m-2/3"]


# -- the store down, hanging, overflowing ------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def own_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A store of the test's own that it takes down and brings back, data kept."""
    store: Store = PostgresStore() if request.param == "postgresql" else SqliteStore(tmp_path)
    yield store
    store.close()


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and text in r.getMessage()
    ]


def test_the_store_down_at_start_and_later_loses_nothing(
    own_store: Store, started: list[FleetStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    store = own_store
    store.down()
    clock = Clock()
    fleet = start(started, store.url, clock=clock)
    wait_for(lambda: not fleet.stats()["fleet_store_ok"], timeout=30, what="the first failure")

    def traffic(first: int, last: int) -> None:
        for n in range(first, last):
            clock.t = float(n)
            fleet.decision(POOL, decision(n))
            state = "ready" if n % 2 else "starting"
            fleet.observe(POOL, "aws", [cloud("i-1", state)], now=float(n))

    traffic(0, 20)
    assert fleet.stats()["fleet_store_pending"] == 40 and fleet.stats()["fleet_store_dropped"] == 0
    store.up()
    flushed(fleet, timeout=60)
    assert [d["reason"] for d in fleet.decisions(POOL, limit=1000)] == [f"r{n}" for n in range(20)]
    assert len(rows(fleet)["i-1"]["history"]) == 20

    # Down again while it runs (SQLite: drop the pooled connections to the moved file too).
    store.down()
    dispose_engines()
    traffic(20, 45)
    wait_for(lambda: not fleet.stats()["fleet_store_ok"], timeout=30, what="the second failure")
    traffic(45, 50)
    store.up()
    flushed(fleet, timeout=60)
    assert [d["reason"] for d in fleet.decisions(POOL, limit=1000)] == [f"r{n}" for n in range(50)]
    history = rows(fleet)["i-1"]["history"]
    assert [h[0] for h in history] == [float(n) for n in range(50)]
    assert fleet.outages == 2 and fleet.stats()["fleet_store_dropped"] == 0

    assert len(messages(caplog, logging.WARNING, "cannot write to the store")) == 2
    back = messages(caplog, logging.INFO, "store reachable again")
    assert len(back) == 2, back
    assert "40 writes were waiting" in back[0]
    assert int(back[1].split("again, ")[1].split()[0]) > 0


def test_a_hanging_store_never_holds_the_caller_and_stop_gives_up_in_time(
    started: list[FleetStore],
) -> None:
    """A server that takes the connection and never answers: the writer waits out its connect
    timeout on every attempt while observe and decision return at once."""
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(64)  # never accepted: connections complete in the kernel and hang
        url = f"postgresql+psycopg://postgres@127.0.0.1:{sink.getsockname()[1]}/fortress?connect_timeout=2"
        fleet = start(started, url, backoff_min=0.1, backoff_max=0.2)
        slowest = 0.0
        for n in range(200):
            t0 = time.perf_counter()
            fleet.decision(POOL, decision(n))
            fleet.observe(POOL, "aws", [cloud("i-1", "ready" if n % 2 else "starting")], now=float(n))
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.2, slowest
        assert fleet.stats()["fleet_store_pending"] == 400
        wait_for(lambda: not fleet.stats()["fleet_store_ok"], timeout=30, what="the connect timeout")
        t0 = time.monotonic()
        fleet.stop(1.0)
        assert time.monotonic() - t0 < 10
        assert not fleet.alive and fleet.stats()["fleet_store_pending"] == 400
    dispose_engines()


def test_a_full_queue_drops_old_history_first_and_says_so_once(
    tmp_path: Path, started: list[FleetStore], caplog: pytest.LogCaptureFixture
) -> None:
    """Queued before the writer starts (as through a long outage), so which writes go is exact."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    fleet = FleetStore(f"sqlite:///{tmp_path / 'fortress.db'}", "gw-a", max_pending=20)
    started.append(fleet)
    quiet = [cloud(f"i-{k}", "ready") for k in range(1, 5)]
    fleet.observe(POOL, "aws", [cloud("i-0", "starting"), *quiet], now=0.0)
    for n in range(1, 30):  # i-0 flaps; the others stay as they were
        fleet.observe(POOL, "aws", [cloud("i-0", "ready" if n % 2 else "starting"), *quiet], now=float(n))
    for n in range(3):
        fleet.decision(POOL, decision(n))
    stats = fleet.stats()
    assert stats["fleet_store_pending"] == 20 and stats["fleet_store_dropped"] == 5 + 29 + 3 - 20
    assert len(messages(caplog, logging.WARNING, "dropping the oldest")) == 1

    fleet.start()
    flushed(fleet)
    got = rows(fleet)
    assert set(got) == {f"i-{k}" for k in range(5)}
    assert all(states(got[f"i-{k}"]) == ["ready"] for k in range(1, 5))  # every row is current
    assert got["i-0"]["state"] == "ready"  # the 29th change (odd): its latest state
    assert [h[0] for h in got["i-0"]["history"]] == [float(n) for n in range(17, 30)]  # the newest 13
    assert [d["reason"] for d in fleet.decisions(POOL)] == ["r0", "r1", "r2"]
    assert len(messages(caplog, logging.WARNING, "dropping the oldest")) == 1
    assert fleet.stats()["fleet_store_dropped"] == 17


def test_an_unreachable_store_fails_the_readers_not_the_writer(started: list[FleetStore]) -> None:
    fleet = start(started, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/fortress")
    fleet.decision(POOL, decision(0))
    wait_for(lambda: fleet.failures >= 2, timeout=30, what="retries")
    assert fleet.alive and fleet.last_error
    with pytest.raises(Exception, match=r"(?i)connect|refused"):
        fleet.adopt(POOL, "local")
    dispose_engines()
