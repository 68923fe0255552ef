"""CPU cost of the access layer per request: authenticate + authorize + admit + release.

Runs the layer in-process (no HTTP) N times and reports process CPU time per request, with
the memory limiter and with the Redis limiter (a throwaway redis-server is started unless
--redis-url is given). The issue's budget is 0.1 ms of gateway CPU per request over the plain
relay; this is the access layer's share of it. Redis's own CPU is not counted (another process).

    .venv/bin/python bench/access_overhead.py [-n 20000] [--concurrency 32] [--redis-url URL]
        [--write-docs]

With ``--write-docs`` it measures both 32 concurrent requests and one at a time and writes the
"Access layer" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fortress.access.layer import AccessControl
from fortress.config import parse_config
from fortress.core.context import RequestContext

BODY = b'{"model":"m","messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
PLANS = {
    # The default plan: bucket + a daily request quota.
    "default": "{rate: 1000000000, burst: 1000000000, requests: {day: 1000000000}}",
    # Everything on: bucket, request and token quotas for day/week/month, concurrency.
    "full": (
        "{rate: 1000000000, burst: 1000000000, max_concurrent: 100000, "
        "requests: {day: 1000000000, week: 1000000000, month: 1000000000}, "
        "input_tokens: {day: 1000000000000, month: 1000000000000}, "
        "output_tokens: {day: 1000000000000, week: 1000000000000, month: 1000000000000}}"
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(
    backend: str, plan: str, n: int, concurrency: int, redis_url: str, tmp: Path, baseline: bool = False
) -> tuple[float, float]:
    """(CPU µs, wall µs) per request; ``baseline`` runs the same loop without the layer."""
    limits = f"limits: {{backend: redis, redis_url: '{redis_url}', key_prefix: 'bench{os.getpid()}:'}}\n"
    cfg = parse_config(
        f"state_dir: {tmp / backend / plan / str(baseline)}\naudit: {{enabled: false}}\n"
        f"plans:\n  {plan}: {PLANS[plan]}\n" + (limits if backend == "redis" else ""),
        env={},
    )
    access = AccessControl(cfg)
    await access.start()
    key, _ = await asyncio.to_thread(access.store.create, "bench", plan, [])
    await access.cache.sync()
    auth = b"Bearer " + key.encode()
    usage = {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}

    async def one() -> None:
        ctx = RequestContext("req-bench", "/v1/chat/completions", 0.0, "127.0.0.1")
        ctx.headers = {b"authorization": auth, b"content-type": b"application/json"}
        ctx.bytes_in = len(BODY)
        ctx.max_tokens = 64
        if baseline:
            return
        access.authenticate(ctx)
        access.authorize(ctx, "m")
        await access.admit(ctx)
        ctx.usage = usage
        ctx.status = 200
        access.release(ctx)

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    await worker(min(1000, n))  # warm up: caches, script load, connections
    per = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    c0, w0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in per))
    drain = getattr(access.limiter, "drain", None)
    if drain is not None:
        await drain()  # the settles scheduled by release() are part of the cost
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    await access.stop()
    return cpu / n * 1e6, wall / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument(
        "--no-uvloop", action="store_true", help="the stdlib loop instead of uvloop (the gateway's)"
    )
    ap.add_argument("--write-docs", action="store_true", help="32 concurrent and one at a time; write docs")
    args = ap.parse_args()
    rows: dict[tuple[str, str], dict[int, float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="fortress-bench-"))
    go: Any = asyncio.run
    loop_name = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop  # the gateway's loop under uvicorn[standard]

            go, loop_name = uvloop.run, "uvloop"
        except ImportError:
            pass
    redis_proc = None
    url = args.redis_url
    if url is None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is missing (apt-get install redis-server) or pass --redis-url")
        port = free_port()
        redis_proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.3)
    try:
        print(
            f"access layer per request, N={args.n}, {args.concurrency} concurrent, {loop_name} "
            "(CPU of this process)"
        )
        print(
            f"{'backend':8} {'plan':8} {'conc':>4} {'CPU µs/req':>11} {'net of loop':>12} {'wall µs/req':>12}"
        )
        for conc in (args.concurrency, 1) if args.write_docs else (args.concurrency,):
            for backend in ("memory", "redis"):
                # The same loop without the layer (context creation, task switches): subtracted.
                base, _ = go(run(backend, "default", args.n, conc, url, tmp, baseline=True))
                for plan in PLANS:
                    cpu, wall = go(run(backend, plan, args.n, conc, url, tmp))
                    rows.setdefault((backend, plan), {})[conc] = cpu - base
                    print(f"{backend:8} {plan:8} {conc:4} {cpu:11.1f} {cpu - base:12.1f} {wall:12.1f}")
        if args.write_docs:
            write_docs(rows, args, loop_name)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def write_docs(rows: dict[tuple[str, str], dict[int, float]], args: Any, loop_name: str) -> None:
    import datetime as dt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from docs_section import machine_line, write_section

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    what = {"default": "default (bucket + day quota)", "full": "everything (bucket, quotas, concurrency)"}
    lines = [
        f"Measured {when} on {machine_line()}, with `python bench/access_overhead.py -n {args.n} "
        "--write-docs`: authenticate + authorize + admit + release in-process, "
        f"{loop_name}, CPU of the process per request net of the same loop without the layer; "
        "Redis's own CPU not included.",
        "",
        f"| backend | plan | {args.concurrency} concurrent | one at a time |",
        "| --- | --- | ---: | ---: |",
    ]
    for (backend, plan), by in rows.items():
        lines.append(
            f"| {backend} | {what.get(plan, plan)} | {by[args.concurrency]:.1f} µs | {by[1]:.1f} µs |"
        )
    print(write_section("access", "\n".join(lines) + "\n", "## Access layer", after="gateway-layers"))


if __name__ == "__main__":
    main()
