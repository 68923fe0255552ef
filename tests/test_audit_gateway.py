"""The audit trail through real gateway processes: required headers, the CLI, and kill -9."""

from __future__ import annotations

import csv
import http.client
import json
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from helpers import PYTHON, wait_for

AUDIT_HEADERS = {"x-llm-source": "tests", "x-llm-user": "alice", "x-llm-request-type": "chat"}


def gateway_config(tmp_path: Path, sim_url: str, audit: str = "") -> str:
    return f"""
state_dir: {tmp_path / "state"}
auth: {{enabled: false}}
audit:
  group_commit_ms: 2
  anchor_every: 0.5
{audit}
pools:
  - model: m
    health_check: {{interval: 1, timeout: 0.5}}
    replicas: [{{url: "{sim_url}"}}]
"""


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json", **headers}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "fortress.cli.main", "audit", *args], capture_output=True, text=True)


def db_rows(db: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def test_missing_audit_headers_get_400_naming_them(cluster, tmp_path: Path) -> None:
    sim_url, _ = cluster.sim("m")
    url, _ = cluster.gateway(gateway_config(tmp_path, sim_url))
    status, body = post(url, CHAT, {"x-llm-user": "alice"})
    assert status == 400
    err = json.loads(body)["error"]
    assert err["code"] == "missing_audit_headers" and err["type"] == "invalid_request_error"
    assert "x-llm-source" in err["message"] and "x-llm-request-type" in err["message"]
    status, _ = post(url, CHAT, AUDIT_HEADERS)
    assert status == 200


def test_records_through_the_gateway_and_the_cli(cluster, tmp_path: Path) -> None:
    sim_url, _ = cluster.sim("m")
    cfg = gateway_config(tmp_path, sim_url, "  body_capture: metadata")
    url, proc = cluster.gateway(cfg)
    for i, user in enumerate(["alice", "bob", "alice"]):
        headers = {**AUDIT_HEADERS, "x-llm-user": user, "x-request-id": f"cli-{i}"}
        assert post(url, {**CHAT, "stream": i == 1}, headers)[0] == 200
    post(url, {**CHAT, "model": "nope"}, {**AUDIT_HEADERS, "x-request-id": "cli-404"})
    post(url, CHAT, {"x-request-id": "cli-400"})
    proc.stop()  # a clean stop ships everything
    config = tmp_path / "fortress.yaml"
    config.write_text(cfg)

    out = cli("query", "-c", str(config), "--user", "alice", "--status", "200", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["request_id"] for r in rows] == ["cli-2", "cli-0"]  # newest first
    r = rows[1]
    assert (r["source"], r["request_type"], r["model"]) == ("tests", "chat", "m")
    assert (r["status"], r["stream"]) == (200, False)
    assert r["output_tokens"] and r["input_tokens"] and r["latency_ms"] > 0 and r["ttft_ms"] is not None
    assert r["body"]["messages"] == 1 and r["body"]["roles"] == {"user": 1}
    stream = json.loads(cli("query", "-c", str(config), "--request-id", "cli-1", "--json").stdout)[0]
    assert stream["stream"] is True and stream["output_tokens"] and stream["user"] == "bob"
    errors = json.loads(cli("query", "-c", str(config), "--status", "4xx", "--json").stdout)
    assert {(e["request_id"], e["status"]) for e in errors} == {("cli-404", 404), ("cli-400", 400)}
    table = cli("query", "-c", str(config), "--since", "1h")
    assert table.returncode == 0 and "cli-1" in table.stdout

    out_csv = tmp_path / "audit.csv"
    exported = cli("export", "-c", str(config), "--format", "csv", "--output", str(out_csv))
    assert exported.returncode == 0, exported.stderr
    with open(out_csv) as fh:
        lines = list(csv.DictReader(fh))
    assert [x["request_id"] for x in lines] == ["cli-0", "cli-1", "cli-2", "cli-404", "cli-400"]
    jsonl = cli("export", "-c", str(config), "--since", "1h", "--key", "nobody")
    assert jsonl.returncode == 0 and jsonl.stdout == ""
    ok = cli("verify", "-c", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout
    for command in ("query", "export", "verify"):
        helptext = cli(command, "--help")
        assert helptext.returncode == 0 and "Example:" in helptext.stdout


class Client(threading.Thread):
    """Sends requests in a loop; remembers the ids of answers it received complete."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(daemon=True)
        self.url = urllib.parse.urlsplit(url)
        self.name_ = name
        self.completed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            rid = f"{self.name_}-{i}"
            stream = i % 2 == 1
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=5)
                body = json.dumps({**CHAT, "stream": stream})
                conn.request(
                    "POST",
                    "/v1/chat/completions",
                    body,
                    {"content-type": "application/json", "x-request-id": rid, **AUDIT_HEADERS},
                )
                resp = conn.getresponse()
                data = resp.read()
                if resp.status == 200 and (not stream or b"data: [DONE]" in data):
                    self.completed.append(rid)
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)


def test_kill_9_loses_no_record_of_a_completed_request(cluster, tmp_path: Path) -> None:
    sim_url, _ = cluster.sim("m")
    cfg = gateway_config(tmp_path, sim_url)
    config = tmp_path / "fortress.yaml"
    config.write_text(cfg)
    url, gw = cluster.gateway(cfg)
    clients = [Client(url, f"c{k}") for k in range(8)]
    for c in clients:
        c.start()
    db = tmp_path / "state" / "fortress.db"

    def done() -> int:
        return sum(len(c.completed) for c in clients)

    wait_for(lambda: done() >= 150, timeout=30, what="traffic")
    # Then the store stalls (another writer holds SQLite's lock): records pile up in the journal.
    blocker = sqlite3.connect(db, timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    stalled_at = done()
    wait_for(lambda: done() >= stalled_at + 150, timeout=30, what="traffic while the store is stalled")
    gw.kill(signal.SIGKILL)  # mid-traffic: some requests are in flight, many records unshipped
    time.sleep(0.3)
    for c in clients:
        c.stop.set()
    for c in clients:
        c.join(10)
    completed = [rid for c in clients for rid in c.completed]
    shipped_before = db_rows(db, "SELECT count(*) FROM audit_records")[0][0]
    assert shipped_before < len(completed), "the kill should leave records only in the journal"
    blocker.rollback()
    blocker.close()

    # Same state dir, new process: it recovers the journal and ships what was left.
    url2, gw2 = cluster.gateway(cfg)
    want = set(completed)

    def all_there() -> bool:
        ids = {r[0] for r in db_rows(db, "SELECT request_id FROM audit_records")}
        return want <= ids

    wait_for(all_there, timeout=30, what="every completed request's record in the store")
    counts = dict(db_rows(db, "SELECT request_id, count(*) FROM audit_records GROUP BY request_id"))
    assert all(counts[rid] == 1 for rid in completed), "a request was recorded twice"
    statuses = dict(db_rows(db, "SELECT request_id, status FROM audit_records"))
    assert all(statuses[rid] == 200 for rid in completed)
    # The restarted gateway serves and records on the same chain.
    assert post(url2, CHAT, {**AUDIT_HEADERS, "x-request-id": "after-restart"})[0] == 200
    after = "SELECT count(*) FROM audit_records WHERE request_id = 'after-restart'"
    wait_for(lambda: db_rows(db, after)[0][0] == 1)

    ok = cli("verify", "-c", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # Someone edits one record in the store: verify fails and names it.
    victim = completed[len(completed) // 2]
    seq = db_rows(db, "SELECT seq FROM audit_records WHERE request_id = ?", victim)[0][0]
    con = sqlite3.connect(db, timeout=10)
    with con:
        con.execute("UPDATE audit_records SET output_tokens = 0 WHERE seq = ?", (seq,))
    con.close()
    bad = cli("verify", "-c", str(config))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"seq {seq}: changed" in bad.stdout
    gw2.stop()
