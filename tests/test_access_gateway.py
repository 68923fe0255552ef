"""API keys and usage plans through real gateway processes in front of simulated replicas."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster
from helpers import fortress_argv, wait_for

KEY_RE = re.compile(r"fk_[a-z0-9]{8}_[A-Za-z0-9]{32}")
ID_RE = re.compile(r"key_[0-9a-f]{16}")


PLANS = (
    "  default: {rate: 100, burst: 100}\n"
    "  tight: {rate: 0.2, burst: 2}\n"
    "  tokens: {rate: null, requests: {}, output_tokens: {day: 100}, default_max_tokens: 40}\n"
)


def config(sim_url: str, tmp: Path, extra: str = "", database: str | None = None, plans: str = PLANS) -> str:
    db = f"database: {{url: '{database}'}}\n" if database else ""
    return (
        f"state_dir: {tmp / 'state'}\n{db}"
        "auth: {cache_refresh: 1, rotation_grace: 3600}\n"
        "audit: {enabled: false}\n"
        f"plans:\n{plans}{extra}"
        "pools:\n"
        "  - model: sim-model\n"
        "    health_check: {interval: 1, timeout: 0.5, healthy_threshold: 1}\n"
        f"    replicas: [{{url: '{sim_url}'}}]\n"
    )


def call(
    url: str, key: str | None = None, header: str = "authorization", body: dict[str, Any] | None = None
) -> tuple[int, dict[str, str], Any]:
    """POST a chat completion; (status, lower-case headers, parsed body or raw text)."""
    data = json.dumps(
        body or {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, method="POST")
    req.add_header("content-type", "application/json")
    if key is not None:
        req.add_header(header, f"Bearer {key}" if header == "authorization" else key)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, headers, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, dict(exc.headers), exc.read()
    headers = {k.lower(): v for k, v in headers.items()}
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode()


def admin(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def cli(cfg: Path, *args: str) -> str:
    out = subprocess.run(
        fortress_argv("keys", *args, "-c", str(cfg)),
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout


def beside(text: str, tmp: Path) -> str:
    """The config of a second gateway next to the one ``text`` started: a state dir of its own
    (one gateway per state dir), the first one's database and secret, so both know the same
    keys."""
    state = tmp / "state"
    other = text.replace(f"state_dir: {state}\n", f"state_dir: {tmp / 'state-b'}\n")
    if "database:" not in other:
        other += f"database: {{url: 'sqlite:///{state / 'fortress.db'}'}}\n"
    secret = (state / "secret").read_text().strip()
    return other.replace("auth: {", f"auth: {{secret: '{secret}', ", 1)


def write(tmp: Path, text: str) -> Path:
    path = tmp / f"keys-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(text)
    return path


def test_key_lifecycle_through_the_gateway(cluster: Cluster, tmp_path: Path) -> None:
    sim, _ = cluster.sim()
    text = config(sim, tmp_path)
    cfg = write(tmp_path, text)
    out = cli(cfg, "create", "--name", "bot", "--plan", "default")
    key, key_id = KEY_RE.search(out).group(0), ID_RE.search(out).group(0)  # type: ignore[union-attr]
    other = KEY_RE.search(cli(cfg, "create", "--name", "narrow", "--model", "another-model")).group(0)  # type: ignore[union-attr]
    gw, _ = cluster.gateway(text)

    status, headers, body = call(gw, key)
    assert status == 200, body
    assert headers["x-ratelimit-limit-requests"] == "100"
    assert headers["x-ratelimit-remaining-requests"] == "99"
    assert "x-ratelimit-reset-requests" in headers
    assert call(gw, key, header="x-api-key")[0] == 200

    status, headers, body = call(gw, None)
    assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
    assert "x-api-key" in body["error"]["message"]
    status, _, body = call(gw, key[:-4] + "abcd")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert key not in body["error"]["message"]  # never echo a key back
    status, _, body = call(gw, other)
    assert status == 403 and body["error"]["code"] == "model_not_allowed"

    # Rotate with a short grace: both values work, then only the new one.
    out = cli(cfg, "rotate", key_id, "--grace", "3")
    new = KEY_RE.search(out).group(0)  # type: ignore[union-attr]
    wait_for(lambda: call(gw, new)[0] == 200, timeout=5, what="the rotated key to work")
    assert call(gw, key)[0] == 200
    wait_for(lambda: call(gw, key)[0] == 401, timeout=6, what="the old key to stop after its grace")
    assert call(gw, new)[0] == 200

    listing = cli(cfg, "list")
    assert key_id in listing and "bot" in listing
    assert "memory" in cli(cfg, "show", key_id)

    t0 = time.monotonic()
    cli(cfg, "revoke", key_id)
    wait_for(lambda: call(gw, new)[0] == 401, timeout=5, what="the revoked key to fail")
    assert time.monotonic() - t0 < 5


def test_burst_exceeded_answers_429_with_openai_headers(cluster: Cluster, tmp_path: Path) -> None:
    sim, _ = cluster.sim()
    text = config(sim, tmp_path)
    gw, _ = cluster.gateway(text)
    status, created = admin(gw, "POST", "/admin/keys", {"name": "t", "plan": "tight"})
    assert status == 201
    key = created["key"]
    assert call(gw, key)[0] == 200
    assert call(gw, key)[0] == 200
    status, headers, body = call(gw, key)
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_streams_settle_token_quotas_to_real_usage(cluster: Cluster, tmp_path: Path) -> None:
    sim, _ = cluster.sim("sim-model", "--tokens", "16")
    gw, _ = cluster.gateway(config(sim, tmp_path))
    _, created = admin(gw, "POST", "/admin/keys", {"name": "s", "plan": "tokens"})
    key = created["key"]
    stream = {
        "model": "sim-model",
        "stream": True,
        "max_tokens": 30,
        "messages": [{"role": "user", "content": "x"}],
    }
    status, headers, _ = call(gw, key, body=stream)
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "70"  # 30 reserved while the stream runs
    # Settled to the 16 tokens really generated; default_max_tokens (40) reserved when none given.
    wait_for(
        lambda: admin(gw, "GET", f"/admin/keys/{created['id']}")[1]["usage"]["output_tokens"]["day"] == 16
    )
    status, headers, _ = call(gw, key)
    assert status == 200 and headers["x-ratelimit-remaining-tokens"] == "44"  # 100 - 16 - 40
    for _ in range(3):
        call(gw, key, body=stream)
    status, headers, body = call(gw, key, body={**stream, "max_tokens": 60})
    assert status == 429 and body["error"]["type"] == "tokens" and "max_tokens" in body["error"]["message"]
    assert "x-ratelimit-remaining-tokens" in headers


def test_admin_api_for_keys_and_plans(cluster: Cluster, tmp_path: Path) -> None:
    sim, _ = cluster.sim()
    gw, _ = cluster.gateway(config(sim, tmp_path))
    assert admin(gw, "POST", "/admin/keys", {"name": "x", "plan": "nope"})[0] == 400
    assert admin(gw, "POST", "/admin/keys", {"plan": "default"})[0] == 400
    status, created = admin(gw, "POST", "/admin/keys", {"name": "x", "models": ["sim-model"]})
    assert status == 201 and created["key"].startswith(created["prefix"])
    assert call(gw, created["key"])[0] == 200
    status, listing = admin(gw, "GET", "/admin/keys")
    assert status == 200 and [k["id"] for k in listing["data"]] == [created["id"]]
    assert all("key" not in k and "hash" not in k for k in listing["data"])
    status, shown = admin(gw, "GET", f"/admin/keys/{created['id']}")
    assert shown["usage"]["requests"] == {"day": 1, "month": 1}
    status, rotated = admin(gw, "POST", f"/admin/keys/{created['id']}/rotate", {"grace": 0})
    assert status == 200 and rotated["key"] != created["key"]
    assert call(gw, created["key"])[0] == 401  # grace 0: at once on this gateway
    assert call(gw, rotated["key"])[0] == 200
    status, plans = admin(gw, "GET", "/admin/plans")
    # The config's plans, and the built-in unlimited `operator` (the first key's).
    assert {p["name"] for p in plans["data"]} == {"default", "tight", "tokens", "operator"}
    assert admin(gw, "DELETE", f"/admin/keys/{created['id']}")[1]["status"] == "revoked"
    assert call(gw, rotated["key"])[0] == 401
    assert admin(gw, "GET", "/admin/keys/key_0000000000000000")[0] == 404
    assert admin(gw, "GET", "/admin/replicas")[0] == 200  # still the gateway's own route


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_revocation_reaches_every_gateway_within_5s(
    cluster: Cluster, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    database = None
    if store == "postgresql":
        base: str = request.getfixturevalue("postgres_url")
        database = base  # the session database: keys are told apart by their random ids
    sim, _ = cluster.sim()
    text = config(sim, tmp_path, database=database)
    gw_a, _ = cluster.gateway(text)
    gw_b, _ = cluster.gateway(beside(text, tmp_path))
    _, created = admin(gw_a, "POST", "/admin/keys", {"name": "shared"})
    key = created["key"]
    wait_for(lambda: call(gw_b, key)[0] == 200, timeout=5, what="gateway B to learn the new key")
    assert call(gw_a, key)[0] == 200
    t0 = time.monotonic()
    assert admin(gw_a, "DELETE", f"/admin/keys/{created['id']}")[0] == 200
    assert call(gw_a, key)[0] == 401
    wait_for(lambda: call(gw_b, key)[0] == 401, timeout=5, what="gateway B to reject the revoked key")
    assert time.monotonic() - t0 < 5


def test_two_gateways_share_limits_through_redis(cluster: Cluster, tmp_path: Path, redis_url: str) -> None:
    sim, _ = cluster.sim()
    prefix = f"gw{uuid.uuid4().hex[:6]}:"
    limits = f"limits: {{backend: redis, redis_url: '{redis_url}', key_prefix: '{prefix}'}}\n"
    text = config(sim, tmp_path, extra=limits, plans="  default: {rate: null, requests: {day: 7}}\n")
    gw_a, _ = cluster.gateway(text)
    gw_b, _ = cluster.gateway(beside(text, tmp_path))
    _, created = admin(gw_a, "POST", "/admin/keys", {"name": "r"})
    key = created["key"]
    wait_for(lambda: call(gw_b, key)[0] in (200, 429), timeout=5, what="gateway B to learn the key")
    statuses = [call(gw, key)[0] for _ in range(6) for gw in (gw_a, gw_b)]
    ok = statuses.count(200) + 1  # + the probe that let B in
    assert ok == 7 and set(statuses) == {200, 429}
    shown = admin(gw_b, "GET", f"/admin/keys/{created['id']}")[1]
    assert shown["usage"]["requests"]["day"] == 7
    assert str(7) in cli(write(tmp_path, text), "show", created["id"])
