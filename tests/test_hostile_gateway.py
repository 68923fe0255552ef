"""Hostile input and lying replicas, through real gateway processes: no wrong-model answer is ever
relayed, a keyless client costs no body buffer, and every failing request is answered in OpenAI's
format and recorded."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from conftest import Cluster
from helpers import assert_schema, http_get, http_post, replica_table, wait_for
from test_audit_gateway import AUDIT_HEADERS, cli

FAKE = "fake-model"
OTHER = "other-model"


def pool_config(*urls: str, extra: str = "", ejection: float = 30, interval: float = 0.2) -> str:
    replicas = ", ".join(f"{{url: '{u}'}}" for u in urls)
    return (
        "observe: {alarms: {evaluate_every: 0.2}}\n"
        f"{extra}"
        "pools:\n"
        f"  - model: {FAKE}\n"
        f"    health_check: {{interval: {interval}, timeout: 0.15}}\n"
        f"    outlier: {{base_ejection_time: {ejection}}}\n"
        f"    replicas: [{replicas}]\n"
    )


def control(sim_url: str, **changes: Any) -> None:
    status, body = http_post(sim_url + "/sim/control", json.dumps(changes).encode())
    assert status == 200, body


def ask(url: str, stream: bool) -> tuple[int, list[str], dict[str, Any]]:
    """One chat completion; (status, every model named in the answer, the error object if any)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    body = {"model": FAKE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        err = json.loads(raw)
        assert_schema(err, "ErrorResponse")
        return resp.status, [], err["error"]
    if not stream:
        return 200, [json.loads(raw)["model"]], {}
    models = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if "model" in chunk:
                models.append(chunk["model"])
    return 200, models, {}


def hammer(url: str, n: int, threads: int = 6) -> list[tuple[int, list[str], dict[str, Any]]]:
    out: list[tuple[int, list[str], dict[str, Any]]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        for j in range(i, n, threads):
            r = ask(url, stream=j % 2 == 1)
            with lock:
                out.append(r)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def metric(url: str, name: str, **labels: str) -> float | None:
    _, body = http_get(url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def alarm_state(url: str, name: str) -> str:
    _, body = http_get(url + "/alarms")
    return {a["name"]: a["state"] for a in json.loads(body)["alarms"]}[name]


# -- model identity ------------------------------------------------------------------------------


def test_a_replica_switching_models_never_answers_for_the_old_one(cluster: Cluster) -> None:
    a, _ = cluster.sim(FAKE, "--ttft", "0", "--itl", "0", "--tokens", "3")
    b, _ = cluster.sim(FAKE, "--ttft", "0", "--itl", "0", "--tokens", "3")
    # Answers caught by the relay hold the replica out for an ejection time: 1 s here.
    url, _ = cluster.gateway(pool_config(a, b, ejection=1))
    wait_for(lambda: all(r["state"] == "healthy" for r in replica_table(url).values()), 10, what="healthy")

    control(a, model=OTHER)  # the URL now serves another model, for checks and answers alike
    results = hammer(url, 240)
    wrong = [m for _, models, _ in results for m in models if m != FAKE]
    assert wrong == []
    assert sum(1 for status, _, _ in results if status == 200) == len(results)  # b answered, retries too

    wait_for(lambda: replica_table(url)[a]["state"] == "unhealthy", 5, what="a unhealthy")
    snap = replica_table(url)[a]
    assert snap["wrong_model"] == OTHER and "wrong model" in snap["reason"], snap
    assert replica_table(url)[b]["state"] == "healthy"
    assert metric(url, "fortress_replica_wrong_model", replica=snap["name"]) == 1.0
    wait_for(lambda: alarm_state(url, "model_mismatch") == "firing", 5, what="model_mismatch firing")
    assert alarm_state(url, "unhealthy_replicas") == "firing"

    control(a, model=FAKE)  # back to the right model: back in rotation through the checks
    wait_for(lambda: replica_table(url)[a]["state"] == "healthy", 10, what="a healthy again")
    assert replica_table(url)[a]["wrong_model"] is None
    wait_for(lambda: alarm_state(url, "model_mismatch") in ("resolved", "ok"), 5, what="alarm resolved")


def test_a_replica_lying_in_its_answers_is_caught_before_the_first_byte(cluster: Cluster) -> None:
    # /v1/models says the right model; the answers name another: only the relay can see it.
    liar, _ = cluster.sim(FAKE, "--ttft", "0", "--itl", "0", "--tokens", "3")
    good, _ = cluster.sim(FAKE, "--ttft", "0", "--itl", "0", "--tokens", "3")
    url, _ = cluster.gateway(pool_config(liar, good))
    wait_for(lambda: all(r["state"] == "healthy" for r in replica_table(url).values()), 10, what="healthy")
    control(liar, answer_model=OTHER)

    results = hammer(url, 120)
    assert [m for _, models, _ in results for m in models if m != FAKE] == []
    assert all(status == 200 for status, _, _ in results)
    snap = replica_table(url)[liar]
    assert snap["state"] == "unhealthy" and snap["wrong_model"] == OTHER, snap
    assert snap["model_mismatches"].get("answer", 0) >= 1
    assert metric(url, "fortress_replica_model_mismatches_total", replica=snap["name"], source="answer") >= 1
    # Its /v1/models looks right, but it stays out for the ejection time (30 s by default).
    time.sleep(1.0)
    assert replica_table(url)[liar]["state"] == "unhealthy"


def test_a_404_for_the_model_is_not_relayed_and_checks_the_replica_at_once(cluster: Cluster) -> None:
    # vLLM restarted with another model answers 404 for ours. Checks are 60 s apart here: only
    # the 404 can make the gateway look at the replica's /v1/models in time.
    gone, _ = cluster.sim(FAKE, "--ttft", "0", "--itl", "0", "--tokens", "3")
    good, _ = cluster.sim(FAKE, "--ttft", "0", "--itl", "0", "--tokens", "3")
    url, _ = cluster.gateway(pool_config(gone, good, interval=60))
    wait_for(lambda: all(r["state"] == "healthy" for r in replica_table(url).values()), 10, what="healthy")
    control(gone, model=OTHER, model_check=True)
    chat = {"model": FAKE, "messages": [{"role": "user", "content": "x"}]}
    status, body = http_post(gone + "/v1/chat/completions", json.dumps(chat).encode())
    assert status == 404 and b"does not exist" in body  # what the replica itself answers

    results = hammer(url, 60, threads=3)
    assert {status for status, _, _ in results} == {200}
    wait_for(lambda: replica_table(url)[gone]["state"] == "unhealthy", 5, what="checked at once")
    snap = replica_table(url)[gone]
    assert snap["wrong_model"] == OTHER and snap["model_mismatches"]["check"] >= 1, snap
    assert snap["failures"] >= 1  # the 404 that prompted the check


def test_fail_open_never_routes_to_a_replica_serving_another_model(cluster: Cluster) -> None:
    a, _ = cluster.sim(FAKE, "--ttft", "0", "--itl", "0", "--tokens", "3")
    b, _ = cluster.sim(FAKE, "--ttft", "0", "--itl", "0", "--tokens", "3")
    url, _ = cluster.gateway(pool_config(a, b, extra="routing: {when_all_unhealthy: fail_open}\n"))
    wait_for(lambda: all(r["state"] == "healthy" for r in replica_table(url).values()), 10, what="healthy")
    control(a, answer_model=OTHER)
    control(b, answer_model=OTHER)

    results = hammer(url, 60, threads=3)
    assert [m for _, models, _ in results for m in models if m != FAKE] == []
    statuses = {status for status, _, _ in results}
    assert statuses <= {502, 503}, statuses
    assert all(err.get("type") for _, _, err in results)
    table = replica_table(url)
    assert all(r["wrong_model"] == OTHER for r in table.values())
    # Both unhealthy and fail_open on: still no attempt reaches them.
    before = sum(r["served"] + r["failures"] for r in table.values())
    status, _, err = ask(url, stream=False)
    assert status == 503 and err["code"] == "no_healthy_replica", err
    after = sum(r["served"] + r["failures"] for r in replica_table(url).values())
    assert after == before


# -- hostile bodies ------------------------------------------------------------------------------


def audited_config(tmp_path: Path, sim_url: str, auth: bool = False) -> str:
    return (
        f"state_dir: {tmp_path / 'state'}\n"
        + f"auth: {{enabled: {str(auth).lower()}}}\n"
        + "audit: {group_commit_ms: 2}\n"
        "pools:\n"
        "  - model: m\n"
        "    aliases: [alias-m]\n"
        "    health_check: {interval: 1, timeout: 0.5}\n"
        f"    replicas: [{{url: '{sim_url}'}}]\n"
    )


def nested(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


def test_deep_nesting_is_a_400_with_a_record(cluster: Cluster, tmp_path: Path) -> None:
    sim_url, _ = cluster.sim("m")
    cfg = audited_config(tmp_path, sim_url)
    url, proc = cluster.gateway(cfg)
    msg = '"messages": [{"role": "user", "content": %s}]'
    cases = {  # written as text: too deep for Python's own json module
        # The gateway re-encodes these (stream usage, alias): more than 254 levels cannot be.
        "deep-stream": ('{"model": "m", "stream": true, %s}' % (msg % nested(300)), "nested"),
        "deep-alias": ('{"model": "alias-m", %s}' % (msg % nested(300)), "nested"),
        # Deeper than the JSON parser goes.
        "deep-plain": ('{"model": "m", %s}' % (msg % nested(2000)), "parse"),
    }
    for rid, (body, says) in cases.items():
        headers = {**AUDIT_HEADERS, "x-request-id": rid}
        status, raw = http_post(url + "/v1/chat/completions", body.encode(), headers)
        assert status == 400, (rid, raw[:200])
        err = json.loads(raw)
        assert_schema(err, "ErrorResponse")
        assert says in err["error"]["message"], err
    # A body nested within the limit still works.
    ok = '{"model": "alias-m", "stream": true, "x": ' + nested(100) + ", " + msg % '"hi"' + "}"
    headers = {**AUDIT_HEADERS, "x-request-id": "ok"}
    status, raw = http_post(url + "/v1/chat/completions", ok.encode(), headers)
    assert status == 200, raw[:300]
    proc.stop()
    assert "Traceback" not in proc.output()
    (tmp_path / "f.yaml").write_text(cfg)
    out = cli("query", "-c", str(tmp_path / "f.yaml"), "--since", "1h", "--json")
    assert out.returncode == 0, out.stderr
    statuses = {r["request_id"]: r["status"] for r in json.loads(out.stdout)}
    assert statuses == {"deep-stream": 400, "deep-alias": 400, "deep-plain": 400, "ok": 200}


def read_response(s: socket.socket) -> bytes:
    """One whole response with a content-length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536) or b""
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def gateway_pid(proc: Any) -> int:
    # `fortress serve` runs the gateway in the started process itself.
    return proc.pid


def test_keyless_request_is_refused_before_its_body_is_read(cluster: Cluster, tmp_path: Path) -> None:
    sim_url, _ = cluster.sim("m")
    url, proc = cluster.gateway(audited_config(tmp_path, sim_url, auth=True))
    port = urllib.parse.urlsplit(url).port
    size = 4 * 1024 * 1024
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {size}\r\n\r\n"
    ).encode()
    # Warm up (first requests allocate what every later one reuses).
    for _ in range(5):
        assert http_post(url + "/v1/chat/completions", b"{}")[0] == 401
    before = rss_kib(gateway_pid(proc))
    socks = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(10)
            s.sendall(head + b"{" * 1024)
            socks.append(s)
        for s in socks:
            # The answer comes while almost all of the 4 MiB body is still unsent.
            answer = read_response(s)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["code"] is None and "API key" in body["error"]["message"]
        chunk = b" " * (1024 * 1024)
        for s in socks:  # the rest of each body is read and dropped, never held
            with contextlib.suppress(OSError):  # the gateway closes after a short linger
                for _ in range(4):
                    s.sendall(chunk)
        time.sleep(0.5)
        grown = rss_kib(gateway_pid(proc)) - before
        assert grown < 10 * 1024, f"RSS grew {grown} KiB for 50 keyless 4 MiB requests"
    finally:
        for s in socks:
            s.close()


def test_client_gone_during_upload_is_a_499_record_without_traceback(
    cluster: Cluster, tmp_path: Path
) -> None:
    sim_url, _ = cluster.sim("m")
    cfg = audited_config(tmp_path, sim_url)
    url, proc = cluster.gateway(cfg)
    port = urllib.parse.urlsplit(url).port
    hdrs = "".join(f"{k}: {v}\r\n" for k, v in AUDIT_HEADERS.items())
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{hdrs}x-request-id: gone-{i}\r\n"
                "content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
            ).encode()
            + b'{"model": "m", "messages": ['
        )
        time.sleep(0.02)
        s.close()
    assert (
        http_post(
            url + "/v1/chat/completions",
            json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            AUDIT_HEADERS,
        )[0]
        == 200
    )
    proc.stop()
    log = proc.output()
    assert "Traceback" not in log and "ERROR" not in log, log[-2000:]
    (tmp_path / "f.yaml").write_text(cfg)
    out = cli("query", "-c", str(tmp_path / "f.yaml"), "--since", "1h", "--json")
    rows = [r for r in json.loads(out.stdout) if r["request_id"].startswith("gone-")]
    assert len(rows) == 20 and {r["status"] for r in rows} == {499}, rows[:3]
