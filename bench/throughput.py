#!/usr/bin/env python3
"""Throughput benchmark: how many output tokens per second an OpenAI-compatible server generates
under a fixed concurrency, the figure ``fortress cost --throughput FILE`` prices tokens with.

Method
------
* **Target**: any OpenAI-compatible URL (``--url``): one replica (llama-server, vLLM, the
  simulator) to measure an instance, or the gateway to measure a pool behind it.
* **Load**: ``--concurrency N`` clients, each sending streamed chat completions
  (``stream_options.include_usage``, ``--max-tokens``, temperature 0) one after the other;
  each on a new connection; a client starts a new request only while ``--seconds S`` have not
  elapsed, and the run ends when the last request in flight finishes, so every counted token
  belongs to a whole request.
  ``--ignore-eos`` asks llama.cpp and vLLM for exactly ``max_tokens`` tokens each time.
* **Counted**: the output tokens each answer's ``usage.completion_tokens`` reports (the
  server's own count, not the number of stream events); a request without usage, or that fails,
  counts as an error and adds no tokens.
* **Figure**: ``tokens_per_second`` = output tokens of all completed requests / wall time from
  the first request sent to the last one finished. It is the rate at this concurrency only:
  a server with more slots generates more at a higher one.

Run ``python bench/throughput.py --url http://127.0.0.1:8080 --model m --concurrency 4
--seconds 30 --json throughput.json``, then ``fortress cost -c fortress.yaml --throughput
throughput.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a load balancer does.",
    "List five fruits and their colours.",
    "Describe a sunrise in the mountains.",
    "Give three tips for writing clear code.",
]


@dataclass
class Tally:
    """What the clients counted."""

    requests: int = 0
    output_tokens: int = 0
    input_tokens: int = 0
    errors: int = 0
    last_error: str | None = None
    ttfts: list[float] = field(default_factory=list)


async def one(session: aiohttp.ClientSession, args: argparse.Namespace, prompt: str, tally: Tally) -> bool:
    """One streamed request; its usage goes into ``tally``. False when it failed."""
    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] | None = None
    try:
        async with session.post(args.url.rstrip("/") + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}: {(await resp.read())[:200]!r}")
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if first is None and any(
                    (c.get("delta") or {}).get("content") for c in event.get("choices", [])
                ):
                    first = time.perf_counter()
                if event.get("usage"):
                    usage = event["usage"]
        if usage is None:
            raise RuntimeError("the stream carried no usage (stream_options.include_usage unsupported?)")
    except (TimeoutError, aiohttp.ClientError, RuntimeError, json.JSONDecodeError) as exc:
        tally.errors += 1
        tally.last_error = str(exc) or type(exc).__name__
        return False
    tally.requests += 1
    tally.output_tokens += int(usage.get("completion_tokens") or 0)
    tally.input_tokens += int(usage.get("prompt_tokens") or 0)
    if first is not None:
        tally.ttfts.append(first - t0)
    return True


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement: ``args.concurrency`` clients for ``args.seconds``."""
    tally = Tally()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    # A new connection per request: llama-server closes its end after every stream, and a pooled
    # connection it closed fails the next request. A connect is nothing beside a generation.
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=True)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        deadline = start + args.seconds

        async def client(i: int) -> None:
            n = i
            while time.perf_counter() < deadline:
                if not await one(session, args, PROMPTS[n % len(PROMPTS)], tally):
                    await asyncio.sleep(0.05)  # a refusing server is not hammered in a tight loop
                n += args.concurrency

        await asyncio.gather(*(client(i) for i in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = sorted(tally.ttfts)
    return {
        "tokens_per_second": tally.output_tokens / elapsed if elapsed > 0 else 0.0,
        "concurrency": args.concurrency,
        "model": args.model,
        "requests": tally.requests,
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "url": args.url,
        "seconds": args.seconds,
        "elapsed_s": elapsed,
        "max_tokens": args.max_tokens,
        "output_tokens": tally.output_tokens,
        "input_tokens": tally.input_tokens,
        "errors": tally.errors,
        "last_error": tally.last_error,
        "ttft_median_s": ttfts[len(ttfts) // 2] if ttfts else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--url", required=True, help="an OpenAI-compatible base URL (a replica or the gateway)")
    ap.add_argument("--model", required=True, help="the model name to ask for")
    ap.add_argument("--concurrency", type=int, default=4, help="clients in parallel (default 4)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to start requests (default 30)")
    ap.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default 128)")
    ap.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens (llama.cpp, vLLM)")
    ap.add_argument("--api-key", default=None, help="a bearer token (a Fortress API key for the gateway)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--json", type=Path, default=None, help="write the result to this file")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.seconds <= 0 or args.max_tokens < 1:
        ap.error("--concurrency, --seconds and --max-tokens must be positive")
    res = asyncio.run(run(args))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"{res['tokens_per_second']:.1f} output tokens/s at concurrency {res['concurrency']} "
        f"({res['output_tokens']} tokens in {res['requests']} requests, {res['elapsed_s']:.1f} s, "
        f"{res['errors']} errors)"
    )
    if res["requests"] == 0:
        print(f"no request completed: {res['last_error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
