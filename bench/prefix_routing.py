#!/usr/bin/env python3
"""Prefix-aware and session routing versus least outstanding: time to first token on a
shared-prefix, multi-turn chat workload over real llama-server replicas, in one run.

Method
------
* **Replicas**: ``--replicas`` (default 3) llama-servers with the embedded model (SmolLM2-135M,
  Q4_1), started as ``fortress up`` starts them but with a larger context (``--ctx-size``,
  default 8192, 2 slots: room for a long system prompt and a few turns per slot). Their prompt
  cache (``cache_prompt``, on by default) is what the balancers compete for.
* **Workload**: ``--apps`` system prompts of about ``--system-chars`` characters each (distinct
  from their first line on), ``--conversations`` conversations spread over the apps, each
  ``--turns`` turns long: every turn resends the system prompt, the earlier turns (with the
  model's answers) and a new question. ``--concurrency`` clients play conversations from a
  shared queue, one turn at a time. Every request is a stream with ``max_tokens``
  ``--max-tokens`` and temperature 0, and carries the conversation id in ``x-session-id``.
  The workload is the same for each balancer (seeded), apart from the model's answers.
* **Documents** (``--doc-chars N``): each conversation's first turn also carries a document of
  about N characters of its own, so the prefix a conversation's turns share is mostly its own
  history rather than its app's system prompt: the workload session affinity is for (many
  turns per conversation, ``--turns``). With a long shared system prompt and few turns, most
  of what is cacheable is shared across conversations, which only prefix routing keeps
  together.
* **Phases**: for each balancer (``least_outstanding``, ``session``, ``prefix``) fresh
  replicas (cold caches) and a fresh ``fortress serve`` with one pool of them using that
  balancer; the workload runs; everything stops. Time to first token (TTFT: request sent to
  first content event) of every turn is kept.
* **Figures**: requests per replica, replicas the gateway ejected meanwhile (their prefixes and
  sessions move), P50 and P90 TTFT per balancer, and least outstanding's
  P90 over each other's P90. Target: >= 3x lower P90 TTFT with ``prefix`` and ``session``
  than with ``least_outstanding``. ``--json FILE`` keeps every request (TTFT, replica, app,
  turn, when it was sent) for a closer look.

Run ``python bench/prefix_routing.py`` (a few minutes on two cores; ``--quick`` for a short
first figure). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedded_model import free_port, started, wait_http  # noqa: E402

from fortress.config import LlamaCppOptions, LlamaCppReplicaConfig  # noqa: E402
from fortress.engines import engine_for  # noqa: E402

BALANCERS = ("least_outstanding", "session", "prefix")
TOPICS = ["returns", "shipping", "invoices", "warranty", "accounts", "stock", "pricing", "repairs"]
WORDS = "customer order parcel refund label carrier receipt policy ticket agent delay stock".split()


@dataclass
class Conversation:
    cid: str
    app: int
    system: str
    questions: list[str]
    messages: list[dict[str, str]] = field(default_factory=list)


def workload(args: argparse.Namespace) -> list[Conversation]:
    """The same conversations for every phase (seeded)."""
    rng = random.Random(args.seed)
    systems = []
    for a in range(args.apps):
        lines = [f"You are the assistant of ACME desk number {a}. Follow these rules."]
        i = 0
        while sum(len(x) + 1 for x in lines) < args.system_chars:
            words = " ".join(rng.choice(WORDS) for _ in range(12))
            lines.append(f"Rule {a}.{i} ({rng.choice(TOPICS)}): {words}.")
            i += 1
        systems.append("\n".join(lines))
    convs = []
    for c in range(args.conversations):
        questions = [
            f"Question {t} about {rng.choice(TOPICS)}: what about my {rng.choice(WORDS)}?"
            for t in range(args.turns)
        ]
        if args.doc_chars:
            # A document of the conversation's own in its first turn: the prefix its later
            # turns share is mostly theirs alone (a session's history, not an app's prompt).
            doc = [f"My document number {c}:"]
            while sum(len(x) + 1 for x in doc) < args.doc_chars:
                doc.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
            questions[0] = "\n".join(doc) + "\n\n" + questions[0]
        convs.append(Conversation(f"conv-{c}", c % args.apps, systems[c % args.apps], questions))
    return convs


# One request: TTFT (s), the replica that served it, its app (system prompt), its turn, when it
# was sent (s since the phase's workload started), and its conversation.
Row = tuple[float, str, int, int, float, str]


async def turn(
    s: aiohttp.ClientSession, gw: str, conv: Conversation, question: str, max_tokens: int, t_start: float
) -> Row:
    conv.messages.append({"role": "user", "content": question})
    body = {
        "model": "smollm2",
        "messages": [{"role": "system", "content": conv.system}, *conv.messages],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    first: float | None = None
    answer: list[str] = []
    async with s.post(gw + "/v1/chat/completions", json=body, headers={"x-session-id": conv.cid}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {(await resp.read())[:300]!r}")
        replica = resp.headers.get("x-fortress-replica", "?")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            text = choices[0].get("delta", {}).get("content") if choices else None
            if text:
                first = first or time.perf_counter()
                answer.append(text)
    conv.messages.append({"role": "assistant", "content": "".join(answer) or "(no answer)"})
    n = len(conv.messages) // 2 - 1
    return (first or time.perf_counter()) - t0, replica, conv.app, n, t0 - t_start, conv.cid


async def play(gw: str, convs: list[Conversation], args: argparse.Namespace) -> list[Row]:
    queue: asyncio.Queue[Conversation] = asyncio.Queue()
    for c in convs:
        queue.put_nowait(c)
    out: list[Row] = []
    t_start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    # llama-server closes its connection after a stream; the gateway's side is pooled.
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def client() -> None:
            while not queue.empty():
                conv = queue.get_nowait()
                for q in conv.questions:
                    out.append(await turn(s, gw, conv, q, args.max_tokens, t_start))

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return out


def phase(balancer: str, args: argparse.Namespace, tmp: Path) -> tuple[list[Row], int]:
    """Fresh replicas and gateway with ``balancer``; the workload's rows, and how many times the
    gateway ejected a replica meanwhile."""
    opts = LlamaCppOptions(ctx_size=args.ctx_size, parallel=args.parallel, threads=args.threads)
    launches = [
        engine_for(LlamaCppReplicaConfig(options=opts)).launch(free_port()) for _ in range(args.replicas)
    ]
    gport = free_port()
    reps = "\n".join(f'      - {{url: "{x.url}"}}' for x in launches)
    config = tmp / f"fortress-{balancer}.yaml"
    config.write_text(
        f"""state_dir: {tmp / ("state-" + balancer)}
auth: {{enabled: false}}
audit: {{enabled: false}}
server: {{port: {gport}, log_level: warning}}
timeouts: {{first_byte: 300, idle: 300, total: 600}}
pools:
  - model: smollm2
    balancer: {balancer}
    health_check: {{interval: 1, timeout: 1}}
    replicas:
{reps}
"""
    )
    # One worker: the prefix table is a process's own (docs/operations.md#workers).
    gw_argv = [sys.executable, "-m", "fortress.cli.main", "serve", "-c", str(config), "--workers", "1"]
    procs = [started(list(x.argv), tmp / f"llama-{balancer}-{i}.log", None) for i, x in enumerate(launches)]
    for p in procs:
        p.__enter__()
    try:
        for x in launches:
            wait_http(x.url + "/health", 120)
        with started(gw_argv, tmp / f"gateway-{balancer}.log", None):
            gw = f"http://127.0.0.1:{gport}"
            wait_http(gw + "/ready", 60)
            print(f"{balancer}: {len(launches)} replicas, gateway {gw}", file=sys.stderr)
            rows = asyncio.run(play(gw, workload(args), args))
        # A replica out of rotation moves its prefixes (and sessions): count it beside the figures.
        log = (tmp / f"gateway-{balancer}.log").read_text(errors="replace")
        ejections = 0
        for line in log.splitlines():
            if " ejected for " in line:
                ejections += 1
            if (" WARNING " in line and "SIGTERM" not in line) or " ERROR " in line:
                print(f"{balancer} gateway: {line.strip()[:300]}", file=sys.stderr)
        return rows, ejections
    finally:
        for p in reversed(procs):
            p.__exit__(None, None, None)


def spread(rows: list[Row]) -> str:
    """Requests per replica, most first (``32/32/32``): how evenly a balancer used the fleet."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[1]] = counts.get(row[1], 0) + 1
    return "/".join(str(n) for n in sorted(counts.values(), reverse=True))


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description="Prefix and session routing vs least outstanding (TTFT).")
    ap.add_argument("--replicas", type=int, default=3, help="llama-server replicas [3]")
    ap.add_argument("--ctx-size", type=int, default=8192, help="llama-server context, all slots [8192]")
    ap.add_argument("--parallel", type=int, default=2, help="slots per replica [2]")
    ap.add_argument("--threads", type=int, default=1, help="threads per replica [1]")
    ap.add_argument("--apps", type=int, default=3, help="distinct system prompts [3]")
    ap.add_argument("--system-chars", type=int, default=5000, help="system prompt length [5000]")
    ap.add_argument(
        "--doc-chars",
        type=int,
        default=0,
        help="a document of this many characters of each conversation's own in its first turn [0: none]",
    )
    ap.add_argument("--conversations", type=int, default=12, help="conversations [12]")
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation [4]")
    ap.add_argument("--concurrency", type=int, default=4, help="clients at once [4]")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per answer [8]")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="6 conversations of 3 turns: a first figure")
    ap.add_argument(
        "--json",
        metavar="FILE",
        help="write every request as JSON (TTFT, replica, app, turn, sent at, conversation id)",
    )
    ap.add_argument("--write-docs", action="store_true", help="replace its section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.conversations, args.turns = 6, 3
    shown = [a for a in argv if a != "--write-docs"]
    if args.json:  # the file's own path says nothing to a reader of the docs
        shown = ["FILE" if a == args.json else a.replace(args.json, "FILE") for a in shown]
    command = " ".join(["python bench/prefix_routing.py", *map(shlex.quote, shown)])
    t0 = time.monotonic()
    results: dict[str, list[Row]] = {}
    ejected: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="fortress-prefix-") as tmp:
        for b in BALANCERS:
            results[b], ejected[b] = phase(b, args, Path(tmp))
    base = p90([row[0] for row in results["least_outstanding"]])
    lines = [
        f"```\n{command}\n```\n",
        f"{args.replicas} llama-server replicas (embedded SmolLM2-135M, ctx {args.ctx_size}, "
        f"{args.parallel} slots, {args.threads} thread), {args.apps} system prompts of ~{args.system_chars} "
        f"chars, {args.conversations} conversations x {args.turns} turns"
        + (f" (each with a document of ~{args.doc_chars} chars)" if args.doc_chars else "")
        + f", {args.concurrency} clients; "
        f"run time {time.monotonic() - t0:.0f} s.\n",
        "| balancer | requests | per replica | replicas ejected | P50 TTFT | P90 TTFT "
        "| least_outstanding P90 / this P90 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts: dict[str, bool] = {}
    summary: dict[str, Any] = {}
    for b, rows in results.items():
        ttfts = [row[0] for row in rows]
        ratio = base / p90(ttfts)
        if b != "least_outstanding":
            verdicts[b] = ratio >= 3.0
        summary[b] = {
            "p50": statistics.median(ttfts),
            "p90": p90(ttfts),
            "ratio": ratio,
            "ejections": ejected[b],
            "rows": rows,
        }
        lines.append(
            f"| `{b}` | {len(ttfts)} | {spread(rows)} | {ejected[b]} | "
            f"{statistics.median(ttfts) * 1000:.0f} ms | {p90(ttfts) * 1000:.0f} ms | {ratio:.2f}x |"
        )
    ok = all(verdicts.values())
    lines.append("")
    for b, passed in verdicts.items():
        lines.append(
            f"Target >= 3x lower P90 TTFT than least_outstanding, `{b}`: {'PASS' if passed else 'FAIL'}  "
        )
    print("\n".join(lines))
    if args.write_docs:
        from docs_section import machine_line, write_section

        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        body = f"Measured {when} on {machine_line()}.\n\n" + "\n".join(lines).replace(
            command, command + " --write-docs"
        )
        if args.doc_chars:  # the documents workload keeps a section of its own
            title = "## Prefix-aware and session routing: conversations with documents of their own"
            print(write_section("prefix-routing-documents", body, title, after="prefix-routing"))
        else:
            print(
                write_section(
                    "prefix-routing", body, "## Prefix-aware and session routing", after="autoscale"
                )
            )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
