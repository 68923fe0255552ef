"""`fortress up` and its signals, with simulated local replicas: a signal while the replicas load,
a second signal while a stream drains, and a replica that never becomes ready in time."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from helpers import Proc, alive, children_of, fortress_argv, free_port, wait_for, wait_http, write_up_config


def up(tmp_path: Path, options: dict[str, Any]) -> tuple[Proc, str]:
    config = write_up_config(tmp_path, "m", {"engine": "sim", "options": options})
    port = free_port()
    proc = Proc(fortress_argv("up", "-c", str(config), "--port", str(port), "-q"), tmp_path / "up.log")
    return proc, f"http://127.0.0.1:{port}"


def test_a_signal_while_the_replicas_load_stops_everything(tmp_path: Path) -> None:
    proc, _ = up(tmp_path, {"startup_delay": 120, "ready_timeout": 300})
    try:
        wait_for(lambda: children_of(proc.pid), 60, what="the replica process")
        replicas = children_of(proc.pid)
        time.sleep(0.5)  # still loading: its /health answers 503 for 120 s
        proc.p.send_signal(signal.SIGTERM)
        assert proc.p.wait(60) == 0, proc.output()[-2000:]
        assert "stopping" in proc.output()
        wait_for(lambda: not any(alive(p) for p in replicas), 30, what="the replica to be gone")
    finally:
        proc.stop()


def test_a_replica_not_ready_within_ready_timeout_fails_the_start(tmp_path: Path) -> None:
    options = {"startup_delay": 120, "ready_timeout": 1, "max_crashes": 1, "backoff_initial": 0.1}
    proc, _ = up(tmp_path, options)
    try:
        assert proc.p.wait(120) == 1, proc.output()[-2000:]
    finally:
        proc.stop()
    out = proc.output()
    assert "not ready after 1s" in out and "Traceback" not in out, out[-2000:]


def test_a_second_signal_does_not_wait_for_the_drain(tmp_path: Path) -> None:
    proc, url = up(tmp_path, {"tokens": 4000, "itl": 0.01, "ttft": 0})
    try:
        wait_http(url + "/ready", timeout=60)
        replicas = children_of(proc.pid)
        body = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
        req = urllib.request.Request(
            url + "/v1/chat/completions", body, {"content-type": "application/json"}, method="POST"
        )
        started = threading.Event()

        def stream() -> None:
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    resp.read(1)
                    started.set()
                    resp.read()
            except OSError:
                pass

        threading.Thread(target=stream, daemon=True).start()
        assert started.wait(30)
        proc.p.send_signal(signal.SIGTERM)
        # The first signal lets the 40 s stream drain (uvicorn's graceful bound: 10 s), so the
        # process is still there 2 s later; the second one ends it well before that bound.
        time.sleep(2)
        assert proc.p.poll() is None, proc.output()[-2000:]
        proc.p.send_signal(signal.SIGTERM)
        proc.p.wait(6)  # raises TimeoutExpired if it waited for the drain
        assert "again: killing the replicas now" in proc.output()
        wait_for(lambda: not any(alive(p) for p in replicas), 30, what="the replicas to be gone")
    finally:
        proc.stop()
