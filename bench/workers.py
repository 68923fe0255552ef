#!/usr/bin/env python3
"""Gateway workers: does ``server.workers: 2`` give about twice one worker on a 2-core machine?

Method
------
The same upstream, load and CPU accounting as ``bench/gateway_overhead.py``,
``bench/gateway_layers.py`` and ``bench/peers.py``, whose helpers this script imports:

* **Upstream**: nginx (``worker_processes 1``) answering ``POST /v1/chat/completions`` with a
  fixed ~600-byte ``chat.completion`` (with usage).
* **Gateways**, all started at once and measured in turn: ``fortress serve -c <config> --port P
  --workers 1`` and ``--workers 2``, for each configuration:

  * ``relay``: the defaults with API keys and the audit trail off (metrics, alarms and the
    access log on): ``gateway_overhead.py``'s configuration;
  * ``access-memory``: ``relay`` + an API key + a usage plan (memory backend: with 2 workers
    that is the table in shared memory the workers lock per key) + the audit trail (every
    request carries the audit headers; one hash-chained record each, per worker journal,
    shipped into SQLite): ``gateway_layers.py``'s ``access-memory``.

  Nothing is pinned: the workers, nginx and wrk share both cores as the scheduler sees fit
  (pinning would keep the two workers from using both cores).
* **Load**: ``wrk -t1 -c64`` (non-streamed POSTs, the key and audit headers where needed),
  unpinned. Rounds alternate between the gateways so that 1-worker and 2-worker gateways see
  the same machine noise: in each round the configurations come in rotating order, and each
  configuration's 1-worker and 2-worker gateways run back to back, which of them first
  alternating (on a shared virtual machine the speed of a core drifts within seconds, so the
  two measurements that are compared should be close in time). After each measurement the
  script waits until the gateway is idle again (the audit shipper may still be storing).
* **Per measurement**: wrk's requests and req/s; the wall time W of the window; the CPU time
  (from ``/proc/<pid>/task/*/schedstat``, all threads) of the gateway (the process started and
  all its descendants: with 2 workers the master and both workers), of nginx (master and
  worker) and of wrk (``getrusage(RUSAGE_CHILDREN)`` around it); and how much CPU other
  processes of the machine used in the window (``/proc/stat`` minus all of the above and this
  script). Gateway CPU per request counts the gateway's CPU from the start of the window until
  it is idle again (work left over, such as shipping audit records, is part of a request's
  cost) over the requests wrk completed.

Normalized capacity: what the load generator takes
--------------------------------------------------
On 2 cores, wrk and nginx use CPU the workers could otherwise have, and they use more of it
the more requests are served: a 2-worker gateway cannot reach twice the requests/s of one
while wrk and nginx run beside it (with 1 worker the machine still has spare CPU; with 2 it
has none). The raw ratio (req/s with 2 workers / req/s with 1) is reported, but the question
is "with the whole machine for the gateway (the load generator elsewhere), what do N workers
give?". A worker is one event loop: it can use about one core (a little more where a
thread of its own, such as the audit shipper, runs beside the loop). So N workers on C cores
can use ``min(N, C)`` cores, or what they were seen to use if more (``G_N``, the gateway's CPU s
per wall s, counts the helper threads), and with the load elsewhere they are CPU-bound at
saturation. Hence, per round and gateway::

    cpu_per_request_N = gateway CPU s (master + workers, window + tail) / requests completed
    cores_N           = min(C, max(N, G_N))        the cores N workers use, the machine theirs
    capacity_N        = cores_N / cpu_per_request_N                      [req/s]
                      = req/s_N * cores_N / G_N                          (tail ~ 0)
    normalized ratio  = capacity_2 / capacity_1
                      ~ 2 * cpu_per_request_1 / cpu_per_request_2        (when G_1 <= 1)

that is, requests per gateway-core-second times the cores N workers can use. With one worker
the machine had CPU to spare (wrk and nginx take well under a core), so G_1 is what one worker
uses when nothing holds it back and capacity_1 is about its req/s; with two, the machine was
full, and capacity_2 gives them the CPU wrk and nginx took. The ratio falls short of 2 as far
as a request costs more CPU with 2 workers than with 1 (the shared usage-plan table, the metrics
board, contention between the two cores). It assumes the gateway is CPU-bound: the report shows
how much of the CPU it could have each gateway used (``G_N`` over ``min(N, C - (wrk + nginx +
other processes' CPU s) / wall)``, the cores left to it by the load generator and whatever else
ran), which must be near 100 % for the capacity to mean anything (above 100 %: helper threads),
and warns when it is under 85 %: a gateway that waits (on a lock, say) would not turn the
CPU the load generator took into requests. Ratios are taken per round (the 1-worker and
2-worker measurements of the same configuration in the same round) and the
median over rounds is reported.

Target: normalized ratio ≥ 1.8 for every configuration measured. Checks: no wrk errors or
non-2xx answers; both workers served (each worker has at least 20 % of its gateway's worker CPU
in every measured round and, with audit on, records under each worker's gateway id
``<id>-w0`` / ``<id>-w1``); every request answered has its audit record.

Run ``python bench/workers.py`` (about 3 minutes; ``--quick`` ~1 minute with rougher figures;
``--write-docs`` replaces the "Gateway workers" section of ``docs/benchmarks.md``; ``--json
FILE`` writes the raw results; ``--keep`` keeps the temporary directory with the logs;
``--configs relay,keys,audit,access-memory`` measures other configurations: ``keys`` and
``audit`` are ``relay`` + each layer of ``access-memory`` alone, to see where a cost comes
from). Needs nginx and wrk (``make bench`` installs them on Debian) and two CPU cores. Other
processes' CPU during the run is reported; above ~10 % of the machine, rerun when it is quieter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gateway_layers as gl
import gateway_overhead as go
import peers as pr
from docs_section import DOCS, markers, write_section

SECTION = "workers"
TITLE = "## Gateway workers: one process or two on two cores"
TARGET_RATIO = 1.8  # normalized capacity, 2 workers / 1 worker
MIN_WORKER_SHARE = 0.2  # each worker's least share of its gateway's worker CPU in a round
MIN_USED = 0.85  # a gateway's CPU / the CPU it could have, below which the capacity is doubtful
NOISY = 0.10  # other processes' share of the machine above which the run should be redone
MODEL = "bench-json"
# The configurations this script knows: gateway_layers' layers on top of the relay.
LAYERS: dict[str, dict[str, bool]] = {
    "relay": {},
    "keys": {"auth": True},
    "audit": {"audit": True},
    "access-memory": {"auth": True, "audit": True},
}
DEFAULT_CONFIGS = "relay,access-memory"
WHAT = {
    "relay": "the defaults with keys and audit off",
    "keys": "relay + API key and usage plan (memory backend: shared-memory table with 2 workers)",
    "audit": "relay + audit trail",
    "access-memory": "relay + API key, usage plan (memory backend: shared-memory table with 2 "
    "workers) and audit trail",
}


@dataclass
class Plan:
    rounds: int = 8
    round_s: float = 4.0
    warmup_s: float = 2.0
    conns: int = 64


QUICK = Plan(rounds=2, round_s=3.0, warmup_s=1.0)


@dataclass
class Gateway:
    config: str  # relay / access-memory
    workers: int
    port: int = 0
    pid: int = 0  # the process started: the master with 2 workers, the gateway with 1
    worker_pids: list[int] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    variant: gl.Variant | None = None  # access-memory: its key, state dir and audit headers
    rounds: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0  # completed by wrk, warm-up included
    errors: int = 0  # wrk's socket errors + non-2xx, warm-up included
    smoke_requests: int = 0

    @property
    def name(self) -> str:
        return f"{self.config} x{self.workers}"

    def pids(self) -> list[int]:
        return [self.pid, *pr.descendants(self.pid)]


def children_cpu() -> float:
    """CPU seconds of this script's waited-for children (wrk), µs precision."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_of(pids: list[int]) -> dict[int, float]:
    return {p: go.cpu_time(p) for p in pids}


def sleeps_of(pids: list[int]) -> int:
    """Voluntary context switches so far of every thread of ``pids``: each is a thread that
    went to sleep (an idle event loop, or a worker waiting for another's limits lock)."""
    total = 0
    for pid in pids:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue  # the thread ended meanwhile
            for line in text.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def measure(
    g: Gateway, body: bytes, secs: float, conns: int, nginx_pids: list[int], workdir: Path, cores: int
) -> dict[str, Any]:
    """One wrk run against ``g``, unpinned; the CPU of everyone in its window."""
    pids = g.pids()
    url = f"http://127.0.0.1:{g.port}{go.PATH}"
    gw0, ng0 = cpu_of(pids), sum(go.cpu_time(p) for p in nginx_pids)
    sleeps0 = sleeps_of(pids)
    wrk0, own0, busy0 = children_cpu(), self_cpu(), go.machine_busy()
    t0 = time.perf_counter()
    r = go.run_wrk(url, body, secs, conns, None, workdir, pids, g.headers)
    wall = time.perf_counter() - t0
    gw1, ng1 = cpu_of(pids), sum(go.cpu_time(p) for p in nginx_pids)
    sleeps = sleeps_of(pids) - sleeps0
    wrk_cpu, own, busy = children_cpu() - wrk0, self_cpu() - own0, go.machine_busy() - busy0
    pr.settle(pids)  # the gateway's leftover work (audit shipping) is part of the cost
    gw2 = cpu_of(pids)
    gw_cpu = sum(gw1[p] - gw0[p] for p in pids)
    tail = sum(gw2[p] - gw1[p] for p in pids)
    nginx_cpu = ng1 - ng0
    g.requests += r.requests
    g.errors += r.errors
    per_worker = [gw1[p] - gw0[p] for p in g.worker_pids]
    load = (wrk_cpu + nginx_cpu) / wall
    others = max(0.0, busy - gw_cpu - nginx_cpu - wrk_cpu - own) / wall  # cores
    cpu_per_request = (gw_cpu + tail) / r.requests if r.requests else float("inf")
    usable = min(g.workers, cores)
    whole = min(cores, max(g.workers, gw_cpu / wall))  # cores_N: the machine theirs
    return {
        "requests": r.requests,
        "rps": r.rps,
        "errors": r.errors,
        "wall_s": wall,
        "gateway_cpu_s": gw_cpu,
        "gateway_tail_cpu_s": tail,
        "worker_cpu_s": per_worker,
        "nginx_cpu_s": nginx_cpu,
        "wrk_cpu_s": wrk_cpu,
        "gateway_cores": gw_cpu / wall,  # G: cores the gateway used
        "load_cores": load,  # L: cores wrk and nginx used
        "gateway_used": (gw_cpu / wall) / max(1e-9, min(usable, cores - load - others)),
        "other_share": others / cores,
        "cpu_per_request_us": cpu_per_request * 1e6,
        "sleeps_per_request": sleeps / r.requests if r.requests else 0.0,
        "load_cpu_per_request_us": (wrk_cpu + nginx_cpu) / r.requests * 1e6 if r.requests else 0.0,
        "cores_whole_machine": whole,
        "capacity_rps": whole / cpu_per_request,
    }


def audit_by_gateway(v: gl.Variant) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(v.state / "fortress.db", timeout=5)) as conn:
        rows = conn.execute("select gateway_id, count(*) from audit_records group by gateway_id")
        return {str(gid): int(n) for gid, n in rows}


def start_gateways(
    configs: list[str], workdir: Path, procs: go.Procs, p_up: int, fortress_bin: str
) -> list[Gateway]:
    gws = [Gateway(c, n) for c in configs for n in (1, 2)]
    for g in gws:
        g.port = go.free_port()
        if g.config == "relay":
            d = workdir / f"relay-w{g.workers}"
            d.mkdir()
            path = go.write_gateway_config(d, g.port, {MODEL: p_up})
        else:
            v = gl.Variant(f"{g.config}-w{g.workers}", "", port=g.port, **LAYERS[g.config])
            path = gl.write_config(v, workdir, p_up, "redis://127.0.0.1:6379/0")  # memory backend
            if v.auth:
                v.key = gl.create_key(path)
            g.variant, g.headers = v, v.headers()
        argv = [fortress_bin, "serve", "-c", str(path), "--port", str(g.port), "--workers", str(g.workers)]
        g.pid = procs.start(f"gateway-{g.config}-w{g.workers}", argv, None).pid
    return gws


def round_order(gws: list[Gateway], configs: list[str], i: int) -> list[Gateway]:
    """Round ``i``: the configurations rotated; each one's two gateways back to back, which
    first alternating from round to round and from configuration to configuration."""
    out = []
    for k in range(len(configs)):
        j = (i + k) % len(configs)
        pair = sorted((g for g in gws if g.config == configs[j]), key=lambda g: g.workers)
        out += pair if (i + j) % 2 == 0 else pair[::-1]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    cores = len(os.sched_getaffinity(0))
    if cores != 2:
        print(f"warning: {cores} usable cores; this benchmark is meant for 2", file=sys.stderr)
    nginx_bin, fortress_bin = go.require_tools("nginx", "wrk")
    configs = args.configs.split(",")
    if not configs or not set(configs) <= set(LAYERS):
        raise SystemExit(f"--configs: choose from {', '.join(LAYERS)}")
    workdir = Path(tempfile.mkdtemp(prefix="fortress-workers-"))
    procs = go.Procs(workdir)
    body = go.request_body(MODEL, False)
    results: dict[str, Any] = {
        "machine": go.machine(),
        "plan": asdict(plan),
        "cores": cores,
        "configs": configs,
    }
    gws: list[Gateway] = []
    busy0, own0, t0 = go.machine_busy(), go.own_cpu(), time.monotonic()
    try:
        p_up, p_sse = go.free_port(), go.free_port()
        conf = go.write_nginx(workdir, p_up, p_sse)
        nginx = procs.start("nginx", [nginx_bin, "-p", str(workdir), "-c", str(conf)], None)
        go.wait_for(f"http://127.0.0.1:{p_up}/health", procs)
        nginx_pids = [nginx.pid, *pr.descendants(nginx.pid)]
        go.step(f"starting {2 * len(configs)} gateways, unpinned: {', '.join(configs)} x 1 and 2 workers")
        gws = start_gateways(configs, workdir, procs, p_up, fortress_bin)
        for g in gws:
            go.wait_for(f"http://127.0.0.1:{g.port}/ready", procs, timeout=60)
            if g.workers > 1:
                deadline = time.monotonic() + 30
                while len(go.children(g.pid)) < g.workers and time.monotonic() < deadline:
                    time.sleep(0.1)
                g.worker_pids = sorted(go.children(g.pid))
                if len(g.worker_pids) != g.workers:
                    raise SystemExit(f"{g.name}: {len(g.worker_pids)} worker processes, not {g.workers}")
            else:
                g.worker_pids = [g.pid]
            pr.smoke(pr.Proxy(g.name, "", port=g.port, headers=g.headers), body)  # 200, a completion
            if g.variant is not None:
                gl.smoke(g.variant, body)  # 200 with rate-limit headers, 401 without key, 400 without audit
                g.smoke_requests = 2 + g.variant.auth + g.variant.audit

        def one(g: Gateway, secs: float) -> dict[str, Any]:
            return measure(g, body, secs, plan.conns, nginx_pids, workdir, cores)

        go.step(f"warm-up, {plan.warmup_s:g} s each")
        for g in gws:
            one(g, plan.warmup_s)
        for i in range(plan.rounds):
            order = round_order(gws, configs, i)
            go.step(f"round {i + 1}/{plan.rounds}: {' → '.join(g.name for g in order)}")
            for g in order:
                m = one(g, plan.round_s)
                g.rounds.append(m)
                print(
                    f"    {g.name}: {m['rps']:,.0f} req/s, {m['cpu_per_request_us']:.0f} µs/request, "
                    f"gateway {m['gateway_cores']:.2f} + load {m['load_cores']:.2f} cores, "
                    f"others {m['other_share'] * 100:.0f} %",
                    file=sys.stderr,
                )
        procs.check_alive()
        for g in gws:
            if g.workers > 1 and sorted(go.children(g.pid)) != g.worker_pids:
                raise SystemExit(f"{g.name}: a worker was replaced during the run (see its log)")
        audit: dict[str, Any] = {}
        if any(g.variant and g.variant.audit for g in gws):
            go.step("waiting for the audit shippers to store every record")
        for g in gws:
            if g.variant is None or not g.variant.audit:
                continue
            expected = g.requests + g.smoke_requests
            deadline, by_id = time.monotonic() + 30, {}
            while time.monotonic() < deadline:
                by_id = audit_by_gateway(g.variant)
                if sum(by_id.values()) >= expected:
                    break
                time.sleep(0.5)
            audit[g.name] = {"expected": expected, "by_gateway": by_id}
        results["audit"] = audit
    finally:
        procs.stop()
        wall = time.monotonic() - t0
        other = max(0.0, (go.machine_busy() - busy0) - (go.own_cpu() - own0))
        results["other_cpu"] = {"seconds": other, "share": other / (wall * cores)}
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["gateways"] = {
        g.name: {
            "config": g.config,
            "workers": g.workers,
            "requests": g.requests,
            "errors": g.errors,
            "rounds": g.rounds,
        }
        for g in gws
    }
    return results


# -- report ---------------------------------------------------------------------------------


def med(rounds: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rounds))


def ratios(r: dict[str, Any], config: str) -> dict[str, list[float]]:
    """Per round: 2 workers / 1 worker of req/s (raw) and of capacity (normalized)."""
    one, two = r["gateways"][f"{config} x1"]["rounds"], r["gateways"][f"{config} x2"]["rounds"]
    return {
        "raw": [b["rps"] / a["rps"] for a, b in zip(one, two, strict=True)],
        "normalized": [b["capacity_rps"] / a["capacity_rps"] for a, b in zip(one, two, strict=True)],
    }


def _range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"


def report(r: dict[str, Any], command: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The markdown section body and the checks (name, measured, PASS/FAIL)."""
    m, plan, cores = r["machine"], r["plan"], r["cores"]
    gws = r["gateways"]
    verdict = {True: "PASS", False: "FAIL"}
    checks: list[tuple[str, str, str]] = []
    for config in r["configs"]:
        q = ratios(r, config)
        norm = statistics.median(q["normalized"])
        checks.append(
            (
                f"{config}: normalized capacity, 2 workers / 1 worker (raw req/s ratio beside it)",
                f"**{_range(q['normalized'])}** (≥ {TARGET_RATIO}x); raw {_range(q['raw'])}",
                verdict[norm >= TARGET_RATIO],
            )
        )
    errors = sum(g["errors"] for g in gws.values())
    checks.append(("wrk errors and non-2xx answers, all runs", f"{errors}", verdict[errors == 0]))
    shares = []
    for g in gws.values():
        if g["workers"] > 1:
            for rd in g["rounds"]:
                w = rd["worker_cpu_s"]
                shares.append(min(w) / sum(w) if sum(w) else 0.0)
    least = min(shares) if shares else 0.0
    served = f"least share of a worker in a round {least * 100:.0f} % (≥ {MIN_WORKER_SHARE * 100:.0f} %)"
    served_ok = least >= MIN_WORKER_SHARE
    for name, a in r.get("audit", {}).items():
        ids = a["by_gateway"]
        if gws[name]["workers"] > 1:
            workers_ids = sorted(gid[-3:] for gid, n in ids.items() if n > 0)
            served += f"; {name}: audit records under " + ", ".join(
                f"`…{gid[-3:]}` {n:,}" for gid, n in sorted(ids.items())
            )
            served_ok = served_ok and workers_ids == ["-w0", "-w1"]
    checks.append(("both workers served (worker CPU; audit gateway ids)", served, verdict[served_ok]))
    if r.get("audit"):
        parts, ok = [], True
        for name, a in r["audit"].items():
            total = sum(a["by_gateway"].values())
            ok = ok and total >= a["expected"]
            parts.append(f"{name}: {total:,} for {a['expected']:,}")
        checks.append(("an audit record per request answered", "; ".join(parts), verdict[ok]))

    other = r["other_cpu"]["share"]
    lines = [
        f"Measured {r['date']} at commit {m['commit']} on {m['cpu']} ({m['cores']} cores, Linux "
        f"{m['kernel']}), Python {m['python']}, {m['stack']}; nginx {m['nginx']}, wrk {m['wrk']}. "
        f"Load average at start: {m['loadavg']}.",
        "",
        "```",
        command,
        "```",
        "",
        "`fortress serve --workers 1` and `--workers 2` side by side, unpinned, in front of nginx "
        f"answering a ~600-byte `chat.completion`; wrk (`-t1 -c{plan['conns']}`, non-streamed "
        f"`POST /v1/chat/completions`, unpinned) on the same {cores} cores. {plan['rounds']} rounds "
        f"of {plan['round_s']:g} s per gateway (configurations in rotating order, each one's 1-worker "
        "and 2-worker gateways back to back, which first alternating); figures are medians over "
        "rounds. "
        "Configurations: " + "; ".join(f"`{c}` = {WHAT[c]}" for c in r["configs"]) + ". "
        f"Run time {r['seconds']:.0f} s; other processes used {other * 100:.1f} % of the machine's "
        "CPU meanwhile"
        + (
            f" (more than {NOISY * 100:.0f} %: a busy machine, req/s are unreliable, CPU per "
            "request less so)."
            if other > NOISY
            else "."
        ),
        "",
        "**Normalized capacity** (the load generator accounted for): wrk and nginx run on the "
        "same 2 cores and take CPU the workers could use. With the whole machine for the gateway, "
        "N workers use cores_N = min(cores, max(N, G_N)) cores, where G_N is the gateway's CPU s "
        "per wall s in the run (a worker is one event loop, about one core; more where its own "
        "threads, such as the audit shipper, were seen to use more). capacity_N = cores_N / "
        "(gateway CPU s per request), the gateway's CPU (master + workers, including work left "
        "over after the window) over the requests wrk completed; capacity_2 / capacity_1 is about "
        "2 x CPU/request(1) / CPU/request(2): it falls short of 2 by what a request costs more "
        "with 2 workers. It assumes the gateway is CPU-bound: 'CPU used' is G_N over what the "
        "load generator and other processes left it, min(N, cores - (wrk + nginx + others' "
        "CPU)/wall). Ratios are paired per round (the median and range over rounds). 'Sleeps "
        "/ request': the gateway's voluntary context switches (all threads) over the requests: "
        "a thread that went to sleep, an event loop with nothing to do or a worker waiting for "
        "another's limits lock.",
        "",
        "| target | measured | result |",
        "| --- | --- | --- |",
        *(f"| {a} | {b} | {c} |" for a, b, c in checks),
        "",
        "| gateway | req/s | gateway CPU / request | wrk + nginx CPU / request | cores: gateway + "
        "wrk + nginx | gateway CPU used of what it could have | capacity (whole machine) | "
        "worker CPU split | sleeps / request | others |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    warn_used = []
    for name, g in gws.items():
        rd = g["rounds"]
        used = med(rd, "gateway_used")
        if used < MIN_USED:
            warn_used.append(name)
        split = "-"
        if g["workers"] > 1:
            tot = [sum(x["worker_cpu_s"]) for x in rd]
            w0 = statistics.median(x["worker_cpu_s"][0] / t for x, t in zip(rd, tot, strict=True) if t)
            split = f"{w0 * 100:.0f} / {100 - w0 * 100:.0f} %"
        cpu = [x["cpu_per_request_us"] for x in rd]
        lines.append(
            f"| {name} | {med(rd, 'rps'):,.0f} | **{statistics.median(cpu):.0f} µs** "
            f"[{min(cpu):.0f}-{max(cpu):.0f}] | {med(rd, 'load_cpu_per_request_us'):.0f} µs | "
            f"{med(rd, 'gateway_cores'):.2f} + {med(rd, 'load_cores'):.2f} | {used * 100:.0f} % | "
            f"{med(rd, 'capacity_rps'):,.0f} req/s | {split} | {med(rd, 'sleeps_per_request'):.3f} | "
            f"{med(rd, 'other_share') * 100:.0f} % |"
        )
    lines.append("")
    reading = []
    for config in r["configs"]:
        one, two = gws[f"{config} x1"]["rounds"], gws[f"{config} x2"]["rounds"]
        c1, c2 = med(one, "cpu_per_request_us"), med(two, "cpu_per_request_us")
        reading.append(
            f"`{config}`: a request costs {c1:.0f} µs of gateway CPU with 1 worker and {c2:.0f} µs "
            f"with 2 ({(c2 / c1 - 1) * 100:+.0f} %)"
        )
    lines.append(
        "Reading the figures: "
        + "; ".join(reading)
        + ". The raw req/s ratio is lower than the normalized one because with 2 workers wrk and "
        "nginx compete with the gateway for the same 2 cores, which one worker leaves partly idle."
        + (
            " Every request carries the same API key: with 2 workers each admission and settle "
            "locks the same slot of the shared usage-plan table, the worst case for its per-key "
            "lock (a worker waiting for it stops its event loop)."
            if any(LAYERS[c].get("auth") for c in r["configs"])
            else ""
        )
        + (
            f" Warning: {', '.join(warn_used)} used less than {MIN_USED * 100:.0f} % of the CPU it "
            "could have: not CPU-bound, so its capacity figure overstates it."
            if warn_used
            else ""
        )
    )
    lines.append("")
    return "\n".join(lines), checks


def outside(text: str) -> list[str]:
    """The docs' non-blank lines outside this script's section."""
    start, end = markers(SECTION)
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + rest.split(end, 1)[1]
    return [ln for ln in text.splitlines() if ln.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        description="1 gateway worker vs 2 on a 2-core machine (see the module docstring for the method)."
    )
    ap.add_argument("--quick", action="store_true", help="short run (~1 minute), rougher figures")
    ap.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"configurations, comma-separated, from {', '.join(LAYERS)} [{DEFAULT_CONFIGS}]",
    )
    ap.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    ap.add_argument("--json", metavar="FILE", help="write the raw results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    results, body, checks = go.measure("workers.py", argv, args, run, report)
    if args.json:  # the report names no path of this machine
        body = body.replace(args.json, "FILE")
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.write_docs:
        before = DOCS.read_text() if DOCS.exists() else ""
        path = write_section(SECTION, body, TITLE, after="peers")
        if outside(before) != outside(path.read_text()):
            path.write_text(before)
            print(f"not written: text outside the section changed; {path} left as it was", file=sys.stderr)
            return 1
        print(f"wrote the '{TITLE[3:]}' section of {path}", file=sys.stderr)
    if results["other_cpu"]["share"] > NOISY:
        print(
            f"other processes used {results['other_cpu']['share'] * 100:.0f} % of the machine: rerun later",
            file=sys.stderr,
        )
    return 0 if all(c[2] == "PASS" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
