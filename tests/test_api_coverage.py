"""/v1/embeddings and /v1/responses through a real gateway with keys, limits and audit on, the
official `openai` SDK as client; the body's `user` field as the audit user where allowed; replica
errors normalised to OpenAI's format."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Cluster
from helpers import PYTHON, http_post

from fortress.gateway.conform import openai_error

AUDIT = {"x-llm-source": "tests", "x-llm-user": "alice", "x-llm-request-type": "api"}


def config(tmp: Path, sim_url: str, audit: str = "") -> str:
    return (
        f"state_dir: {tmp / 'state'}\n"
        "auth: {cache_refresh: 1}\n"
        "plans:\n  default: {rate: 100, burst: 100, requests: {day: 1000}}\n"
        f"audit: {{group_commit_ms: 2{audit}}}\n"
        "pools:\n  - model: m\n    health_check: {interval: 1, timeout: 0.5}\n"
        f"    replicas: [{{url: '{sim_url}'}}]\n"
    )


def new_key(cfg_path: Path, plan: str = "default") -> str:
    argv = ["keys", "create", "--name", f"api-{plan}", "--plan", plan, "-c", str(cfg_path), "--json"]
    out = subprocess.run([PYTHON, "-m", "fortress.cli.main", *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["key"]


def records(cfg_path: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [PYTHON, "-m", "fortress.cli.main", "audit", "query", "-c", str(cfg_path), "--since", "1h", "--json"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return {r["request_id"]: r for r in json.loads(out.stdout)}


@pytest.fixture
def gateway(cluster: Cluster, tmp_path: Path) -> tuple[str, Path, str, Any]:
    sim_url, _ = cluster.sim("m", "--ttft", "0", "--itl", "0", "--tokens", "5")
    cfg = config(tmp_path, sim_url, ", user_from_body: true")
    path = tmp_path / "fortress.yaml"
    path.write_text(cfg)
    key = new_key(path)
    url, proc = cluster.gateway(cfg)
    return url, path, key, proc


def test_embeddings_and_responses_with_keys_audit_and_the_sdk(gateway: tuple[str, Path, str, Any]) -> None:
    url, path, key, proc = gateway
    c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, default_headers=AUDIT)
    emb = c.embeddings.create(model="m", input=["one", "two three"], extra_headers={"x-request-id": "emb-1"})
    assert [len(d.embedding) for d in emb.data] == [8, 8] and emb.usage.prompt_tokens == 3
    assert emb.data[0].embedding != emb.data[1].embedding

    resp = c.responses.create(
        model="m", input="hi", max_output_tokens=3, extra_headers={"x-request-id": "resp-1"}
    )
    assert resp.output_text == " tok0 tok1 tok2" and resp.usage.output_tokens == 3
    events = list(
        c.responses.create(model="m", input="hi there", stream=True, extra_headers={"x-request-id": "resp-2"})
    )
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert (
        "".join(e.delta for e in events if e.type == "response.output_text.delta")
        == " tok0 tok1 tok2 tok3 tok4"
    )

    with pytest.raises(openai.AuthenticationError):  # the same keys guard every endpoint
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).embeddings.create(
            model="m", input="x"
        )

    proc.stop()  # ships every record
    rec = records(path)
    assert rec["emb-1"]["status"] == 200 and rec["emb-1"]["input_tokens"] == 3
    assert rec["emb-1"]["output_tokens"] in (0, None)
    assert (rec["resp-1"]["input_tokens"], rec["resp-1"]["output_tokens"]) == (1, 3)
    assert rec["resp-2"]["stream"] is True and rec["resp-2"]["output_tokens"] == 5
    assert all(rec[r]["user"] == "alice" for r in ("emb-1", "resp-1", "resp-2"))


def test_the_body_user_stands_in_for_the_header_where_allowed(gateway: tuple[str, Path, str, Any]) -> None:
    url, path, key, proc = gateway
    headers = {"authorization": f"Bearer {key}", "x-llm-source": "app", "x-llm-request-type": "chat"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, raw = http_post(
        url + "/v1/chat/completions",
        json.dumps({**chat, "user": "bob"}).encode(),
        {**headers, "x-request-id": "u-body"},
    )
    assert status == 200, raw
    status, raw = http_post(
        url + "/v1/chat/completions", json.dumps(chat).encode(), {**headers, "x-request-id": "u-none"}
    )
    assert status == 400
    err = json.loads(raw)["error"]
    assert err["param"] == "user" and "x-llm-user" in err["message"]
    status, _ = http_post(
        url + "/v1/chat/completions",
        json.dumps({**chat, "user": "bob"}).encode(),
        {**headers, "x-llm-user": "carol", "x-request-id": "u-both"},
    )
    assert status == 200
    proc.stop()
    rec = records(path)
    assert rec["u-body"]["user"] == "bob" and rec["u-both"]["user"] == "carol"  # the header wins
    assert rec["u-none"]["status"] == 400


def test_a_plan_can_allow_the_body_user_for_its_keys(cluster: Cluster, tmp_path: Path) -> None:
    sim_url, _ = cluster.sim("m")
    cfg = config(tmp_path, sim_url).replace(
        "plans:\n", "plans:\n  apps: {rate: 100, burst: 100, user_from_body: true}\n"
    )
    path = tmp_path / "fortress.yaml"
    path.write_text(cfg)
    app_key, plain_key = new_key(path, "apps"), new_key(path)
    url, _ = cluster.gateway(cfg)
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "bob"}).encode()
    headers = {"x-llm-source": "app", "x-llm-request-type": "chat"}
    ok = http_post(url + "/v1/chat/completions", chat, {**headers, "authorization": f"Bearer {app_key}"})
    assert ok[0] == 200, ok
    status, raw = http_post(
        url + "/v1/chat/completions", chat, {**headers, "authorization": f"Bearer {plain_key}"}
    )
    assert status == 400 and "x-llm-user" in json.loads(raw)["error"]["message"]


def test_without_permission_the_body_user_is_not_enough(cluster: Cluster, tmp_path: Path) -> None:
    sim_url, _ = cluster.sim("m")
    url, _ = cluster.gateway(
        config(tmp_path, sim_url).replace("auth: {cache_refresh: 1}", "auth: {enabled: false}")
    )
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "bob"}
    status, raw = http_post(
        url + "/v1/chat/completions",
        json.dumps(chat).encode(),
        {"x-llm-source": "a", "x-llm-request-type": "b"},
    )
    assert status == 400 and "x-llm-user" in json.loads(raw)["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "message", "code"),
    [
        # llama.cpp: code is the HTTP status
        (
            b'{"error":{"code":400,"message":"messages must be an array","type":"invalid_request_error"}}',
            400,
            "messages must be an array",
            None,
        ),
        # vLLM: no envelope
        (
            b'{"object":"error","message":"max_tokens too large","type":"BadRequestError",'
            b'"param":null,"code":400}',
            400,
            "max_tokens too large",
            None,
        ),
        # plain text
        (b"Bad Request: nope", 400, "Bad Request: nope", None),
        # a string error
        (b'{"error":"context too long"}', 400, "context too long", None),
    ],
)
def test_replica_errors_are_normalised(body: bytes, status: int, message: str, code: str | None) -> None:
    fixed = openai_error(body, status)
    assert fixed is not None
    err = json.loads(fixed)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["message"], err["code"]) == (message, code) and err["type"]


def test_an_openai_format_error_is_left_as_it_is() -> None:
    ok = b'{"error":{"message":"m","type":"invalid_request_error","param":"messages","code":"x"}}'
    assert openai_error(ok, 400) is None
