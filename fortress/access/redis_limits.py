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

**Outages.** Every Redis call is bounded by ``timeout`` (connecting included). After
``breaker_failures`` failures in a row the circuit opens: no Redis call at all, every decision
is immediate. Every ``breaker_reset`` seconds one PING probes Redis (half-open); when it answers,
what was owed is added back and the circuit closes. While Redis is unavailable, ``fail_open``
admits through a ``MemoryLimiter`` of this gateway (the same plans, enforced per gateway rather
than in total; quotas start from the last usage Redis reported) and counts every such admission;
they, their settled token usage and the settles Redis missed are replayed into the key's counters
when it is back (the bucket is not replayed), each batch applied once. Without ``fail_open``
the limiter raises ``LimiterUnavailable`` (the gateway answers 503). A call that timed out may
still run when a frozen Redis resumes: its admission (or settle) then counts twice, never zero
times.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from typing import Any

from fortress.access.limits import (
    INPUT,
    OK,
    OUTPUT,
    Clock,
    Decision,
    MemoryLimiter,
    Ticket,
    amounts_for,
    new_slot,
    usage_report,
)
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

# KEYS: batch marker, slots, counter...; ARGV: number of slots to free (n), the n slots, then
# (delta, ttl) per counter. Adds what a gateway owes Redis after an outage, atomically per key and
# once per batch: a batch sent again after its reply was lost finds its marker and does nothing.
REPLAY = b"""
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then return 0 end
local n = tonumber(ARGV[1])
for i = 2, n + 1 do redis.call('ZREM', KEYS[2], ARGV[i]) end
for i = 3, #KEYS do
  local d = tonumber(ARGV[n + 2 * i - 4])
  if d ~= 0 then
    redis.call('INCRBY', KEYS[i], d)
    redis.call('EXPIRE', KEYS[i], ARGV[n + 2 * i - 3])
  end
end
return 1
"""

ADMIT_SHA = hashlib.sha1(ADMIT).hexdigest().encode()
SETTLE_SHA = hashlib.sha1(SETTLE).hexdigest().encode()
REPLAY_SHA = hashlib.sha1(REPLAY).hexdigest().encode()
_KEEP = 86400  # counters outlive their period by a day, so late settles still land
_PING = pack(b"PING")
_REPLAY_BATCH = 256  # keys replayed per round trip
# What an unavailable Redis raises: error replies, lost or refused connections, timeouts.
_ERRORS = (RespError, OSError, TimeoutError)

CLOSED, OPEN, HALF_OPEN = "ok", "open", "half_open"


class _Prepared:
    """Everything about one key's commands that does not change until a period rolls over."""

    __slots__ = (
        "admit_head",
        "admit_tail",
        "base",
        "bounds",
        "ends",
        "last_used",
        "names",
        "plan",
        "settle_head",
        "settle_tail",
        "ttls",
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
        self.last_used: list[int] | None = None  # counters as Redis last reported them
        base = self.base = f"{prefix}{{{key_id}}}:"
        self.names = [base + "b", base + "c"] + [
            f"{base}{METRICS[c.metric]}:{c.period}:{w}"
            for c, w in zip(plan.counters, self.windows, strict=True)
        ]
        keys = [n.encode() for n in self.names]
        # A counter written anywhere in its period lives at least until a day after it ends.
        self.ttls = [end - start + _KEEP for start, end in bounds]
        ttls = [b"%d" % t for t in self.ttls]
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


class _Local:
    """``Ticket.prepared`` of an admission made by the local fallback while Redis was unavailable."""

    __slots__ = ("limiter", "prep")

    def __init__(self, limiter: MemoryLimiter, prep: _Prepared) -> None:
        self.limiter = limiter  # the fallback that holds its local slot (replaced after an outage)
        self.prep = prep  # the Redis counters its usage belongs to


class _Owed:
    """What one key owes Redis: counter deltas, slots to free, admissions it never saw."""

    __slots__ = ("admissions", "base", "batch", "counters", "key_id", "slots")

    def __init__(self, key_id: str, base: str) -> None:
        self.key_id = key_id
        self.base = base  # "<prefix>{<key_id>}:"
        self.slots: list[str] = []
        self.counters: dict[str, list[int]] = {}  # counter key -> [delta, ttl]
        self.admissions = 0
        self.batch = os.urandom(8).hex()  # sent again as is until Redis confirms it

    def add(self, name: str, delta: int, ttl: int) -> None:
        c = self.counters.get(name)
        if c is None:
            self.counters[name] = [delta, ttl]
        else:
            c[0] += delta
            c[1] = max(c[1], ttl)

    def command(self) -> bytes:
        names = [f"{self.base}r:{self.batch}", self.base + "c", *self.counters]
        args = [b"%d" % len(self.slots), *(s.encode() for s in self.slots)]
        for delta, ttl in self.counters.values():
            args += [b"%d" % delta, b"%d" % ttl]
        return pack(b"EVALSHA", REPLAY_SHA, b"%d" % len(names), *(n.encode() for n in names), *args)


def _deltas(plan: Plan, d_in: int, d_out: int) -> list[int]:
    """A settle's correction per counter of ``plan`` (request counters never change)."""
    return [d_in if m == INPUT else d_out if m == OUTPUT else 0 for m in plan.metrics]


class RedisLimiter:
    """Limits in Redis, with a bounded cost when Redis is slow or gone (see the module doc).

    ``settle`` sends its script and returns at once; ``stop`` waits for the settles still pending
    and adds what is still owed when Redis answers.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "fortress:",
        slot_ttl: float = 660.0,
        clock: Clock = time.time,
        fail_open: bool = True,
        timeout: float = 0.25,
        breaker_failures: int = 3,
        breaker_reset: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.slot_ttl = slot_ttl  # a slot outlives the longest request (timeouts.total + margin)
        self.clock = clock
        self.fail_open = fail_open
        self.timeout = timeout
        self.breaker_failures = breaker_failures
        self.breaker_reset = breaker_reset
        # The connection's watchdog drops it, failing every call waiting on it, once the oldest
        # has waited its timeout; it looks every timeout / 2. With timeout / 1.5 there, no call
        # waits longer than ``timeout``, at no cost per call (a timer per call costs ~2 µs).
        self.conn = RespConnection(url, timeout / 1.5)
        opts = self.conn.options
        # For logs: never the URL itself, which may carry a password.
        self.where = opts.get("path") or f"{opts.get('host', '127.0.0.1')}:{opts.get('port', 6379)}"
        self.periods = PeriodClock()
        self.pending: set[asyncio.Future[Any]] = set()
        self._prepared: dict[str, _Prepared] = {}
        self._late = f"redis did not answer within {timeout:g}s"
        # The circuit breaker.
        self._state = CLOSED
        self._failures = 0  # consecutive, counted once per wave (see _failed)
        self._epoch = 0  # bumped on every counted failure
        self._reason = ""
        self._opened_at = 0.0
        self._recovery: asyncio.Task[None] | None = None
        # While Redis is unavailable: this gateway's own limiter and what it owes Redis.
        self.local = MemoryLimiter(clock)
        self._owed: dict[str, _Owed] = {}  # owed since the last flush, per key
        self._unsure: list[_Owed] = []  # sent, outcome unknown: sent again as the same batch
        self._flusher: asyncio.Task[None] | None = None
        self._pending_replay = 0
        self.fail_open_total = 0
        self.fail_open_by_key: dict[str, int] = {}  # admissions made while Redis was unavailable
        self.errors_total = 0
        self.opens_total = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the scripts (and so check that Redis answers); if it does not, open the circuit
        (``fail_open``) or raise."""
        try:
            await self._load_scripts()
        except _ERRORS as exc:
            if not self.fail_open:
                raise
            self.errors_total += 1
            self._open(exc)

    async def _load_scripts(self) -> None:
        for script in (ADMIT, SETTLE, REPLAY):
            await self._call(pack(b"SCRIPT", b"LOAD", script))

    async def stop(self) -> None:
        """Stop probing, wait for pending settles, add what is still owed if Redis answers."""
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
            self._recovery = None
        if self._flusher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.drain()
        if self._owes():
            try:
                await self._flush()
            except _ERRORS as exc:
                self.errors_total += 1
                if self._pending_replay:
                    log.warning(
                        "redis limiter at %s: %d admissions made while it was unavailable could not be "
                        "added to usage at shutdown: %s",
                        self.where,
                        self._pending_replay,
                        exc,
                    )
        await self.conn.close()

    async def drain(self, wait: float = 5.0) -> None:
        """Wait for the settles sent so far."""
        deadline = time.monotonic() + wait
        while self.pending and time.monotonic() < deadline:
            await asyncio.wait(list(self.pending), timeout=deadline - time.monotonic())

    def stats(self) -> dict[str, Any]:
        """Health of the shared limiter, for metrics and alarms.

        ``limiter_state``: ``ok`` | ``open`` (Redis unavailable, not called) | ``half_open``
        (probing); ``fail_open_admissions_total``: admissions made without Redis (per key:
        ``fail_open_by_key``); ``redis_errors_total``: failed Redis calls;
        ``breaker_opens_total``: outages; ``pending_replay``: admissions not yet added to Redis.
        """
        return {
            "limiter_state": self._state,
            "fail_open_admissions_total": self.fail_open_total,
            "redis_errors_total": self.errors_total,
            "breaker_opens_total": self.opens_total,
            "pending_replay": self._pending_replay,
        }

    # -- Redis calls ----------------------------------------------------------------------------

    async def _call(self, packed: bytes) -> Any:
        """One command, answered within ``timeout`` (connecting included), else ``TimeoutError``
        or ``ConnectionLost`` (the watchdog dropped the connection)."""
        fut = self.conn.send(packed)
        if fut is None:  # not connected: connecting counts against the same bound
            try:
                async with asyncio.timeout(self.timeout):
                    return await self.conn.call(packed)
            except TimeoutError:
                raise TimeoutError(self._late) from None
        return await fut  # bounded by the connection's watchdog (see __init__)

    async def _eval(self, packed: bytes, script: bytes) -> Any:
        try:
            return await self._call(packed)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # Redis restarted or its scripts were flushed: load again, once.
            await self._call(pack(b"SCRIPT", b"LOAD", script))
            return await self._call(packed)

    # -- the circuit breaker ----------------------------------------------------------------------

    def _failed(self, exc: BaseException, epoch: int) -> None:
        """Count a failed call issued at ``epoch``. Pipelined calls fail together (one lost
        connection fails them all), so only the first failure of calls issued before the last
        counted one counts: ``breaker_failures`` means that many attempts in a row."""
        self.errors_total += 1
        if self._state != CLOSED or epoch != self._epoch:
            return
        self._epoch += 1
        self._failures += 1
        if self._failures >= self.breaker_failures:
            self._open(exc)
        else:
            log.debug("redis limiter at %s: call failed (%d in a row): %s", self.where, self._failures, exc)

    def _open(self, exc: BaseException) -> None:
        self._state = OPEN
        self._reason = f"{type(exc).__name__}: {exc}"
        self._opened_at = time.monotonic()
        self.opens_total += 1
        verdict = (
            "admitting through this gateway's own limiter (plans enforced per gateway, not in total)"
            if self.fail_open
            else "answering 503"
        )
        log.warning(
            "redis limiter at %s unavailable (%s): circuit open, %s; probing every %gs",
            self.where,
            self._reason,
            verdict,
            self.breaker_reset,
        )
        self._recovery = asyncio.get_running_loop().create_task(
            self._recover(), name="fortress-limiter-recovery"
        )

    async def _recover(self) -> None:
        """Probe every ``breaker_reset`` s; once Redis answers, add what is owed, then close."""
        added = 0
        while True:
            await asyncio.sleep(self.breaker_reset)
            self._state = HALF_OPEN
            try:
                await self._call(_PING)
                for _ in range(3):  # local admissions go on while replaying: a few passes
                    if not self._owes():
                        break
                    added += await self._flush()
            except _ERRORS as exc:
                self.errors_total += 1
                self._state = OPEN
                log.debug("redis limiter at %s: still unavailable: %s", self.where, exc)
                continue
            break
        self._state = CLOSED
        self._failures = 0
        self._epoch += 1
        self._recovery = None
        self.local = MemoryLimiter(self.clock)  # the next outage starts from Redis's numbers again
        log.info(
            "redis limiter at %s is back after %.1fs: %d admissions made meanwhile added to usage%s",
            self.where,
            time.monotonic() - self._opened_at,
            added,
            f" ({self._pending_replay} more pending)" if self._pending_replay else "",
        )
        if self._owes():
            self._kick()

    def _unavailable(self, exc: BaseException | None) -> LimiterUnavailable:
        # Clients may see this message (503): no address, no internals; the log has those.
        why = "circuit open" if exc is None else "no answer"
        return LimiterUnavailable(f"the shared limiter (Redis) is unavailable ({why})")

    # -- what is owed to Redis ------------------------------------------------------------------

    def _owe(self, key_id: str, prep: _Prepared, deltas: Any, slot: str | None, admissions: int) -> None:
        """Remember for the replay: per-counter ``deltas`` (or None), a slot to free, admissions."""
        owed = self._owed.get(key_id)
        if owed is None:
            owed = self._owed[key_id] = _Owed(key_id, prep.base)
        if slot:
            owed.slots.append(slot)
        if deltas is not None:
            for name, ttl, d in zip(prep.names[2:], prep.ttls, deltas, strict=True):
                if d:
                    owed.add(name, d, ttl)
        owed.admissions += admissions
        self._pending_replay += admissions

    async def _flush(self) -> int:
        """Add what is owed to Redis, one batch per key; the admissions added. A batch that
        fails is kept as it is and sent again later (the script applies each batch once); the
        error is raised."""
        batches, self._unsure = self._unsure + list(self._owed.values()), []
        self._owed = {}
        added = 0
        error: BaseException | None = None
        try:
            while batches and error is None:
                chunk, batches = batches[:_REPLAY_BATCH], batches[_REPLAY_BATCH:]
                try:
                    results = await asyncio.gather(
                        *(self._eval(o.command(), REPLAY) for o in chunk), return_exceptions=True
                    )
                except BaseException:  # cancelled (stop): this chunk's outcome is unknown
                    self._unsure += chunk
                    raise
                for o, res in zip(chunk, results, strict=True):
                    if isinstance(res, BaseException):
                        error = res
                        self._unsure.append(o)
                    else:
                        added += o.admissions
                        self._pending_replay -= o.admissions
        finally:
            self._unsure += batches  # not sent yet
        if error is not None:
            raise error
        return added

    def _owes(self) -> bool:
        return bool(self._owed or self._unsure)

    def _kick(self) -> None:
        """Flush what is owed in the background, once Redis is known to answer."""
        if self._state == CLOSED and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_now())

    async def _flush_now(self) -> None:
        epoch = self._epoch
        try:
            await self._flush()
        except _ERRORS as exc:
            self._failed(exc, epoch)

    # -- the request path -----------------------------------------------------------------------

    def _prepare(self, key_id: str, plan: Plan, now: float) -> _Prepared:
        prep = self._prepared.get(key_id)
        if prep is not None and prep.plan is plan and now < prep.until:
            return prep
        bounds = [self.periods.bounds(c.period, now) for c in plan.counters]
        prep = self._prepared[key_id] = _Prepared(self.prefix, key_id, plan, bounds, self.slot_ttl)
        return prep

    async def admit(self, key_id: str, plan: Plan, reserve_in: int, reserve_out: int) -> Decision:
        now = self.clock()
        prep = self._prepare(key_id, plan, now)
        if self._state != CLOSED:
            return self._fallback(key_id, plan, reserve_in, reserve_out, prep, None)
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
        epoch = self._epoch
        try:
            r = await self._eval(packed, ADMIT)
        except _ERRORS as exc:
            self._failed(exc, epoch)
            if slot and not isinstance(exc, RespError):
                # The script may still run when a frozen Redis resumes: free its slot then.
                self._owe(key_id, prep, None, slot, 0)
            return self._fallback(key_id, plan, reserve_in, reserve_out, prep, exc)
        self._failures = 0
        if self._owed or self._unsure:
            self._kick()
        reason = r[0]
        tokens: float | None = None
        if plan.rate is not None:
            tokens = float(r[2])
            if reason == OK:
                tokens -= 1.0  # the script reports the level before this request took its token
        used = prep.last_used = r[4:]
        ticket = None
        if reason == OK:
            amounts = amounts_for(plan, reserve_in, reserve_out)
            reserved = (reserve_in, reserve_out)
            ticket = Ticket(key_id, plan, prep.windows, prep.ends, amounts, slot or None, reserved)
            ticket.prepared = prep
        return Decision(plan, now, reason, max(0, r[1] - 1), tokens, r[3], used, prep.bounds, ticket)

    def _fallback(
        self,
        key_id: str,
        plan: Plan,
        reserve_in: int,
        reserve_out: int,
        prep: _Prepared,
        exc: BaseException | None,
    ) -> Decision:
        """Decide without Redis: this gateway's own limiter, or LimiterUnavailable."""
        if not self.fail_open:
            raise self._unavailable(exc) from exc
        local = self.local
        if prep.last_used is not None and key_id not in local.states:
            # Quotas go on from the usage Redis last reported, not from zero.
            local.seed(key_id, plan, prep.windows, prep.last_used)
        decision = local.admit_now(key_id, plan, reserve_in, reserve_out)
        ticket = decision.ticket
        if ticket is not None:
            ticket.prepared = _Local(local, prep)
            self._owe(key_id, prep, ticket.amounts, None, 1)
            self.fail_open_total += 1
            self.fail_open_by_key[key_id] = self.fail_open_by_key.get(key_id, 0) + 1
        return decision

    def settle(self, ticket: Ticket, used_in: int, used_out: int) -> None:
        if ticket.done:
            return
        d_in = used_in - ticket.reserved_in
        d_out = used_out - ticket.reserved_out
        prep = ticket.prepared
        if type(prep) is _Local:  # admitted without Redis: free the local slot, owe the usage
            prep.limiter.settle(ticket, used_in, used_out)
            if d_in or d_out:
                self._owe(ticket.key_id, prep.prep, _deltas(ticket.plan, d_in, d_out), None, 0)
                self._kick()
            return
        ticket.done = True
        if ticket.slot is None and d_in == 0 and d_out == 0:
            return  # nothing to tell Redis
        if self._state != CLOSED:
            self._owe(ticket.key_id, prep, _deltas(ticket.plan, d_in, d_out), ticket.slot, 0)
            return
        packed = (
            prep.settle_head
            + pack_args((ticket.slot or "").encode(), b"%d" % d_in, b"%d" % d_out)
            + prep.settle_tail
        )
        epoch = self._epoch
        fut = self.conn.send(packed)
        if fut is None:  # not connected right now: connect and send from a task
            self._settle_later(packed, ticket, d_in, d_out)
            return
        self.pending.add(fut)
        fut.add_done_callback(lambda f: self._sent(f, packed, ticket, d_in, d_out, epoch))

    def _sent(
        self, fut: asyncio.Future[Any], packed: bytes, ticket: Ticket, d_in: int, d_out: int, epoch: int
    ) -> None:
        self.pending.discard(fut)
        if fut.cancelled() or (exc := fut.exception()) is None:
            return
        if isinstance(exc, RespError) and str(exc).startswith("NOSCRIPT"):
            self._settle_later(packed, ticket, d_in, d_out)  # loads the script and sends again
            return
        self._settle_failed(ticket, d_in, d_out, exc, epoch)

    def _settle_later(self, packed: bytes, ticket: Ticket, d_in: int, d_out: int) -> None:
        task = asyncio.get_running_loop().create_task(self._settle_task(packed, ticket, d_in, d_out))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _settle_task(self, packed: bytes, ticket: Ticket, d_in: int, d_out: int) -> None:
        epoch = self._epoch
        try:
            await self._eval(packed, SETTLE)
        except _ERRORS as exc:
            self._settle_failed(ticket, d_in, d_out, exc, epoch)

    def _settle_failed(self, ticket: Ticket, d_in: int, d_out: int, exc: BaseException, epoch: int) -> None:
        # Replayed once Redis answers. A settle whose reply was lost may have run already: its
        # correction then counts twice. Slots are freed idempotently.
        self._owe(ticket.key_id, ticket.prepared, _deltas(ticket.plan, d_in, d_out), ticket.slot, 0)
        self._failed(exc, epoch)

    async def usage(self, key_id: str, plan: Plan) -> dict[str, dict[str, int]]:
        """A key's counters as Redis holds them; ``LimiterUnavailable`` while the circuit is open."""
        if self._state != CLOSED:
            raise self._unavailable(None)
        prep = self._prepare(key_id, plan, self.clock())
        names = prep.names[2:]
        epoch = self._epoch
        try:
            vals = await self._call(pack(b"MGET", *(n.encode() for n in names))) if names else []
        except _ERRORS as exc:
            self._failed(exc, epoch)
            raise
        return usage_report(plan, [int(v) if v is not None else 0 for v in vals])


class LimiterUnavailable(Exception):
    """The shared limiter cannot be reached and ``limits.fail_open`` is off."""
