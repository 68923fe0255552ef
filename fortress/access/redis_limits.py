"""The Redis limiter: the same limits as ``MemoryLimiter``, shared by every gateway.

One EVALSHA per admission and one per settle; each script runs atomically in Redis, so
gateways hammering the same key can never admit more than the plan allows together. A key's
Redis keys share the hash tag ``{key_id}`` so they live in one slot of a Redis Cluster.

Keys: ``<prefix>{<key_id>}:b`` (bucket hash: tokens, ts), ``...:c`` (sorted set of in-flight
slots scored by expiry, so a crashed gateway's slots free themselves) and
``...:<metric>:<period>:<period start>`` (counters, kept a day past their period).

The hot path packs each command from bytes prepared once per key and period and sends it on a
pipelined connection (``resp.py``); TTLs are relative so Redis's clock never has to agree with
the gateways'.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

from fortress.access.limits import OK, Clock, Decision, Ticket, amounts_for, new_slot, usage_report
from fortress.access.plans import METRICS, PeriodClock, Plan
from fortress.access.resp import RespConnection, RespError, pack, pack_args

log = logging.getLogger("fortress.access")

# KEYS: bucket, slots, counter...
# ARGV: now, slot, slot score, input reserve, output reserve, rate (-1: none), burst,
#       max_concurrent (-1: none), bucket ttl, slots ttl, then (metric 0|1|2, limit (-1: none),
#       ttl) per counter.
# Returns {reason, failed counter (1-based), tokens before (exact string), in-flight, used...}.
ADMIT = b"""
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[6])
local burst = tonumber(ARGV[7])
local maxc = tonumber(ARGV[8])
local amounts = {1, tonumber(ARGV[4]), tonumber(ARGV[5])}
local n = #KEYS - 2
local used = {}
local reason, failed = 0, 0
if n > 0 then
  local vals = redis.call('MGET', unpack(KEYS, 3))
  for i = 1, n do
    local u = tonumber(vals[i]) or 0
    used[i] = u
    local limit = tonumber(ARGV[9 + i * 3])
    local amount = amounts[tonumber(ARGV[8 + i * 3]) + 1]
    if reason == 0 and limit >= 0 and (u >= limit or u + amount > limit) then
      reason, failed = 1, i
    end
  end
end
local tokens, ts = -1, now
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 't', 'ts')
  local t = tonumber(b[1])
  if t == nil then t = burst else ts = tonumber(b[2]) end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  tokens = math.min(burst, t + elapsed * rate)
  if reason == 0 and tokens < 1 then reason = 2 end
end
local inflight = 0
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[2])
  if reason == 0 and inflight >= maxc then reason = 3 end
end
local out = {reason, failed, string.format('%.17g', tokens), inflight}
if reason ~= 0 then
  for i = 1, n do out[4 + i] = used[i] end
  return out
end
if rate > 0 then
  if now > ts then ts = now end
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens - 1), 'ts', string.format('%.17g', ts))
  redis.call('EXPIRE', KEYS[1], ARGV[9])
end
if maxc > 0 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[10])
  out[4] = inflight + 1
end
for i = 1, n do
  local amount = amounts[tonumber(ARGV[8 + i * 3]) + 1]
  if amount ~= 0 then
    used[i] = redis.call('INCRBY', KEYS[2 + i], amount)
    redis.call('EXPIRE', KEYS[2 + i], ARGV[10 + i * 3])
  end
  out[4 + i] = used[i]
end
return out
"""

# KEYS: slots, counter...; ARGV: slot ('' for none), input delta, output delta, then
# (metric 0|1|2, ttl) per counter.
SETTLE = b"""
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local deltas = {0, tonumber(ARGV[2]), tonumber(ARGV[3])}
for i = 2, #KEYS do
  local d = deltas[tonumber(ARGV[2 * i]) + 1]
  if d ~= 0 then
    redis.call('INCRBY', KEYS[i], d)
    redis.call('EXPIRE', KEYS[i], ARGV[2 * i + 1])
  end
end
return 1
"""

ADMIT_SHA = hashlib.sha1(ADMIT).hexdigest().encode()
SETTLE_SHA = hashlib.sha1(SETTLE).hexdigest().encode()
_KEEP = 86400  # counters outlive their period by a day, so late settles still land


class _Prepared:
    """Everything about one key's commands that does not change until a period rolls over."""

    __slots__ = (
        "admit_head",
        "admit_tail",
        "bounds",
        "ends",
        "names",
        "plan",
        "settle_head",
        "settle_tail",
        "until",
        "windows",
    )

    def __init__(
        self, prefix: str, key_id: str, plan: Plan, bounds: list[tuple[int, int]], slot_ttl: float
    ) -> None:
        self.plan = plan
        self.bounds = bounds
        self.windows = tuple(b[0] for b in bounds)
        self.ends = tuple(b[1] for b in bounds)
        self.until = min(self.ends, default=float("inf"))
        base = f"{prefix}{{{key_id}}}:"
        self.names = [base + "b", base + "c"] + [
            f"{base}{METRICS[c.metric]}:{c.period}:{w}"
            for c, w in zip(plan.counters, self.windows, strict=True)
        ]
        keys = [n.encode() for n in self.names]
        # A counter written anywhere in its period lives at least until a day after it ends.
        ttls = [b"%d" % (end - start + _KEEP) for start, end in bounds]
        n = len(plan.counters)
        static: list[bytes] = [
            repr(plan.rate).encode() if plan.rate is not None else b"-1",
            b"%d" % (plan.burst or 0),
            b"%d" % (plan.max_concurrent or -1),
            b"%d" % (int(plan.burst / plan.rate) + 60 if plan.rate and plan.burst else 60),
            b"%d" % (int(slot_ttl) + 1),
        ]
        for c, ttl in zip(plan.counters, ttls, strict=True):
            static += [b"%d" % c.metric, b"%d" % c.limit if c.limit is not None else b"-1", ttl]
        nkeys = 2 + n
        self.admit_head = b"*%d\r\n" % (3 + nkeys + 5 + len(static)) + pack_args(
            b"EVALSHA", ADMIT_SHA, b"%d" % nkeys, *keys
        )
        self.admit_tail = pack_args(*static)
        settle_static: list[bytes] = []
        for c, ttl in zip(plan.counters, ttls, strict=True):
            settle_static += [b"%d" % c.metric, ttl]
        self.settle_head = b"*%d\r\n" % (3 + nkeys - 1 + 3 + len(settle_static)) + pack_args(
            b"EVALSHA", SETTLE_SHA, b"%d" % (nkeys - 1), *keys[1:]
        )
        self.settle_tail = pack_args(*settle_static)


class RedisLimiter:
    """Limits in Redis. ``settle`` sends its script and returns at once; ``stop`` waits for the
    settles still pending."""

    def __init__(
        self,
        url: str,
        prefix: str = "fortress:",
        slot_ttl: float = 660.0,
        clock: Clock = time.time,
        fail_open: bool = True,
        timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.slot_ttl = slot_ttl  # a slot outlives the longest request (timeouts.total + margin)
        self.clock = clock
        self.fail_open = fail_open
        self.conn = RespConnection(url, timeout)
        self.periods = PeriodClock()
        self.pending: set[asyncio.Future[Any]] = set()
        self._prepared: dict[str, _Prepared] = {}
        self._last_error = 0.0

    async def start(self) -> None:
        """Load the scripts (and so check that Redis answers)."""
        try:
            await self._load_scripts()
        except (RespError, OSError, TimeoutError) as exc:
            if not self.fail_open:
                raise
            log.error(
                "redis limiter at %s unavailable at start, admitting until it is back: %s", self.url, exc
            )

    async def _load_scripts(self) -> None:
        await self.conn.call(pack(b"SCRIPT", b"LOAD", ADMIT))
        await self.conn.call(pack(b"SCRIPT", b"LOAD", SETTLE))

    async def stop(self) -> None:
        await self.drain()
        await self.conn.close()

    async def drain(self, wait: float = 5.0) -> None:
        """Wait for the settles sent so far (retries included)."""
        deadline = time.monotonic() + wait
        while self.pending and time.monotonic() < deadline:
            await asyncio.wait(list(self.pending), timeout=deadline - time.monotonic())

    def _prepare(self, key_id: str, plan: Plan, now: float) -> _Prepared:
        prep = self._prepared.get(key_id)
        if prep is not None and prep.plan is plan and now < prep.until:
            return prep
        bounds = [self.periods.bounds(c.period, now) for c in plan.counters]
        prep = self._prepared[key_id] = _Prepared(self.prefix, key_id, plan, bounds, self.slot_ttl)
        return prep

    async def _eval(self, packed: bytes, script: bytes) -> Any:
        try:
            return await self.conn.call(packed)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # Redis restarted or its scripts were flushed: load again, once.
            await self.conn.call(pack(b"SCRIPT", b"LOAD", script))
            return await self.conn.call(packed)

    async def admit(self, key_id: str, plan: Plan, reserve_in: int, reserve_out: int) -> Decision:
        now = self.clock()
        prep = self._prepare(key_id, plan, now)
        slot = new_slot() if plan.max_concurrent is not None else ""
        packed = (
            prep.admit_head
            + pack_args(
                repr(now).encode(),
                slot.encode(),
                repr(now + self.slot_ttl).encode(),
                b"%d" % reserve_in,
                b"%d" % reserve_out,
            )
            + prep.admit_tail
        )
        try:
            r = await self._eval(packed, ADMIT)
        except (RespError, OSError, TimeoutError) as exc:
            return self._unavailable(key_id, plan, now, prep, exc)
        reason = r[0]
        tokens: float | None = None
        if plan.rate is not None:
            tokens = float(r[2])
            if reason == OK:
                tokens -= 1.0  # the script reports the level before this request took its token
        ticket = None
        if reason == OK:
            amounts = amounts_for(plan, reserve_in, reserve_out)
            reserved = (reserve_in, reserve_out)
            ticket = Ticket(key_id, plan, prep.windows, prep.ends, amounts, slot or None, reserved)
            ticket.prepared = prep
        return Decision(plan, now, reason, max(0, r[1] - 1), tokens, r[3], r[4:], prep.bounds, ticket)

    def _unavailable(self, key_id: str, plan: Plan, now: float, prep: _Prepared, exc: Exception) -> Decision:
        if now - self._last_error > 10:  # one line per 10 s, not one per request
            self._last_error = now
            verdict = "admitting" if self.fail_open else "rejecting"
            log.error("redis limiter unavailable (%s requests): %s", verdict, exc)
        if not self.fail_open:
            raise LimiterUnavailable(str(exc)) from exc
        ticket = Ticket(key_id, plan, prep.windows, prep.ends, (), None, (0, 0))
        ticket.done = True  # nothing was reserved, nothing to settle
        return Decision(plan, now, OK, 0, None, 0, [0] * len(prep.bounds), prep.bounds, ticket)

    def settle(self, ticket: Ticket, used_in: int, used_out: int) -> None:
        if ticket.done:
            return
        ticket.done = True
        d_in = used_in - ticket.reserved_in
        d_out = used_out - ticket.reserved_out
        if ticket.slot is None and d_in == 0 and d_out == 0:
            return  # nothing to tell Redis
        prep: _Prepared = ticket.prepared
        packed = (
            prep.settle_head
            + pack_args((ticket.slot or "").encode(), b"%d" % d_in, b"%d" % d_out)
            + prep.settle_tail
        )
        fut = self.conn.send(packed)
        if fut is None:  # not connected right now: connect and send from a task
            self._retry(packed)
            return
        self.pending.add(fut)
        fut.add_done_callback(lambda f: self._sent(f, packed))

    def _sent(self, fut: asyncio.Future[Any], packed: bytes) -> None:
        self.pending.discard(fut)
        if fut.cancelled() or fut.exception() is None:
            return
        self._retry(packed)

    def _retry(self, packed: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._resend(packed))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _resend(self, packed: bytes) -> None:
        # A settle whose reply was lost may have run already; counters can then be off by that
        # request's correction. Slots are freed idempotently.
        for attempt in range(3):
            try:
                await self._eval(packed, SETTLE)
                return
            except (RespError, OSError, TimeoutError) as exc:
                if attempt == 2:
                    log.error("redis settle lost after 3 tries: %s", exc)
                    return
                await asyncio.sleep(0.2 * (attempt + 1))

    async def usage(self, key_id: str, plan: Plan) -> dict[str, dict[str, int]]:
        prep = self._prepare(key_id, plan, self.clock())
        names = prep.names[2:]
        vals = await self.conn.call(pack(b"MGET", *(n.encode() for n in names))) if names else []
        return usage_report(plan, [int(v) if v is not None else 0 for v in vals])


class LimiterUnavailable(Exception):
    """The shared limiter cannot be reached and ``limits.fail_open`` is off."""
