"""Documented behaviour of the gateway (docs/gateway.md, access.md, audit.md, replicas.md),
each driven through real processes: gateways, `fortress sim` replicas, the real llama-server,
the `openai` SDK."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Cluster
from helpers import (
    AUDIT_HEADERS,
    assert_schema,
    fortress_argv,
    free_port,
    http_get,
    replica_table,
    wait_for,
)

FAST = "health_check: {interval: 0.5, timeout: 0.25}"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def pool(model: str, *replicas: tuple[str, str], extra: str = "") -> str:
    reps = "".join(f"      - {{url: '{u}', tier: {t}}}\n" for u, t in replicas)
    return f"  - model: {model}\n    {FAST}\n{extra}    replicas:\n{reps}"


def audited(tmp: Path, pools: str, extra: str = "") -> tuple[str, Path]:
    """A gateway config with the audit trail on (keys off) and a copy for the CLI."""
    text = (
        f"state_dir: {tmp / 'state'}\nauth: {{enabled: false}}\n"
        "audit: {group_commit_ms: 2, ship_interval: 0.1}\n"
        f"{extra}pools:\n{pools}"
    )
    path = tmp / "audited.yaml"
    path.write_text(text)
    return text, path


def request(
    url: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    source: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on its own connection: (status, lower-case headers, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(
        host, int(port), timeout=60, source_address=(source, 0) if source else None
    )
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, data, {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sim_stats(url: str) -> dict[str, int]:
    status, body = http_get(url + "/sim/stats")
    assert status == 200
    return json.loads(body)


def sim_control(url: str, **changes: Any) -> None:
    req = urllib.request.Request(url + "/sim/control", data=json.dumps(changes).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e.strip()]


def audit_record(config: Path, request_id: str) -> dict[str, Any] | None:
    out = subprocess.run(
        fortress_argv("audit", "query", "-c", str(config), "--request-id", request_id, "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    return rows[0] if rows else None


def wait_record(config: Path, request_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def stored() -> bool:
        rec = audit_record(config, request_id)
        if rec is not None:
            found.append(rec)
        return bool(found)

    wait_for(stored, 60, interval=0.5, what=f"the audit record of {request_id}")
    return found[0]


def all_healthy(gw: str) -> None:
    wait_for(
        lambda: all(r["state"] == "healthy" for r in replica_table(gw).values()),
        20,
        what="every replica healthy",
    )


# -- streams that fail after the first byte --------------------------------------------------


def test_a_stream_failing_midway_ends_with_an_error_event_no_retry_and_a_502_record(
    cluster: Cluster, tmp_path: Path
) -> None:
    # The primaries crash after 3 chunks (the role chunk and two tokens) of 16.
    crash, _ = cluster.sim("m", "--crash-after", "3", "--itl", "0.05")
    spare, _ = cluster.sim("m")
    crash2, _ = cluster.sim("m2", "--crash-after", "3", "--itl", "0.05")
    text, config = audited(
        tmp_path, pool("m", (crash, "primary"), (spare, "secondary")) + pool("m2", (crash2, "primary"))
    )
    gw, _ = cluster.gateway(text)
    all_healthy(gw)

    headers = {**AUDIT_HEADERS, "x-request-id": "cut-raw"}
    status, hdrs, raw = request(gw, "/v1/chat/completions", {**CHAT, "stream": True}, headers)
    assert status == 200 and hdrs["x-fortress-attempts"] == "1"
    evs = events(raw)
    assert json.loads(evs[0].removeprefix(b"data: "))["object"] == "chat.completion.chunk"
    last = json.loads(evs[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "bad_gateway" and last["error"]["type"] == "upstream_error", last
    assert b"[DONE]" not in raw
    assert sim_stats(spare)["requests"] == 0  # started streams are never retried elsewhere
    rec = wait_record(config, "cut-raw")
    assert (rec["status"], rec["stream"], rec["retries"]) == (502, True, 0), rec
    assert rec["error"]

    # The openai SDK raises the error event.
    client = openai.OpenAI(
        base_url=gw + "/v1", api_key="unused", max_retries=0, default_headers=AUDIT_HEADERS
    )
    chunks = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in client.chat.completions.create(
            model="m2",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-request-id": "cut-sdk"},
        ):
            chunks.append(chunk)
    assert chunks, "the stream failed before its first event: that one would have been retried"
    assert exc.value.code == "bad_gateway", exc.value.body
    assert wait_record(config, "cut-sdk")["status"] == 502


def test_a_client_leaving_mid_stream_is_recorded_499(cluster: Cluster, tmp_path: Path) -> None:
    slow, _ = cluster.sim("m", "--itl", "0.2", "--tokens", "100")
    text, config = audited(tmp_path, pool("m", (slow, "primary")))
    gw, _ = cluster.gateway(text)
    host, port = gw.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**CHAT, "stream": True}),
        {"content-type": "application/json", **AUDIT_HEADERS, "x-request-id": "left"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    resp.close()
    conn.close()  # gone after the first event
    wait_for(lambda: sim_stats(slow)["cancelled"] == 1, 20, what="the replica's request cancelled")
    rec = wait_record(config, "left")
    assert (rec["status"], rec["stream"]) == (499, True), rec


# -- a replica's own 4xx ------------------------------------------------------------------------


def test_a_replicas_own_4xx_is_relayed_without_retry_or_ejection(llama_url: str, cluster: Cluster) -> None:
    spare, _ = cluster.sim("smollm2")
    gw, _ = cluster.gateway(
        "pools:\n"
        + pool("smollm2", (llama_url, "primary"), (spare, "secondary"))
        + "routing: {max_attempts: 3}\n"
    )
    all_healthy(gw)
    # More tokens than the server's whole context (-c 2048): llama-server's own 400.
    too_long = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "hello " * 4000}],
        "max_tokens": 4,
    }
    for _ in range(6):  # more than outlier.consecutive_5xx / consecutive_gateway_failure (5)
        status, hdrs, raw = request(gw, "/v1/chat/completions", too_long)
        assert 400 <= status < 500 and status != 404, raw[:300]
        assert hdrs["x-fortress-attempts"] == "1"
        body = json.loads(raw)
        assert_schema(body, "ErrorResponse")
        assert "context" in body["error"]["message"], body
    assert sim_stats(spare)["requests"] == 0
    row = replica_table(gw)[llama_url]
    assert (row["state"], row["ejected"], row["ejections"]) == ("healthy", False, 0), row


# -- retries, 502 and 413 -------------------------------------------------------------------


def test_x_fortress_attempts_counts_retries_and_all_failing_is_502_bad_gateway(cluster: Cluster) -> None:
    bad, _ = cluster.sim("m", "--error-rate", "1")
    good, _ = cluster.sim("m")
    bad2, _ = cluster.sim("m2", "--error-rate", "1")
    bad3, _ = cluster.sim("m2", "--error-rate", "1")
    gw, _ = cluster.gateway(
        "pools:\n"
        + pool("m", (bad, "primary"), (good, "secondary"))
        + pool("m2", (bad2, "primary"), (bad3, "primary"))
        + "routing: {max_attempts: 2}\n"
    )
    all_healthy(gw)
    for _ in range(3):  # fewer than outlier.consecutive_5xx: the primary stays in rotation
        status, hdrs, _ = request(gw, "/v1/chat/completions", CHAT)
        assert status == 200 and hdrs["x-fortress-attempts"] == "2", hdrs
        assert hdrs["x-fortress-tier"] == "secondary"
    assert (sim_stats(bad)["requests"], sim_stats(good)["requests"]) == (3, 3)

    status, hdrs, raw = request(gw, "/v1/chat/completions", {**CHAT, "model": "m2"})
    assert status == 502 and hdrs["x-fortress-attempts"] == "2", (raw, hdrs)
    body = json.loads(raw)
    assert_schema(body, "ErrorResponse")
    assert (body["error"]["code"], body["error"]["type"]) == ("bad_gateway", "upstream_error"), body
    assert "answered 500" in body["error"]["message"]
    assert (sim_stats(bad2)["requests"], sim_stats(bad3)["requests"]) == (1, 1)  # each tried once


def read_answer(s: socket.socket, until_closed: bool) -> bytes:
    """One answer: up to its content-length, or everything until the gateway closes."""
    s.settimeout(30)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        length = [
            int(v)
            for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        ]
        if not until_closed and sep and length and len(body) >= length[0]:
            break
    return data


def test_a_body_over_max_body_bytes_is_413_request_too_large(cluster: Cluster) -> None:
    sim, _ = cluster.sim("m")
    gw, _ = cluster.gateway("server: {max_body_bytes: 1024}\npools:\n" + pool("m", (sim, "primary")))
    port = int(gw.rsplit(":", 1)[1])
    head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"

    # Declared too large: answered from the headers alone (no body sent), then closed.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"{head}content-length: 100000\r\n\r\n".encode())
        declared = read_answer(s, until_closed=True)
    # Chunked, no length declared: refused once the body passes the limit.
    with socket.create_connection(("127.0.0.1", port)) as s:
        body = json.dumps({**CHAT, "pad": "x" * 4000}).encode()
        s.sendall(f"{head}transfer-encoding: chunked\r\n\r\n".encode())
        s.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        chunked = read_answer(s, until_closed=False)
    for answer in (declared, chunked):
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 413"), answer[:200]
        err = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert_schema(err, "ErrorResponse")
        assert err["error"]["code"] == "request_too_large", err
    assert sim_stats(sim)["requests"] == 0


# -- the admin API ---------------------------------------------------------------------------


def outward_address() -> str:
    """An address of this machine that is not loopback: a client from it is not 'local'."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # no packet is sent: this only picks a route
            addr = s.getsockname()[0]
        except OSError:
            addr = "127.0.0.1"
    # Without any route out, 127.0.0.2 is still not the loopback address the rule accepts.
    return addr if not addr.startswith("127.") else "127.0.0.2"


def test_admin_api_with_a_token_needs_it_and_without_one_answers_only_this_machine(
    cluster: Cluster,
) -> None:
    sim, _ = cluster.sim("m")
    pools = "pools:\n" + pool("m", (sim, "primary"))
    guarded, _ = cluster.gateway("server: {host: 0.0.0.0, admin_token: s3cret}\n" + pools)
    open_, _ = cluster.gateway("server: {host: 0.0.0.0}\n" + pools)
    outside = outward_address()
    add = {"url": "http://127.0.0.1:9", "model": "m", "name": "intruder"}

    # With a token: nothing without it or with another, from anywhere.
    for source in (None, outside):
        for hdrs in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            status, _, raw = request(guarded, "/admin/replicas", None, hdrs, "GET", source)
            assert status in (401, 403), (source, hdrs, status)
            assert_schema(json.loads(raw), "ErrorResponse")
            assert request(guarded, "/admin/replicas", add, hdrs, source=source)[0] in (401, 403)
        good = {"authorization": "Bearer s3cret"}
        status, _, raw = request(guarded, "/admin/replicas", None, good, "GET", source)
        assert status == 200 and json.loads(raw)["pools"], raw
    assert "intruder" not in {r["name"] for r in replica_table_auth(guarded)}

    # Without a token: this machine's loopback clients only.
    assert request(open_, "/admin/replicas", None, {}, "GET")[0] == 200
    status, _, raw = request(open_, "/admin/replicas", None, {}, "GET", outside)
    assert status in (401, 403), (outside, status)
    assert request(open_, "/admin/replicas", add, {}, source=outside)[0] in (401, 403)
    assert "intruder" not in {r["name"] for r in replica_table(open_).values()}


def replica_table_auth(gw: str) -> list[dict[str, Any]]:
    status, _, raw = request(gw, "/admin/replicas", None, {"authorization": "Bearer s3cret"}, "GET")
    assert status == 200
    return [r for p in json.loads(raw)["pools"] for r in p["replicas"]]


# -- token reservations through the gateway ----------------------------------------------------

PLAN = "plans:\n  res: {rate: null, requests: {}, input_tokens: {day: 300}, output_tokens: {day: 1000}}\n"


def keyed(tmp: Path, sim: str) -> str:
    return (
        f"state_dir: {tmp / 'state'}\nauth: {{cache_refresh: 1}}\naudit: {{enabled: false}}\n"
        f"{PLAN}pools:\n" + pool("m", (sim, "primary"))
    )


def usage(gw: str, key_id: str) -> tuple[int, int]:
    """(input, output) tokens the key used today."""
    status, _, raw = request(gw, f"/admin/keys/{key_id}", None, {}, "GET")
    assert status == 200, raw
    u = json.loads(raw)["usage"]
    return u["input_tokens"]["day"], u["output_tokens"]["day"]


@pytest.fixture
def reserving(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[str, str, dict[str, str], str]]:
    """(gateway, sim, auth headers, key id) with a key on a plan with both token quotas."""
    sim, _ = cluster.sim("m", "--itl", "0.1", "--tokens", "50")
    gw, _ = cluster.gateway(keyed(tmp_path, sim))
    status, _, raw = request(gw, "/admin/keys", {"name": "r", "plan": "res"})
    assert status == 201, raw
    key = json.loads(raw)
    yield gw, sim, {"authorization": f"Bearer {key['key']}"}, key["id"]


def test_input_tokens_and_max_completion_tokens_are_reserved_then_settled(
    reserving: tuple[str, str, dict[str, str], str],
) -> None:
    gw, sim, auth, key_id = reserving
    sim_control(sim, itl=0.0)
    body = {**CHAT, "max_completion_tokens": 7}
    status, _, raw = request(gw, "/v1/chat/completions", body, auth)
    assert status == 200, raw
    real = json.loads(raw)["usage"]
    assert real["completion_tokens"] == 7
    # Settled to the real usage, not to the bytes/4 and max_completion_tokens reserved.
    wait_for(lambda: usage(gw, key_id) == (real["prompt_tokens"], 7), 10, what="usage settled")

    # A body whose bytes/4 exceed what is left of the input quota is refused before any work.
    big = {**body, "messages": [{"role": "user", "content": "x" * 1400}]}
    status, _, raw = request(gw, "/v1/chat/completions", big, auth)
    assert status == 429, raw
    assert json.loads(raw)["error"]["type"] == "tokens"
    # max_completion_tokens is what is reserved: exactly what is left fits, one more does not.
    status, _, raw = request(gw, "/v1/chat/completions", {**CHAT, "max_completion_tokens": 993}, auth)
    assert status == 200, raw
    second = json.loads(raw)["usage"]
    used = (real["prompt_tokens"] + second["prompt_tokens"], 7 + second["completion_tokens"])
    wait_for(lambda: usage(gw, key_id) == used, 10, what="usage settled again")
    left = 1000 - used[1]
    status, _, raw = request(gw, "/v1/chat/completions", {**CHAT, "max_completion_tokens": left + 1}, auth)
    assert status == 429 and "max_tokens" in json.loads(raw)["error"]["message"], raw
    assert sim_stats(sim)["requests"] == 2
    assert usage(gw, key_id) == used


def test_a_failed_request_gives_its_reservation_back(
    reserving: tuple[str, str, dict[str, str], str],
) -> None:
    gw, sim, auth, key_id = reserving
    sim_control(sim, error_rate=1.0)
    status, _, raw = request(gw, "/v1/chat/completions", {**CHAT, "max_completion_tokens": 300}, auth)
    assert status == 502, raw
    sim_control(sim, error_rate=0.0, itl=0.0)
    status, _, raw = request(gw, "/v1/chat/completions", {**CHAT, "max_completion_tokens": 5}, auth)
    assert status == 200, raw
    prompt = json.loads(raw)["usage"]["prompt_tokens"]
    # Only the second request's real usage: the failed one's 300 came back.
    wait_for(lambda: usage(gw, key_id) == (prompt, 5), 10, what="usage without the failed request")


@pytest.mark.parametrize("cut", ["client", "replica"])
def test_a_cut_stream_keeps_its_reservation(cut: str, cluster: Cluster, tmp_path: Path) -> None:
    extra = ("--crash-after", "3") if cut == "replica" else ()
    sim, _ = cluster.sim("m", "--itl", "0.1", "--tokens", "50", *extra)
    gw, _ = cluster.gateway(keyed(tmp_path, sim))
    _, _, raw = request(gw, "/admin/keys", {"name": "r", "plan": "res"})
    key = json.loads(raw)
    body = json.dumps({**CHAT, "stream": True, "max_completion_tokens": 300}).encode()
    host, port = gw.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body,
        {"content-type": "application/json", "authorization": f"Bearer {key['key']}"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    if cut == "client":
        resp.close()
        conn.close()
    else:
        assert b'"error"' in resp.read()  # the replica died: the stream ends with an error event
        conn.close()
    wait_for(lambda: replica_table(gw)[sim]["in_flight"] == 0, 10, what="the stream ended")
    time.sleep(0.5)  # the request's settle follows its end
    # Tokens were generated and their count never arrived: the reservation stays counted.
    assert usage(gw, key["id"]) == (len(body) // 4, 300)


# -- timeouts.connect ----------------------------------------------------------------------


def test_connect_timeout_on_a_blackholed_replica_ejects_and_retries(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    victim, proc = cluster.sim("m", port=port)
    good, _ = cluster.sim("m")
    gw, _ = cluster.gateway(
        "pools:\n"
        "  - model: m\n    health_check: {interval: 60, timeout: 1}\n"
        f"    replicas:\n      - {{url: '{victim}', tier: primary}}\n"
        f"      - {{url: '{good}', tier: secondary}}\n"
        "timeouts: {connect: 0.5, first_byte: 30}\nrouting: {engine_metrics_interval: 0}\n"
    )
    all_healthy(gw)
    # The replica's port now takes no connection: a listener whose backlog is full drops SYNs.
    proc.stop()
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", port))
    hole.listen(0)
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        with pytest.raises(TimeoutError):  # the backlog is full: connects hang
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        status, hdrs, raw = request(gw, "/v1/chat/completions", CHAT)
        assert status == 200, raw
        assert hdrs["x-fortress-attempts"] == "2" and hdrs["x-fortress-tier"] == "secondary"
        row = replica_table(gw)[victim]
        assert row["state"] == "unhealthy" and row["ejected"], row
        assert "connect failed (timed out after 0.5 s)" in row["reason"], row  # the connect timeout
        # Out of rotation: the next request goes straight to the secondary.
        status, hdrs, _ = request(gw, "/v1/chat/completions", CHAT)
        assert status == 200 and hdrs["x-fortress-attempts"] == "1"
    finally:
        filler.close()
        hole.close()


# -- the audit archive -----------------------------------------------------------------------


def test_a_running_gateway_archives_its_records_as_jsonl_gz(cluster: Cluster, tmp_path: Path) -> None:
    sim, _ = cluster.sim("m")
    archive = tmp_path / "archive"
    text, _ = audited(tmp_path, pool("m", (sim, "primary")))
    text = text.replace("0.1}", f"0.1, archive_dir: '{archive}', archive_every: 0.5}}", 1)
    gw, _ = cluster.gateway(text)
    ids = [f"arch-{i}" for i in range(3)]
    for rid in ids:
        assert request(gw, "/v1/chat/completions", CHAT, {**AUDIT_HEADERS, "x-request-id": rid})[0] == 200

    def archived() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for part in archive.glob("*/*.jsonl.gz"):
            for line in gzip.decompress(part.read_bytes()).splitlines():
                rec = json.loads(line)
                out[rec["request_id"]] = rec
        return out

    wait_for(lambda: set(ids) <= set(archived()), 30, interval=0.2, what="the records in the archive")
    parts = sorted(archive.glob("*/*.jsonl.gz"))
    day, name = parts[0].parent.name, parts[0].name
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", day), day  # one directory per UTC day
    gateway_id, first, last = name.removesuffix(".jsonl.gz").rsplit("-", 2)
    assert gateway_id.startswith("gw-") and int(first) <= int(last)
    recs = archived()
    assert all(recs[r]["status"] == 200 and recs[r]["hash"] for r in ids)


# -- fortress up on a port in use ---------------------------------------------------------


def test_up_on_a_port_in_use_fails_before_starting_a_replica(tmp_path: Path) -> None:
    model = f"up-port-{os.getpid()}"
    config = tmp_path / "fortress.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nauth: {{enabled: false}}\naudit: {{enabled: false}}\n"
        f"pools: [{{model: {model}, replicas: [{{engine: sim, options: {{startup_delay: 30}}}}]}}]\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            fortress_argv("up", "-c", str(config), "--port", str(port), "-q"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "Traceback" not in out.stderr, out.stderr
    # No replica was started: no simulator serving the model, no replica log.
    running = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if entry.name.isdigit() and model.encode() in cmdline:
            running.append(cmdline)
    assert not running, running
    assert not (tmp_path / "state" / "logs").exists()
