#!/usr/bin/env python3
"""Fortress side by side with its peers: nginx's ``proxy_pass`` and LiteLLM's proxy.

Method
------
The same method as ``bench/gateway_overhead.py`` and ``bench/gateway_layers.py``, whose helpers
this script imports:

* **One upstream for all.** nginx (``worker_processes 1``) answers ``POST /v1/chat/completions``
  with a fixed, realistic ``chat.completion`` JSON (~600 bytes, with usage) and ``GET /health``
  and ``/v1/models``; it runs on the load core.
* **The proxies**, each one process pinned with ``taskset`` to the other core (the proxy core),
  all started at once and measured in turn:

  1. ``direct``: no proxy, wrk talks to the upstream itself (its CPU is the upstream nginx's,
     on the load core): the reference.
  2. ``nginx``: a second nginx (``worker_processes 1``, access log off) whose ``proxy_pass``
     keeps a pool of keep-alive connections to the upstream (``upstream { keepalive 64; }``,
     HTTP/1.1): what a C proxy that does nothing but relay costs.
  3. ``litellm``: LiteLLM's proxy (``litellm --config``; the upstream as an OpenAI-compatible
     ``openai/<model>`` with ``api_base``; a master key, no database; one worker; the local
     model cost map, telemetry off), installed by this script into a throwaway virtualenv in
     the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``, ``fortress-bench/``) at
     the version pinned below, and reused while it has that version.
  4. ``fortress``: ``fortress serve -c`` with one pool on the upstream and the defaults (metrics,
     alarms and the access log on), except API keys and the audit trail, which the defaults turn
     on and which need a key and audit headers (the configuration ``gateway_overhead.py``
     measures).
  5. ``fortress-all``: everything on (``gateway_layers.py``'s ``access-memory`` configuration
     with the access log off): an API key created in the gateway's store before it starts, a
     usage plan sized so that nothing is refused but every part of it runs (token bucket, daily
     request quota, input and output token quotas with the ``max_tokens`` reservation settled
     to the real usage, a concurrency slot), the audit trail (every request carries the audit
     headers; one hash-chained record each, journalled and shipped into SQLite), metrics and
     alarms.

  Fortress runs one worker (``server.workers: 1`` where the build has that setting).
* **Smoke test first**: one request through each proxy must answer 200 with a JSON
  ``chat.completion`` that has choices; the report says whether the answer is the upstream's
  unchanged. ``fortress-all`` is also checked to refuse a request without a key (401) and one
  without audit headers (400) and to send rate-limit headers, so that its layers are really on.
* **Load**: ``wrk -t1 -c32`` on the load core, non-streamed POSTs (the same body for all; the
  key and audit headers where the proxy needs them), 10 s per measurement. Rounds alternate
  between the proxies, the order rotating each round, so that all of them see the same machine
  noise; each figure is the median over rounds. After each measurement the script waits until
  the proxy is idle again (a slow proxy may still be working on requests wrk left in flight)
  so that it takes no CPU from the next one.
* **CPU per request**: the proxy's CPU time over the measurement (all threads of it and its
  child processes, from ``/proc/<pid>/task/*/schedstat``) divided by the requests wrk completed
  in it. Requests per second depend on everything else that runs on the machine; CPU time per
  request much less so, which makes it the figure to compare. The report says how busy the
  proxy's core was (the proxy's CPU seconds per wall second), how much CPU other processes used
  on that core and on the whole machine during the run, and warns when it was more than 5 %.
* **Errors**: wrk's socket errors and non-2xx answers are counted for each proxy; Fortress must
  have none. At the end, ``fortress-all``'s audit store must hold a record for every request it
  answered.

Targets: Fortress with everything on ≤ 150 µs of CPU per request; LiteLLM's CPU per request at
least 80 times that.

Run ``python bench/peers.py`` (about 4 minutes, plus LiteLLM's installation the first time;
``--quick`` ~1.5 minutes with rougher figures; ``--write-docs`` replaces the "Fortress, nginx and
LiteLLM side by side" section of ``docs/benchmarks.md``; ``--skip-litellm`` leaves LiteLLM out
and says so). Needs nginx and wrk (``make bench`` installs them on Debian), two CPU cores, and
for LiteLLM a package index to install it from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gateway_layers as gl
import gateway_overhead as go
import throwaway_venv as tv
from docs_section import DOCS, markers, write_section

SECTION = "peers"
TITLE = "## Fortress, nginx and LiteLLM side by side"

# The LiteLLM release measured; `pip install 'litellm[proxy]==<this>'` into its own virtualenv.
LITELLM_VERSION = "1.108.7"
LITELLM_KEY = "sk-bench-master"

TARGET_ALL_US = 150.0  # Fortress, everything on: CPU per request
TARGET_LITELLM_RATIO = 80.0  # LiteLLM's CPU per request / Fortress everything-on's

MODEL = "bench-json"


@dataclass
class Plan:
    # Five rounds: on a shared machine a round of Fortress everything-on (three threads) moved
    # by up to a third with the host's load; the median of five is steadier than that of three.
    rounds: int = 5
    round_s: float = 8.0
    warmup_s: float = 2.0
    conns: int = 32


QUICK = Plan(rounds=2, round_s=3.0, warmup_s=1.0)


@dataclass
class Proxy:
    name: str
    what: str
    port: int = 0
    pid: int = 0
    watch: list[int] = field(default_factory=list)  # the processes whose CPU is measured
    headers: dict[str, str] = field(default_factory=dict)
    fortress: bool = False
    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    others_on_core: list[float] = field(default_factory=list)  # other CPU on its core / wall
    requests: int = 0  # completed by wrk, warm-up included
    errors: int = 0  # wrk's socket errors + non-2xx answers, warm-up included
    answer: str = ""  # what the smoke request showed
    # CPU µs per request by thread (the event loop, then the threads by their OS names), per round
    threads: list[dict[str, float]] = field(default_factory=list)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid`` by name: ``event loop`` for the main thread,
    else the OS name (Fortress names its own threads: ``audit-journal``, ``audit-shipper``)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            ns = int((task / "schedstat").read_text().split()[0])
            name = "event loop" if task.name == str(pid) else (task / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


# -- LiteLLM --------------------------------------------------------------------------------


def ensure_litellm() -> Path:
    """The ``litellm`` executable at LITELLM_VERSION, in its own virtualenv."""
    return tv.ensure("litellm", "litellm", LITELLM_VERSION, [f"litellm[proxy]=={LITELLM_VERSION}"], "litellm")


def write_litellm_config(workdir: Path, p_up: int) -> Path:
    path = workdir / "litellm.yaml"
    path.write_text(
        "# written by bench/peers.py\n"
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{p_up}/v1\n"
        "      api_key: none\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    return path


def litellm_argv(exe: Path, config: Path, port: int) -> list[str]:
    # `env` execs LiteLLM in place: the pid taskset started stays the one measured.
    return [
        "env",
        "-u",
        "DATABASE_URL",
        "LITELLM_LOCAL_MODEL_COST_MAP=True",  # the cost map shipped in the package, not fetched
        "LITELLM_TELEMETRY_DISABLED=true",
        "LITELLM_LOG=ERROR",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX=true",
        str(exe),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]


# -- nginx as a proxy -----------------------------------------------------------------------


def write_nginx_proxy(workdir: Path, port: int, p_up: int) -> Path:
    temp = "\n".join(
        f"  {d}_temp_path {workdir / ('proxy-' + d)};"
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = f"""# written by bench/peers.py
worker_processes 1;
daemon off;
pid {workdir / "proxy-nginx.pid"};
error_log {workdir / "proxy-nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  upstream bench {{
    server 127.0.0.1:{p_up};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    path = workdir / "proxy-nginx.conf"
    path.write_text(conf)
    return path


# -- Fortress -------------------------------------------------------------------------------


def has_workers_setting() -> bool:
    from fortress.config.server import Server

    return "workers" in Server.model_fields


def one_worker(path: Path) -> None:
    """Add ``server.workers: 1`` to a config written by the other benches."""
    text = path.read_text()
    if "\nserver:\n" not in text:
        raise SystemExit(f"{path.name}: no server section to add workers to")
    path.write_text(text.replace("\nserver:\n", "\nserver:\n  workers: 1\n", 1))


def fortress_argv(binary: str, config: Path, port: int, workers: bool) -> list[str]:
    env = ["env", "FORTRESS__SERVER__WORKERS=1"] if workers else []
    return [*env, binary, "serve", "-c", str(config), "--port", str(port)]


# -- checks and measurement -----------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = go.children(todo.pop())
        out += kids
        todo += kids
    return out


def smoke(p: Proxy, body: bytes) -> None:
    """One request: 200 with a JSON chat.completion that has choices."""
    headers = {"Content-Type": "application/json", **p.headers}
    req = urllib.request.Request(f"http://127.0.0.1:{p.port}{go.PATH}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if status != 200 or not isinstance(choices, list) or not choices or "message" not in choices[0]:
        raise SystemExit(f"smoke test failed for {p.name}: {status} {raw[:300]!r}")
    p.answer = (
        "the upstream's, unchanged"
        if answer == json.loads(go.completion_body())
        else f"valid, rewritten ({len(raw)} bytes)"
    )


def settle(pids: list[int], limit: float = 15.0) -> None:
    """Wait until the processes use less than 5 % of a core (at most ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        c0 = sum(go.cpu_time(p) for p in pids)
        time.sleep(0.2)
        if sum(go.cpu_time(p) for p in pids) - c0 < 0.01:
            return


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    gw_core, load_core = args.gateway_core, args.load_core
    go.pin_load(gw_core, load_core, "proxies")
    nginx_bin, fortress_bin = go.require_tools("nginx", "wrk", "taskset")

    litellm: dict[str, Any] = {"version": LITELLM_VERSION, "skipped": None}
    exe: Path | None = None
    if args.skip_litellm:
        litellm["skipped"] = "left out with --skip-litellm"
    else:
        try:
            exe = ensure_litellm()
        except tv.Unavailable as exc:
            raise SystemExit(f"LiteLLM is not available: {exc}\nrerun with --skip-litellm") from exc
        litellm["version"] = tv.installed_version(exe.parent / "python", "litellm") or "?"
    workers = has_workers_setting()

    workdir = Path(tempfile.mkdtemp(prefix="fortress-peers-"))
    procs = go.Procs(workdir)
    body = go.request_body(MODEL, False)
    proxies = [
        Proxy("direct", "no proxy: wrk to the upstream nginx (its CPU, on the load core)"),
        Proxy("nginx", "nginx `proxy_pass`, upstream keep-alive, 1 worker"),
    ]
    if exe is not None:
        proxies.append(
            Proxy(
                "litellm",
                f"LiteLLM {litellm['version']} proxy: `openai/{MODEL}` with `api_base`, master key, "
                "no database, 1 worker",
                headers={"Authorization": f"Bearer {LITELLM_KEY}"},
            )
        )
    proxies += [
        Proxy(
            "fortress",
            "Fortress, defaults (metrics, alarms, access log) with keys and audit off",
            fortress=True,
        ),
        Proxy(
            "fortress-all",
            "Fortress, everything on: API key + usage plan + audit trail + metrics and alarms; "
            "access log off",
            fortress=True,
        ),
    ]
    by_name = {p.name: p for p in proxies}
    all_on = gl.Variant("fortress-all", "", auth=True, audit=True, access_log=False)
    results: dict[str, Any] = {
        "machine": go.machine(),
        "plan": asdict(plan),
        "cores": {"proxy": gw_core, "load": load_core},
        "litellm": litellm,
        "fortress_workers_setting": workers,
    }
    busy0, own0, t0 = go.machine_busy(), go.own_cpu(), time.monotonic()
    core0, proxies_cpu = go.machine_busy(gw_core), 0.0
    smoke_requests = 0
    try:
        p_up, p_sse = go.free_port(), go.free_port()
        conf = go.write_nginx(workdir, p_up, p_sse)
        upstream = procs.start("nginx", [nginx_bin, "-p", str(workdir), "-c", str(conf)], load_core)
        go.wait_for(f"http://127.0.0.1:{p_up}/health", procs)
        direct = by_name["direct"]
        direct.port, direct.pid = p_up, upstream.pid
        direct.watch = [upstream.pid, *descendants(upstream.pid)]

        go.step(f"starting the proxies on core {gw_core}: {', '.join(p.name for p in proxies[1:])}")
        for p in proxies[1:]:
            p.port = go.free_port()
        nx = by_name["nginx"]
        nx_conf = write_nginx_proxy(workdir, nx.port, p_up)
        nx.pid = procs.start("proxy-nginx", [nginx_bin, "-p", str(workdir), "-c", str(nx_conf)], gw_core).pid
        if "litellm" in by_name and exe is not None:
            ll = by_name["litellm"]
            ll_conf = write_litellm_config(workdir, p_up)
            ll.pid = procs.start("litellm", litellm_argv(exe, ll_conf, ll.port), gw_core).pid
        fd = by_name["fortress"]
        fd_conf = go.write_gateway_config(workdir, fd.port, {MODEL: p_up})
        fa = by_name["fortress-all"]
        all_on.port = fa.port
        fa_conf = gl.write_config(all_on, workdir, p_up, "redis://127.0.0.1:6379/0")  # memory backend
        if workers:
            one_worker(fd_conf)
            one_worker(fa_conf)
        all_on.key = gl.create_key(fa_conf)
        fa.headers = all_on.headers()
        for p, path in ((fd, fd_conf), (fa, fa_conf)):
            p.pid = procs.start(p.name, fortress_argv(fortress_bin, path, p.port, workers), gw_core).pid

        go.wait_for(f"http://127.0.0.1:{nx.port}/health", procs)
        for p in (fd, fa):
            go.wait_for(f"http://127.0.0.1:{p.port}/ready", procs)
        if "litellm" in by_name:
            go.wait_for(f"http://127.0.0.1:{by_name['litellm'].port}/health/liveliness", procs, timeout=180)
        for p in proxies:
            if p is not direct:
                p.watch = [p.pid, *descendants(p.pid)]
            smoke(p, body)
        gl.smoke(all_on, body)  # 200 with rate-limit headers, 401 without the key, 400 without audit
        smoke_requests = 4  # fortress-all: smoke() and gl.smoke()'s three

        def wrk(p: Proxy, secs: float) -> go.WrkResult:
            url = f"http://127.0.0.1:{p.port}{go.PATH}"
            core = gw_core if p is not direct else load_core
            b0 = go.machine_busy(core)
            t0 = thread_cpu(p.pid) if p is fa else {}
            r = go.run_wrk(url, body, secs, plan.conns, load_core, workdir, p.watch, p.headers)
            if p is fa and r.requests:
                t1 = thread_cpu(p.pid)
                p.threads.append({k: (v - t0.get(k, 0.0)) / r.requests * 1e6 for k, v in t1.items()})
            others = max(0.0, go.machine_busy(core) - b0 - r.cpu_s)  # wrk's too on the load core
            p.requests += r.requests
            p.errors += r.errors
            settle(p.watch)
            if p is not direct:
                p.others_on_core.append(others / r.seconds)
            return r

        go.step(f"warm-up, {plan.warmup_s:g} s each")
        for p in proxies:
            wrk(p, plan.warmup_s)
            p.others_on_core.clear()
            p.threads.clear()
        for i in range(plan.rounds):
            order = proxies[i % len(proxies) :] + proxies[: i % len(proxies)]
            go.step(f"round {i + 1}/{plan.rounds}: {' → '.join(p.name for p in order)}")
            for p in order:
                r = wrk(p, plan.round_s)
                p.cpu_us.append(r.cpu_per_request_us)
                p.rps.append(r.rps)
                p.busy.append(r.busy)
        procs.check_alive()
        proxies_cpu = sum(go.cpu_time(pid) for p in proxies[1:] for pid in p.watch)
        go.step("waiting for fortress-all's audit shipper to store every record")
        deadline, count = time.monotonic() + 30, -1
        while time.monotonic() < deadline:
            count = gl.audit_count(all_on)
            if count >= fa.requests + smoke_requests:
                break
            time.sleep(0.5)
        results["audit_records"] = count
    finally:
        procs.stop()
        wall = time.monotonic() - t0
        other = max(0.0, (go.machine_busy() - busy0) - (go.own_cpu() - own0))
        on_core = max(0.0, go.machine_busy(gw_core) - core0 - proxies_cpu)
        results["other_cpu"] = {
            "seconds": other,
            "share": other / (wall * (os.cpu_count() or 1)),
            "proxy_core_share": on_core / wall,
        }
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["audit_expected"] = fa.requests + smoke_requests
    results["proxies"] = {
        p.name: {k: v for k, v in asdict(p).items() if k not in ("name", "pid", "watch", "port")}
        for p in proxies
    }
    return results


# -- report ---------------------------------------------------------------------------------


def _us(v: float) -> str:
    return f"{v:,.1f} µs" if v < 100 else f"{v:,.0f} µs"


def _x(v: float) -> str:
    return f"{v:.2f}x" if v < 10 else f"{v:,.0f}x"


def med(p: dict[str, Any], key: str = "cpu_us") -> float:
    return float(statistics.median(p[key]))


def report(r: dict[str, Any], command: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The markdown section body and the target checks (name, measured, PASS/FAIL/SKIPPED)."""
    m, ps, plan = r["machine"], r["proxies"], r["plan"]
    ll = r["litellm"]
    nginx_us = med(ps["nginx"])
    all_us = med(ps["fortress-all"])
    verdict = {True: "PASS", False: "FAIL"}
    checks = [
        (
            "Fortress, everything on: CPU per request",
            f"{_us(all_us)} (≤ {TARGET_ALL_US:.0f} µs)",
            verdict[all_us <= TARGET_ALL_US],
        )
    ]
    if "litellm" in ps:
        ratio = med(ps["litellm"]) / all_us
        checks.append(
            (
                "LiteLLM's CPU per request / Fortress everything-on's",
                f"{ratio:,.0f}x (≥ {TARGET_LITELLM_RATIO:.0f}x)",
                verdict[ratio >= TARGET_LITELLM_RATIO],
            )
        )
    else:
        checks.append(
            (
                "LiteLLM's CPU per request / Fortress everything-on's",
                f"not measured: {ll['skipped']}",
                "SKIPPED",
            )
        )
    fortress_errors = sum(p["errors"] for p in ps.values() if p["fortress"])
    checks.append(
        ("Fortress: wrk errors and non-2xx answers", f"{fortress_errors}", verdict[fortress_errors == 0])
    )
    audit_ok = r.get("audit_records", -1) >= r.get("audit_expected", 0)
    checks.append(
        (
            "Fortress, everything on: an audit record per request answered",
            f"{r.get('audit_records', -1):,} records for {r.get('audit_expected', 0):,} requests",
            verdict[audit_ok],
        )
    )
    other = r["other_cpu"]
    noisy = other["share"] > 0.05 or other["proxy_core_share"] > 0.05
    workers = (
        "`server.workers: 1`"
        if r["fortress_workers_setting"]
        else "one process (this build has no workers setting)"
    )
    litellm_line = (
        f"LiteLLM {ll['version']} (`litellm[proxy]`, in its own virtualenv)"
        if "litellm" in ps
        else f"LiteLLM not measured ({ll['skipped']})"
    )
    lines = [
        f"Measured {r['date']} at commit {m['commit']} on {m['cpu']} ({m['cores']} cores, Linux "
        f"{m['kernel']}), Python {m['python']}, {m['stack']}; nginx {m['nginx']}, wrk {m['wrk']}; "
        f"{litellm_line}. Load average at start: {m['loadavg']}.",
        "",
        "```",
        command,
        "```",
        "",
        f"Every proxy is one process on CPU {r['cores']['proxy']} (Fortress: {workers}; nginx: one "
        f"worker{'; LiteLLM: `--num_workers 1`' if 'litellm' in ps else ''}), in front of the same "
        "upstream: nginx answering a "
        f"~600-byte `chat.completion` on CPU {r['cores']['load']}, where wrk (`-t1 "
        f"-c{plan['conns']}`, non-streamed `POST /v1/chat/completions`) runs too. {plan['rounds']} "
        f"rounds of {plan['round_s']:.0f} s per proxy in rotating order; each figure is the median "
        "over rounds (CPU range in brackets). CPU per request is the proxy's CPU time (all "
        "threads) over the requests completed: the figure that other work on the machine disturbs "
        "least. Run time "
        f"{r['seconds']:.0f} s; other processes used {other['share'] * 100:.1f} % of the machine's "
        f"CPU meanwhile and {other['proxy_core_share'] * 100:.1f} % of the proxies' core"
        + (
            " (a busy machine: requests/s are unreliable, CPU per request less so; rerun when it is quiet)."
            if noisy
            else "."
        ),
        "",
        "**Targets**:",
        "",
        "| target | measured | result |",
        "| --- | --- | --- |",
        *(f"| {a} | {b} | {c} |" for a, b, c in checks),
        "",
        "| proxy | what runs | CPU / request | vs nginx proxy | req/s | its core: proxy / others | "
        "wrk errors + non-2xx | answer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, p in ps.items():
        cpu = med(p)
        others = f"{med(p, 'others_on_core') * 100:.0f} %" if p["others_on_core"] else "-"
        lines.append(
            f"| {name} | {p['what']} | **{_us(cpu)}** [{min(p['cpu_us']):,.1f}-{max(p['cpu_us']):,.1f}] "
            f"| {_x(cpu / nginx_us)} | {med(p, 'rps'):,.0f} | {med(p, 'busy') * 100:.0f} % / {others} | "
            f"{p['errors']} | {p['answer']} |"
        )
    lines.append("")
    fd_us = med(ps["fortress"])
    reading = (
        f"Reading the figures: per request, Fortress spends {_x(fd_us / nginx_us)} the CPU of nginx's "
        f"`proxy_pass` in its default configuration and {_x(all_us / nginx_us)} with keys, usage "
        "plans, audit trail and metrics on"
    )
    if "litellm" in ps:
        ll_us = med(ps["litellm"])
        reading += (
            f"; LiteLLM's proxy spends {_x(ll_us / all_us)} the CPU of Fortress with everything on "
            f"({_x(ll_us / fd_us)} that of its default configuration) and {_x(ll_us / nginx_us)} "
            "that of nginx. At saturation of one core, that is "
            f"{med(ps['fortress-all'], 'rps'):,.0f} requests/s for Fortress with everything on "
            f"against {med(ps['litellm'], 'rps'):,.0f} for LiteLLM."
        )
    else:
        reading += f". LiteLLM was not measured ({ll['skipped']})."
    split = ps["fortress-all"].get("threads") or []
    if split:
        names = sorted({k for row in split for k in row}, key=lambda k: (k != "event loop", k))
        parts = [
            f"{k} {_us(float(statistics.median(row.get(k, 0.0) for row in split)))}"
            for k in names
            if statistics.median(row.get(k, 0.0) for row in split) >= 0.05
        ]
        lines += [
            "Where Fortress-all's CPU per request goes, by thread (median over rounds; "
            "`/proc/<pid>/task/*/schedstat`): " + ", ".join(parts) + ".",
            "",
        ]
    lines += [reading, ""]
    return "\n".join(lines), checks


def check_others(before: str, after: str) -> str | None:
    """What changed outside the peers section between two versions of the docs (None: nothing)."""
    start, end = markers(SECTION)

    def without(text: str) -> list[str]:
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + rest.split(end, 1)[1]
        return [ln for ln in text.splitlines() if ln.strip()]

    old, new = without(before), without(after)
    if old == new:
        return None
    for i, (a, b) in enumerate(zip(old, new, strict=False)):
        if a != b:
            return f"line {i + 1} outside the section changed: {a[:80]!r} -> {b[:80]!r}"
    return f"{abs(len(old) - len(new))} lines outside the section appeared or went"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        description="Fortress, nginx and LiteLLM side by side (see the module docstring for the method)."
    )
    ap.add_argument("--quick", action="store_true", help="short run (~1.5 minutes), rougher figures")
    ap.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    ap.add_argument("--json", metavar="FILE", help="write the raw results as JSON")
    ap.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM out (the report says so)")
    ap.add_argument("--gateway-core", type=int, default=1, help="CPU for the proxies [1]")
    ap.add_argument("--load-core", type=int, default=0, help="CPU for the upstream and wrk [0]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    results, body, checks = go.measure("peers.py", argv, args, run, report)
    if args.json:  # the report names no path of this machine
        body = body.replace(args.json, "FILE")
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.write_docs:
        before = DOCS.read_text() if DOCS.exists() else ""
        path = write_section(SECTION, body, TITLE, after="gateway-layers")
        problem = check_others(before, path.read_text())
        if problem:
            path.write_text(before)
            print(f"not written: {problem}; {path} left as it was", file=sys.stderr)
            return 1
        print(f"wrote the '{TITLE[3:]}' section of {path}", file=sys.stderr)
    return 0 if all(c[2] != "FAIL" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
