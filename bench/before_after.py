#!/usr/bin/env python3
"""Before and after, in one run: two Fortress builds side by side under the same loads.

Sequential runs of ``bench/gateway_overhead.py`` on a shared machine differ by more than a
small change does (seen here: the same commit's CPU per streamed event moved by 15 % between
runs). So this script starts both gateways at once, each from its own ``fortress`` binary with
the same config, pinned to the same core, in front of the same upstreams, and alternates their
rounds: whatever the machine does meanwhile hits both alike.

Loads (the gateway_overhead.py upstreams: nginx for fixed JSON, ``fortress sim`` for streams):

* non-stream saturation: ``wrk -t1 -c32`` for ``--round`` seconds per round against each;
  CPU per request of the gateway process;
* streams, light load: 8 concurrent ``fortress sim`` streams (200 tokens, 2 ms apart);
  CPU per relayed event;
* streams, heavy load: 64 concurrent streams; CPU per relayed event.

A third gateway runs the before build again (the control): two processes of one build differ
by a few per cent here (start order, memory layout), and the control measures that in the same
run. For each figure: each build's median over the rounds and its range, the median of the
per-round ratio after/before (paired rounds) and of control/before. "Worse" means the after
median exceeds the before median by more than the before rounds' range *and* the paired
after/before ratio exceeds every control/before ratio.

The "before" build is any other checkout with its own environment, for example::

    git worktree add /tmp/before <commit>
    python -m venv /tmp/before-venv && /tmp/before-venv/bin/pip install -e /tmp/before
    python bench/before_after.py --before /tmp/before-venv/bin/fortress [--write-docs]

Needs nginx and wrk (``make bench`` installs them) and two CPU cores. About 3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_overhead as go
from docs_section import machine_line, write_section

try:
    import uvloop
except ImportError:  # pragma: no cover - uvicorn[standard] brings it
    uvloop = None  # type: ignore[assignment]


def commit_of(binary: str) -> str:
    """The git commit (short) of the checkout a ``fortress`` binary runs, or '?'."""
    code = "import fortress, pathlib; print(pathlib.Path(fortress.__file__).resolve().parent.parent)"
    python = str(Path(binary).absolute().parent / "python")
    try:
        # cwd "/": `python -c` would otherwise import the fortress/ of the current directory.
        root = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, check=True, cwd="/"
        ).stdout.strip()
        git = ["git", "-C", root]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run([*git, "status", "--porcelain", "fortress"], capture_output=True, text=True)
        return head.stdout.strip() + (" (fortress/ modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("nginx", "wrk", "taskset"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            raise SystemExit(f"{tool} not found: `make bench` installs nginx-light and wrk")
    gw_core, load_core = 1, 0
    with contextlib.suppress(OSError):
        import os

        os.sched_setaffinity(0, {load_core})
    # "control" is the before build a second time: what two processes of one build differ by on
    # this machine in this run (start order, memory layout), the yardstick for "after".
    bins = {"before": args.before, "after": args.after, "control": args.before}
    workdir = Path(tempfile.mkdtemp(prefix="fortress-ab-"))
    procs = go.Procs(workdir)
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None)
    out: dict[str, Any] = {"commits": {k: commit_of(v) for k, v in bins.items()}}
    try:
        p_json, p_sse, p_sim = go.free_port(), go.free_port(), go.free_port()
        conf = go.write_nginx(workdir, p_json, p_sse)
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.start("nginx", [nginx_bin, "-p", str(workdir), "-c", str(conf)], load_core)
        sim = [args.after, "sim", "--port", str(p_sim), "--model", "bench-sim"]
        sim += ["--tokens", str(go.SIM_TOKENS), "--itl", str(go.SIM_ITL)]
        procs.start("sim", sim, load_core)
        for p in (p_json, p_sim):
            go.wait_for(f"http://127.0.0.1:{p}/health", procs)
        ups = {"bench-json": p_json, "bench-sim": p_sim}
        gws: dict[str, tuple[int, int]] = {}
        for name, binary in bins.items():
            port = go.free_port()
            (workdir / name).mkdir()
            cfg = go.write_gateway_config(workdir / name, port, ups)
            proc = procs.start(name, [binary, "serve", "-c", str(cfg), "--port", str(port)], gw_core)
            gws[name] = (port, proc.pid)
        for port, _ in gws.values():
            go.wait_for(f"http://127.0.0.1:{port}/ready", procs)
        b_json = go.request_body("bench-json", False)
        b_sim = go.request_body("bench-sim", True)

        go.step(f"non-stream saturation, {args.rounds} alternating rounds of {args.round:g} s each")
        per_request: dict[str, list[float]] = {name: [] for name in bins}
        for port, pid in gws.values():  # warm-up
            go.run_wrk(f"http://127.0.0.1:{port}{go.PATH}", b_json, 1, 32, load_core, workdir, [pid])
        for i in range(args.rounds):
            items = list(gws.items())
            order = items[i % len(items) :] + items[: i % len(items)]
            for name, (port, pid) in order:
                r = go.run_wrk(
                    f"http://127.0.0.1:{port}{go.PATH}", b_json, args.round, 32, load_core, workdir, [pid]
                )
                if r.errors:
                    raise SystemExit(f"{name}: {r.errors} errors under wrk")
                per_request[name].append(r.cpu_per_request_us)
        out["non_stream_cpu_us"] = per_request

        for key, streams in (("light", 8), ("heavy", 64)):
            go.step(f"streams: {streams} concurrent, {args.rounds} alternating rounds")
            targets = [go.Target(name, port, b_sim, pid) for name, (port, pid) in gws.items()]
            runner.run(go.rounds(targets, args.rounds, 2.5, concurrency=streams))
            for t in targets:
                if t.failures:
                    raise SystemExit(f"{t.name}: {t.failures} failed streams")
            out[f"stream_{key}_cpu_us"] = {
                t.name: [r.cpu_s / r.events * 1e6 for r in t.rounds if r.events] for t in targets
            }
        procs.check_alive()
    finally:
        runner.close()
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


FIGURES = (
    ("non_stream_cpu_us", "non-stream: gateway CPU per request at saturation"),
    ("stream_light_cpu_us", "stream, 8 concurrent: CPU per relayed event"),
    ("stream_heavy_cpu_us", "stream, 64 concurrent: CPU per relayed event"),
)


def report(r: dict[str, Any], command: str) -> tuple[str, list[str]]:
    rows = [
        "| figure (µs) | before: median (range) | after: median (range) "
        "| after / before, paired rounds: median (range) | control / before: median (range) | worse? |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    worse = []
    for key, label in FIGURES:
        b, a, c = r[key]["before"], r[key]["after"], r[key]["control"]
        bm, blo, bhi = summary(b)
        am, alo, ahi = summary(a)
        rm, rlo, rhi = summary([y / x for x, y in zip(b, a, strict=False) if x])
        cm, clo, chi = summary([y / x for x, y in zip(b, c, strict=False) if x])
        # Worse: beyond the before build's own spread over rounds, and beyond what the same
        # build run twice differs by (the control) in this run.
        bad = am - bm > bhi - blo and rm > chi
        if bad:
            worse.append(label)
        rows.append(
            f"| {label} | {bm:.1f} ({blo:.1f}-{bhi:.1f}) | {am:.1f} ({alo:.1f}-{ahi:.1f}) "
            f"| {rm:.3f} ({rlo:.3f}-{rhi:.3f}) | {cm:.3f} ({clo:.3f}-{chi:.3f}) "
            f"| {'**worse**' if bad else 'no'} |"
        )
    c = r["commits"]
    body = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_line()}: "
        f"commit {c['before']} (before) and {c['after']} (after), plus the before build a second "
        "time (control: what two processes of one build differ by), all three running at once on "
        "CPU 1 with the same config (defaults, keys and audit off), upstreams and load on CPU 0, "
        f"{r['rounds']} rounds per figure in rotating order. A figure is worse when the after "
        "median exceeds the before median by more than the before rounds' range and the paired "
        f"after/before ratio exceeds every control/before ratio.\n\n```\n{command}\n```\n\n"
        + "\n".join(rows)
        + "\n\n"
    )
    body += (
        f"Worse beyond the run-to-run range: {', '.join(worse)}.\n"
        if worse
        else "No figure of the after build is worse than the before build's beyond the run-to-run range.\n"
    )
    return body, worse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Two Fortress builds side by side under the same loads.")
    ap.add_argument("--before", required=True, help="the `fortress` executable of the before build")
    ap.add_argument(
        "--after",
        default=str(Path(sys.executable).parent / "fortress"),
        help="the `fortress` executable of the after build [this environment's]",
    )
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds per figure [6]")
    ap.add_argument("--round", type=float, default=3.0, help="seconds of wrk per non-stream round [3]")
    ap.add_argument("--write-docs", action="store_true", help="write the 'Before and after' section")
    args = ap.parse_args(argv)
    r = run(args)
    r["rounds"] = args.rounds
    command = "python bench/before_after.py --before BEFORE/bin/fortress" + (
        f" --rounds {args.rounds}" if args.rounds != 6 else ""
    )
    body, worse = report(r, command)
    print()
    print(body)
    if args.write_docs:
        path = write_section("before-after", body, "## Before and after", after="gateway-layers")
        print(f"wrote {path}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
