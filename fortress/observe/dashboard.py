"""The live dashboard at ``/dashboard``: a static page that polls ``/dashboard/data``.

Everything the page needs ships in the package (``static/``, with uPlot vendored under
``static/vendor/``); nothing is fetched from elsewhere, and the page's Content-Security-Policy
says so. ``/dashboard/data`` is one JSON document: the last 10 s and 60 s of traffic, a
five-minute series, the last hour's history (``History``: traffic and replica health every
5 s, kept by the gateway so a reload loses nothing; ``?since=<t>`` returns only newer points),
replicas per tier, the replica table with the engines' own numbers, the alarms, the fleet's
pools (desired and current replicas over time, recent decisions) and the machine (GPUs, or the
gateway's CPU and memory).
"""

from __future__ import annotations

import importlib.resources
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fortress.config import TIER_ORDER
from fortress.core import errors
from fortress.core.admin import COOKIE, admin_allowed, cookie_value
from fortress.core.asgi import Receive, Scope, Send, query, respond, respond_error, respond_json
from fortress.observe.alarms import slot_down
from fortress.observe.system import CpuMeter, GpuProbe, host_memory, process_rss
from fortress.observe.window import History, RecentTraffic, Summary
from fortress.routing.pool import Router
from fortress.routing.replica import State

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'"
)
SERIES_SECONDS = 300
SERIES_STEP = 2


def _load_static() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    root = importlib.resources.files("fortress.observe") / "static"

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            name = prefix + child.name
            if child.is_dir():
                walk(child, name + "/")
            else:
                suffix = "." + child.name.rsplit(".", 1)[-1] if "." in child.name else ""
                files[name] = (child.read_bytes(), _TYPES.get(suffix, "text/plain; charset=utf-8"))

    walk(root, "")
    return files


def replica_health(router: Router, slots: list[dict[str, Any]] | None = None) -> dict[str, dict[str, int]]:
    """Healthy, unhealthy and total replicas per tier. Local replicas whose process is down
    (``slot_down``) are out of the router: they count as unhealthy and in the total."""
    tiers = {str(t): {"healthy": 0, "unhealthy": 0, "total": 0} for t in TIER_ORDER}
    for r in router.all_replicas():
        t = tiers[str(r.tier)]
        t["total"] += 1
        t["healthy"] += r.state is State.HEALTHY
        t["unhealthy"] += r.state is State.UNHEALTHY
    for slot in slots or ():
        if slot_down(slot) and router.replica_named(slot["name"]) is None:
            t = tiers[slot["tier"]]
            t["total"] += 1
            t["unhealthy"] += 1
    return tiers


def _point(s: Summary) -> dict[str, Any]:
    return {
        "requests": s.requests,
        "rps": s.request_rate,
        "errors_4xx": s.errors_4xx,
        "errors_5xx": s.errors_5xx,
        "rate_limited": s.rate_limited,
        "tokens_in": s.tokens_in,
        "tokens_out": s.tokens_out,
        "tokens_per_s": s.tokens_per_s,
        "avg_latency": s.avg_latency,
        "p50": s.p50,
        "p95": s.p95,
        "p99": s.p99,
        "ttft_p50": s.ttft_p50,
        "ttft_p95": s.ttft_p95,
    }


class Dashboard:
    """Serves the page, its static files and its data."""

    def __init__(
        self,
        router: Router,
        recent: RecentTraffic,
        admin_token: str | None,
        gpus: GpuProbe | None = None,
        alarms: Callable[[], dict[str, Any]] | None = None,
        history: History | None = None,
        slots: Callable[[], list[dict[str, Any]]] | None = None,
        fleet: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.router = router
        self.recent = recent
        self.admin_token = admin_token
        self.gpus = gpus
        self.alarms = alarms
        self.history = history if history is not None else History()
        # The supervisor's slots (status rows), for local replicas that are down.
        self.slots = slots
        # The fleet's pools: desired and current replicas, recent decisions.
        self.fleet = fleet
        self.cpu = CpuMeter()
        self.static = _load_static()
        self.started = time.time()
        # No series points from before the gateway started (a restart shows no fake idle minutes).
        self.series_start = int(recent.clock())
        # Finished steps of the series never change: keep them (end second → point).
        self._points: dict[int, dict[str, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await respond_error(send, errors.method_not_allowed("Use GET."))
            return
        if path in ("/dashboard", "/dashboard/"):
            await self._page(scope, send)
            return
        if not admin_allowed(scope, self.admin_token, allow_cookie=True):
            await respond_error(send, errors.admin_required())
            return
        if path == "/dashboard/data":
            try:
                since = float(query(scope).get("since") or "nan")
            except ValueError:
                since = math.nan
            data = self.data(None if math.isnan(since) else since)
            await respond_json(send, 200, data, [(b"cache-control", b"no-store")])
        elif path.startswith("/dashboard/static/") and path[len("/dashboard/static/") :] in self.static:
            body, ctype = self.static[path[len("/dashboard/static/") :]]
            await respond(send, 200, body, ctype, [(b"cache-control", b"no-cache")])
        else:
            await respond_error(send, errors.not_found(scope["method"], path))

    async def _page(self, scope: Scope, send: Send) -> None:
        token = query(scope).get("token")
        if token and self.admin_token:
            import hmac

            if hmac.compare_digest(token.encode(), self.admin_token.encode()):
                # Trade the token in the URL for a cookie, and drop it from the address bar.
                cookie = f"{COOKIE}={cookie_value(token)}; Path=/; HttpOnly; SameSite=Strict"
                await respond(
                    send,
                    303,
                    b"",
                    "text/plain",
                    [(b"location", b"/dashboard"), (b"set-cookie", cookie.encode())],
                )
                return
        if not admin_allowed(scope, self.admin_token, allow_cookie=True):
            body = (
                b"<!doctype html><title>Fortress</title><p>The dashboard needs the admin token: "
                b"open <code>/dashboard?token=&lt;server.admin_token&gt;</code> once.</p>"
            )
            await respond(send, 401, body, _TYPES[".html"])
            return
        body, ctype = self.static["index.html"]
        await respond(
            send, 200, body, ctype, [(b"content-security-policy", _CSP), (b"cache-control", b"no-cache")]
        )

    # -- data -------------------------------------------------------------------------------

    def data(self, since: float | None = None) -> dict[str, Any]:
        """The JSON document the page polls; ``since``: only history points taken after it."""
        now = self.recent.clock()
        last10 = self.recent.summary(10, now)
        last60 = self.recent.summary(60, now)
        return {
            "now": time.time(),
            "uptime": time.time() - self.started,
            "last_10s": _point(last10),
            "last_60s": _point(last60),
            "totals": self.recent.totals(),
            "series": self._series(now),
            "series_step": SERIES_STEP,
            "history": self.history.points(since),
            "history_step": self.history.step,
            **self._replicas(),
            "alarms": self.alarms()["alarms"] if self.alarms is not None else [],
            "fleet": [
                {k: p[k] for k in ("pool", "desired", "current", "recent_decisions")}
                for p in (self.fleet() if self.fleet is not None else [])
            ],
            "machine": self._machine(),
        }

    def _series(self, now: float) -> list[dict[str, Any]]:
        last = int(now)
        # Whole steps only, aligned so a finished step is computed once and cached.
        end = last - last % SERIES_STEP
        points = []
        ends = range(end - SERIES_SECONDS + SERIES_STEP, end + 1, SERIES_STEP)
        wall_offset = time.time() - now
        for e in ends:
            if e <= self.series_start:
                continue
            p = self._points.get(e)
            if p is None:
                # The step ending at second `e` covers seconds e-2 and e-1.
                p = _point(self.recent.summary(SERIES_STEP, now=e - 0.5))
                if e <= last:  # the step is over: it will not change any more
                    self._points[e] = p
            points.append({"t": e + wall_offset, **p})
        for stale in [k for k in self._points if k < ends.start]:
            del self._points[stale]
        return points

    def _replicas(self) -> dict[str, Any]:
        tiers = replica_health(self.router, self.slots() if self.slots is not None else None)
        models: dict[str, dict[str, int]] = {}
        rows = []
        for pool in self.router.pools:
            for r in pool.replicas:
                model = pool.model or ",".join(sorted(r.models)) or "?"
                healthy = r.state is State.HEALTHY
                m = models.setdefault(model, {"healthy": 0, "total": 0})
                m["total"] += 1
                m["healthy"] += healthy
                s = r.load
                rows.append(
                    {
                        "name": r.name,
                        "url": r.url,
                        "model": model,
                        "tier": str(r.tier),
                        "state": str(r.state),
                        "reason": r.reason,
                        "in_flight": r.in_flight,
                        "served": r.served,
                        "failures": r.failures,
                        "incarnation": r.incarnation,
                        "ejected": r.ejected,
                        "last_check_at": r.last_check_at,
                        "last_check_ok": r.last_check_ok,
                        "last_check_detail": r.last_check_detail,
                        "engine": asdict(s) if s is not None else None,
                    }
                )
        return {"tiers": tiers, "models": models, "replicas": rows}

    def _machine(self) -> dict[str, Any]:
        gpus = [asdict(g) for g in self.gpus.sample()] if self.gpus is not None else []
        mem = host_memory()
        return {
            "gpus": gpus,
            "cpu_percent": self.cpu.percent(),
            "rss_bytes": process_rss(),
            "host_memory": {"used": mem[0], "total": mem[1]} if mem else None,
        }
