#!/usr/bin/env python3
"""Embedded-model benchmark: the same streamed requests direct to llama-server and through the
gateway, interleaved in one run.

Method
------
* **One llama-server** with the embedded model (SmolLM2-135M-Instruct, Q4_1), started with the
  same command line ``fortress up`` uses (``fortress.engines.LlamaCppEngine``: 1 thread,
  2 slots, 2048 context) and pinned to one core (``--server-core``, default 0).
* **The gateway** is ``fortress serve -c <config>`` with that server as the only replica of pool
  ``smollm2`` (API keys and audit off, so the relay itself is measured), pinned to the other core
  alone (``--gateway-core``, default 1); this script's client runs beside llama-server
  (``--client-core``, default: the server's core), as the load generators do in
  ``bench/gateway_overhead.py``. The client does the same work on both paths; a client sharing
  the gateway's core would add its wake-ups to every event the gateway relays.
* **Requests**: streamed chat completions with ``stream_options.include_usage``, ``max_tokens``
  fixed and ``ignore_eos`` so every answer has the same length, temperature 0. Each round uses
  one prompt from a fixed list: an unmeasured 2-token request warms llama-server's prompt cache
  with it, then the direct and the gateway request run back to back, in alternating order
  (ABBA), so both see the same cache state and the same machine noise.
* **Figures** per request: time to first token (TTFT: from sending the request, on a new
  connection as llama-server closes it after every stream, to the first SSE event with
  content), decode rate ((completion tokens - 1) / (last content event - first content event))
  and end-to-end rate (completion tokens / whole request). Reported as medians per path and
  their ratio (the targets), and as the median of the per-round differences or ratios
  (gateway vs direct), which cancels most of the round-to-round noise of a shared machine.
* **Targets**: through the gateway, decode tokens/s >= 99 % of direct, and <= 2 ms added TTFT.

Run ``python bench/embedded_model.py`` (about 50 s with the defaults; ``--rounds``,
``--max-tokens``); ``--write-docs`` replaces the "Embedded model: direct vs gateway" section of
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from docs_section import machine_line, write_section  # noqa: E402

from fortress.config import LlamaCppReplicaConfig  # noqa: E402
from fortress.engines import engine_for  # noqa: E402

TITLE = "## Embedded model: direct vs gateway"
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a load balancer does.",
    "List five fruits and their colours.",
    "Describe a sunrise in the mountains.",
    "Give three tips for writing clear code.",
    "What is the capital of France, and why is it famous?",
]


@dataclass
class Sample:
    ttft: float  # seconds
    decode_tps: float
    e2e_tps: float
    tokens: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 within {timeout:g}s")


@contextlib.contextmanager
def started(argv: list[str], log: Path, core: int | None) -> Iterator[subprocess.Popen[bytes]]:
    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})  # inherited by every thread the server starts

    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=pin, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # llama.cpp: always generate max_tokens, so both paths do equal work
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    usage: dict[str, Any] | None = None
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: status {resp.status}: {(await resp.read())[:300]!r}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            choices = event.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    done = time.perf_counter()
    if first is None or last is None or usage is None:
        raise RuntimeError(f"{url}: stream without content or usage")
    n = int(usage["completion_tokens"])
    return Sample(first - t0, (n - 1) / (last - first), n / (done - t0), n)


async def measure(direct: str, gateway: str, rounds: int, max_tokens: int) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {"direct": [], "gateway": []}
    # llama-server closes the connection after every streamed response (without saying so in
    # a header), so both paths open a new connection per request: the same cost on each side.
    conn = {"limit": 1, "force_close": True}
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(**conn), timeout=timeout) as sd,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(**conn), timeout=timeout) as sg,
    ):
        paths = {"direct": (sd, direct), "gateway": (sg, gateway)}
        for s, url in paths.values():  # warm connections and the server
            await one(s, url, PROMPTS[0], 8)
        for i in range(rounds):
            prompt = PROMPTS[i % len(PROMPTS)]
            await one(sd, direct, prompt, 2)  # warm the prompt cache for this round
            order = ("direct", "gateway") if i % 4 in (0, 3) else ("gateway", "direct")  # ABBA
            for name in order:
                s, url = paths[name]
                out[name].append(await one(s, url, prompt, max_tokens))
            if (i + 1) % 10 == 0:
                print(f"  {i + 1}/{rounds} rounds", file=sys.stderr)
    return out


def summarise(samples: dict[str, list[Sample]]) -> dict[str, Any]:
    d, g = samples["direct"], samples["gateway"]
    med = statistics.median
    res: dict[str, Any] = {}
    for key in ("ttft", "decode_tps", "e2e_tps"):
        res[key] = {
            "direct": med(getattr(s, key) for s in d),
            "gateway": med(getattr(s, key) for s in g),
            "paired_diff": med(getattr(b, key) - getattr(a, key) for a, b in zip(d, g, strict=True)),
        }
    res["tokens"] = sorted({s.tokens for s in d + g})
    res["n"] = len(d)
    res["decode_ratio"] = res["decode_tps"]["gateway"] / res["decode_tps"]["direct"]
    res["decode_ratio_paired"] = med(b.decode_tps / a.decode_tps for a, b in zip(d, g, strict=True))
    res["e2e_ratio"] = res["e2e_tps"]["gateway"] / res["e2e_tps"]["direct"]
    res["ttft_added_ms"] = (res["ttft"]["gateway"] - res["ttft"]["direct"]) * 1000
    res["ttft_added_paired_ms"] = res["ttft"]["paired_diff"] * 1000
    return res


def client_core(args: argparse.Namespace) -> int:
    return int(args.server_core if args.client_core is None else args.client_core)


def report(res: dict[str, Any], args: argparse.Namespace, command: str, seconds: float) -> str:
    t, dec, e2e = res["ttft"], res["decode_tps"], res["e2e_tps"]
    ok_tps = res["decode_ratio"] >= 0.99
    ok_ttft = max(res["ttft_added_ms"], res["ttft_added_paired_ms"]) <= 2.0
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    pin = (
        f"llama-server pinned to CPU {args.server_core}, the gateway to CPU {args.gateway_core}, "
        f"the client to CPU {client_core(args)}"
        if not args.no_pin
        else "no CPU pinning"
    )
    return f"""Measured {when} on {machine_line()}; {pin}. Run time {seconds:.0f} s.

```
{command}
```

llama-server (embedded SmolLM2-135M-Instruct Q4_1, `--threads 1 --parallel 2 --ctx-size 2048`,
as `fortress up` starts it) direct, and through `fortress serve` with it as the only replica.
{res["n"]} streamed chat completions per path, {res["tokens"][0]} tokens each (`ignore_eos`),
interleaved ABBA with the prompt cache warmed before each pair, a new connection per request on
both paths (llama-server closes it after a stream); method in the script's docstring.

| target | measured | result |
| --- | --- | --- |
| decode tokens/s through the gateway ≥ 99 % of direct | {res["decode_ratio"] * 100:.1f} % (median of pairs {res["decode_ratio_paired"] * 100:.1f} %) | {"PASS" if ok_tps else "FAIL"} |
| added time to first token ≤ 2 ms | {res["ttft_added_ms"]:+.2f} ms (median of pairs {res["ttft_added_paired_ms"]:+.2f} ms) | {"PASS" if ok_ttft else "FAIL"} |

| median | direct | through gateway | gateway / direct |
| --- | ---: | ---: | ---: |
| time to first token | {t["direct"] * 1000:.2f} ms | {t["gateway"] * 1000:.2f} ms | {t["gateway"] / t["direct"] * 100:.1f} % |
| decode rate | {dec["direct"]:.1f} tok/s | {dec["gateway"]:.1f} tok/s | {res["decode_ratio"] * 100:.1f} % |
| end-to-end rate (incl. TTFT) | {e2e["direct"]:.1f} tok/s | {e2e["gateway"]:.1f} tok/s | {res["e2e_ratio"] * 100:.1f} % |
"""  # noqa: E501


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description="Embedded model: direct vs through the gateway.")
    ap.add_argument("--rounds", type=int, default=30, help="requests per path [30]")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per answer [48]")
    ap.add_argument("--server-core", type=int, default=0, help="CPU for llama-server [0]")
    ap.add_argument("--gateway-core", type=int, default=1, help="CPU for the gateway [1]")
    ap.add_argument("--client-core", type=int, default=None, help="CPU for the client [server's]")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--write-docs", action="store_true", help="replace this section of docs/benchmarks.md")
    ap.add_argument("--json", metavar="FILE", help="write the raw samples and summary as JSON")
    args = ap.parse_args(argv)
    command = " ".join(["python bench/embedded_model.py", *map(shlex.quote, argv)])
    server_core = None if args.no_pin else args.server_core
    gateway_core = None if args.no_pin else args.gateway_core
    if not args.no_pin:
        os.sched_setaffinity(0, {client_core(args)})
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fortress-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        lport, gport = free_port(), free_port()
        launch = engine_for(LlamaCppReplicaConfig()).launch(lport)
        config = tmp / "fortress.yaml"
        config.write_text(
            f"""
state_dir: {tmp / "state"}
auth: {{enabled: false}}
audit: {{enabled: false}}
server: {{port: {gport}, log_level: warning}}
pools:
  - model: smollm2
    health_check: {{interval: 1, timeout: 1}}
    replicas: [{{url: "{launch.url}"}}]
"""
        )
        gw_argv = [sys.executable, "-m", "fortress.cli.main", "serve", "-c", str(config), "--workers", "1"]
        with (
            started(list(launch.argv), tmp / "llama.log", server_core),
            started(gw_argv, tmp / "gateway.log", gateway_core),
        ):
            direct, gateway = launch.url, f"http://127.0.0.1:{gport}"
            wait_http(direct + "/health", 60)
            wait_http(gateway + "/ready", 30)
            print(f"direct {direct}, gateway {gateway}: {args.rounds} rounds", file=sys.stderr)
            samples = asyncio.run(measure(direct, gateway, args.rounds, args.max_tokens))
    res = summarise(samples)
    body = report(res, args, command, time.monotonic() - t0)
    print(body)
    if args.json:
        raw = {k: [s.__dict__ for s in v] for k, v in samples.items()}
        Path(args.json).write_text(json.dumps({"summary": res, "samples": raw}, indent=1))
    if args.write_docs:
        write_section("embedded-model", body, TITLE)
    # A missed target fails the run (the section still says which).
    return (
        0
        if res["decode_ratio"] >= 0.99 and max(res["ttft_added_ms"], res["ttft_added_paired_ms"]) <= 2.0
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
