"""The WebSocket connection registry's writer: a store that is down keeps the queue, writes
it once back, and a stop during an outage ends by its deadline."""

from __future__ import annotations

import time
from pathlib import Path

from helpers import wait_for

from fortress.store.connections import ConnectionRegistry


def row(cid: str) -> dict[str, object]:
    return {"id": cid, "opened_at": time.time(), "key_id": None, "key_name": None, "source": "t", "user": "u"}


def test_a_store_down_keeps_the_queue_and_writes_it_when_back(tmp_path: Path) -> None:
    where = tmp_path / "blocked"
    where.write_text("")  # a file where the store's directory should be: every write fails
    reg = ConnectionRegistry(f"sqlite:///{where}/fortress.db", "gw:1", backoff_max=0.2)
    reg.start()
    try:
        reg.opened(row("ws-a"))
        reg.opened(row("ws-b"))
        reg.closed("ws-b")  # an open and its close fold to nothing
        wait_for(lambda: not reg.healthy, timeout=10, what="the write to fail")
        assert reg.stats()["ws_registry_pending"] == 1 and reg.last_error
        where.unlink()  # the store is back
        where.mkdir()
        wait_for(lambda: reg.stats()["ws_registry_pending"] == 0, timeout=10, what="the queue written")
        assert reg.healthy
        assert [r["id"] for r in reg.listing()] == ["ws-a"]
    finally:
        reg.stop()


def test_a_stop_during_an_outage_ends_by_its_deadline(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("")
    reg = ConnectionRegistry(f"sqlite:///{tmp_path}/blocked/fortress.db", "gw:1", backoff_max=0.2)
    reg.start()
    reg.opened(row("ws-a"))
    wait_for(lambda: not reg.healthy, timeout=10, what="the write to fail")
    t0 = time.monotonic()
    reg.stop(timeout=1.0)
    assert time.monotonic() - t0 < 2.5
    assert reg._thread is None
