#!/usr/bin/env python3
"""Speed budgets of single operations on the request path, measured and checked.

The test suite checks what these operations do; how fast they are depends on the machine and on
what else runs on it, so the budgets are measured here, on a quiet machine, and reported:

- **Audit record build**: CPU time of ``RecordBuilder.build`` for a finished chat completion
  (every field, body capture off), averaged over ``--records`` builds. Budget: 50 µs.
- **Lone journal append**: wall time of one ``await journal.append`` that nobody appends beside,
  fsync included, with a group-commit delay of 200 ms that it must not wait for. Averaged over
  ``--appends`` appends one after the other, in ``--dir`` (default: a temporary directory).
  Budget: 100 ms. Its CPU time (the process's, the writer thread's system time included) is
  reported beside it.

Run ``python bench/unit_budgets.py`` (a few seconds). It prints one line per budget and exits 1
when any is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from docs_section import machine_line  # noqa: E402

from fortress.audit.journal import Journal  # noqa: E402
from fortress.audit.records import RecordBuilder  # noqa: E402
from fortress.config import HealthCheck, Tier, parse_config  # noqa: E402
from fortress.core.context import Identity, RequestContext  # noqa: E402
from fortress.routing.replica import Replica  # noqa: E402

RECORD_BUDGET_S = 50e-6
APPEND_BUDGET_S = 0.1
GROUP_COMMIT_MS = 200.0
SECRET = b"bench-secret-0123456789abcdef0123456789abcdef"


def finished_ctx() -> RequestContext:
    """A streamed chat completion as the audit layer sees it when the response has ended."""
    ctx = RequestContext("req-abc", "/v1/chat/completions", time.perf_counter() - 0.25, "10.0.0.7")
    ctx.headers = {
        b"x-llm-source": b"billing-service",
        b"x-llm-user": b"alice",
        b"x-llm-request-type": b"chat",
    }
    ctx.body = {
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "user", "content": [{"type": "text", "text": "and you"}]},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "end-user-42",
        "metadata": {"ticket": "T-1", "email": "alice@example.com"},
    }
    ctx.model = "gpt-4o-mini"
    ctx.stream = True
    ctx.replica = Replica("r7", "http://127.0.0.1:9", Tier.SECONDARY, HealthCheck())
    ctx.attempts = 2
    ctx.status = 200
    ctx.usage = {"prompt_tokens": 12, "completion_tokens": 34, "prompt_tokens_details": {"cached_tokens": 8}}
    ctx.ttfb = 0.05
    ctx.bytes_in = 321
    ctx.bytes_out = 4567
    ctx.identity = Identity("key_9", "alice-laptop", "default", frozenset(), "fk_abcd")
    return ctx


def record_build_cpu(state_dir: Path, n: int) -> tuple[float, dict[str, Any]]:
    """(seconds of CPU per built record, one such record)."""
    cfg = parse_config(f"state_dir: {state_dir}\nauth: {{enabled: false}}\naudit: {{}}\n", env={})
    builder = RecordBuilder(cfg.audit)
    ctx = finished_ctx()
    for _ in range(min(n, 1000)):  # warm up
        builder.build(ctx)
    t0 = time.process_time()
    for _ in range(n):
        builder.build(ctx)
    return (time.process_time() - t0) / n, builder.build(ctx)


async def lone_append_wall(journal_dir: Path, record: dict[str, Any], n: int) -> tuple[float, float, int]:
    """(wall seconds per lone append, CPU seconds per lone append (the process, all threads:
    the writer's system time included), fsyncs) for ``n`` appends one after the other."""
    journal = Journal(journal_dir, "gw-bench", SECRET, group_commit_ms=GROUP_COMMIT_MS)
    journal.open()
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            await journal.append({**record, "request_id": f"req-{i}"})
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall / n, cpu / n, journal.fsyncs
    finally:
        journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000, help="record builds to average")
    parser.add_argument("--appends", type=int, default=20, help="lone appends to average")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the journal")
    args = parser.parse_args()

    print(machine_line())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base = Path(tmp)
        per_record, record = record_build_cpu(base / "state", args.records)
        per_append, cpu_append, fsyncs = asyncio.run(lone_append_wall(base / "journal", record, args.appends))

    results = [
        (
            "audit record build",
            per_record <= RECORD_BUDGET_S,
            f"{per_record * 1e6:.1f} µs CPU per record (budget {RECORD_BUDGET_S * 1e6:.0f} µs)",
        ),
        (
            "lone journal append",
            per_append <= APPEND_BUDGET_S and fsyncs == args.appends,
            f"{per_append * 1e3:.2f} ms per fsync'd append ({cpu_append * 1e6:.0f} µs CPU), {fsyncs} "
            f"fsyncs for {args.appends} "
            f"appends (budget {APPEND_BUDGET_S * 1e3:.0f} ms, one fsync each, "
            f"group commit {GROUP_COMMIT_MS:g} ms not waited for)",
        ),
    ]
    for name, ok, detail in results:
        print(f"{name}: {detail}: {'ok' if ok else 'MISSED'}")
    sys.exit(0 if all(ok for _, ok, _ in results) else 1)


if __name__ == "__main__":
    main()
