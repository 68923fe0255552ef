#!/usr/bin/env python3
"""The server side alone: Fortress's HTTP protocol, uvicorn's and granian's, one core each.

Which HTTP server the gateway runs on decides a floor under every request: reading the request,
handing it to the application, writing the answer. This benchmark measures that part alone,
without a relay: every server reads a ``POST /v1/chat/completions`` body and answers the same
fixed ~600-byte ``chat.completion`` JSON.

Method
------
* **The servers**, each one process pinned with ``taskset`` to the server core, all started at
  once and measured in turn:

  1. ``bare``: an ``asyncio.Protocol`` on uvloop with httptools' parser that answers from its
     ``on_message_complete`` callback (no task, no ASGI): the least a Python server costs here.
  2. ``fortress``: uvicorn (uvloop, httptools) with the gateway's own connection protocol
     (``fortress.gateway.protocol``: its request cycle, limits and timers, defaults of
     ``server``), and an ASGI application that takes the body and answers through the cycle's
     shortcuts (``whole_body``, ``respond``), as the gateway's completion path does.
  3. ``uvicorn``: uvicorn's stock httptools protocol, the same application through ASGI's
     ``receive`` and ``send``.
  4. ``granian-rsgi``: granian's RSGI interface (``await proto()``, ``proto.response_bytes``),
     one worker, one runtime thread, uvloop.
  5. ``granian-rsgi-st``: the same with granian's single-threaded runtime and its Rust task
     implementation (``--runtime-mode st --task-impl rust``), its leanest settings for one core.
  6. ``granian-asgi``: granian's ASGI interface with the ``uvicorn`` application.

  granian is installed by this script into a throwaway virtualenv in the user's cache directory
  (``$XDG_CACHE_HOME`` or ``~/.cache``, ``fortress-bench/``) at the version pinned below, with
  the uvloop this environment has; ``--skip-granian`` leaves it out and says so.
* **Load**: ``wrk -t1 -c32`` on the other core (the load core), the same body for all; rounds
  alternate between the servers in rotating order so that all see the same machine noise; each
  figure is the median over rounds.
* **CPU per request**: the server's CPU time over the measurement (every thread and child
  process, from ``/proc/<pid>/task/*/schedstat``) divided by the requests wrk completed in it,
  the figure other work on the machine disturbs least.

Run ``python bench/servers.py`` (about 3 minutes, plus granian's installation the first time;
``--quick`` ~1 minute with rougher figures; ``--write-docs`` replaces the "Server side" section
of ``docs/benchmarks.md``). Needs wrk (``make bench`` installs it on Debian) and two CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gateway_overhead as go
import throwaway_venv as tv
from docs_section import write_section

SECTION = "servers"
TITLE = "## Server side: Fortress's protocol, uvicorn and granian"

# The granian release measured; `pip install granian==<this>` into its own virtualenv.
GRANIAN_VERSION = "2.8.9"
MODEL = "bench-json"
ANSWER = go.completion_body()


@dataclass
class Plan:
    rounds: int = 5
    round_s: float = 5.0
    warmup_s: float = 2.0
    conns: int = 32


QUICK = Plan(rounds=2, round_s=3.0, warmup_s=1.0)


@dataclass
class Server:
    name: str
    what: str
    port: int = 0
    pid: int = 0
    watch: list[int] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    system_share: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0


# -- the applications (also written into the working directory for granian) ----------------

APPS = '''
"""The applications granian serves (written by bench/servers.py)."""
ANSWER = {answer!r}
RSGI_HEADERS = [("content-type", "application/json")]
ASGI_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def rsgi_app(scope, proto):
    await proto()
    proto.response_bytes(200, RSGI_HEADERS, ANSWER)


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({{"type": "http.response.start", "status": 200, "headers": ASGI_HEADERS}})
    await send({{"type": "http.response.body", "body": ANSWER}})
'''


def _asgi_app() -> Any:
    """The ASGI application, with the shortcuts of Fortress's cycle where the server has them."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        whole = getattr(getattr(receive, "__self__", None), "whole_body", None)
        raw = whole() if whole is not None else None
        if raw is None:
            more = True
            while more:
                message = await receive()
                more = message.get("more_body", False)
        respond = getattr(getattr(send, "__self__", None), "respond", None)
        if respond is not None and respond(200, list(headers), ANSWER):
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ANSWER})

    return app


def serve_bare(port: int) -> None:
    """An asyncio protocol answering from the parser's callbacks: the floor."""
    import httptools
    import uvloop

    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(ANSWER)
    answer = head + ANSWER

    class Bare(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(answer)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def serve_uvicorn(port: int, fortress: bool) -> None:
    import uvicorn

    http: Any = "httptools"
    if fortress:
        from fortress.config.server import Server as ServerConfig
        from fortress.gateway.protocol import ConnectionLimits, guarded_protocol

        http = guarded_protocol(ConnectionLimits.from_config(ServerConfig()))
    config = uvicorn.Config(
        _asgi_app(),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=http,
        lifespan="off",
        access_log=False,
        log_level="warning",
        # As the gateway runs it (fortress.runtime): no Server or Date header, no proxy headers
        # without trusted proxies. uvicorn's stock protocol runs with the same settings.
        server_header=False,
        date_header=False,
        proxy_headers=False,
    )
    uvicorn.Server(config).run()


# -- granian in its own virtualenv ----------------------------------------------------------


def ensure_granian() -> Path:
    """The ``granian`` executable at GRANIAN_VERSION, in its own virtualenv (with this
    environment's uvloop)."""
    import uvloop

    requirements = [f"granian=={GRANIAN_VERSION}", f"uvloop=={uvloop.__version__}"]
    return tv.ensure("granian", "granian", GRANIAN_VERSION, requirements, "granian")


def granian_argv(exe: Path, port: int, interface: str, app: str, lean: bool) -> list[str]:
    argv = [str(exe), "--interface", interface, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", "1", "--runtime-threads", "1", "--loop", "uvloop", "--no-ws"]
    argv += ["--log-level", "warning"]
    if lean:
        argv += ["--runtime-mode", "st", "--task-impl", "rust"]
    return [*argv, f"apps:{app}"]


# -- the run --------------------------------------------------------------------------------


def smoke(s: Server, body: bytes) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{s.port}{go.PATH}", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        got = resp.read()
        if resp.status != 200 or got != ANSWER:
            raise SystemExit(f"{s.name}: answered {resp.status} with {got[:200]!r}")


def wait_up(s: Server, procs: go.Procs, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    body = go.request_body(MODEL, False)
    while True:
        procs.check_alive()
        try:
            smoke(s, body)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{s.name} is not answering on port {s.port}") from None
            time.sleep(0.2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    core, load_core = args.server_core, args.load_core
    go.pin_load(core, load_core, "servers")
    go.require_tools("wrk", "taskset")
    granian: dict[str, Any] = {"version": GRANIAN_VERSION, "skipped": None}
    exe: Path | None = None
    if args.skip_granian:
        granian["skipped"] = "left out with --skip-granian"
    else:
        try:
            exe = ensure_granian()
        except tv.Unavailable as exc:
            raise SystemExit(f"granian is not available: {exc}\nrerun with --skip-granian") from exc
        granian["version"] = tv.installed_version(exe.parent / "python", "granian") or "?"

    me = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    servers = [
        (Server("bare", "asyncio protocol + httptools, answers from the parser's callback"), [*me, "bare"]),
        (
            Server("fortress", "uvicorn + Fortress's connection protocol, ASGI app through its shortcuts"),
            [*me, "fortress"],
        ),
        (Server("uvicorn", "uvicorn's httptools protocol, ASGI app"), [*me, "uvicorn"]),
    ]
    if exe is not None:
        v = granian["version"]
        servers += [
            (
                Server("granian-rsgi", f"granian {v}, RSGI, 1 worker, 1 runtime thread"),
                [str(exe), "rsgi", "rsgi_app", ""],
            ),
            (
                Server("granian-rsgi-st", f"granian {v}, RSGI, single-threaded runtime, Rust tasks"),
                [str(exe), "rsgi", "rsgi_app", "lean"],
            ),
            (
                Server("granian-asgi", f"granian {v}, ASGI, 1 worker, 1 runtime thread"),
                [str(exe), "asgi", "asgi_app", ""],
            ),
        ]
    workdir = Path(tempfile.mkdtemp(prefix="fortress-servers-"))
    (workdir / "apps.py").write_text(APPS.format(answer=ANSWER))
    procs = go.Procs(workdir)
    body = go.request_body(MODEL, False)
    results: dict[str, Any] = {
        "machine": go.machine(),
        "plan": asdict(plan),
        "cores": {"server": core, "load": load_core},
        "granian": granian,
    }
    busy0, own0, t0 = go.machine_busy(), go.own_cpu(), time.monotonic()
    try:
        go.step(f"starting the servers on core {core}: {', '.join(s.name for s, _ in servers)}")
        for s, argv in servers:
            s.port = go.free_port()
            if argv[0] == sys.executable:
                argv = [*argv, str(s.port)]
            else:
                argv = granian_argv(Path(argv[0]), s.port, argv[1], argv[2], argv[3] == "lean")
            s.pid = procs.start(s.name, argv, core).pid
        for s, _ in servers:
            wait_up(s, procs)
            s.watch = [s.pid, *go.children(s.pid)]

        def wrk(s: Server, secs: float) -> go.WrkResult:
            url = f"http://127.0.0.1:{s.port}{go.PATH}"
            r = go.run_wrk(url, body, secs, plan.conns, load_core, workdir, s.watch)
            s.requests += r.requests
            s.errors += r.errors
            return r

        go.step(f"warm-up, {plan.warmup_s:g} s each")
        for s, _ in servers:
            wrk(s, plan.warmup_s)
        order = [s for s, _ in servers]
        for i in range(plan.rounds):
            turn = order[i % len(order) :] + order[: i % len(order)]
            go.step(f"round {i + 1}/{plan.rounds}: {' → '.join(s.name for s in turn)}")
            for s in turn:
                r = wrk(s, plan.round_s)
                s.cpu_us.append(r.cpu_per_request_us)
                s.rps.append(r.rps)
                s.system_share.append(r.system_share)
        procs.check_alive()
    finally:
        procs.stop()
        wall = time.monotonic() - t0
        other = max(0.0, (go.machine_busy() - busy0) - (go.own_cpu() - own0))
        results["other_cpu"] = {"seconds": other, "share": other / (wall * (os.cpu_count() or 1))}
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["servers"] = {
        s.name: {k: v for k, v in asdict(s).items() if k not in ("name", "pid", "watch", "port")}
        for s, _ in servers
    }
    return results


# -- report ---------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def report(r: dict[str, Any], command: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The markdown section body and the checks (name, measured, PASS/FAIL)."""
    m, ss, plan = r["machine"], r["servers"], r["plan"]
    fortress = med(ss["fortress"]["cpu_us"])
    lines = [
        f"Measured {r['date']} at commit {m['commit']} on {m['cpu']} ({m['cores']} cores, Linux "
        f"{m['kernel']}), Python {m['python']}, {m['stack']}; wrk {m['wrk']}"
        + (f"; granian {r['granian']['version']}" if not r["granian"]["skipped"] else "")
        + f". Load average at start: {m['loadavg']}.",
        "",
        "```",
        command,
        "```",
        "",
        f"Every server is one process on CPU {r['cores']['server']}; wrk (`-t1 -c{plan['conns']}`, "
        f"`POST {go.PATH}`) runs on CPU {r['cores']['load']}. Each reads the request body and "
        f"answers the same {len(ANSWER)}-byte `chat.completion` JSON: no relay, the server side "
        f"alone. {plan['rounds']} rounds of {plan['round_s']:.0f} s per server in rotating order; "
        "each figure is the median over rounds (range in brackets). Run time "
        f"{r['seconds']:.0f} s; other processes used {r['other_cpu']['share'] * 100:.1f} % of the "
        "machine's CPU meanwhile.",
        "",
        "| server | what runs | CPU / request | vs Fortress's protocol | system share | req/s "
        "| wrk errors + non-2xx |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in ss.items():
        cpu = med(s["cpu_us"])
        lines.append(
            f"| {name} | {s['what']} | **{cpu:.1f} µs** [{min(s['cpu_us']):.1f}-{max(s['cpu_us']):.1f}] "
            f"| {cpu / fortress:.2f}x | {med(s['system_share']) * 100:.0f} % | {med(s['rps']):,.0f} "
            f"| {s['errors']} |"
        )
    if r["granian"]["skipped"]:
        lines += ["", f"granian: not measured ({r['granian']['skipped']})."]
    lines += ["", _reading(ss)]
    errors = sum(s["errors"] for s in ss.values())
    checks = [("wrk errors and non-2xx answers, all servers", str(errors), "PASS" if errors == 0 else "FAIL")]
    return "\n".join(lines) + "\n", checks


def _reading(ss: dict[str, Any]) -> str:
    f = med(ss["fortress"]["cpu_us"])
    text = (
        f"Reading the figures: the gateway's server side costs {f:.1f} µs of CPU per request here, "
        f"{med(ss['bare']['cpu_us']):.1f} µs of it what any Python server on uvloop pays (the bare "
        f"protocol); uvicorn's own protocol costs {med(ss['uvicorn']['cpu_us']) / f:.2f}x that."
    )
    granians = [n for n in ss if n.startswith("granian")]
    if granians:
        best = min(granians, key=lambda n: med(ss[n]["cpu_us"]))
        text += (
            f" granian's leanest configuration here ({best}) costs {med(ss[best]['cpu_us']) / f:.2f}x "
            "Fortress's protocol: on one core its Rust I/O threads and the Python event loop hand "
            "every request across threads, which costs more than parsing it in Python's own loop "
            "with httptools."
        )
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:  # internal: one of the Python servers
        kind, port = argv[1], int(argv[2])
        if kind == "bare":
            serve_bare(port)
        else:
            serve_uvicorn(port, fortress=kind == "fortress")
        return 0
    ap = argparse.ArgumentParser(
        description="The server side alone: Fortress's protocol, uvicorn and granian (see the docstring)."
    )
    ap.add_argument("--quick", action="store_true", help="short run (~1 minute), rougher figures")
    ap.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    ap.add_argument("--json", metavar="FILE", help="write the raw results as JSON")
    ap.add_argument("--skip-granian", action="store_true", help="leave granian out (the report says so)")
    ap.add_argument("--server-core", type=int, default=1, help="CPU for the servers [1]")
    ap.add_argument("--load-core", type=int, default=0, help="CPU for wrk [0]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    results, body, checks = go.measure("servers.py", argv, args, run, report)
    if args.json:
        body = body.replace(args.json, "FILE")
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.write_docs:
        path = write_section(SECTION, body, TITLE, after="gateway-overhead")
        print(f"wrote the '{TITLE[3:]}' section of {path}", file=sys.stderr)
    return 0 if all(c[2] != "FAIL" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
