"""The pieces of session affinity and prefix-aware routing: hashes, the prefix table, the session key.

Everything here runs on the request path, so it is bounded and cheap: one 64-bit hash of the
session key and one mix per candidate replica; for prefixes, one incremental hash over at most
``block_chars x max_blocks`` characters of the prompt and a dict lookup per block.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from hashlib import blake2b

from fortress.config import SessionAffinity
from fortress.routing.replica import Replica

_MASK = (1 << 64) - 1
# How many replicas one block chain remembers (most recent first): a prefix spilled to another
# replica is then warm on both.
OWNERS_PER_CHAIN = 4
# A prefix is hot on a replica while it came back there within this many seconds: long enough to
# span the pauses of a chat (a user reading and typing), short enough that a prefix's replica
# is free for another one soon after its traffic stops.
HOT_SECONDS = 60.0
HOT_ENTRIES = 4096  # (prefix, replica) pairs kept: placement needs the hot ones only
HOME_ENTRIES = 65536  # sessions whose replica is remembered (about 100 bytes each)


def key_hash(key: str) -> int:
    """A 64-bit hash of a session key, the same in every process (unlike ``hash()``)."""
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little")


_name_hashes: dict[str, int] = {}


def _name_hash(name: str) -> int:
    h = _name_hashes.get(name)
    if h is None:
        if len(_name_hashes) > 65536:  # names are few; never let the cache grow without bound
            _name_hashes.clear()
        h = _name_hashes[name] = key_hash(name)
    return h


def _mix(a: int, b: int) -> int:
    # splitmix64's finalizer over both hashes: a well spread weight per (key, replica) pair.
    z = (a ^ b) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def rank(key: int, candidates: Sequence[Replica]) -> list[Replica]:
    """``candidates`` in rendezvous order for ``key`` (highest weight first), by replica name.

    A replica's weight for a key does not depend on the other candidates, so removing one
    changes the first choice only for the keys it was first for.
    """
    return sorted(candidates, key=lambda r: _mix(key, _name_hash(r.name)), reverse=True)


def block_chains(text: str, block_chars: int, seed: str) -> list[int]:
    """The chained hashes of ``text``'s full blocks: hash i covers ``seed`` and blocks 0..i, so
    two prompts share hash i exactly when they share their first i + 1 blocks.

    Python's own string hash (SipHash, 64 bits): about three times cheaper than a blake2b
    digest per block, and the table it keys lives and dies with this process anyway.
    """
    n = len(text) // block_chars
    h = hash(seed)
    out: list[int] = []
    for i in range(n):
        h = hash((h, text[i * block_chars : (i + 1) * block_chars]))
        out.append(h)
    return out


class PrefixTable:
    """Which replicas served which block chains: at most ``entries`` chains, least recently used out."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._owners: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def match(self, chains: Sequence[int]) -> dict[str, int]:
        """Replica name → how many leading blocks of this prompt it served (absent: none)."""
        matched: dict[str, int] = {}
        owners = self._owners
        for i, chain in enumerate(chains):
            names = owners.get(chain)
            if names is None:
                break  # a longer chain cannot be known without this one (they age together)
            for name in names:
                matched[name] = i + 1
        return matched

    def record(self, chains: Sequence[int], name: str) -> None:
        """``name`` now holds every chain of this prompt (it is about to process it)."""
        owners = self._owners
        for chain in chains:
            names = owners.get(chain)
            if names is None:
                owners[chain] = (name,)
            else:
                if names[0] != name:
                    owners[chain] = (name, *[n for n in names if n != name])[:OWNERS_PER_CHAIN]
                owners.move_to_end(chain)
        while len(owners) > self.entries:
            owners.popitem(last=False)

    def forget(self, name: str) -> None:
        """Drop ``name`` from every chain (a replica that left: its cache left with it)."""
        for chain, names in list(self._owners.items()):
            if name in names:
                rest = tuple(n for n in names if n != name)
                if rest:
                    self._owners[chain] = rest
                else:
                    del self._owners[chain]


class HotPrefixes:
    """The prefixes that keep coming back, and how many of them each replica serves.

    A prefix is named by its first block's chain (``block_chains(...)[0]``); it is hot on a
    replica while requests that matched it went there within the last ``seconds``. ``count``
    (replica name → hot prefixes) is kept up to date as entries come and go, so reading it costs
    nothing; entries expire oldest first, at most ``entries`` are kept.
    """

    def __init__(self, seconds: float = HOT_SECONDS, entries: int = HOT_ENTRIES) -> None:
        self.seconds = seconds
        self.entries = entries
        self.count: dict[str, int] = {}
        self._seen: OrderedDict[tuple[int, str], float] = OrderedDict()  # (root, replica) → last use

    def __len__(self) -> int:
        return len(self._seen)

    def touch(self, root: int, name: str, now: float) -> None:
        """A request of prefix ``root`` went to replica ``name`` at ``now``."""
        key = (root, name)
        if key in self._seen:
            self._seen.move_to_end(key)
        else:
            self.count[name] = self.count.get(name, 0) + 1
        self._seen[key] = now
        while len(self._seen) > self.entries:
            self._drop(self._seen.popitem(last=False)[0][1])

    def expire(self, now: float) -> None:
        """Drop what has not come back within ``seconds`` (the oldest are first: touch moves to the end)."""
        seen = self._seen
        cutoff = now - self.seconds
        while seen:
            key = next(iter(seen))
            if seen[key] >= cutoff:
                break
            del seen[key]
            self._drop(key[1])

    def forget(self, name: str) -> None:
        """Drop replica ``name`` (it left the pool, and its cache with it)."""
        for key in [k for k in self._seen if k[1] == name]:
            del self._seen[key]
        self.count.pop(name, None)

    def _drop(self, name: str) -> None:
        n = self.count.get(name, 0) - 1
        if n > 0:
            self.count[name] = n
        else:
            self.count.pop(name, None)


class SessionHomes:
    """Each session's replica (by the key's hash), kept ``ttl`` seconds after its last request.

    At most ``entries``, least recently used out; expired entries leave as they reach the
    front, so a lookup and an update cost a dict operation each.
    """

    def __init__(self, ttl: float, entries: int = HOME_ENTRIES) -> None:
        self.ttl = ttl
        self.entries = entries
        self._homes: OrderedDict[int, tuple[str, float]] = OrderedDict()  # hash → (replica, last use)

    def __len__(self) -> int:
        return len(self._homes)

    def get(self, key: int, now: float) -> str | None:
        """The replica of session ``key``, or None (new, or expired); a hit counts as a use."""
        entry = self._homes.get(key)
        if entry is None:
            return None
        if now - entry[1] > self.ttl:
            del self._homes[key]
            return None
        self._homes[key] = (entry[0], now)
        self._homes.move_to_end(key)
        return entry[0]

    def set(self, key: int, name: str, now: float) -> None:
        """Session ``key`` now lives on ``name``."""
        homes = self._homes
        homes[key] = (name, now)
        homes.move_to_end(key)
        cutoff = now - self.ttl
        while homes:
            first = next(iter(homes))
            if len(homes) <= self.entries and homes[first][1] >= cutoff:
                break
            del homes[first]

    def forget(self, name: str) -> None:
        """Drop the sessions of replica ``name`` (it left the pool)."""
        for key in [k for k, v in self._homes.items() if v[0] == name]:
            del self._homes[key]


def session_key(
    headers: Mapping[bytes, bytes], cfg: SessionAffinity, secure: bool = False
) -> tuple[str | None, bytes | None]:
    """A request's session key by the pool's ``session:`` settings, and the ``Set-Cookie`` value
    to send back (cookie mode, when the request brought no cookie; else None)."""
    if cfg.source == "header":
        raw = headers.get(cfg.header.encode("latin-1"))
        return (raw.decode("latin-1") if raw else None), None
    value = _cookie(headers.get(b"cookie"), cfg.cookie)
    if value:
        return value, None
    value = os.urandom(16).hex()
    attrs = f"{cfg.cookie}={value}; Max-Age={int(cfg.ttl)}; Path=/; HttpOnly; SameSite=Lax"
    if secure:
        attrs += "; Secure"
    return value, attrs.encode("latin-1")


def _cookie(header: bytes | None, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header, or None (a few bytes scanned, no parser)."""
    if not header:
        return None
    text = header.decode("latin-1")
    want = name + "="
    for part in text.split(";"):
        part = part.strip()
        if part.startswith(want):
            value = part[len(want) :].strip('"')
            return value if 0 < len(value) <= 256 else None
    return None
