"""Active health checks: one task per replica, beside the request path, never inside it.

Each check is a GET of the pool's check path with the pool's timeout; a status in
``expected_status`` passes. Then the replica's ``/v1/models`` is read (on every check: it is
cheap, and one request when the check path is ``/v1/models``), so the router learns and keeps
verifying which model it serves. A replica that reports another model than its pool's is taken
out of rotation at once, without waiting for ``unhealthy_threshold`` (``Replica.misidentify``),
and comes back through ``healthy_threshold`` passing checks once it serves the right one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import orjson

from fortress.routing.pool import Router
from fortress.routing.replica import Replica, State

log = logging.getLogger("fortress.health")

MODELS_PATH = "/v1/models"


class HealthChecker:
    """Runs the active checks of every replica in a ``Router``."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._tasks: dict[Replica, asyncio.Task[None]] = {}
        self._wake: dict[Replica, asyncio.Event] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            skip_auto_headers=("User-Agent",),
        )
        self.router.on_added.append(self.watch)
        self.router.on_removed.append(self.unwatch)
        for r in list(self.router.all_replicas()):
            self.watch(r)

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    def watch(self, replica: Replica) -> None:
        if replica not in self._tasks:
            self._wake[replica] = asyncio.Event()
            self._tasks[replica] = asyncio.create_task(self._loop(replica), name=f"health-{replica.name}")

    def unwatch(self, replica: Replica) -> None:
        task = self._tasks.pop(replica, None)
        self._wake.pop(replica, None)
        if task is not None:
            task.cancel()

    def poke(self, replica: Replica) -> None:
        """Re-plan the next check (after an ejection changed ``next_check_at``)."""
        ev = self._wake.get(replica)
        if ev is not None:
            ev.set()

    async def _loop(self, replica: Replica) -> None:
        clock = self.router.clock
        wake = self._wake[replica]
        while True:
            delay = replica.next_check_at - clock()
            if delay > 0:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
                if clock() < replica.next_check_at:
                    continue
            await self.check_once(replica)

    async def check_once(self, replica: Replica) -> None:
        """Run one check and apply its result."""
        ok, detail, body = await self._probe(replica)
        if ok:
            # The check path may be /v1/models itself: then one request answers both questions.
            models_body = body if replica.check.path == MODELS_PATH else None
            ok, detail = await self._verify_model(replica, models_body)
        before = replica.state
        changed = replica.record_check(ok, detail, self.router.clock(), time.time())
        if changed:
            # Becoming healthy is good news; losing health (or failing the first check) is not.
            level = logging.INFO if replica.state is State.HEALTHY else logging.WARNING
            log.log(
                level,
                "replica %s (%s) %s -> %s: %s",
                replica.name,
                replica.url,
                before,
                replica.state,
                replica.reason,
            )

    async def _probe(self, replica: Replica) -> tuple[bool, str, bytes]:
        assert self._session is not None
        hc = replica.check
        try:
            async with self._session.get(
                replica.url + hc.path, timeout=aiohttp.ClientTimeout(total=hc.timeout)
            ) as resp:
                body = await resp.read()
                if resp.status in hc.expected_status:
                    return True, f"{resp.status}", body
                return False, f"status {resp.status}", b""
        except TimeoutError:
            return False, f"timeout after {hc.timeout:g}s", b""
        except aiohttp.ClientConnectorError as exc:
            return False, f"connect failed: {exc.os_error.strerror or exc}", b""
        except (aiohttp.ClientError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}", b""

    async def _verify_model(self, replica: Replica, body: bytes | None) -> tuple[bool, str]:
        """Read what the replica serves (every check: /v1/models is cheap) and judge it."""
        assert self._session is not None
        try:
            if body is None:
                async with self._session.get(
                    replica.url + MODELS_PATH,
                    timeout=aiohttp.ClientTimeout(total=replica.check.timeout),
                ) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        return False, f"{MODELS_PATH} status {resp.status}"
            ids = frozenset(str(m["id"]) for m in orjson.loads(body)["data"])
        except TimeoutError:
            return False, f"{MODELS_PATH} timeout"
        except (aiohttp.ClientError, OSError, ValueError, KeyError, TypeError) as exc:
            return False, f"{MODELS_PATH} unreadable: {type(exc).__name__}"
        self.router.set_models(replica, ids)
        now = self.router.clock()
        want = replica.expected_model
        if want is not None and want not in ids:
            served = ", ".join(sorted(ids)) or "no model"
            if replica.misidentify(served, want, "check", now):
                log.warning(
                    "replica %s (%s) serves %s, not %r: out of rotation until it serves %r again",
                    replica.name,
                    replica.url,
                    served,
                    want,
                    want,
                )
            return False, f"serves {served}, not {want!r}"
        if replica.identity_confirmed(now):
            log.info("replica %s (%s) serves %r again", replica.name, replica.url, want)
        elif replica.wrong_model is not None:
            # Its answers named another model: /v1/models alone does not clear it before the hold.
            return False, f"answered as {replica.wrong_model}"
        return True, "200"
