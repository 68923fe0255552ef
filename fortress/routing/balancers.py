"""Balancers: which replica of a route gets one request. A strategy per pool (``balancer:``).

Every strategy walks the tiers the same way (``TieredBalancer``): traffic goes to the highest
tier with a healthy replica; with ``outlier.panic_threshold`` set, a tier with fewer healthy
replicas than that share of its members spills to the next tier that is not itself in panic,
and when there is none it *fails open* within the tier (its unhealthy and ejected replicas take
traffic too, as in Envoy's panic mode); when no tier has a healthy replica,
``routing.when_all_unhealthy: fail_open`` tries the unhealthy ones (as an ALB does) and
``reject`` gives up. Failing open never includes a replica known to serve another model.
Within the chosen tier a strategy's ``choose`` picks one replica; it sees
the request (``RequestView``: model, session key, prompt prefix, computed only when asked) and
each replica's load (``in_flight``, and ``load`` from the engine's own metrics).

Strategies (docs/routing.md):

- ``least_outstanding``: power of two choices on requests in flight; the default.
- ``session``: the request's session key picks the replica by consistent hashing with bounded
  loads (rendezvous hashing: the candidates ranked by a hash of key and replica name; a new
  session goes to the first whose requests in flight and active sessions stay within
  ``load_factor`` x the average, and stays there). Only a leaving replica's sessions move; a hot
  key spills to its next choices. No key: least outstanding.
- ``prefix``: the replica most likely to hold the prompt's prefix in its KV cache, from a table
  of the block chains each replica served (``affinity.PrefixTable``), unless it is loaded more
  than ``max_imbalance`` above the least loaded one. No match: the least loaded replica among
  those holding the fewest hot prefixes (``affinity.HotPrefixes``), so prefixes spread over
  replicas instead of sharing one replica's slots and cache.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from math import ceil
from typing import Protocol

from fortress.config import PoolConfig, Routing
from fortress.routing.affinity import HotPrefixes, PrefixTable, SessionHomes, block_chains, key_hash, rank
from fortress.routing.replica import Replica, State

Tiers = tuple[list[Replica], ...]  # a route's replicas per tier, highest first


class RequestView(Protocol):
    """What a balancer may know of the request (``core.context.RequestContext`` is one)."""

    model: str | None

    @property
    def session_key(self) -> str | None: ...

    def prompt_prefix(self, limit: int = 4096) -> str: ...


class Balancer(Protocol):
    """Picks the replica for one attempt of one request."""

    def pick(self, tiers: Tiers, view: RequestView | None, exclude: Sequence[Replica] = ()) -> Replica | None:
        """A replica of a route (its ``tiers``) not in ``exclude``, or None when none may be tried."""


class TieredBalancer:
    """The tier walk every strategy shares; subclasses implement ``choose``."""

    def __init__(
        self,
        pool: PoolConfig,
        routing: Routing,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rng = rng
        self.clock = clock  # what strategies that remember recent traffic age it by
        self.fail_open = routing.when_all_unhealthy == "fail_open"
        self.panic = pool.outlier.panic_threshold / 100.0

    def choose(self, candidates: list[Replica], view: RequestView | None) -> Replica:
        raise NotImplementedError

    def forget(self, name: str) -> None:
        """A replica left the pool: drop what the strategy remembers of it (nothing by default)."""

    def pick(self, tiers: Tiers, view: RequestView | None, exclude: Sequence[Replica] = ()) -> Replica | None:
        any_healthy = False
        for i, tier in enumerate(tiers):
            cands = [r for r in tier if r.state is State.HEALTHY]
            if not cands:
                continue
            any_healthy = True
            if self.panic and self._panics(tier, len(cands)):
                if any(self._serves(t) for t in tiers[i + 1 :]):
                    continue  # spill to a lower tier that has the capacity
                # Nowhere to spill: fail open within this tier (Envoy's panic mode).
                cands = [r for r in tier if _may_fail_open(r) or r.state is State.HEALTHY]
            if exclude:
                cands = [r for r in cands if r not in exclude]
            if cands:
                return self.choose(cands, view)
        if any_healthy or not self.fail_open:
            return None
        for tier in tiers:
            cands = [r for r in tier if _may_fail_open(r) and r not in exclude]
            if cands:
                return self.choose(cands, view)
        return None

    def _panics(self, tier: list[Replica], healthy: int) -> bool:
        return healthy < self.panic * len(tier)

    def _serves(self, tier: list[Replica]) -> bool:
        healthy = sum(1 for r in tier if r.state is State.HEALTHY)
        return healthy > 0 and not self._panics(tier, healthy)


def _may_fail_open(r: Replica) -> bool:
    # Unhealthy, but never one known to serve another model: failing open trades health for
    # availability, never identity.
    return r.state is State.UNHEALTHY and r.wrong_model is None


class LeastOutstanding(TieredBalancer):
    """Power of two choices: of two random candidates, the one with fewer requests in flight."""

    def choose(self, candidates: list[Replica], view: RequestView | None) -> Replica:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        if a.in_flight == b.in_flight:
            return a
        return a if a.in_flight < b.in_flight else b


class SessionAffinity(LeastOutstanding):
    """Consistent hashing with bounded loads on the request's session key.

    A session's *home* is where its last placed request went; its requests stay there while it
    is a candidate and its requests in flight, this one included, stay within
    ``ceil(load_factor x average)`` over the candidates (a hot key's overflow goes to the next
    candidate in the key's rendezvous order that is within that bound, and the home stays).

    A session without a home (new, or its home left the candidates: ejected, unhealthy,
    draining, already tried) is *placed*: on the first candidate in rendezvous order (a hash of
    key and replica name, the same in every gateway process) that keeps both bounds, the one
    on requests in flight and the same one on *active sessions* (sessions with a request in
    the last ``HOT_SECONDS``, this one counted), the bounded-loads rule of Mirrokni, Thorup
    and Zadimoghaddam with sessions as the balls. Counting sessions, not only requests in
    flight, is what keeps conversations from piling onto one replica's slots and cache while
    their requests happen not to overlap. When no candidate keeps both (one is least loaded
    in flight, another in sessions), the fewest in flight takes it. Homes are kept for
    ``session.ttl`` (at most ``HOME_ENTRIES``), so a conversation that pauses comes back to its
    cache; a replica that leaves moves only the sessions it was home to, and they stay where
    they moved (their caches are there now).
    """

    def __init__(self, pool: PoolConfig, routing: Routing, rng: random.Random) -> None:
        super().__init__(pool, routing, rng)
        self.load_factor = pool.session.load_factor
        self.homes = SessionHomes(pool.session.ttl)
        self.active = HotPrefixes()  # (session hash, replica) → last request: sessions per replica

    def choose(self, candidates: list[Replica], view: RequestView | None) -> Replica:
        key = view.session_key if view is not None else None
        if not key or len(candidates) == 1:
            return super().choose(candidates, view)
        n = len(candidates)
        total = 1  # this request
        for r in candidates:
            total += r.in_flight
        cap = ceil(self.load_factor * total / n)
        h = key_hash(key)
        now = self.clock()
        home = self.homes.get(h, now)
        chosen: Replica | None = None
        if home is not None:
            for r in candidates:
                if r.name == home:
                    chosen = r
                    break
        if chosen is not None:
            if chosen.in_flight + 1 > cap:  # a hot key: this request spills, the home stays
                for r in rank(h, candidates):
                    if r.in_flight + 1 <= cap:
                        return r
            self.active.touch(h, chosen.name, now)
            return chosen
        ranked = rank(h, candidates)
        self.active.expire(now)
        count = self.active.count
        sessions = 1  # this one
        for r in candidates:
            sessions += count.get(r.name, 0)
        scap = ceil(self.load_factor * sessions / n)
        for r in ranked:
            if r.in_flight + 1 <= cap and count.get(r.name, 0) + 1 <= scap:
                chosen = r
                break
        else:
            chosen = min(ranked, key=lambda r: (r.in_flight, count.get(r.name, 0)))
        self.homes.set(h, chosen.name, now)
        self.active.touch(h, chosen.name, now)
        return chosen

    def forget(self, name: str) -> None:
        self.homes.forget(name)
        self.active.forget(name)


class PrefixAware(LeastOutstanding):
    """The replica that served the longest leading run of the prompt's blocks, within a load margin.

    Candidates with more than ``max_imbalance`` requests in flight above the least loaded one
    are passed over (the warm replica spills when it is overloaded); among the rest, the
    longest match wins, then the fewer in flight, if it covers at least ``min_match`` of the
    prompt's blocks (the way SGLang's cache-aware router thresholds its match rate: a short
    system prompt every conversation shares would otherwise draw every new conversation to
    the replica that served the first one). A prompt that matches nothing (enough) on them (a
    new prefix, or a spill) is *placed*: on the candidate holding the fewest hot prefixes
    (first blocks that came back within ``HOT_SECONDS``), then with the fewest in flight, so
    each hot prefix gets replicas of its own while there are enough. The chosen replica is
    recorded as holding every block chain of the prompt. A prompt shorter than one block goes
    by least outstanding.
    """

    def __init__(self, pool: PoolConfig, routing: Routing, rng: random.Random) -> None:
        super().__init__(pool, routing, rng)
        cfg = pool.prefix
        self.block_chars = cfg.block_chars
        self.max_blocks = cfg.max_blocks
        self.max_imbalance = cfg.max_imbalance
        self.min_match = cfg.min_match
        self.table = PrefixTable(cfg.entries)
        self.hot = HotPrefixes()

    def choose(self, candidates: list[Replica], view: RequestView | None) -> Replica:
        if view is None:
            return super().choose(candidates, view)
        text = view.prompt_prefix(self.block_chars * self.max_blocks)
        chains = block_chains(text, self.block_chars, view.model or "")
        if not chains:
            return super().choose(candidates, view)
        now = self.clock()
        self.hot.expire(now)
        matched = self.table.match(chains)
        best: Replica | None = None
        within = candidates
        if matched:
            bound = min(r.in_flight for r in candidates) + self.max_imbalance
            within = [r for r in candidates if r.in_flight <= bound]
            best_len = 0
            for r in within:
                n = matched.get(r.name, 0)
                if n == 0:
                    continue
                if n > best_len or (n == best_len and best is not None and r.in_flight < best.in_flight):
                    best, best_len = r, n
            if best is not None and best_len < self.min_match * len(chains):
                best = None  # a shared start (a short system prompt) only: placed as new
        if best is None:
            best = self._place(within)
        if matched:  # its first block was seen before: a prefix that comes back, hot where it runs now
            self.hot.touch(chains[0], best.name, now)
        self.table.record(chains, best.name)
        return best

    def _place(self, candidates: list[Replica]) -> Replica:
        """Where a prefix no candidate holds goes: fewest hot prefixes, then fewest in flight.

        Not two random choices: a replica already serving another hot prefix would share its
        slots and cache with this one for as long as both stay hot, and a cold prefill queued
        behind another costs far more than the herding two random choices guard against (the
        counts here are this process's own, exact at the time of the pick).
        """
        hot = self.hot.count
        least: list[Replica] = []
        least_key = (0, 0)
        for r in candidates:
            key = (hot.get(r.name, 0), r.in_flight)
            if not least or key < least_key:
                least, least_key = [r], key
            elif key == least_key:
                least.append(r)
        return least[0] if len(least) == 1 else self.rng.choice(least)

    def forget(self, name: str) -> None:
        # A replica that comes back under this name starts with an empty cache.
        self.table.forget(name)
        self.hot.forget(name)


# The one registry of strategies: the name a pool's `balancer:` gives -> the class.
BALANCERS: dict[str, type[TieredBalancer]] = {
    "least_outstanding": LeastOutstanding,
    "session": SessionAffinity,
    "prefix": PrefixAware,
}


def build_balancer(pool: PoolConfig, routing: Routing, rng: random.Random) -> TieredBalancer:
    return BALANCERS[pool.balancer](pool, routing, rng)
