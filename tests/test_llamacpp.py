"""``fortress up`` with real llama-server replicas of the embedded model, through the official
``openai`` SDK: OpenAI conformance of every body and stream chunk, and the supervisor keeping
the model answering when llama-server processes are SIGKILLed under load.

A missing llama-server or embedded model fails these tests (it never skips them): ``make test``
installs both.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import (
    AUDIT_HEADERS,
    PYTHON,
    Proc,
    alive,
    assert_schema,
    children_of,
    fortress_argv,
    free_port,
    http_get,
    http_post,
    replica_table,
    wait_for,
    wait_http,
    write_up_config,
)

from fortress.config import LlamaCppReplicaConfig
from fortress.engines import EngineError, engine_for

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def require_embedded_llama() -> None:
    try:
        engine_for(LlamaCppReplicaConfig())
    except EngineError as exc:
        pytest.fail(f"cannot run the llama.cpp integration tests: {exc}")


@dataclass
class Up:
    proc: Proc
    url: str
    replicas: int

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    def llama_pids(self) -> list[int]:
        return children_of(self.proc.pid)

    def healthy(self) -> int:
        return sum(1 for r in replica_table(self.url).values() if r["state"] == "healthy")

    def wait_all_healthy(self, timeout: float = 60) -> None:
        wait_for(
            lambda: len(self.llama_pids()) == self.replicas and self.healthy() == self.replicas,
            timeout=timeout,
            what=f"{self.replicas} healthy llama-server replicas",
        )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """``fortress up -c`` with two llama-server replicas of the embedded model."""
    require_embedded_llama()
    tmp = tmp_path_factory.mktemp("up")
    config = write_up_config(
        tmp,
        "smollm2",
        {"engine": "llamacpp", "count": 2, "options": {"backoff_initial": 0.2}},
        health_check={"interval": 0.5, "timeout": 0.5},
        deregistration_delay=5,
    )
    port = free_port()
    proc = Proc(fortress_argv("up", "-c", str(config), "--port", str(port), "-q"), tmp / "up.log")
    gw = Up(proc, f"http://127.0.0.1:{port}", 2)
    try:
        wait_http(gw.url + "/ready", timeout=90)
        gw.wait_all_healthy()
    except AssertionError:
        proc.stop()
        pytest.fail("fortress up did not become ready:\n" + proc.output()[-3000:])
    yield gw
    pids = gw.llama_pids()
    proc.stop()
    assert not any(alive(p) for p in pids), "fortress up left llama-server processes behind"


# -- OpenAI conformance through the gateway ------------------------------------------------


def test_models(up: Up) -> None:
    raw = up.client().models.with_raw_response.list()
    body = json.loads(raw.http_response.content)
    assert_schema(body, "ListModelsResponse")
    assert [m["id"] for m in body["data"]] == ["smollm2"]


def test_chat_non_stream(up: Up) -> None:
    raw = up.client().chat.completions.with_raw_response.create(
        model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0
    )
    body = json.loads(raw.http_response.content)
    assert_schema(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion" and body["model"] == "smollm2"
    assert body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def sse_events(lines: Iterator[str]) -> tuple[list[dict[str, Any]], bool]:
    """Parse SSE ``data:`` lines into JSON events; also whether ``[DONE]`` ended the stream."""
    events, done = [], False
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        events.append(json.loads(data))
    return events, done


def test_chat_stream_with_usage(up: Up) -> None:
    client = up.client()
    prompt_tokens = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=1
    ).usage.prompt_tokens
    with client.chat.completions.with_streaming_response.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks, done = sse_events(resp.iter_lines())
    assert done
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["object"] == "chat.completion.chunk"
    assert len({c["id"] for c in chunks}) == 1, "every chunk of one stream carries the same id"
    *content, last = chunks
    assert last["choices"] == [] and last["usage"], "the usage chunk comes last, with no choices"
    usage = last["usage"]
    text_chunks = [c for c in content if c["choices"] and c["choices"][0]["delta"].get("content")]
    finish = [c["choices"][0]["finish_reason"] for c in content if c["choices"]][-1]
    assert usage["prompt_tokens"] == prompt_tokens  # same prompt, same count as non-streamed
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= len(text_chunks) <= usage["completion_tokens"] <= 12
    if finish == "length":
        assert usage["completion_tokens"] == 12


def test_completions_non_stream_and_stream(up: Up) -> None:
    client = up.client()
    raw = client.completions.with_raw_response.create(
        model="smollm2", prompt="Once upon a time", max_tokens=5
    )
    body = json.loads(raw.http_response.content)
    assert_schema(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 5
    with client.completions.with_streaming_response.create(
        model="smollm2",
        prompt="Once upon a time",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    ) as resp:
        chunks, done = sse_events(resp.iter_lines())
    assert done and chunks
    text = ""
    for chunk in chunks:
        if chunk["choices"]:
            # OpenAI's schema requires a finish_reason string, but OpenAI itself streams null
            # until the last chunk: accept exactly that.
            choices = [dict(c, finish_reason=c["finish_reason"] or "stop") for c in chunk["choices"]]
            assert_schema(dict(chunk, choices=choices), "CreateCompletionResponse")
            text += chunk["choices"][0]["text"]
    assert text
    assert chunks[-1]["usage"]["completion_tokens"] == 5


# -- the supervisor under load -------------------------------------------------------------


@dataclass
class Load:
    """Client threads sending non-streamed chat requests back to back through the gateway."""

    up: Up
    threads: int = 2
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    last_ok: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(35)

    def _run(self) -> None:
        client = self.up.client()
        while not self._stop.is_set():
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model="smollm2", messages=MESSAGES, max_tokens=16
                )
                body = json.loads(raw.http_response.content)
                assert_schema(body, "CreateChatCompletionResponse")
                with self._lock:
                    self.ok += 1
                    self.last_ok = time.monotonic()
            except Exception as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)

    def wait_ok(self, more: int, timeout: float = 30) -> None:
        target = self.ok + more
        wait_for(lambda: self.ok >= target, timeout=timeout, what=f"{more} more successful requests")


def replica_series(url: str) -> dict[str, dict[frozenset, float]]:
    """Per-replica series of /metrics: metric -> {label set: value} (replica-labelled only)."""
    from prometheus_client.parser import text_string_to_metric_families

    _, body = http_get(url + "/metrics")
    out: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if "replica" in sample.labels:
                out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def test_sigkill_one_of_two_replicas_no_request_fails_and_its_name_stays(up: Up) -> None:
    up.wait_all_healthy()
    before = up.llama_pids()
    rows = {r["name"]: r for r in replica_table(up.url).values()}
    assert sorted(rows) == ["smollm2-1", "smollm2-2"]  # pool + index, from the config
    victim = before[0]
    victim_name = next(n for n, r in rows.items() if r["origin"]["pid"] == victim)
    other_name = next(n for n in rows if n != victim_name)
    assert rows[victim_name]["origin"]["kind"] == "local"
    series_before = replica_series(up.url)
    with Load(up) as load:
        load.wait_ok(6)
        os.kill(victim, signal.SIGKILL)
        # The supervisor starts a new llama-server; it rejoins after its first passing check.
        wait_for(
            lambda: victim not in up.llama_pids() and len(up.llama_pids()) == 2 and up.healthy() == 2,
            timeout=60,
            what="the killed replica to be replaced",
        )
        load.wait_ok(6)
    assert not load.failures, (
        f"{len(load.failures)} of {load.ok + len(load.failures)} failed: {load.failures[:3]}"
    )
    assert load.ok >= 12
    assert before[1] in up.llama_pids(), "the surviving replica was left alone"
    # The restarted process came back under the same name, as the next incarnation.
    after = {r["name"]: r for r in replica_table(up.url).values()}
    assert sorted(after) == sorted(rows)
    assert after[victim_name]["incarnation"] == rows[victim_name]["incarnation"] + 1
    assert after[victim_name]["origin"]["pid"] not in (victim, None)
    assert after[other_name]["incarnation"] == rows[other_name]["incarnation"]
    # /metrics keeps one series per replica name: the same label sets before and after.
    series_after = replica_series(up.url)
    for metric in (
        "fortress_replica_requests_total",
        "fortress_replica_state",
        "fortress_replica_incarnation",
    ):
        assert set(series_after[metric]) == set(series_before[metric]), metric
    incarnation = {dict(k)["replica"]: v for k, v in series_after["fortress_replica_incarnation"].items()}
    assert incarnation[victim_name] == after[victim_name]["incarnation"]
    requests = {dict(k)["replica"]: v for k, v in series_after["fortress_replica_requests_total"].items()}
    requests_before = {
        dict(k)["replica"]: v for k, v in series_before["fortress_replica_requests_total"].items()
    }
    assert requests[victim_name] >= requests_before[victim_name]  # the counter did not reset


def test_sigkill_all_under_load_and_while_loading_then_serves_again(up: Up) -> None:
    up.wait_all_healthy()
    gateway_pid = up.proc.pid
    before = set(up.llama_pids())
    with Load(up) as load:
        load.wait_ok(4)
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # Kill a replacement again while it is still loading the model (before /health is 200).
        wait_for(
            lambda: set(up.llama_pids()) - before, timeout=20, interval=0.01, what="a replacement process"
        )
        loading = next(iter(set(up.llama_pids()) - before))

        def cmdline() -> list[bytes]:
            return Path(f"/proc/{loading}/cmdline").read_bytes().split(b"\0")

        # Between fork and exec the child still shows the parent's command line.
        wait_for(lambda: b"--port" in cmdline(), timeout=5, interval=0.005, what="llama-server's exec")
        argv = cmdline()
        port = int(argv[argv.index(b"--port") + 1])
        try:
            still_loading = http_get(f"http://127.0.0.1:{port}/health", timeout=0.5)[0] != 200
        except OSError:
            still_loading = True  # not even listening yet
        os.kill(loading, signal.SIGKILL)
        assert still_loading, "the replacement was ready before it could be killed mid-load"
        # No gateway restart: the same process serves again once the supervisor is done.
        load.wait_ok(4, timeout=60)
        recovered_in = load.last_ok - killed_at
        up.wait_all_healthy()
    after = set(up.llama_pids())
    assert up.proc.p.poll() is None and up.proc.pid == gateway_pid
    assert not after & before and loading not in after
    assert recovered_in < 30, f"took {recovered_in:.1f}s to serve again"
    print(f"served again {recovered_in:.2f}s after the kill; {len(load.failures)} failed meanwhile")
    # With every replica dead, requests may fail (there is nothing to fail over to), and they
    # must say so in OpenAI's format rather than hang; afterwards everything succeeds again.
    for f in load.failures:
        assert re.search(r"(InternalServerError|ServiceUnavailable|APIStatusError|APIConnection)", f), f


# -- zero-config `fortress up` -------------------------------------------------------------


def test_zero_config_up_prints_a_working_snippet_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    require_embedded_llama()
    port = free_port()
    proc = Proc(
        fortress_argv("up", "--port", str(port), "-q", "--show-key"),  # the log file is no terminal
        tmp_path / "up.log",
        env={"FORTRESS__STATE_DIR": str(tmp_path / "state")},
    )
    try:
        wait_for(
            lambda: "print(reply.choices[0].message.content)" in proc.output(), timeout=60, what="the banner"
        )
        out = proc.output()
        url = f"http://127.0.0.1:{port}"
        assert f"Fortress is ready: {url}/v1" in out and "model: smollm2" in out
        assert f"curl {url}/v1/chat/completions" in out and '"model": "smollm2"' in out
        dashboard = re.search(r"dashboard: (\S+)", out)
        assert dashboard is not None and http_get(dashboard.group(1))[0] == 200
        snippet = out[
            out.index("from openai import OpenAI") : out.index("print(reply.choices[0].message.content)")
        ]
        snippet += "print(reply.choices[0].message.content)"
        # Keys and the audit trail are on: the banner carries the first key, printed once.
        key = re.search(r"^    (fk_\w+)$", out, re.M)
        assert key is not None, out[-3000:]
        assert f'api_key="{key.group(1)}"' in snippet and "x-llm-user" in snippet
        ran = Proc([PYTHON, "-c", snippet], tmp_path / "snippet.log")
        assert ran.p.wait(60) == 0, ran.output()
        assert ran.output().strip()
        curl = out[out.index("curl:\n") + 6 :].split("\n\n", 1)[0]
        assert f"Authorization: Bearer {key.group(1)}" in curl
        ran = Proc(["bash", "-c", curl + " -sS -o /dev/null -w '%{http_code}'"], tmp_path / "curl.log")
        assert ran.p.wait(60) == 0 and ran.output().strip() == "200", ran.output()
        body = json.dumps({"model": "smollm2", "messages": MESSAGES}).encode()
        status, _ = http_post(url + "/v1/chat/completions", body)
        assert status == 401  # no key
        status, _ = http_post(url + "/v1/chat/completions", body, {"Authorization": f"Bearer {key.group(1)}"})
        assert status == 400  # the key, but no audit headers
        assert (tmp_path / "state" / "logs" / "smollm2-1.log").stat().st_size > 0
        pids = children_of(proc.pid)
        assert len(pids) == 1
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.p.wait(20) == 0, proc.output()[-2000:]
        assert not alive(pids[0])
        with pytest.raises(OSError):  # the gateway is gone too
            http_get(url + "/health", timeout=0.5)
        # Every request above has its audit record: 2 answered (SDK, curl), 401 and 400.
        env = {**os.environ, "FORTRESS__STATE_DIR": str(tmp_path / "state")}
        q = subprocess.run(
            fortress_argv("audit", "query", "--json"), env=env, capture_output=True, text=True, timeout=60
        )
        assert q.returncode == 0, q.stderr
        statuses = sorted(r["status"] for r in json.loads(q.stdout))
        assert statuses == [200, 200, 400, 401], statuses
        # A second start on the same state keeps the key and does not print a new one.
        again = Proc(fortress_argv("up", "--port", str(port), "-q"), tmp_path / "up2.log", env=env)
        try:
            wait_for(lambda: "print(reply.choices" in again.output(), timeout=60, what="the second banner")
            assert key.group(1) not in again.output() and "fk_" in again.output()
            assert re.search(r"^    fk_\w+$", again.output(), re.M) is None
            status, _ = http_post(
                url + "/v1/chat/completions",
                body,
                {"Authorization": f"Bearer {key.group(1)}", **AUDIT_HEADERS},
            )
            assert status == 200
        finally:
            again.stop()
    finally:
        proc.stop()


def test_a_start_that_fails_leaves_no_unseen_key_behind(tmp_path: Path) -> None:
    """The first key is created right before the banner shows it: when every replica fails to
    start, no key exists that nobody was shown."""
    require_embedded_llama()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a model")
    options = {"model": str(bad), "max_crashes": 2, "backoff_initial": 0.1}
    config = write_up_config(
        tmp_path, "broken", {"engine": "llamacpp", "options": options}, keys_and_audit=True
    )
    proc = Proc(fortress_argv("up", "-c", str(config), "--port", str(free_port()), "-q"), tmp_path / "up.log")
    try:
        assert proc.p.wait(90) == 1, proc.output()[-2000:]
    finally:
        proc.stop()
    assert "fk_" not in proc.output() and "failed" in proc.output()
    listed = subprocess.run(
        fortress_argv("keys", "list", "-c", str(config)), capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "first-key" not in listed.stdout and "fk_" not in listed.stdout, listed.stdout


def test_an_embeddings_pool_of_llama_server(tmp_path: Path) -> None:
    """`options: {embeddings: true}`: llama-server with --embeddings behind the gateway, the
    openai SDK's embeddings call (base64 by default) answered with the model's vectors."""
    require_embedded_llama()
    config = write_up_config(
        tmp_path, "smollm2-embed", {"engine": "llamacpp", "options": {"embeddings": True}},
        health_check={"interval": 0.5, "timeout": 0.5},
    )  # fmt: skip
    port = free_port()
    proc = Proc(fortress_argv("up", "-c", str(config), "--port", str(port), "-q"), tmp_path / "up.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", timeout=90)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = c.embeddings.create(model="smollm2-embed", input=["a cat", "a dog", "a cat"])
        vecs = [d.embedding for d in out.data]
        assert len(vecs) == 3 and len(vecs[0]) >= 64 and out.usage.prompt_tokens > 0
        assert vecs[0] == pytest.approx(vecs[2]) and vecs[0] != pytest.approx(vecs[1])
    finally:
        proc.stop()
