"""The hostile drill at full scale: what an unauthenticated attacker and a lying replica get.

Runs real processes (one gateway, ``fortress sim`` replicas) with the default limits except where
a phase says otherwise, and reports:

1. **Header drip**: ``--drip`` connections (1,000) each send a request line and then one header
   byte per second. How many the gateway closed, and when (the default ``header_timeout`` is 10 s).
2. **Connection flood**: ``--flood`` idle half-sent requests against ``max_connections: 1000``
   (reserve 32): whether ``/health`` and the admin API still answer (and how fast), what a
   completion gets, and whether the replicas stay healthy (their checks need descriptors too).
3. **Keyless bodies**: 50 connections sending 4 MiB bodies without a key: the gateway's RSS
   growth (the target is under 10 MiB).
4. **Model swap**: one of two replicas starts serving another model under load, with the default
   10 s health checks: answers from the wrong model relayed (the target is none), time until the
   replica is out of rotation.

    python bench/hostile_drill.py [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import machine_line, write_section

PYTHON = sys.executable
AUDIT = {"x-llm-source": "drill", "x-llm-user": "drill", "x-llm-request-type": "chat"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if get(url, 1.0)[0] == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


class World:
    """The processes of one phase, stopped on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def sim(self, model: str, *extra: str) -> str:
        port = free_port()
        log = open(self.tmp / f"sim-{port}.log", "wb")
        self.procs.append(
            subprocess.Popen(
                [PYTHON, "-m", "fortress.sim", "--port", str(port), "--model", model, *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait(url + "/v1/models")
        return url

    def gateway(self, config: str) -> tuple[str, int]:
        port = free_port()
        path = self.tmp / f"gw-{port}.yaml"
        path.write_text(config + f"state_dir: {self.tmp / f'state-{port}'}\n")
        log = open(self.tmp / f"gw-{port}.log", "wb")
        proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "fortress.cli.main",
                "serve",
                "-c",
                str(path),
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait(url + "/ready")
        return url, proc.pid

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


def pool(model: str, *urls: str, interval: float = 10) -> str:
    reps = ", ".join(f"{{url: '{u}'}}" for u in urls)
    return (
        f"pools:\n  - model: {model}\n"
        f"    health_check: {{interval: {interval}, timeout: {min(5, interval)}}}\n"
        f"    replicas: [{reps}]\n"
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- 1. header drip ------------------------------------------------------------------------------


async def drip(port: int, n: int, budget: float) -> dict[str, Any]:
    closed_at: list[float] = []
    t0 = time.monotonic()

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\nx-drip: ")
        try:
            while time.monotonic() - t0 < budget:
                try:
                    data = await asyncio.wait_for(reader.read(65536), 1.0)
                    if not data:
                        closed_at.append(time.monotonic() - t0)
                        return
                except TimeoutError:
                    writer.write(b"a")
                    await writer.drain()
        except OSError:
            closed_at.append(time.monotonic() - t0)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))
    return {
        "connections": n,
        "closed": len(closed_at),
        "median_s": statistics.median(closed_at) if closed_at else None,
        "max_s": max(closed_at) if closed_at else None,
    }


# -- 2. connection flood -------------------------------------------------------------------------


async def flood(url: str, port: int, n: int) -> dict[str, Any]:
    writers = []
    refused = 0
    for _ in range(n):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
            writers.append(w)
        except OSError:
            refused += 1
    await asyncio.sleep(2.0)
    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    health = await loop.run_in_executor(None, get, url + "/health")
    health_ms = (time.perf_counter() - t) * 1000
    admin = await loop.run_in_executor(None, get, url + "/admin/replicas")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    completion = await loop.run_in_executor(None, post, url + "/v1/chat/completions", chat)
    open_now = sum(1 for w in writers if not w.is_closing() and not w.transport.is_closing())
    for w in writers:
        w.close()
    replicas = [r for p in json.loads(admin[1])["pools"] for r in p["replicas"]] if admin[0] == 200 else []
    return {
        "flood": n,
        "connect_failed": refused,
        "health": health[0],
        "health_ms": health_ms,
        "admin": admin[0],
        "completion": completion[0],
        "completion_code": json.loads(completion[1])["error"]["code"] if completion[0] != 200 else None,
        "replicas_healthy": sum(1 for r in replicas if r["state"] == "healthy"),
        "replicas": len(replicas),
        "client_side_open": open_now,
    }


# -- 3. keyless bodies ---------------------------------------------------------------------------


def keyless(port: int, pid: int, n: int = 50) -> dict[str, Any]:
    import socket

    size = 4 * 1024 * 1024
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {size}\r\n\r\n"
    ).encode()
    before = rss_mib(pid)
    socks, answers, peak = [], 0, before

    def send_body(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            chunk = b" " * 65536
            for _ in range(size // len(chunk)):
                s.sendall(chunk)

    threads = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(10)
        s.sendall(head)
        socks.append(s)
        t = threading.Thread(target=send_body, args=(s,), daemon=True)
        t.start()
        threads.append(t)
    for s in socks:
        with contextlib.suppress(OSError):
            if s.recv(65536).startswith(b"HTTP/1.1 401"):
                answers += 1
        peak = max(peak, rss_mib(pid))
    for t in threads:
        t.join(30)
        peak = max(peak, rss_mib(pid))
    for s in socks:
        s.close()
    return {"connections": n, "answered_401": answers, "rss_before_mib": before, "rss_peak_mib": peak}


# -- 4. model swap -------------------------------------------------------------------------------


def swap(url: str, victim: str, seconds: float) -> dict[str, Any]:
    wrong = ok = errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    out_at: list[float] = []
    t0 = time.monotonic()

    def work() -> None:
        nonlocal wrong, ok, errors
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        while time.monotonic() < stop:
            status, raw = post(url + "/v1/chat/completions", body)
            with lock:
                if status != 200:
                    errors += 1
                elif json.loads(raw)["model"] != "fake-model":
                    wrong += 1
                else:
                    ok += 1

    def watch() -> None:
        while time.monotonic() < stop and not out_at:
            table = json.loads(get(url + "/admin/replicas")[1])
            for p in table["pools"]:
                for r in p["replicas"]:
                    if r["url"] == victim and r["state"] == "unhealthy":
                        out_at.append(time.monotonic() - t0)
            time.sleep(0.05)

    post(victim + "/sim/control", {"model": "other-model"})
    threads = [threading.Thread(target=work) for _ in range(8)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "seconds": seconds,
        "answers": ok + wrong,
        "wrong_model_relayed": wrong,
        "errors": errors,
        "out_of_rotation_after_s": out_at[0] if out_at else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drip", type=int, default=1000, help="header-drip connections [1000]")
    ap.add_argument("--flood", type=int, default=1500, help="idle half-sent requests [1500]")
    ap.add_argument("--swap-seconds", type=float, default=30.0, help="model-swap load [30]")
    ap.add_argument("--write-docs", action="store_true", help="write the 'Hostile drill' section")
    args = ap.parse_args()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d, World(Path(d)) as w:
        sim = w.sim("m", "--ttft", "0", "--itl", "0", "--tokens", "4")
        base = "auth: {enabled: false}\naudit: {enabled: false}\n"
        url, _ = w.gateway(base + pool("m", sim))
        port = int(url.rsplit(":", 1)[1])
        print(f"1. header drip: {args.drip} connections", flush=True)
        res["drip"] = asyncio.run(drip(port, args.drip, budget=40.0))
        print("  ", res["drip"], flush=True)

        sim2 = w.sim("m", "--ttft", "0", "--itl", "0", "--tokens", "4")
        capped = base + "server: {max_connections: 1000, reserved_connections: 32}\n"
        url2, _ = w.gateway(capped + pool("m", sim, sim2, interval=1))
        print(f"2. connection flood: {args.flood} half-sent requests, cap 1000 + 32", flush=True)
        res["flood"] = asyncio.run(flood(url2, int(url2.rsplit(":", 1)[1]), args.flood))
        print("  ", res["flood"], flush=True)

        url3, pid3 = w.gateway("audit: {enabled: false}\n" + pool("m", sim))
        print("3. keyless: 50 x 4 MiB", flush=True)
        res["keyless"] = keyless(int(url3.rsplit(":", 1)[1]), pid3)
        print("  ", res["keyless"], flush=True)

        a = w.sim("fake-model", "--ttft", "0", "--itl", "0", "--tokens", "4")
        b = w.sim("fake-model", "--ttft", "0", "--itl", "0", "--tokens", "4")
        url4, _ = w.gateway(base + pool("fake-model", a, b, interval=10))
        print(f"4. model swap under load, {args.swap_seconds:g} s, checks every 10 s", flush=True)
        res["swap"] = swap(url4, a, args.swap_seconds)
        print("  ", res["swap"], flush=True)
    if args.write_docs:
        write_docs(res, " ".join(["python", "bench/hostile_drill.py", *sys.argv[1:]]))
    return 0


def write_docs(res: dict[str, Any], command: str) -> None:
    d, f, k, s = res["drip"], res["flood"], res["keyless"], res["swap"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    grown = k["rss_peak_mib"] - k["rss_before_mib"]
    out_after = s["out_of_rotation_after_s"]
    rows = "\n".join(
        "| " + " | ".join(cells) + " |"
        for cells in (
            (
                f"header drip: {d['connections']} connections sending a header byte a second "
                "(`header_timeout` 10 s)",
                f"{d['closed']} closed, median {d['median_s']:.1f} s, last {d['max_s']:.1f} s",
            ),
            (
                f"flood: {f['flood']} idle half-sent requests, `max_connections` 1000 + 32 reserved",
                f"`/health` {f['health']} in {f['health_ms']:.0f} ms, `/admin/replicas` {f['admin']}, "
                f"a completion {f['completion']} `{f['completion_code']}`, "
                f"{f['replicas_healthy']} of {f['replicas']} replicas healthy",
            ),
            (
                "50 keyless requests with 4 MiB bodies",
                f"{k['answered_401']} answered 401 before the body; RSS {k['rss_before_mib']:.0f} MiB, "
                f"peak +{grown:.1f} MiB",
            ),
            (
                "one of two replicas switches models under load, checks every 10 s",
                f"{s['wrong_model_relayed']} wrong of {s['answers']} answers in {s['seconds']:g} s "
                f"({s['errors']} errors); out of rotation after "
                + (f"{out_after:.2f} s" if out_after is not None else "(not seen)"),
            ),
        )
    )
    body = f"""Measured {when} on {machine_line()}, open-file limit {os.sysconf("SC_OPEN_MAX")}, with
`{command}`: real processes (one gateway per phase, `fortress sim` replicas), default limits
except where a row says otherwise.

| phase | result |
| --- | --- |
{rows}
"""
    print(write_section("hostile", body, "## Hostile drill", after="before-after"))


if __name__ == "__main__":
    raise SystemExit(main())
