#!/usr/bin/env python3
"""Gateway-overhead benchmark, part two: what each layer adds to the relay, in gateway CPU.

The same method as ``bench/gateway_overhead.py`` (whose helpers this script uses): nginx answers
``POST /v1/chat/completions`` with a fixed ``chat.completion`` (with usage) on one core; the
gateway runs on the other, pinned with ``taskset``; ``wrk -t1 -c32`` saturates it; gateway CPU
time (all threads, from ``/proc/<pid>/task/*/schedstat``) is divided by the requests completed.

Several gateways run side by side, one per configuration, each with its own ``state_dir``:

* ``bare``: ``observe: {enabled: false}``, keys and audit off: the relay alone.
* ``observe``: ``bare`` + metrics and alarms (the Prometheus observer, the alarm windows and
  the evaluator; the access log off).
* ``relay``: the defaults with keys and audit off (metrics, alarms, access log on), which is
  the configuration ``gateway_overhead.py`` measures.
* ``keys`` and ``audit``: ``relay`` + each layer alone (to show where the cost is).
* ``access-memory``: ``relay`` + API keys + usage plan (in-memory limiter) + audit (headers
  checked, one record per request appended to the journal with group commit and fsync, shipped
  by the shipper thread into SQLite, hash-chained).
* ``access-redis``: the same with the Redis limiter (a local ``redis-server`` on the load core;
  one EVALSHA to admit and one to settle per request).

The usage plan is sized so that nothing is refused (a refused request would be cheaper), but
every part of it runs: bucket, daily request quota, input and output token quotas with the
``max_tokens`` reservation settled to the real usage, and a concurrency slot.

Runs alternate in rounds (the order rotating each round) so that every configuration sees the
same machine noise; a layer's cost is the median over rounds of (its CPU/request - its baseline's
CPU/request in the same round). Targets: keys + limits + audit ≤ 100 µs over ``relay``;
metrics + alarms ≤ 20 µs over ``bare``. At the end, the audit stores are checked to hold one record
per request the gateway answered (wrk's count, plus requests still in flight when a run ended).

Run ``python bench/gateway_layers.py`` (about 3 minutes; ``--quick`` ~40 s; ``--write-docs``
replaces the "Gateway overhead by layer" section of ``docs/benchmarks.md``). Needs nginx, wrk and
redis-server (``make bench`` installs them on Debian) and two CPU cores.

``--before PATH/TO/fortress`` also runs every configuration with another build (another
checkout's environment) as ``<name>@before``, in the same rounds: a before/after comparison of
each layer's cost on the same machine at the same time, e.g. ``--only access-memory --before
/tmp/before-venv/bin/fortress`` (see ``bench/before_after.py`` for making such a build).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gateway_overhead as go
from docs_section import write_section

TARGET_ACCESS_US = 100.0
TARGET_OBSERVE_US = 20.0
AUDIT = {"x-llm-source": "bench", "x-llm-user": "bench-user", "x-llm-request-type": "chat"}

PLAN = """plans:
  bench:
    rate: 1000000
    burst: 1000000
    max_concurrent: 10000
    requests: {day: 1000000000}
    input_tokens: {day: 1000000000000}
    output_tokens: {day: 1000000000000}
"""


@dataclass
class Variant:
    name: str
    what: str
    auth: bool = False
    audit: bool = False
    observe: bool = True
    access_log: bool = True
    redis: bool = False
    baseline: str | None = None  # the variant whose CPU this one is compared with
    target_us: float | None = None
    binary: str = ""  # the `fortress` executable; empty: this environment's
    port: int = 0
    pid: int = 0
    key: str = ""
    state: Path = field(default_factory=Path)
    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.auth:
            h["Authorization"] = f"Bearer {self.key}"
        if self.audit:
            h.update(AUDIT)
        return h


def variants() -> list[Variant]:
    return [
        Variant("bare", "the relay alone (observe, keys, audit off)", observe=False),
        Variant(
            "observe",
            "+ metrics and alarms",
            access_log=False,
            baseline="bare",
            target_us=TARGET_OBSERVE_US,
        ),
        Variant("relay", "+ access log: the defaults with keys and audit off", baseline="observe"),
        Variant("keys", "relay + keys + limits (memory)", auth=True, baseline="relay"),
        Variant("audit", "relay + audit", audit=True, baseline="relay"),
        Variant(
            "access-memory",
            "relay + keys + limits (memory) + audit",
            auth=True,
            audit=True,
            baseline="relay",
            target_us=TARGET_ACCESS_US,
        ),
        Variant(
            "access-redis",
            "relay + keys + limits (Redis) + audit",
            auth=True,
            audit=True,
            redis=True,
            baseline="relay",
            target_us=TARGET_ACCESS_US,
        ),
    ]


def write_config(v: Variant, workdir: Path, p_json: int, redis_url: str) -> Path:
    v.state = workdir / f"state-{v.name}"
    text = (
        f"# written by bench/gateway_layers.py ({v.name})\n"
        f"server:\n  host: 127.0.0.1\n  port: {v.port}\n  log_level: warning\n"
        f"pools:\n  - model: bench-json\n    replicas:\n      - url: http://127.0.0.1:{p_json}\n"
        f"state_dir: {v.state}\n"
        f"auth:\n  enabled: {str(v.auth).lower()}\n"
        f"audit:\n  enabled: {str(v.audit).lower()}\n"
        f"limits:\n  backend: {'redis' if v.redis else 'memory'}\n  redis_url: {redis_url}\n"
        f"  fail_open: false\n"
        f"observe:\n  enabled: {str(v.observe).lower()}\n"
        f"  access_log: {{enabled: {str(v.access_log).lower()}}}\n" + PLAN
    )
    path = workdir / f"fortress-{v.name}.yaml"
    path.write_text(text)
    return path


def create_key(config: Path) -> str:
    """A key on the bench plan, created in the variant's store before its gateway starts."""
    from fortress.access.keys import KeyStore
    from fortress.config import load_config
    from fortress.core.secret import load_secret
    from fortress.store.db import database_url, migrate

    cfg = load_config(config)
    key, _ = KeyStore(migrate(database_url(cfg)), load_secret(cfg)).create("bench", "bench")
    return key


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{go.PATH}",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def smoke(v: Variant, body: bytes) -> None:
    """The layer is really on: 200 with its headers; 401 without the key; 400 without audit ones."""
    status, headers = post(v.port, body, v.headers())
    if status != 200 or "x-fortress-replica" not in headers:
        raise SystemExit(f"{v.name}: smoke request answered {status}")
    keyless = {k: x for k, x in v.headers().items() if k != "Authorization"}
    if v.auth and post(v.port, body, keyless)[0] != 401:
        raise SystemExit(f"{v.name}: a request without a key was not refused with 401")
    if v.auth and "x-ratelimit-limit-requests" not in headers:
        raise SystemExit(f"{v.name}: no rate-limit headers, the usage plan is not applied")
    if v.audit and post(v.port, body, {"Authorization": f"Bearer {v.key}"})[0] != 400:
        raise SystemExit(f"{v.name}: a request without audit headers was not refused with 400")


def audit_count(v: Variant) -> int:
    db = v.state / "fortress.db"
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        return int(conn.execute("select count(*) from audit_records").fetchone()[0])


@dataclass
class Plan:
    rounds: int = 6
    round_s: float = 3.0
    conns: int = 32


QUICK = Plan(rounds=2, round_s=2.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    gw_core, load_core = args.gateway_core, args.load_core
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {load_core})
    for tool in ("nginx", "wrk", "taskset", "redis-server"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            raise SystemExit(f"{tool} not found: `make bench` installs nginx-light, wrk and redis-server")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    fortress_bin = str(Path(sys.executable).parent / "fortress")
    workdir = Path(tempfile.mkdtemp(prefix="fortress-layers-"))
    procs = go.Procs(workdir)
    vs = variants()
    if args.only:
        wanted = set(args.only.split(","))
        names = {v.name for v in vs}
        if not wanted <= names:
            unknown = sorted(wanted - names)
            raise SystemExit(f"--only: unknown configurations {unknown}; known: {sorted(names)}")
        keep = wanted | {v.baseline for v in vs if v.name in wanted and v.baseline}
        vs = [v for v in vs if v.name in keep]
    if args.before:
        # The same configurations run by another build, side by side: "<name>@before".
        twins = [
            dataclasses.replace(
                v,
                name=f"{v.name}@before",
                what=f"{v.what} (before build)",
                baseline=f"{v.baseline}@before" if v.baseline else None,
                binary=args.before,
                cpu_us=[],
                rps=[],
            )
            for v in vs
        ]
        vs = [x for pair in zip(vs, twins, strict=True) for x in pair]
    by_name = {v.name: v for v in vs}
    results: dict[str, Any] = {
        "machine": go.machine(),
        "plan": plan.__dict__,
        "variants": {v.name: {} for v in vs},  # the report's order
    }
    busy0, own0, t0 = go.machine_busy(), go.own_cpu(), time.monotonic()
    try:
        p_json, p_sse, p_redis = (go.free_port() for _ in range(3))
        conf = go.write_nginx(workdir, p_json, p_sse)
        procs.start("nginx", [nginx_bin, "-p", str(workdir), "-c", str(conf)], load_core)
        redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
        procs.start(
            "redis",
            [redis_bin, "--port", str(p_redis), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            load_core,
        )
        go.wait_for(f"http://127.0.0.1:{p_json}/health", procs)
        redis_url = f"redis://127.0.0.1:{p_redis}/0"
        body = go.request_body("bench-json", False)
        go.step(f"starting {len(vs)} gateways on core {gw_core}: {', '.join(v.name for v in vs)}")
        for v in vs:
            v.port = go.free_port()
            path = write_config(v, workdir, p_json, redis_url)
            if v.auth:
                v.key = create_key(path)
            argv = [v.binary or fortress_bin, "serve", "-c", str(path), "--port", str(v.port)]
            gw = procs.start(f"gateway-{v.name}", argv, gw_core)
            v.pid = gw.pid
        for v in vs:
            go.wait_for(f"http://127.0.0.1:{v.port}/ready", procs)
            smoke(v, body)

        def wrk(v: Variant, secs: float) -> go.WrkResult:
            url = f"http://127.0.0.1:{v.port}{go.PATH}"
            return go.run_wrk(url, body, secs, plan.conns, load_core, workdir, [v.pid], v.headers())

        go.step("warm-up, 1 s each")
        for v in vs:
            r = wrk(v, 1)
            v.requests += r.requests
            v.errors += r.errors
        for i in range(plan.rounds):
            order = vs[i % len(vs) :] + vs[: i % len(vs)]
            go.step(f"round {i + 1}/{plan.rounds}: {' → '.join(v.name for v in order)}")
            for v in order:
                r = wrk(v, plan.round_s)
                v.cpu_us.append(r.cpu_per_request_us)
                v.rps.append(r.rps)
                v.requests += r.requests
                v.errors += r.errors
        if args.profile:
            spy = go.py_spy()
            if spy is None:
                raise SystemExit("py-spy not found: pip install py-spy")
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            for v in vs:
                go.step(f"profiling {v.name} (py-spy, 4 s under wrk)")
                raw = go.profile_run(spy, v.pid, 4, out / f"{v.name}.txt", lambda v=v: wrk(v, 4))
                results["variants"].setdefault(v.name, {})["profile"] = inclusive(raw)
        procs.check_alive()
        go.step("waiting for the audit shippers to store every record")
        for v in vs:
            if not v.audit:
                continue
            deadline, count = time.monotonic() + 30, -1
            while time.monotonic() < deadline:
                count = audit_count(v)
                if count >= v.requests + 3:  # + the smoke requests (200, 401, 400)
                    break
                time.sleep(0.5)
            results["variants"].setdefault(v.name, {})["audit_records"] = count
    finally:
        procs.stop()
        wall = time.monotonic() - t0
        other = max(0.0, (go.machine_busy() - busy0) - (go.own_cpu() - own0))
        results["other_cpu_share"] = other / (wall * (os.cpu_count() or 1))
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for v in vs:
        entry = results["variants"].setdefault(v.name, {})
        entry.update(
            what=v.what,
            baseline=v.baseline,
            target_us=v.target_us,
            cpu_us=v.cpu_us,
            rps=v.rps,
            requests=v.requests,
            errors=v.errors,
        )
        if v.baseline in by_name:
            base = by_name[v.baseline]
            entry["delta_us"] = [a - b for a, b in zip(v.cpu_us, base.cpu_us, strict=True)]
    return results


def inclusive(raw: Path, n: int = 25) -> list[tuple[str, float]]:
    """Share of samples (all threads) whose stack holds each Fortress function (inclusive)."""
    counts: dict[str, int] = {}
    total = 0
    for frames, k in go.stacks(raw):
        total += k
        seen = set()
        for frame in frames:
            fn, where = go._frame(frame)
            if where.startswith("fortress/") and fn not in seen:
                seen.add(fn)
                counts[fn] = counts.get(fn, 0) + k
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return [(fn, c / total) for fn, c in ranked] if total else []


def report(r: dict[str, Any], command: str) -> tuple[str, list[tuple[str, float, float]]]:
    m = r["machine"]
    lines = [
        f"Measured {r['date']} on {m['cpu']} ({m['cores']} cores), Linux {m['kernel']}, Python "
        f"{m['python']}; {m['stack']}; nginx {m['nginx']}, wrk {m['wrk']}; commit {m['commit']}.",
        "",
        f"Command: `{command}` ({r['seconds']:.0f} s). Each configuration is a `fortress serve` "
        "process pinned to one core; nginx, Redis and wrk (`-t1 -c32`, non-streamed requests) on the "
        f"other. {r['plan']['rounds']} rounds of {r['plan']['round_s']:.0f} s per configuration, in "
        "rotating order; a layer's cost is the median over rounds of its CPU/request minus its "
        "baseline's in the same round (range in brackets).",
        "",
        "| configuration | what runs | gateway CPU / request (median) | req/s (median) | "
        "added vs baseline | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    checks: list[tuple[str, float, float]] = []
    for name, v in r["variants"].items():
        cpu = statistics.median(v["cpu_us"])
        added = "-"
        target = "-"
        verdict = ""
        if v.get("delta_us"):
            d = v["delta_us"]
            med = statistics.median(d)
            added = f"{med:+.1f} µs vs {v['baseline']} [{min(d):+.1f}, {max(d):+.1f}]"
            if v["target_us"] is not None:
                target = f"≤ {v['target_us']:.0f} µs"
                verdict = "PASS" if med <= v["target_us"] else "MISS"
                checks.append((name, med, v["target_us"]))
        lines.append(
            f"| {name} | {v['what']} | {cpu:.1f} µs | {statistics.median(v['rps']):,.0f} | {added} | "
            f"{target} | {verdict} |"
        )
    lines.append("")
    errors = sum(v["errors"] for v in r["variants"].values())
    stored = [
        f"{name}: {v['audit_records']:,} records for {v['requests']:,} requests completed by wrk "
        "(+3 smoke requests)"
        for name, v in r["variants"].items()
        if "audit_records" in v
    ]
    line = f"wrk errors and non-2xx answers: {errors}."
    if stored:
        line += (
            " Audit records in each store after the run: "
            + "; ".join(stored)
            + " (the store can hold a few more: requests in flight when a wrk run stopped are "
            "answered and recorded, but not counted by wrk)."
        )
    lines.append(line)
    share = r["other_cpu_share"]
    lines.append(
        f"Other processes used {share * 100:.1f} % of the machine's CPU during the run"
        + (" (more than 5 %: figures are noisier than usual)." if share > 0.05 else ".")
    )
    lines.append("")
    return "\n".join(lines), checks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        description="Measure the gateway CPU each layer adds (see the module docstring for the method)."
    )
    ap.add_argument("--quick", action="store_true", help="short run (~40 s), rougher figures")
    ap.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    ap.add_argument("--json", metavar="FILE", help="write the raw results as JSON")
    ap.add_argument("--gateway-core", type=int, default=1, help="CPU for the gateways [1]")
    ap.add_argument("--load-core", type=int, default=0, help="CPU for nginx, Redis and wrk [0]")
    ap.add_argument(
        "--only", metavar="NAMES", help="only these configurations (and their baselines), comma-separated"
    )
    ap.add_argument("--profile", metavar="DIR", help="also sample each gateway with py-spy; stacks to DIR")
    ap.add_argument(
        "--before",
        metavar="FORTRESS",
        help="also run every configuration with this other build's `fortress` (as <name>@before)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    results, body, checks = go.measure("gateway_layers.py", argv, args, run, report)
    if args.before:  # the report names the other build's place generically
        body = body.replace(args.before, "BEFORE/bin/fortress")
    for name, v in results["variants"].items():
        if v.get("profile"):
            print(f"\n{name}: Fortress functions by inclusive share of samples (all threads)")
            for fn, share in v["profile"]:
                print(f"  {share * 100:5.1f} %  {fn}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.write_docs:
        path = write_section("gateway-layers", body, "## Gateway overhead by layer", after=go.SECTION)
        print(f"wrote the 'Gateway overhead by layer' section of {path}", file=sys.stderr)
    # Every request wrk saw answered must have its audit record (+3 smoke requests): a missing one
    # fails the run as a missed target does.
    lost = {
        name: v["requests"] + 3 - v["audit_records"]
        for name, v in results["variants"].items()
        if "audit_records" in v and v["audit_records"] < v["requests"] + 3
    }
    for name, n in lost.items():
        print(f"{name}: {n} audit records missing", file=sys.stderr)
    return 0 if all(med <= target for _, med, target in checks) and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
