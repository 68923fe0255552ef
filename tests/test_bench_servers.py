"""``bench/servers.py``: the servers it compares answer what it measures (each reads the POST and
answers the same JSON; the gateway's protocol as the runtime configures it), and its report
computes each server's ratio to Fortress's protocol and fails a run with errors. About 3 s."""

from __future__ import annotations

import http.client
import sys
from pathlib import Path

import pytest
from helpers import PYTHON, ROOT, Proc, free_port, wait_for

sys.path.insert(0, str(ROOT / "bench"))
import servers


def _post(port: int, body: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        # Two requests on one connection: the answer must keep it alive as wrk's load does.
        out = []
        for _ in range(2):
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            out.append((resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
        assert out[0] == out[1]
        return out[0]
    finally:
        conn.close()


def _up(port: int) -> bool:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        c.request("GET", "/")
        c.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["bare", "fortress", "uvicorn"])
def test_each_python_server_reads_the_post_and_answers_the_fixed_json(kind: str, tmp_path: Path) -> None:
    port = free_port()
    proc = Proc([PYTHON, str(ROOT / "bench" / "servers.py"), "--serve", kind, str(port)], tmp_path / "s.log")
    try:
        wait_for(lambda: _up(port), timeout=20, what=f"{kind} server")
        body = b'{"model":"bench-json","messages":[{"role":"user","content":"' + b"x" * 3000 + b'"}]}'
        status, headers, got = _post(port, body)
        assert status == 200
        assert got == servers.ANSWER
        assert headers["content-length"] == str(len(servers.ANSWER))
        assert headers["content-type"] == "application/json"
        if kind != "bare":  # as fortress.runtime runs uvicorn: no Server or Date header
            assert "server" not in headers and "date" not in headers
    finally:
        proc.kill()


def _results(errors: int) -> dict[str, object]:
    def server(cpu: list[float]) -> dict[str, object]:
        return {"what": "x", "cpu_us": cpu, "rps": [1e3], "system_share": [0.5], "errors": 0, "requests": 9}

    ss = {
        "bare": server([9.0, 10.0, 11.0]),
        "fortress": server([30.0, 20.0, 25.0]),
        "uvicorn": server([40.0, 35.0, 37.5]),
        "granian-rsgi": server([50.0]),
    }
    ss["uvicorn"]["errors"] = errors
    return {
        "machine": {"commit": "abc", "cpu": "cpu", "cores": "2", "kernel": "k", "python": "3", "stack": "s"}
        | {"wrk": "w", "loadavg": "0"},
        "servers": ss,
        "plan": {"conns": 32, "rounds": 3, "round_s": 5.0},
        "cores": {"server": 1, "load": 0},
        "granian": {"version": "2.8.9", "skipped": None},
        "date": "today",
        "seconds": 1.0,
        "other_cpu": {"share": 0.0},
    }


def test_the_report_gives_each_server_its_median_and_ratio_to_fortress() -> None:
    body, checks = servers.report(_results(0), "python bench/servers.py")
    rows = {line.split(" | ")[0][2:]: line for line in body.splitlines() if line.startswith("| ")}
    assert "**25.0 µs** [20.0-30.0] | 1.00x" in rows["fortress"]
    assert "**37.5 µs** [35.0-40.0] | 1.50x" in rows["uvicorn"]
    assert "**10.0 µs** [9.0-11.0] | 0.40x" in rows["bare"]
    assert "**50.0 µs**" in rows["granian-rsgi"] and "| 2.00x |" in rows["granian-rsgi"]
    assert "granian-rsgi) costs 2.00x" in body
    assert checks == [("wrk errors and non-2xx answers, all servers", "0", "PASS")]
    _, checks = servers.report(_results(3), "python bench/servers.py")
    assert checks[0][1:] == ("3", "FAIL")
