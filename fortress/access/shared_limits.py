"""Usage-plan limits shared by the gateway workers of one machine, without Redis.

``server.workers > 1`` runs several gateway processes on one port; with the memory backend
each would admit a key's whole plan on its own. ``SharedLimitTable`` is a table in shared
memory (a ``memfd`` the master creates before it forks the workers, so every worker maps the
same pages); ``SharedLimiter`` is the memory limiter over it: same interface, same decisions.

Each key has a fixed slot (open addressing on a hash of its id) holding what
``MemoryLimiter`` keeps per key: its plan, bucket level and time, counter windows and usage.
An admission or a settle locks the key's slot, loads the slot into the memory limiter's own
code, runs it, and writes the result back. The decisions are exactly the memory limiter's.
The locks are ``STRIPES`` process-shared semaphores (slot ``i`` uses stripe ``i %
STRIPES``, slot allocation one of its own), made by the master before it forks: taking a free
one is an atomic operation in user space, no system call. A taken one is tried again up to
``SPINS`` times (about 100 µs) before the worker sleeps on it (the holder runs on another core
and holds it for a few microseconds: sleeping and being woken costs far more; ``fcntl`` locks,
used before, cost two system calls per call and a sleep on every conflict, 21 % of a worker's
time with two workers on one key). A semaphore is not released by the kernel when its holder is
killed, so each stripe records its holder's pid: a worker that has waited ``STALE`` seconds
checks it, and takes over the lock of a holder that is gone (``kill -9`` in the middle of an
admission costs the others a quarter of a second, once).

Requests in flight are counted per worker, each slot a row of counts side by side (one read
gets them all): a worker that dies with requests in flight would otherwise hold its keys'
concurrency slots for ever; the worker that replaces it clears its counts when it starts.
"""

from __future__ import annotations

import array
import hashlib
import logging
import mmap
import multiprocessing
import os
import struct
import weakref
from typing import Any

from fortress.access.limits import Decision, KeyState, MemoryLimiter, Ticket
from fortress.access.plans import PERIODS, Plan

log = logging.getLogger("fortress.access")

MAX_COUNTERS = 9  # 3 metrics x 3 periods: the most a plan keeps
KEY_BYTES = 64
DEFAULT_CAPACITY = 1 << 17  # keys; pages are only used once touched (about 256 bytes a key)

# key, plan (hash of its name; 0: never admitted), shape (a byte per counter: which metric
# and period), bucket tokens and time, then each counter's window start and usage.
_SLOT = struct.Struct(f"<{KEY_BYTES}sQ{MAX_COUNTERS}sdd{MAX_COUNTERS}q{MAX_COUNTERS}q")
SLOT_BYTES = 256
_HEADER = struct.Struct("<8sQQQ")  # magic, capacity, workers, keys in use
_MAGIC = b"FTLIMIT2"
_PAGE = 4096
_INFLIGHT = struct.Struct("<i")
_LOCAL = object()  # a ticket admitted by the local fallback (table full)
_ZERO_KEY = bytes(KEY_BYTES)
STRIPES = 64  # slot locks; plus one for slot allocation
# Non-blocking tries on a taken lock before sleeping on it (about 0.1 µs each here). With two
# workers on one key on two cores, 1,000 cut the sleeps from 0.12 to 0.01 per request and the
# gateway CPU per request from ~180 to ~160 µs against 100 (three runs each; 300 and 3,000 did
# no better): a waiter woken from a sleep costs both processes system calls and a reschedule.
SPINS = 1000
STALE = 0.25  # seconds of waiting before the holder's life is checked
_HOLDERS_AT = 64  # in the header page: a pid per lock (STRIPES + 1 of them)
_PID = struct.Struct("<i")
_PAD = [(0,) * n for n in range(MAX_COUNTERS + 1)]


def _key_bytes(key_id: str) -> bytes:
    raw = key_id.encode()
    if len(raw) <= KEY_BYTES and b"\0" not in raw:
        return raw.ljust(KEY_BYTES, b"\0")
    return b"#" + hashlib.blake2b(raw, digest_size=31).hexdigest().encode()[: KEY_BYTES - 1]


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _plan_id(name: str) -> int:
    return _hash(name.encode()) or 1  # 0 marks a slot that holds no state yet


def _shape(plan: Plan) -> bytes:
    return bytes(c.metric * 3 + PERIODS.index(c.period) + 1 for c in plan.counters).ljust(MAX_COUNTERS, b"\0")


class SharedLimitTable:
    """The shared-memory table one machine's workers keep their limits in.

    Built by the master before it forks (``create``); each worker inherits the descriptor and
    the mapping. ``capacity`` keys fit; past that, new keys are limited per worker (logged).
    """

    def __init__(self, fd: int, capacity: int, workers: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self.workers = workers
        self.slots_at = _PAGE
        # Each slot's requests in flight, one count per worker side by side: one read gets them.
        self.inflight_at = _PAGE + capacity * SLOT_BYTES
        self.size = self.inflight_at + workers * capacity * _INFLIGHT.size
        self._row = struct.Struct(f"<{workers}i")
        self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Made before the fork, so every worker shares them (lock STRIPES: slot allocation).
        ctx = multiprocessing.get_context("fork")
        self.locks = [ctx.Lock() for _ in range(STRIPES + 1)]
        self.pid = os.getpid()  # the holder mark: kept right in forked children
        self.takeovers = 0  # locks taken over from a holder that died
        ref = weakref.ref(self)

        def forked() -> None:
            table = ref()
            if table is not None:
                table.pid = os.getpid()

        os.register_at_fork(after_in_child=forked)

    @classmethod
    def create(cls, workers: int, capacity: int = DEFAULT_CAPACITY) -> SharedLimitTable:
        """A new, empty table for ``workers`` workers (a sparse memfd: untouched pages cost nothing)."""
        if workers < 1 or capacity < 1:
            raise ValueError("a shared limit table needs at least one worker and one slot")
        fd = os.memfd_create("fortress-limits", os.MFD_CLOEXEC)
        size = _PAGE + capacity * SLOT_BYTES + workers * capacity * _INFLIGHT.size
        os.ftruncate(fd, size)
        table = cls(fd, capacity, workers)
        _HEADER.pack_into(table.mm, 0, _MAGIC, capacity, workers, 0)
        return table

    def close(self) -> None:
        """Unmap and close this process's handle (the memory goes with the last one)."""
        self.mm.close()
        os.close(self.fd)

    @property
    def keys(self) -> int:
        """Keys that have a slot."""
        return int(_HEADER.unpack_from(self.mm, 0)[3])

    # ``at`` 0 guards slot allocation, ``1 + i`` slot i (see the module doc for the locks).
    def lock(self, at: int) -> None:
        stripe = STRIPES if at == 0 else (at - 1) % STRIPES
        lock = self.locks[stripe]
        if not lock.acquire(False):
            for _ in range(SPINS):
                if lock.acquire(False):
                    break
            else:
                while not lock.acquire(True, STALE):
                    if self._holder_gone(stripe):
                        break  # its holder died holding it: this worker holds it now
        _PID.pack_into(self.mm, _HOLDERS_AT + stripe * _PID.size, self.pid)

    def unlock(self, at: int) -> None:
        stripe = STRIPES if at == 0 else (at - 1) % STRIPES
        _PID.pack_into(self.mm, _HOLDERS_AT + stripe * _PID.size, 0)
        self.locks[stripe].release()

    def _holder_gone(self, stripe: int) -> bool:
        holder = _PID.unpack_from(self.mm, _HOLDERS_AT + stripe * _PID.size)[0]
        if holder <= 0:
            return False
        try:
            os.kill(holder, 0)
        except ProcessLookupError:
            self.takeovers += 1
            log.warning("worker process %d died holding a limits lock: taken over", holder)
            return True
        except PermissionError:
            return False
        return False

    def find(self, key: bytes) -> int:
        """The slot of ``key`` (claimed now if new), or -1 when the table is full."""
        mm, at, cap = self.mm, self.slots_at, self.capacity
        start = _hash(key) % cap
        self.lock(0)
        try:
            for probe in range(cap):
                i = (start + probe) % cap
                off = at + i * SLOT_BYTES
                held = mm[off : off + KEY_BYTES]
                if held == key:
                    return i
                if held == _ZERO_KEY:
                    magic, capacity, workers, used = _HEADER.unpack_from(mm, 0)
                    if used >= cap * 0.9:  # keep probes short: a full table is a slow table
                        return -1
                    mm[off : off + KEY_BYTES] = key
                    _HEADER.pack_into(mm, 0, magic, capacity, workers, used + 1)
                    return i
            return -1
        finally:
            self.unlock(0)

    def clear_worker(self, worker: int) -> None:
        """Forget the requests in flight of worker ``worker`` (it died; its requests with it)."""
        counts = memoryview(self.mm)[self.inflight_at : self.size].cast("i")
        counts[worker :: self.workers] = array.array("i", bytes(_INFLIGHT.size * self.capacity))
        counts.release()

    def inflight(self, slot: int) -> tuple[int, ...]:
        """Requests in flight of the key in ``slot``, per worker."""
        return self._row.unpack_from(self.mm, self.inflight_at + slot * self._row.size)

    def add_inflight(self, slot: int, worker: int, delta: int) -> None:
        """Add ``delta`` to worker ``worker``'s requests in flight for ``slot`` (never below 0)."""
        off = self.inflight_at + slot * self._row.size + worker * _INFLIGHT.size
        _INFLIGHT.pack_into(self.mm, off, max(0, _INFLIGHT.unpack_from(self.mm, off)[0] + delta))

    def reset_inflight(self, slot: int) -> None:
        self._row.pack_into(self.mm, self.inflight_at + slot * self._row.size, *(0,) * self.workers)


class SharedLimiter(MemoryLimiter):
    """The memory limiter's decisions over a ``SharedLimitTable``: exact across the workers of
    one machine.

    A ``MemoryLimiter`` by type on purpose: it never awaits, so the access layer calls its
    ``admit_now`` directly. Its ``states`` dict keeps an object per key that each call refills
    from the key's slot under the slot's lock before deciding (so it never decides on what
    another worker has changed since); a reload's reshaping of plans happens here, per slot,
    on load.
    """

    def __init__(self, table: SharedLimitTable, worker: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= worker < table.workers:
            raise ValueError(f"worker {worker} is not one of the table's {table.workers}")
        self.table = table
        self.worker = worker
        self._slots: dict[str, tuple[int, bytes]] = {}  # key id -> (slot, key as stored)
        self._plans: dict[int, tuple[Plan, int, bytes]] = {}  # id(plan) -> (plan, id, shape)
        self._local = MemoryLimiter(self.clock)  # keys past the table's capacity
        self._full_logged = False

    async def start(self) -> None:
        # This worker index's requests in flight died with the process it replaces.
        self.table.clear_worker(self.worker)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "shared_limit_keys": self.table.keys}

    def _plan(self, plan: Plan) -> tuple[Plan, int, bytes]:
        hit = self._plans.get(id(plan))
        if hit is None or hit[0] is not plan:
            if len(self._plans) > 1000:  # plans replaced by reloads
                self._plans.clear()
            hit = self._plans[id(plan)] = (plan, _plan_id(plan.name), _shape(plan))
        return hit

    def _slot(self, key_id: str) -> int:
        hit = self._slots.get(key_id)
        if hit is None:
            key = _key_bytes(key_id)
            slot = self.table.find(key)
            if slot < 0:
                if not self._full_logged:
                    log.error(
                        "the shared limit table is full (%d keys): further keys are limited per worker",
                        self.table.capacity,
                    )
                    self._full_logged = True
                return slot
            hit = self._slots[key_id] = (slot, key)
        return hit[0]

    def _load(self, key_id: str, slot: int, plan: Plan) -> int:
        """Load the slot's state for ``plan`` into ``self.states`` (the key's object is kept
        from call to call and refilled: allocating one per call cost more than the decision);
        return the key's requests in flight on every worker. A key new to the plan is left out
        of ``self.states``, and 0 returned: the memory limiter starts it afresh."""
        table = self.table
        _, pid, shape, tokens, ts, *rest = _SLOT.unpack_from(table.mm, table.slots_at + slot * SLOT_BYTES)
        _, plan_id, want = self._plan(plan)
        if pid != plan_id:  # never admitted, or under another plan
            self.states.pop(key_id, None)
            return 0
        n = len(plan.counters)
        if shape == want:
            w, u = rest[:n], rest[MAX_COUNTERS : MAX_COUNTERS + n]
        else:  # a reload changed the plan's counters: carry them over by metric and period
            windows, used = rest[:MAX_COUNTERS], rest[MAX_COUNTERS:]
            where = {code: i for i, code in enumerate(shape) if code}
            starts = self.periods.for_plan(plan, self.clock()).starts
            w, u = [], []
            for j, code in enumerate(want[:n]):
                i = where.get(code)
                w.append(windows[i] if i is not None else starts[j])
                u.append(used[i] if i is not None else 0)
        st = self.states.get(key_id)
        if st is None or st.plan != plan.name:
            st = self.states[key_id] = KeyState(plan, ts, [])
        st.windows, st.used = list(w), list(u)
        st.tokens, st.ts = tokens, ts
        st.aligned = None  # another worker may have written other windows: check them again
        st.inflight = inflight = sum(table.inflight(slot))
        return inflight

    def _store(self, key_id: str, slot: int, plan: Plan, before: int, fresh: bool) -> None:
        st = self.states[key_id]
        pad = _PAD[MAX_COUNTERS - len(st.windows)]
        table = self.table
        _, plan_id, shape = self._plan(plan)
        _SLOT.pack_into(
            table.mm,
            table.slots_at + slot * SLOT_BYTES,
            self._slots[key_id][1],
            plan_id,
            shape,
            st.tokens,
            st.ts,
            *st.windows,
            *pad,
            *st.used,
            *pad,
        )
        if fresh:  # a new state: in-flight counts of another plan no longer apply
            table.reset_inflight(slot)
        if st.inflight != before:
            table.add_inflight(slot, self.worker, st.inflight - before)

    def admit_now(self, key_id: str, plan: Plan, reserve_in: int, reserve_out: int) -> Decision:
        slot = self._slot(key_id)
        if slot < 0:
            decision = self._local.admit_now(key_id, plan, reserve_in, reserve_out)
            if decision.ticket is not None:
                decision.ticket.prepared = _LOCAL
            return decision
        table = self.table
        table.lock(1 + slot)
        try:
            before = self._load(key_id, slot, plan)
            fresh = key_id not in self.states
            decision = super().admit_now(key_id, plan, reserve_in, reserve_out)
            self._store(key_id, slot, plan, 0 if fresh else before, fresh)
        finally:
            table.unlock(1 + slot)
        return decision

    def settle(self, ticket: Ticket, used_in: int, used_out: int) -> None:
        if ticket.done:
            return
        if ticket.prepared is _LOCAL:
            self._local.settle(ticket, used_in, used_out)
            return
        slot = self._slot(ticket.key_id)
        if slot < 0:  # cannot happen: the slot was found at admission and slots are never freed
            ticket.done = True
            return
        table = self.table
        table.lock(1 + slot)
        try:
            before = self._load(ticket.key_id, slot, ticket.plan)
            if ticket.key_id not in self.states:
                ticket.done = True  # the key moved to another plan: nothing of this ticket is kept
                return
            super().settle(ticket, used_in, used_out)
            self._store(ticket.key_id, slot, ticket.plan, before, False)
        finally:
            table.unlock(1 + slot)

    async def usage(self, key_id: str, plan: Plan) -> dict[str, dict[str, int]]:
        slot = self._slot(key_id)
        if slot < 0:
            return await self._local.usage(key_id, plan)
        table = self.table
        table.lock(1 + slot)
        try:
            self._load(key_id, slot, plan)
            return await super().usage(key_id, plan)
        finally:
            table.unlock(1 + slot)


__all__ = ["DEFAULT_CAPACITY", "SharedLimitTable", "SharedLimiter"]
