"""The runtime's failure paths, driven for real: a port already taken, a journal held by another
process. Each must end the process with a clear message, nothing left running. (A database down
at start is not a failure: tests/test_hostile_store.py.)"""

from __future__ import annotations

import fcntl
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import fortress_argv, free_port

from fortress.config import parse_config
from fortress.core.context import RequestContext
from fortress.core.errors import GatewayError
from fortress.runtime import Runtime


def serve(tmp_path: Path, config: str, port: int) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "fortress.yaml"
    path.write_text(config + f"state_dir: {tmp_path / 'state'}\n")
    argv = fortress_argv("serve", "-c", str(path), "--port", str(port))
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_serve_on_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = serve(tmp_path, "pools: [{model: m, replicas: [{url: 'http://127.0.0.1:9'}]}]\n", port)
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr


def test_a_start_failure_exits_1_with_a_message(tmp_path: Path) -> None:
    # Another process holds the audit journal: the audit layer cannot start.
    journal = tmp_path / "state" / "journal"
    journal.mkdir(parents=True)
    with open(journal / "LOCK", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = serve(tmp_path, "pools: [{model: m, replicas: [{url: 'http://127.0.0.1:9'}]}]\n", free_port())
    assert out.returncode == 1, out.stderr
    assert "cannot start" in out.stderr and "in use" in out.stderr and "Traceback" not in out.stderr


async def test_start_failure_stops_the_parts_already_started(tmp_path: Path) -> None:
    cfg = parse_config(
        "pools: [{model: m, replicas: [{url: 'http://127.0.0.1:9'}]}]\n"
        f"state_dir: {tmp_path / 'state'}\n",
        env={},
    )
    runtime = Runtime(cfg)

    async def broken() -> None:
        raise RuntimeError("relay cannot start")

    runtime.relay.start = broken  # type: ignore[method-assign]  # the part after audit and access
    with pytest.raises(RuntimeError, match="relay cannot start"):
        await runtime.start()
    # The audit and access layers started before the relay failed: both were stopped again, and
    # a request can no longer be recorded (no request could get in anyway: nothing serves).
    assert runtime.audit is not None and runtime.access is not None
    ctx = RequestContext("req-1", "/v1/chat/completions", 0.0, None)
    with pytest.raises(GatewayError, match="closed") as failed:
        await runtime.audit.record(ctx)
    assert (failed.value.status, failed.value.code) == (503, "audit_journal_unavailable")
    assert runtime._running == []


def test_the_collector_leaves_startup_objects_and_requests_alone() -> None:
    """After start: what start built is frozen out of collections, and the youngest generation
    is collected every GC_YOUNG net allocations rather than Python's 700."""
    import gc

    from fortress.runtime import GC_YOUNG

    threshold = gc.get_threshold()
    try:
        gc.set_threshold(700, *threshold[1:])
        Runtime._freeze()
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (GC_YOUNG, *threshold[1:]) and GC_YOUNG > 700
        before = gc.get_stats()[0]["collections"]
        junk = [[i] for i in range(GC_YOUNG // 2)]  # growth below the threshold: no collection
        assert gc.get_stats()[0]["collections"] == before
        del junk
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
