#!/usr/bin/env python3
"""Gateway-overhead benchmark: what relaying through Fortress costs, per request and per chunk.

Method
------
* **A fast upstream.** nginx (from Debian) runs from a config written into a temporary directory
  (``worker_processes 1``, ``access_log off``, pid, logs and temp paths in that directory, bound
  to 127.0.0.1). Server A answers ``POST /v1/chat/completions`` with a fixed, realistic
  ``chat.completion`` JSON (~600 bytes, with usage) through ``return 200``; server B answers the
  same path with a fixed SSE body (100 ``chat.completion.chunk`` events, a usage-only chunk and
  ``data: [DONE]``) from a static file (``error_page 405 =200`` turns the POST into a GET of the
  file). Both answer ``GET /health`` and ``GET /v1/models`` (``bench-json`` / ``bench-sse``), as
  the gateway's health checks need. The direct runs show nginx needs a few µs of CPU per request,
  so it is the gateway that is measured, not the upstream.
* nginx sends the whole SSE body in one write, so per-chunk cost is measured against
  ``fortress sim`` (model ``bench-sim``, 200 tokens 2 ms apart), which writes and flushes every
  event separately: the gateway then does one read, one tap and one send per event. It is run
  with a few concurrent streams (light load) and with many (heavy load: the gateway's core is
  busy and events start to share reads and wake-ups).
* **The gateway** is ``fortress serve -c <config>`` with three pools (``bench-json`` → nginx A,
  ``bench-sse`` → nginx B, ``bench-sim`` → the simulator; otherwise the defaults, except that API
  keys and the audit trail are off, as the benchmark's requests carry neither a key nor audit
  headers; default-on layers such as the access log are measured with the relay): one process
  (one worker) pinned with ``taskset`` to one core. nginx, the simulator and every load
  generator (``wrk`` and this script's client) are pinned to another core.
* **Gateway CPU time** is read from /proc over a measured window and divided by the requests (or
  relayed SSE events) completed in it. The total comes from ``/proc/<pid>/task/*/schedstat``
  (run time in ns, all threads) rather than utime+stime of ``/proc/<pid>/stat`` (fields 14, 15),
  which this kernel keeps in 10 ms ticks; stat still gives the user/system split. CPU time is
  less affected by other work on the machine than requests/s and latencies are, not immune: the
  report says how busy the gateway's core was (CPU s / wall s; well under 100 % at saturation
  means something else ran) and how much CPU other processes used during the run (from
  /proc/stat), and warns when that was more than 5 %.
* **Saturation**: ``wrk -t1 -c32`` with a Lua script that POSTs the request body and prints
  wrk's summary as JSON, direct to nginx and through the gateway.
* **Added latency at half saturation**: an open-loop client (asyncio + uvloop + httptools) sends
  requests at a constant rate (paced by an interval timer, not the loop's 1 ms timers) of 50 %
  of the gateway's measured saturation over pre-opened keep-alive connections, and times each
  from the write of the request to the end of its response (to the first body byte for TTFB).
  Direct and gateway runs alternate in short rounds (rotating the order) so both see the same
  machine noise; added = gateway percentile - direct percentile. Evenly spaced requests share
  no wake-ups, so they cost the gateway more CPU each than under wrk: its core is then more
  than 50 % busy (the table shows how busy).
* **Floor**: a bare relay (uvloop + httptools callbacks, no JSON parsing, routing, ASGI or
  aiohttp; started by this script on the gateway's core) runs the same loads. It is not a
  product, it is a yardstick: what the kernel's loopback TCP and the event loop alone cost on
  this machine, the least any Python relay can spend.

What each layer adds (metrics and alarms, the access log, API keys + usage plans + audit) is
measured by ``bench/gateway_layers.py`` with the same method and helpers (it imports this
module; this module does not import it).

Run ``python bench/gateway_overhead.py`` (about 2.5 minutes; ``--quick`` for ~45 s with rougher
figures; ``--write-docs`` replaces the "Gateway overhead" section of ``docs/benchmarks.md``;
``--profile DIR`` also samples the gateway with py-spy under load and prints where its time
goes). Needs nginx and wrk (``make bench`` installs them on Debian) and two CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import glob
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import httptools
from docs_section import cpu_model, write_section

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    uvloop = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
SECTION = "gateway-overhead"  # its part of docs/benchmarks.md

# Targets from the issue (one worker, one core).
TARGET_CPU_PER_REQUEST_MS = 0.3
TARGET_CPU_PER_CHUNK_US = 15.0
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_TTFB_P50_MS = 0.5

# How much slower this machine runs a fixed piece of Python after its core has idled (see
# ``idle_penalty``): a few hundred bytes of JSON parsed, as a request's path does.
_IDLE_PROBE = """
import json, statistics, sys, time
doc = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello " * 20}] * 3})
def work():
    return len(json.loads(doc)["messages"])
out = {}
for gap in (0.0, 0.002, 0.01):
    runs = []
    for _ in range(300):
        if gap:
            time.sleep(gap)
        c0 = time.thread_time_ns()
        work()
        runs.append(time.thread_time_ns() - c0)
    out[str(gap)] = statistics.median(runs) / 1000
print(json.dumps(out))
"""

SSE_EVENTS = 100  # content chunks in nginx's fixed SSE body
SIM_TOKENS = 200
SIM_ITL = 0.002
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATH = "/v1/chat/completions"

# -- fixed bodies ----------------------------------------------------------------------------

_WORDS = (
    "A gateway benchmark compares the same request sent directly to a fast upstream and sent "
    "through the gateway, so that the difference is what the gateway itself costs in time and "
    "in CPU, measured on one pinned core."
).split()


def completion_body() -> bytes:
    """A realistic non-streamed chat.completion (~600 bytes, with usage)."""
    obj = {
        "id": "chatcmpl-bench7d3f9a2c41e84b6f9c0d1a2b",
        "object": "chat.completion",
        "created": 1732350000,
        "model": "bench-json",
        "system_fingerprint": "fp_bench_0001",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(_WORDS), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 31,
            "completion_tokens": len(_WORDS),
            "total_tokens": 31 + len(_WORDS),
        },
    }
    return json.dumps(obj, separators=(",", ":")).encode()


def sse_body(events: int = SSE_EVENTS) -> bytes:
    """A fixed SSE stream as a replica sends it when asked for usage: chunks, usage, [DONE]."""
    base = {
        "id": "chatcmpl-bench7d3f9a2c41e84b6f9c0d1a2b",
        "object": "chat.completion.chunk",
        "created": 1732350000,
        "model": "bench-sse",
        "system_fingerprint": "fp_bench_0001",
    }
    out = []
    for i in range(events):
        delta: dict[str, Any] = {"content": " " + _WORDS[i % len(_WORDS)]}
        if i == 0:
            delta = {"role": "assistant", "content": ""}
        finish = "stop" if i == events - 1 else None
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        out.append({**base, "choices": [choice], "usage": None})
    usage = {"prompt_tokens": 31, "completion_tokens": events, "total_tokens": 31 + events}
    out.append({**base, "choices": [], "usage": usage})
    text = "".join("data: " + json.dumps(o, separators=(",", ":")) + "\n\n" for o in out)
    return (text + "data: [DONE]\n\n").encode()


def request_body(model: str, stream: bool) -> bytes:
    obj: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "In one paragraph: why measure a gateway's overhead?"},
        ],
        "max_tokens": 256,
        "temperature": 0.7,
    }
    if stream:
        obj["stream"] = True
    return json.dumps(obj, separators=(",", ":")).encode()


def models_body(model: str) -> bytes:
    data = [{"id": model, "object": "model", "created": 1732350000, "owned_by": "bench"}]
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()


def _nginx_str(body: bytes) -> str:
    text = body.decode()
    if any(c in text for c in "'$\\\n"):
        raise ValueError("body cannot be put in an nginx 'return' string")
    if len(text) > 4000:  # nginx's limit on one config token is 4096 bytes
        raise ValueError("body too long for an nginx 'return' string")
    return "'" + text + "'"


# -- processes and /proc ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_time(pid: int) -> float:
    """CPU seconds used by a process so far (all threads, ns precision where the kernel has it)."""
    total = 0
    found = False
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(path) as f:
                total += int(f.read().split()[0])
            found = True
    if found:
        return total / 1e9
    user, system = cpu_split(pid)
    return user + system


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds from /proc/<pid>/stat, fields 14 and 15."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2 :].split()  # fields from 3 (state) on
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class CpuWindow:
    """CPU used by some processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.cpu = 0.0
        self.user = 0.0
        self.system = 0.0
        self.wall = 0.0
        self._t = 0.0
        self._c = 0.0
        self._s = (0.0, 0.0)

    def _split(self) -> tuple[float, float]:
        parts = [cpu_split(p) for p in self.pids]
        return sum(u for u, _ in parts), sum(s for _, s in parts)

    def start(self) -> None:
        self._s = self._split()
        self._c = sum(cpu_time(p) for p in self.pids)
        self._t = time.perf_counter()

    def stop(self) -> None:
        self.wall += time.perf_counter() - self._t
        self.cpu += sum(cpu_time(p) for p in self.pids) - self._c
        u, s = self._split()
        self.user += u - self._s[0]
        self.system += s - self._s[1]

    @property
    def system_share(self) -> float:
        return self.system / (self.user + self.system) if self.user + self.system else 0.0


def machine_busy(cpu: int | None = None) -> float:
    """CPU seconds all processes have used, on one CPU or on all (from /proc/stat)."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat") as f:
        fields = next(line.split() for line in f if line.split()[0] == name)[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK  # user..steal, without guest (counted in user)


def own_cpu() -> float:
    """CPU seconds of this script and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Procs:
    """Background processes of the run, each stopped by its own pid at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], core: int | None) -> subprocess.Popen[bytes]:
        if core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_nginx(workdir: Path, port_json: int, port_sse: int) -> Path:
    """Write the nginx config (and the static SSE file) into ``workdir``; return its path."""
    static = workdir / "static"
    static.mkdir()
    (static / "stream.sse").write_bytes(sse_body())
    # nginx's worker runs as "nobody" when started by root: it must be able to read the file.
    for p in (workdir, static, static / "stream.sse"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    temp = "\n".join(
        f"  {d}_temp_path {workdir / ('nginx-' + d)};"
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )

    def common(model: str) -> str:
        return (
            "    location = /health "
            '{ default_type application/json; return 200 \'{"status":"ok"}\'; }\n'
            "    location = /v1/models "
            f"{{ default_type application/json; return 200 {_nginx_str(models_body(model))}; }}"
        )

    conf = f"""# written by bench/gateway_overhead.py
worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port_json};
{common("bench-json")}
    location = {PATH} {{
      default_type application/json;
      return 200 {_nginx_str(completion_body())};
    }}
  }}
  server {{
    listen 127.0.0.1:{port_sse};
{common("bench-sse")}
    # A POST cannot read a static file: the 405 becomes an internal GET of the SSE file.
    location = {PATH} {{ error_page 405 =200 /_stream; return 405; }}
    location = /_stream {{
      internal;
      root {static};
      default_type text/event-stream;
      try_files /stream.sse =404;
    }}
  }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


def write_gateway_config(workdir: Path, port: int, upstreams: dict[str, int]) -> Path:
    """A fortress.yaml with one pool per upstream; defaults otherwise, but no keys and no audit."""
    from fortress.config import FortressConfig

    pools = "".join(
        f"  - model: {model}\n    replicas:\n      - url: http://127.0.0.1:{p}\n"
        for model, p in upstreams.items()
    )
    text = (
        "# written by bench/gateway_overhead.py\n"
        f"server:\n  host: 127.0.0.1\n  port: {port}\n  log_level: warning\n"
        f"pools:\n{pools}"
    )
    fields = FortressConfig.model_fields
    for layer in ("auth", "audit"):
        if layer in fields:
            text += f"{layer}:\n  enabled: false\n"
    if "state_dir" in fields:
        text += f"state_dir: {workdir / 'state'}\n"
    path = workdir / "fortress.yaml"
    path.write_text(text)
    return path


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def wait_for(
    url: str, procs: Procs, timeout: float = 30.0, method: str = "GET", body: bytes | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            status, _, answer = http(method, url, body, timeout=2)
            if status == 200:
                return
            last = f"{status} {answer[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout:.0f}s: {last}")


# -- the floor: a bare relay -----------------------------------------------------------------


def floor_relay(port: int, routes: dict[bytes, int]) -> None:
    """Serve a bare relay on ``port`` until killed: the yardstick, not a product.

    Each client request goes to the upstream whose model name its body contains, over a pooled
    keep-alive connection; each piece of the upstream's body is written to the client from the
    read callback (chunked), with no task, no JSON parsing, no ASGI and no aiohttp.
    """
    pools: dict[int, collections.deque[_Up]] = collections.defaultdict(collections.deque)

    class _Up(asyncio.Protocol):
        def __init__(self, up_port: int) -> None:
            self.up_port = up_port
            self.parser = httptools.HttpResponseParser(self)
            self.down: _Down | None = None
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_headers_complete(self) -> None:
            assert self.down is not None and self.down.transport is not None
            self.down.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )

        def on_body(self, body: bytes) -> None:
            assert self.down is not None and self.down.transport is not None
            self.down.transport.write(b"%x\r\n%s\r\n" % (len(body), body))

        def on_message_complete(self) -> None:
            assert self.down is not None and self.down.transport is not None
            self.down.transport.write(b"0\r\n\r\n")
            self.down = None
            pools[self.up_port].append(self)

    class _Down(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.body: list[bytes] = []
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            body = b"".join(self.body)
            self.body = []
            up_port = next(p for model, p in routes.items() if model in body)
            pool = pools[up_port]
            if pool:
                self._send(pool.pop(), body)
            else:
                asyncio.get_running_loop().create_task(self._connect(up_port, body))

        async def _connect(self, up_port: int, body: bytes) -> None:
            loop = asyncio.get_running_loop()
            _, up = await loop.create_connection(lambda: _Up(up_port), "127.0.0.1", up_port)
            self._send(up, body)

        def _send(self, up: _Up, body: bytes) -> None:
            assert up.transport is not None
            up.down = self
            up.transport.write(
                b"POST %s HTTP/1.1\r\nhost: upstream\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (PATH.encode(), len(body), body)
            )

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Down, "127.0.0.1", port)
        await server.serve_forever()

    if uvloop is not None:
        uvloop.run(main())
    else:  # pragma: no cover
        asyncio.run(main())


# -- wrk ------------------------------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{headers}wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {{"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    errors: int
    p50_ms: float
    p99_ms: float
    cpu_s: float = 0.0  # of the watched processes over the run
    cpu_per_request_us: float = 0.0
    busy: float = 0.0  # watched CPU seconds / wall seconds
    system_share: float = 0.0


def run_wrk(
    url: str,
    body: bytes,
    seconds: float,
    conns: int,
    core: int | None,
    workdir: Path,
    watch: Sequence[int],
    headers: dict[str, str] | None = None,
) -> WrkResult:
    """Run wrk (POST ``body`` with ``headers``) and return its summary plus the CPU used by ``watch``."""
    lines = "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in (headers or {}).items())
    tag = zlib.crc32(body + lines.encode())
    script = workdir / f"wrk-{tag:08x}.lua"
    script.write_text(WRK_LUA.format(body=body.decode(), headers=lines))
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "-s", str(script), url]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    win = CpuWindow(watch)
    win.start()
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    win.stop()
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    d = json.loads(line[6:])
    n = d["requests"]
    secs = d["duration_us"] / 1e6
    return WrkResult(
        requests=n,
        seconds=secs,
        rps=n / secs,
        errors=d["errors"] + d["non2xx"],
        p50_ms=d["p50_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        cpu_s=win.cpu,
        cpu_per_request_us=win.cpu / n * 1e6 if n else 0.0,
        busy=win.cpu / win.wall,
        system_share=win.system_share,
    )


# -- the open-loop / closed-loop client ----------------------------------------------------


@dataclass(slots=True)
class Sample:
    latency: float  # seconds, request written -> response complete
    ttfb: float  # seconds, request written -> first body byte
    status: int
    events: int  # SSE events ("\n\n"-terminated) in the body
    chunks: int  # HTTP chunks (the relay's writes) in a chunked body


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection; one request at a time."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None  # set when the response is complete
        self.t_send = 0.0
        self.t_first = 0.0
        self.events = 0
        self.chunks = 0
        self.last = b""
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._finish(None)

    def send(self, request: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.t_first = 0.0
        self.events = 0
        self.chunks = 0
        self.last = b""
        self.t_send = time.perf_counter()
        self.transport.write(request)
        return self.done

    def _finish(self, sample: Sample | None) -> None:
        done, self.done = self.done, None
        if done is None:
            return
        self.target.record(self, sample)
        if not done.done():
            done.set_result(None)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_body(self, body: bytes) -> None:
        if not self.t_first:
            self.t_first = time.perf_counter()
        # "\n\n" may straddle two reads: count it in (last byte of the previous piece + this one).
        self.events += (self.last + body).count(b"\n\n")
        self.last = body[-1:]

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        ttfb = (self.t_first or now) - self.t_send
        chunks = max(0, self.chunks - 1)  # the last, empty chunk ends the body
        self._finish(Sample(now - self.t_send, ttfb, self.status, self.events, chunks))


@dataclass
class Round:
    cpu_s: float
    wall_s: float
    requests: int
    events: int
    chunks: int


class Target:
    """Keep-alive connections to one host:port, the request they send, what came back."""

    def __init__(self, name: str, port: int, body: bytes, pid: int | None = None) -> None:
        self.name = name
        self.port = port
        self.pid = pid  # the relay whose CPU is measured (None: the upstream itself)
        self.request = (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.idle: collections.deque[_Conn] = collections.deque()
        self.conns: list[_Conn] = []
        self.samples: list[Sample] = []
        self.rounds: list[Round] = []
        self.failures = 0
        self.opened_late = 0  # open-loop requests that found every connection busy

    def record(self, conn: _Conn, sample: Sample | None) -> None:
        if sample is None or sample.status != 200:
            self.failures += 1
        if sample is not None:
            self.samples.append(sample)
        if conn.transport is not None:
            self.idle.append(conn)
        else:
            self.conns.remove(conn)

    async def open(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            _, conn = await loop.create_connection(lambda: _Conn(self), "127.0.0.1", self.port)
            self.conns.append(conn)
            self.idle.append(conn)

    async def send(self) -> asyncio.Future[None]:
        if not self.idle:
            await self.open(1)
        return self.idle.pop().send(self.request)

    async def drain(self) -> None:
        """Wait until no request is in flight."""
        pending = [c.done for c in self.conns if c.done is not None]
        if pending:
            await asyncio.gather(*pending)

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()

    # results
    def pct_ms(self, attr: str, q: float) -> float:
        values: list[float] = sorted(getattr(s, attr) for s in self.samples)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    def summary(self) -> dict[str, Any]:
        cpu = sum(r.cpu_s for r in self.rounds)
        wall = sum(r.wall_s for r in self.rounds)
        n = sum(r.requests for r in self.rounds)
        events = sum(r.events for r in self.rounds)
        chunks = sum(r.chunks for r in self.rounds)
        per_event = [r.cpu_s / r.events * 1e6 for r in self.rounds if r.events]
        out: dict[str, Any] = {
            "requests": n,
            "failures": self.failures,
            "opened_late": self.opened_late,
            "events": events,
            "chunks": chunks,
            "wall_s": wall,
            "cpu_s": cpu,
            "events_per_s": events / wall if wall else 0.0,
            "busy": cpu / wall if wall else 0.0,
            "cpu_per_request_us": cpu / n * 1e6 if n and self.pid else None,
            "cpu_per_event_us": statistics.median(per_event) if per_event and self.pid else None,
            "cpu_per_event_us_range": [min(per_event), max(per_event)] if per_event and self.pid else None,
            "events_per_chunk": events / chunks if chunks else None,
        }
        for attr in ("latency", "ttfb"):
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                out[f"{attr}_{name}_ms"] = self.pct_ms(attr, q)
        return out


async def open_loop(target: Target, rate: float, seconds: float) -> None:
    """Send at ``rate`` requests/s on a fixed schedule for ``seconds``; wait for the answers.

    The schedule is kept by an interval timer (``setitimer``, µs resolution) whose SIGALRM the
    loop handles: the loop's own timers have 1 ms resolution, which would send requests in
    bursts (2-3 at a time at 2,000+ req/s) and measure the relay's queueing, not its latency.
    A late tick sends every request that is due, so the rate holds.
    """
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    sent = 0
    start = time.perf_counter()
    finished = loop.create_future()
    late: set[asyncio.Task[asyncio.Future[None]]] = set()

    def tick() -> None:
        nonlocal sent
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            if target.idle:
                target.idle.pop().send(target.request)
            else:  # every pre-opened connection is busy: open one more (counted)
                task = loop.create_task(target.send())
                late.add(task)
                task.add_done_callback(late.discard)
                target.opened_late += 1
            sent += 1
        if sent >= total and not finished.done():
            finished.set_result(None)

    loop.add_signal_handler(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 1 / rate, 1 / rate)
    try:
        tick()
        await finished
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        loop.remove_signal_handler(signal.SIGALRM)
    if late:
        await asyncio.gather(*late)
    await target.drain()


async def closed_loop(target: Target, concurrency: int, seconds: float) -> None:
    """``concurrency`` connections, each sending its next request when the last one ended."""
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            await (await target.send())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def rounds(
    targets: list[Target],
    n_rounds: int,
    seconds: float,
    *,
    rate: float = 0.0,
    concurrency: int = 0,
    warmup: float = 0.3,
) -> None:
    """Run the same load against each target in turn, ``n_rounds`` times (rotating the order).

    Open loop at ``rate`` requests/s, or closed loop with ``concurrency`` streams. The CPU of a
    target's ``pid`` is measured over its own rounds only.
    """
    conns = max(concurrency, 32)

    async def load(t: Target, secs: float) -> None:
        if rate:
            await open_loop(t, rate, secs)
        else:
            await closed_loop(t, concurrency, secs)

    for t in targets:
        await t.open(conns)
        await load(t, warmup)  # warm the connections (and a relay's upstream pool)
        t.samples.clear()
        t.failures = 0
    for r in range(n_rounds):
        k = r % len(targets)
        for t in targets[k:] + targets[:k]:
            win = CpuWindow([t.pid] if t.pid else [])
            before = len(t.samples)
            win.start()
            await load(t, seconds)
            win.stop()
            new = t.samples[before:]
            t.rounds.append(
                Round(win.cpu, win.wall, len(new), sum(s.events for s in new), sum(s.chunks for s in new))
            )
    for t in targets:
        t.close()


# -- profiling ------------------------------------------------------------------------------


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _frame(frame: str) -> tuple[str, str]:
    """'func (/path/site-packages/pkg/mod.py:12)' -> ('func (pkg/mod.py)', 'pkg/mod.py')."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})", where


def _package(where: str) -> str:
    if where.endswith("asyncio/runners.py"):
        return "event loop: uvloop's C code and syscalls below it"
    for prefix, label in (
        ("fortress/", "fortress (our code)"),
        ("uvicorn/", "uvicorn"),
        ("aiohttp/", "aiohttp (upstream client)"),
        ("asyncio/", "asyncio"),
        ("yarl/", "yarl/multidict"),
        ("multidict/", "yarl/multidict"),
    ):
        if where.startswith(prefix):
            return label
    return "other"


def stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    """(frames, samples) of each line of py-spy's raw (collapsed) output."""
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def top_frames(raw: Path, n: int = 12) -> dict[str, Any]:
    """From py-spy's collapsed stacks: share of samples per package and per function (self)."""
    by_pkg: collections.Counter[str] = collections.Counter()
    by_fn: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, k in stacks(raw):
        total += k
        fn, where = _frame(frames[-1])
        by_pkg[_package(where)] += k
        by_fn[fn] += k
    if not total:
        return {"samples": 0, "packages": [], "functions": []}
    return {
        "samples": total,
        "packages": [(p, c / total) for p, c in by_pkg.most_common()],
        "functions": [(f, c / total) for f, c in by_fn.most_common(n)],
    }


def profile_run(spy: str, pid: int, seconds: float, out: Path, load: Callable[[], object]) -> Path:
    """Sample ``pid`` with py-spy while ``load()`` runs.

    ``--nonblocking``: py-spy reads the stacks without stopping the process. Stopping it (the
    default) skews samples towards system calls on this kind of VM (a thread stops at its next
    return from the kernel), which made getpid() look like 10 % of the time.
    """
    argv = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--nonblocking",
        "--format",
        "raw",
        "--rate",
        "500",
        "--duration",
        str(max(1, round(seconds))),
        "-o",
        str(out),
    ]
    with open(out.with_suffix(".log"), "wb") as log:
        rec = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    load()
    try:
        rec.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        rec.kill()
        rec.wait()
    return out


# -- the run --------------------------------------------------------------------------------


@dataclass
class Plan:
    sat_s: float = 10.0  # gateway saturation, non-stream
    direct_s: float = 5.0  # direct saturation runs (nginx is not what is measured)
    floor_s: float = 4.0
    stream_sat_s: float = 8.0
    rounds: int = 6  # open-loop latency rounds per target
    round_s: float = 1.5
    stream_rounds: int = 4
    stream_round_s: float = 2.0
    light_streams: int = 8
    heavy_streams: int = 64
    sim_rounds: int = 4
    sim_round_s: float = 2.5
    conns: int = 32  # wrk connections


QUICK = Plan(
    sat_s=4,
    direct_s=2,
    floor_s=2,
    stream_sat_s=3,
    rounds=2,
    round_s=1.5,
    stream_rounds=2,
    stream_round_s=1.0,
    sim_rounds=2,
    sim_round_s=1.5,
)


def machine() -> dict[str, str]:
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])

    def first_line(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
        except OSError:
            return "?"
        text = (r.stdout + r.stderr).strip().splitlines()
        return text[0] if text else "?"

    import aiohttp
    import uvicorn

    commit = first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "status", "--porcelain", "--", "fortress"])
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "stack": (
            f"uvicorn {uvicorn.__version__}, uvloop {getattr(uvloop, '__version__', '-')}, "
            f"httptools {httptools.__version__}, aiohttp {aiohttp.__version__}"
        ),
        "nginx": first_line(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "wrk": first_line(["wrk", "-v"]).split(" [")[0].replace("wrk ", ""),
        "loadavg": load,
        "commit": commit + (" (fortress/ modified)" if dirty and dirty != "?" else ""),
    }


def pin_load(gw_core: int, load_core: int, what: str = "gateway") -> None:
    """Run this script (a load generator too) on the load core; warn if that is the gateway's."""
    if gw_core == load_core or len(os.sched_getaffinity(0)) < 2:
        print(f"warning: {what} and load share a core; figures will be pessimistic", file=sys.stderr)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {load_core})


def require_tools(*tools: str) -> tuple[str, str]:
    """Exit with how to get them when a tool is missing; return nginx's and fortress's paths."""
    for tool in tools:
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            raise SystemExit(f"{tool} not found: `make bench` installs nginx-light and wrk")
    return shutil.which("nginx") or "/usr/sbin/nginx", str(Path(sys.executable).parent / "fortress")


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    gw_core, load_core = args.gateway_core, args.load_core
    pin_load(gw_core, load_core)
    nginx_bin, fortress_bin = require_tools("nginx", "wrk", "taskset")

    workdir = Path(tempfile.mkdtemp(prefix="fortress-bench-"))
    procs = Procs(workdir)
    results: dict[str, Any] = {
        "machine": machine(),
        "plan": asdict(plan),
        "cores": {"gateway": gw_core, "load": load_core},
    }
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None)
    busy0, own0, t0 = machine_busy(), own_cpu(), time.monotonic()
    core0, relays_cpu = machine_busy(gw_core), 0.0
    try:
        p_json, p_sse, p_sim, p_gw, p_floor = (free_port() for _ in range(5))
        conf = write_nginx(workdir, p_json, p_sse)
        nginx = procs.start("nginx", [nginx_bin, "-p", str(workdir), "-c", str(conf)], load_core)
        procs.start(
            "sim",
            [
                fortress_bin,
                "sim",
                "--port",
                str(p_sim),
                "--model",
                "bench-sim",
                "--tokens",
                str(SIM_TOKENS),
                "--itl",
                str(SIM_ITL),
            ],
            load_core,
        )
        for p in (p_json, p_sse, p_sim):
            wait_for(f"http://127.0.0.1:{p}/health", procs)
        upstreams = {"bench-json": p_json, "bench-sse": p_sse, "bench-sim": p_sim}
        gw_conf = write_gateway_config(workdir, p_gw, upstreams)
        gw = procs.start("gateway", [fortress_bin, "serve", "-c", str(gw_conf), "--port", str(p_gw)], gw_core)
        floor = procs.start(
            "floor",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--floor-relay",
                str(p_floor),
                *(f"{m}={p}" for m, p in upstreams.items()),
            ],
            gw_core,
        )
        wait_for(f"http://127.0.0.1:{p_gw}/ready", procs)
        wait_for(
            f"http://127.0.0.1:{p_floor}{PATH}", procs, method="POST", body=request_body("bench-json", False)
        )
        nginx_pids = [nginx.pid, *children(nginx.pid)]
        smoke(p_gw, p_json, p_sse, p_sim)

        b_json = request_body("bench-json", False)
        b_sse = request_body("bench-sse", True)
        b_sim = request_body("bench-sim", True)

        def wrk(port: int, body: bytes, secs: float, watch: list[int]) -> dict[str, Any]:
            url = f"http://127.0.0.1:{port}{PATH}"
            return asdict(run_wrk(url, body, secs, plan.conns, load_core, workdir, watch))

        step("non-stream saturation: direct to nginx, through the gateway, through the floor")
        results["json_direct"] = wrk(p_json, b_json, plan.direct_s, nginx_pids)
        wrk(p_gw, b_json, 1, [gw.pid])  # warm-up
        results["json_gateway"] = wrk(p_gw, b_json, plan.sat_s, [gw.pid])
        results["json_floor"] = wrk(p_floor, b_json, plan.floor_s, [floor.pid])

        step("stream (nginx SSE) saturation: direct and through the gateway")
        results["sse_direct"] = wrk(p_sse, b_sse, plan.direct_s / 2, nginx_pids)
        wrk(p_gw, b_sse, 1, [gw.pid])
        results["sse_gateway"] = wrk(p_gw, b_sse, plan.stream_sat_s, [gw.pid])

        rate = 0.5 * results["json_gateway"]["rps"]
        step(f"non-stream latency at 50% of gateway saturation ({rate:.0f} req/s), interleaved")
        ts = [
            Target("direct", p_json, b_json),
            Target("gateway", p_gw, b_json, gw.pid),
            Target("floor", p_floor, b_json, floor.pid),
        ]
        runner.run(rounds(ts, plan.rounds, plan.round_s, rate=rate))
        results["json_latency"] = {"rate": rate, **{t.name: t.summary() for t in ts}}

        srate = 0.5 * results["sse_gateway"]["rps"]
        step(f"stream (nginx SSE) TTFB at 50% of gateway saturation ({srate:.0f} streams/s)")
        ts = [Target("direct", p_sse, b_sse), Target("gateway", p_gw, b_sse, gw.pid)]
        runner.run(rounds(ts, plan.stream_rounds, plan.stream_round_s, rate=srate))
        results["sse_latency"] = {"rate": srate, **{t.name: t.summary() for t in ts}}

        for key, streams, with_direct in (
            ("sim_light", plan.light_streams, True),
            ("sim_heavy", plan.heavy_streams, False),
        ):
            step(f"stream (simulator, one write per event): {streams} concurrent streams")
            ts = [Target("gateway", p_gw, b_sim, gw.pid), Target("floor", p_floor, b_sim, floor.pid)]
            if with_direct:
                ts.insert(0, Target("direct", p_sim, b_sim))
            n_rounds = plan.sim_rounds if with_direct else max(2, plan.sim_rounds - 1)
            runner.run(rounds(ts, n_rounds, plan.sim_round_s, concurrency=streams))
            results[key] = {"streams": streams, **{t.name: t.summary() for t in ts}}

        step("how much slower a fixed piece of Python runs after the gateway's core has idled")
        results["idle_penalty"] = idle_penalty(gw_core)

        if args.profile:
            results["profile"] = profile(
                args.profile, gw.pid, p_gw, b_json, b_sim, plan, load_core, workdir, runner
            )
        procs.check_alive()
        relays_cpu = cpu_time(gw.pid) + cpu_time(floor.pid)
    finally:
        runner.close()
        procs.stop()
        wall = time.monotonic() - t0
        other = max(0.0, (machine_busy() - busy0) - (own_cpu() - own0))
        on_core = max(0.0, machine_busy(gw_core) - core0 - relays_cpu)
        results["other_cpu"] = {
            "seconds": other,
            "share": other / (wall * (os.cpu_count() or 1)),
            "gateway_core_share": on_core / wall,
        }
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def smoke(p_gw: int, p_json: int, p_sse: int, p_sim: int) -> None:
    """One request of each kind: 200, relayed by the intended replica, the expected body."""
    _, _, raw = http("GET", f"http://127.0.0.1:{p_gw}/admin/replicas")
    by_name = {r["name"]: r["url"] for pool in json.loads(raw)["pools"] for r in pool["replicas"]}
    cases = (("bench-json", False, p_json), ("bench-sse", True, p_sse), ("bench-sim", True, p_sim))
    for model, stream, port in cases:
        status, headers, body = http("POST", f"http://127.0.0.1:{p_gw}{PATH}", request_body(model, stream))
        served = by_name.get(headers.get("x-fortress-replica", ""), "?")
        if status != 200 or served != f"http://127.0.0.1:{port}":
            raise SystemExit(f"smoke test failed for {model}: {status} via {served}: {body[:300]!r}")
        if not stream and json.loads(body) != json.loads(completion_body()):
            raise SystemExit(f"smoke test: the gateway changed the JSON answer: {body[:300]!r}")
        if stream and (not body.endswith(b"data: [DONE]\n\n") or b'"usage":{' in body):
            raise SystemExit(f"smoke test: unexpected stream from {model}: {body[-300:]!r}")


def profile(
    out_dir: str,
    pid: int,
    p_gw: int,
    b_json: bytes,
    b_sim: bytes,
    plan: Plan,
    load_core: int,
    workdir: Path,
    runner: asyncio.Runner,
) -> dict[str, Any]:
    spy = py_spy()
    if spy is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secs = max(4.0, plan.sat_s / 2)
    res: dict[str, Any] = {}
    step("profiling the gateway (py-spy) under non-stream saturation")
    url = f"http://127.0.0.1:{p_gw}{PATH}"
    raw = profile_run(
        spy,
        pid,
        secs,
        out / "json.txt",
        lambda: run_wrk(url, b_json, secs, plan.conns, load_core, workdir, [pid]),
    )
    res["json"] = top_frames(raw)
    step(f"profiling the gateway (py-spy) under {plan.heavy_streams} simulator streams")

    async def streams() -> None:
        t = Target("gateway", p_gw, b_sim)
        await t.open(plan.heavy_streams)
        await closed_loop(t, plan.heavy_streams, secs)
        t.close()

    raw = profile_run(spy, pid, secs, out / "stream.txt", lambda: runner.run(streams()))
    res["stream"] = top_frames(raw)
    print(f"py-spy stacks (collapsed) in {out}/", file=sys.stderr)
    return res


def step(text: str) -> None:
    print(f"- {text}", file=sys.stderr, flush=True)


# -- report ---------------------------------------------------------------------------------


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} µs" if v < 100 else f"{v:,.0f} µs"


def _ms(v: float) -> str:
    return f"{v:.3f} ms"


def idle_penalty(core: int) -> dict[str, float]:
    """CPU µs (median) of a fixed piece of Python run back to back, and after 2 ms and 10 ms
    of sleep, pinned to ``core``. On a virtual machine whose host runs other work while a core
    idles, the caches come back cold: code that runs once per event or per request (as at light
    load) then costs several times what it costs in a busy loop, and the more code, the more."""
    out = subprocess.run(
        ["taskset", "-c", str(core), sys.executable, "-c", _IDLE_PROBE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {k: float(v) for k, v in json.loads(out).items()}


def report(r: dict[str, Any], command: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The markdown section body and the target checks (name, measured, PASS/FAIL)."""
    m = r["machine"]
    jd, jg, jf = r["json_direct"], r["json_gateway"], r["json_floor"]
    sd, sg = r["sse_direct"], r["sse_gateway"]
    lat, sl = r["json_latency"], r["sse_latency"]
    light, heavy = r["sim_light"], r["sim_heavy"]

    def added(section: dict[str, Any], attr: str, who: str = "gateway") -> float:
        return float(section[who][attr] - section["direct"][attr])

    added_p50 = added(lat, "latency_p50_ms")
    light_us = light["gateway"]["cpu_per_event_us"]
    heavy_us = heavy["gateway"]["cpu_per_event_us"]
    verdict = {True: "PASS", False: "FAIL"}
    checks = [
        (
            "non-stream: gateway CPU per request, at saturation",
            f"{jg['cpu_per_request_us'] / 1000:.3f} ms (≤ {TARGET_CPU_PER_REQUEST_MS} ms)",
            verdict[jg["cpu_per_request_us"] / 1000 <= TARGET_CPU_PER_REQUEST_MS],
        ),
        (
            f"stream: gateway CPU per relayed chunk, {light['streams']} streams (light load)",
            f"{light_us:.1f} µs (≤ {TARGET_CPU_PER_CHUNK_US:.0f} µs)",
            verdict[light_us <= TARGET_CPU_PER_CHUNK_US],
        ),
        (
            f"stream: gateway CPU per relayed chunk, {heavy['streams']} streams (heavy load)",
            f"{heavy_us:.1f} µs (≤ {TARGET_CPU_PER_CHUNK_US:.0f} µs)",
            verdict[heavy_us <= TARGET_CPU_PER_CHUNK_US],
        ),
        (
            "non-stream: added p50 latency at half of saturation",
            f"{added_p50:.3f} ms (≤ {TARGET_ADDED_P50_MS} ms)",
            verdict[added_p50 <= TARGET_ADDED_P50_MS],
        ),
        (
            "stream (nginx SSE): added p50 TTFB at half of saturation",
            f"{added(sl, 'ttfb_p50_ms'):.3f} ms (≤ {TARGET_ADDED_TTFB_P50_MS} ms)",
            verdict[added(sl, "ttfb_p50_ms") <= TARGET_ADDED_TTFB_P50_MS],
        ),
        (
            f"stream (simulator, {light['streams']} streams): added p50 TTFB",
            f"{added(light, 'ttfb_p50_ms'):.3f} ms (≤ {TARGET_ADDED_TTFB_P50_MS} ms)",
            verdict[added(light, "ttfb_p50_ms") <= TARGET_ADDED_TTFB_P50_MS],
        ),
    ]

    def sim_rows(sec: dict[str, Any]) -> list[str]:
        g, f = sec["gateway"], sec["floor"]
        d = sec.get("direct")
        lo, hi = g["cpu_per_event_us_range"]
        rows = [
            _row(
                "events relayed (events per relayed chunk)",
                "",
                f"{g['events']:,} at {g['events_per_s']:,.0f}/s ({g['events_per_chunk']:.2f})",
                f"{f['events']:,} at {f['events_per_s']:,.0f}/s ({f['events_per_chunk']:.2f})",
            ),
            _row("relay's core busy", "", f"{g['busy'] * 100:.0f} %", f"{f['busy'] * 100:.0f} %"),
            _row(
                "**CPU per relayed event** (median of rounds; range)",
                "",
                f"**{_us(g['cpu_per_event_us'])}** ({lo:.1f}-{hi:.1f})",
                _us(f["cpu_per_event_us"]),
            ),
            _row(
                "CPU per stream (all of its ~202 events)",
                "",
                _us(g["cpu_per_request_us"]),
                _us(f["cpu_per_request_us"]),
            ),
        ]
        if d is not None:
            for q in ("p50", "p99"):
                k = f"ttfb_{q}_ms"
                rows.append(
                    _row(
                        f"{q} TTFB (added)",
                        _ms(d[k]),
                        f"{_ms(g[k])} (**{g[k] - d[k]:+.3f}**)",
                        f"{_ms(f[k])} ({f[k] - d[k]:+.3f})",
                    )
                )
        return rows

    head3 = [
        _row("", "direct", "through gateway", "through floor relay"),
        _row("---", "---:", "---:", "---:"),
    ]
    lines = [
        f"Measured {r['date']} at commit {m['commit']} on {m['cpu']} ({m['cores']} cores, "
        f"Linux {m['kernel']}), Python {m['python']}, {m['stack']}; upstream nginx {m['nginx']}, "
        f"load from wrk {m['wrk']} and the script's own client. Load average at start: "
        f"{m['loadavg']}. The gateway runs its default configuration except API keys and audit "
        "(off: the benchmark's requests carry neither). It (one process = one worker) and the "
        "floor relay run on "
        f"CPU {r['cores']['gateway']}; nginx, the simulator and all load on CPU "
        f"{r['cores']['load']}. Run time {r['seconds']:.0f} s; other processes used "
        f"{r['other_cpu']['share'] * 100:.0f} % of the machine's CPU meanwhile, "
        f"{r['other_cpu']['gateway_core_share'] * 100:.0f} % of the gateway's"
        + (
            " (a busy machine: latency percentiles and requests/s are unreliable, CPU per "
            "request less so; rerun when it is quiet)."
            if r["other_cpu"]["share"] > 0.05 or r["other_cpu"]["gateway_core_share"] > 0.05
            else "."
        ),
        "",
        "```",
        command,
        "```",
        "",
        "**Targets** (one worker, one core):",
        "",
        _row("target", "measured", "result"),
        _row("---", "---", "---"),
        *(_row(*c) for c in checks),
        "",
        "**Non-streamed chat completion** (~600-byte JSON answer from nginx). The floor relay is "
        "a bare uvloop + httptools relay (no parsing, routing, ASGI or aiohttp): what the kernel "
        "and the event loop alone cost here.",
        "",
        *head3,
        _row(
            f"saturation (wrk -t1 -c{r['plan']['conns']})",
            f"{jd['rps']:,.0f} req/s",
            f"{jg['rps']:,.0f} req/s",
            f"{jf['rps']:,.0f} req/s",
        ),
        _row(
            "CPU per request at saturation",
            f"{_us(jd['cpu_per_request_us'])} (nginx)",
            f"**{_us(jg['cpu_per_request_us'])}**",
            _us(jf["cpu_per_request_us"]),
        ),
        _row(
            "relay's core busy; system (kernel) share of its CPU",
            "",
            f"{jg['busy'] * 100:.0f} %; {jg['system_share'] * 100:.0f} %",
            f"{jf['busy'] * 100:.0f} %; {jf['system_share'] * 100:.0f} %",
        ),
        *(
            _row(
                f"{q} latency at {lat['rate']:,.0f} req/s (added)",
                _ms(lat["direct"][k]),
                f"{_ms(lat['gateway'][k])} (**{added(lat, k):+.3f}**)",
                f"{_ms(lat['floor'][k])} ({added(lat, k, 'floor'):+.3f})",
            )
            for q, k in (("p50", "latency_p50_ms"), ("p99", "latency_p99_ms"))
        ),
        _row(
            f"CPU per request at {lat['rate']:,.0f} req/s (relay's core busy)",
            "",
            f"{_us(lat['gateway']['cpu_per_request_us'])} ({lat['gateway']['busy'] * 100:.0f} %)",
            f"{_us(lat['floor']['cpu_per_request_us'])} ({lat['floor']['busy'] * 100:.0f} %)",
        ),
        "",
        f"**Streamed, nginx upstream** ({SSE_EVENTS} chunks + usage chunk + [DONE] in one "
        "write; the gateway removes the usage chunk the client did not ask for):",
        "",
        _row("", "direct", "through gateway", ""),
        _row("---", "---:", "---:", ""),
        _row(
            f"saturation (wrk -t1 -c{r['plan']['conns']})",
            f"{sd['rps']:,.0f} streams/s",
            f"{sg['rps']:,.0f} streams/s",
            "",
        ),
        _row(
            "CPU per stream",
            f"{_us(sd['cpu_per_request_us'])} (nginx)",
            f"{_us(sg['cpu_per_request_us'])} (= {sg['cpu_per_request_us'] / (SSE_EVENTS + 1):.1f}"
            " µs per event: per-request cost spread thin)",
            "",
        ),
        *(
            _row(
                f"{q} TTFB at {sl['rate']:,.0f} streams/s (added)",
                _ms(sl["direct"][k]),
                f"{_ms(sl['gateway'][k])} (**{added(sl, k):+.3f}**)",
                "",
            )
            for q, k in (("p50", "ttfb_p50_ms"), ("p99", "ttfb_p99_ms"))
        ),
        "",
        f"**Streamed, simulator upstream, light load** (`fortress sim`: {SIM_TOKENS} tokens "
        f"{SIM_ITL * 1000:g} ms apart, each event its own write; {light['streams']} concurrent "
        "streams):",
        "",
        *head3,
        *sim_rows(light),
        "",
        f"**Streamed, simulator upstream, heavy load** ({heavy['streams']} concurrent streams; "
        "the simulator and the client share one core, which caps the event rate):",
        "",
        *head3,
        *sim_rows(heavy),
        "",
        *_idle_lines(r),
        _errors_line(r),
        "",
        _reading(r),
    ]
    prof = r.get("profile")
    if prof:
        lines += [
            "",
            "**Where the gateway's time goes** (py-spy --nonblocking; share of samples by "
            "the innermost Python frame, native code and syscalls included in it):",
            "",
        ]
        for kind, title in (
            ("json", "non-stream saturation"),
            ("stream", f"{heavy['streams']} simulator streams"),
        ):
            p = prof.get(kind) or {}
            if not p.get("samples"):
                continue
            lines += [
                _row(f"{title}: {p['samples']} samples", "share"),
                _row("---", "---:"),
                *(_row(name, f"{share * 100:.1f} %") for name, share in p["packages"]),
                _row("*top functions (self)*", ""),
                *(_row(f"`{name}`", f"{share * 100:.1f} %") for name, share in p["functions"][:10]),
                "",
            ]
    return "\n".join(lines).rstrip("\n") + "\n", checks


def _reading(r: dict[str, Any]) -> str:
    """Where the gateway stands against the floor relay, in this run's figures."""
    jg, jf = r["json_gateway"], r["json_floor"]
    light, heavy = r["sim_light"], r["sim_heavy"]
    text = (
        f"Reading the figures: per non-streamed request the gateway spends "
        f"{jg['cpu_per_request_us'] - jf['cpu_per_request_us']:,.0f} µs of CPU more than the floor "
        f"relay ({jg['cpu_per_request_us'] / jf['cpu_per_request_us']:.0f}x); per relayed event "
        f"{light['gateway']['cpu_per_event_us'] - light['floor']['cpu_per_event_us']:.1f} µs more "
        f"at light load and {heavy['gateway']['cpu_per_event_us'] - heavy['floor']['cpu_per_event_us']:.1f}"
        " µs more at heavy load. The floor's own cost is mostly the kernel (see its system share): "
        "no Python relay on this machine gets below it. At light load each event costs more "
        "because each one wakes the process on its own."
    )
    prof = r.get("profile") or {}
    shares = dict(prof.get("json", {}).get("packages", []))
    if shares:
        text += (
            f" Under non-stream saturation, aiohttp (the upstream client) has "
            f"{shares.get('aiohttp (upstream client)', 0) * 100:.0f} % of the gateway's samples, "
            f"Fortress's own code {shares.get('fortress (our code)', 0) * 100:.0f} % and uvicorn "
            f"{shares.get('uvicorn', 0) * 100:.0f} %."
        )
    return text


def _idle_lines(r: dict[str, Any]) -> list[str]:
    """The machine's idle penalty (``idle_penalty``), when measured."""
    idle = r.get("idle_penalty")
    if not idle:
        return []
    warm, two, ten = idle["0.0"], idle["0.002"], idle["0.01"]
    return [
        f"**Cold after idle** (this machine, CPU {r['cores']['gateway']}): a fixed piece of Python "
        f"(parsing a ~400-byte JSON body) takes {warm:.1f} µs of CPU run back to back, "
        f"{two:.1f} µs ({two / warm:.1f}x) after 2 ms asleep (a stream's gap between events "
        f"here) and {ten:.1f} µs ({ten / warm:.1f}x) after 10 ms. Code that runs once per event "
        "or per request at light load runs at the slow end: the light-load CPU per event and the "
        "added TTFB scale with how much code the path runs, which the floor relay keeps small.",
        "",
    ]


def _errors_line(r: dict[str, Any]) -> str:
    wrk_errors = sum(
        r[k]["errors"] for k in ("json_direct", "json_gateway", "json_floor", "sse_direct", "sse_gateway")
    )
    client = late = 0
    for key in ("json_latency", "sse_latency", "sim_light", "sim_heavy"):
        for v in r[key].values():
            if isinstance(v, dict):
                client += v["failures"]
                late += v["opened_late"]
    return (
        f"Errors: wrk {wrk_errors}, client {client}; open-loop requests that found all of the "
        f"client's pre-opened connections busy: {late}."
    )


def measure(
    script: str,
    argv: list[str],
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any], str], tuple[str, Any]],
) -> tuple[dict[str, Any], str, Any]:
    """Run a benchmark, stamp its results with the date and duration, print its report."""
    command = " ".join([f"python bench/{script}", *map(shlex.quote, argv)])
    t0 = time.monotonic()
    results = run(args)
    results["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["seconds"] = time.monotonic() - t0
    body, checks = report(results, command)
    print()
    print(body)
    return results, body, checks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--floor-relay"]:  # internal: the floor relay process
        routes = {f'"model":"{m}"'.encode(): int(p) for m, p in (a.split("=", 1) for a in argv[2:])}
        floor_relay(int(argv[1]), routes)
        return 0
    ap = argparse.ArgumentParser(
        description="Measure Fortress's gateway overhead (see the module docstring for the method)."
    )
    ap.add_argument("--quick", action="store_true", help="short run (~45 s), rougher figures")
    ap.add_argument(
        "--write-docs",
        action="store_true",
        help="replace the 'Gateway overhead' section of docs/benchmarks.md",
    )
    ap.add_argument(
        "--profile", metavar="DIR", help="also sample the gateway with py-spy under load; stacks go to DIR"
    )
    ap.add_argument("--json", metavar="FILE", help="write the raw results as JSON")
    ap.add_argument("--gateway-core", type=int, default=1, help="CPU for the gateway [1]")
    ap.add_argument("--load-core", type=int, default=0, help="CPU for upstreams and load [0]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    results, body, checks = measure("gateway_overhead.py", argv, args, run, report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.write_docs:
        path = write_section(SECTION, body, "## Gateway overhead")
        print(f"wrote the Gateway overhead section of {path}", file=sys.stderr)
    return 0 if all(c[2] == "PASS" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
