"""The hash chain that makes the audit trail tamper-evident, and its verifier.

Each gateway's records form one chain ordered by ``seq``::

    hash = HMAC-SHA-256(secret, prev_hash + canonical(record))

where ``canonical`` is the record as orjson with sorted keys, without ``hash`` (``prev_hash``,
``seq`` and ``gateway_id`` are part of it, so moving a record changes what its hash covers).
The first record's ``prev_hash`` is ``GENESIS``. Without the secret nobody can produce a valid
hash, so a changed, inserted, deleted or reordered record shows, and ``ChainVerifier`` says
which one and how. Anchors (the chain head written every ``audit.anchor_every`` seconds, in the
store and in a local file) catch a cut-off tail.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

GENESIS = "0" * 64
_SORT = orjson.OPT_SORT_KEYS


# -- the secret lives in fortress.core.secret (shared with the access layer) --------------


# -- hashing ----------------------------------------------------------------------------------


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: orjson, sorted keys, without ``hash``."""
    return orjson.dumps({k: v for k, v in record.items() if k != "hash"}, option=_SORT)


_KEYED: dict[bytes, Any] = {}


def _hmac_hex(secret: bytes, data: bytes) -> str:
    """HMAC-SHA-256 of ``data``, hex, from a copy of an HMAC already keyed with ``secret``: a
    one-shot ``hmac.digest`` looks the digest up by name and derives the keyed pads again for
    every record, which costs more than hashing the record itself. The copy is of OpenSSL's
    HMAC object itself where ``hmac`` has one (its ``copy``, ``update`` and ``hexdigest`` are
    then C calls rather than three Python methods around them)."""
    base = _KEYED.get(secret)
    if base is None:
        if len(_KEYED) >= 16:
            _KEYED.clear()  # a gateway has one secret; tests and tools a few
        keyed = hmac.new(secret, digestmod=hashlib.sha256)
        base = _KEYED[secret] = getattr(keyed, "_hmac", None) or keyed
    h = base.copy()
    h.update(data)
    return h.hexdigest()


def chain_hash(secret: bytes, prev_hash: str, canon: bytes) -> str:
    """HMAC-SHA-256(secret, prev_hash + canonical bytes), hex."""
    return _hmac_hex(secret, prev_hash.encode() + canon)


def seal(secret: bytes, record: dict[str, Any], prev_hash: str) -> bytes:
    """Set ``prev_hash`` and ``hash`` on ``record``; return its JSON (canonical order + hash).

    The journal writes exactly these bytes, so sealing costs one serialisation and one HMAC.
    """
    record["prev_hash"] = prev_hash
    record.pop("hash", None)
    canon = orjson.dumps(record, option=_SORT)
    h = _hmac_hex(secret, prev_hash.encode() + canon)
    record["hash"] = h
    return canon[:-1] + b',"hash":"' + h.encode() + b'"}'


def is_sealed(secret: bytes, record: Mapping[str, Any], seq: int | None = None) -> bool:
    """Does ``record`` match its own hash (taking ``seq`` as its sequence number if given)?"""
    body = {k: v for k, v in record.items() if k != "hash"}
    if seq is not None:
        body["seq"] = seq
    canon = orjson.dumps(body, option=_SORT)
    expected = _hmac_hex(secret, str(record.get("prev_hash", "")).encode() + canon)
    return hmac.compare_digest(expected, str(record.get("hash", "")))


# -- verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a chain, at stored sequence number ``seq``."""

    gateway_id: str
    seq: int
    # changed | deleted | inserted | reordered | renumbered | duplicate | unlinked | anchor | truncated
    kind: str
    detail: str
    true_seq: int | None = None  # reordered / renumbered / duplicate: the record actually stored there

    def __str__(self) -> str:
        return f"{self.gateway_id} seq {self.seq}: {self.kind}: {self.detail}"


_CONTEXT = 64  # verified rows kept before an anomaly, to resolve links into it
_RESYNC = 8  # consecutive well-linked rows that end an anomaly
_MAX_REGION = 10_000  # rows diagnosed at once (bounds memory on a badly damaged chain)
_WINDOW = 64  # how far a moved record is searched for around where it is stored


class ChainVerifier:
    """Checks one gateway's records, fed in stored ``seq`` order, in constant memory.

    The common case costs one HMAC per record. When something does not match, the rows until
    the chain re-synchronises are diagnosed together: each row is matched to the sequence
    number its hash was made for (via its links, or a small search), which tells a changed
    record (matches no position) from an inserted one (its position is taken by a genuine
    record), a deleted one (a position nobody holds) and reordered or renumbered ones (genuine
    records at the wrong position).
    """

    def __init__(self, secret: bytes, gateway_id: str, anchors: Mapping[int, str] | None = None) -> None:
        self.secret = secret
        self.gateway_id = gateway_id
        self.anchors = dict(anchors or {})
        self.expected = 1
        self.prev = GENESIS
        self.count = 0
        self.problems: list[Problem] = []
        self._recent: deque[dict[str, Any]] = deque(maxlen=_CONTEXT)
        self._region: list[dict[str, Any]] = []
        self._good_run = 0

    # feeding -----------------------------------------------------------------------------

    def feed(self, row: dict[str, Any]) -> None:
        """Check the next row (``row`` holds every audit column, ``seq`` as stored)."""
        self.count += 1
        if not self._region:
            if row["seq"] == self.expected and row["prev_hash"] == self.prev and is_sealed(self.secret, row):
                self._accept(row, row["seq"])
                return
            self._region = [row]
            self._good_run = 0
            return
        last = self._region[-1]
        self._region.append(row)
        if row["seq"] == last["seq"] + 1 and row["prev_hash"] == last["hash"] and is_sealed(self.secret, row):
            self._good_run += 1
        else:
            self._good_run = 0
        if self._good_run >= _RESYNC or len(self._region) >= _MAX_REGION:
            self._diagnose()

    def feed_all(self, rows: Iterable[dict[str, Any]]) -> list[Problem]:
        for row in rows:
            self.feed(row)
        return self.finish()

    def finish(self) -> list[Problem]:
        """Diagnose what is pending, check the anchors past the end; return every problem."""
        if self._region:
            self._diagnose()
        last = self.expected - 1
        beyond = [s for s in self.anchors if s > last]
        if beyond:
            top = max(beyond)
            missing = f"record {top} is" if top == last + 1 else f"records {last + 1}-{top} are"
            self._problem(last + 1, "truncated", f"{missing} missing: the anchor at seq {top} has no record")
        self.anchors.clear()
        return self.problems

    # internals ---------------------------------------------------------------------------

    def _problem(self, seq: int, kind: str, detail: str, true_seq: int | None = None) -> None:
        self.problems.append(Problem(self.gateway_id, seq, kind, detail, true_seq))

    def _accept(self, row: dict[str, Any], seq: int) -> None:
        anchored = self.anchors.pop(seq, None)
        if anchored is not None and anchored != row["hash"]:
            self._problem(seq, "anchor", "its hash differs from the anchor recorded for this position")
        self.prev = row["hash"]
        self.expected = seq + 1
        self._recent.append(row)

    def _true_seq(
        self,
        row: dict[str, Any],
        known: dict[int, int | None],
        by_hash: dict[str, dict[str, Any]],
        by_prev: dict[str, list[dict[str, Any]]],
        offset: int,
    ) -> int | None:
        stored = row["seq"]
        cands = [stored]
        pred = by_hash.get(row["prev_hash"])
        pred_seq = known.get(id(pred)) if pred is not None else None
        if pred_seq is not None:
            cands.append(pred_seq + 1)
        if row["prev_hash"] == self.prev:
            cands.append(self.expected)
        if row["prev_hash"] == GENESIS:
            cands.append(1)
        if offset:
            cands.append(stored + offset)
        cands += [succ["seq"] - 1 for succ in by_prev.get(row["hash"], ())]
        tried: set[int] = set()
        for c in cands:
            if c not in tried and c > 0:
                tried.add(c)
                if is_sealed(self.secret, row, c):
                    return c
        for d in range(1, _WINDOW + 1):
            for c in (stored + d, stored - d):
                if c > 0 and c not in tried and is_sealed(self.secret, row, c):
                    return c
        return None

    def _diagnose(self) -> None:
        region, self._region = self._region, []
        context = list(self._recent)
        start, start_prev = self.expected, self.prev
        known: dict[int, int | None] = {id(r): r["seq"] for r in context}
        by_hash = {r["hash"]: r for r in context}
        by_prev: dict[str, list[dict[str, Any]]] = {}
        for r in region:
            by_hash.setdefault(r["hash"], r)
            by_prev.setdefault(r["prev_hash"], []).append(r)
        offset = 0
        for r in region:
            t = self._true_seq(r, known, by_hash, by_prev, offset)
            known[id(r)] = t
            if t is not None:
                offset = t - r["seq"]

        genuine: dict[int, dict[str, Any]] = {}
        moved: dict[int, int] = {}  # stored seq -> true seq
        bad: list[dict[str, Any]] = []
        for r in region:
            t = known[id(r)]
            if t is None:
                bad.append(r)
            elif t < start or t in genuine:
                self._problem(r["seq"], "duplicate", f"a copy of record {t}", t)
            else:
                genuine[t] = r
                if t != r["seq"]:
                    moved[r["seq"]] = t
        top = max([start - 1, *genuine])
        for s, t in moved.items():
            # A cycle of positions (5 holds 6, 6 holds 5) is a reordering; a run shifted one
            # way is the renumbering that hides an insertion or a deletion.
            kind, cur = "renumbered", t
            for _ in range(len(moved)):
                if cur == s:
                    kind = "reordered"
                    break
                if cur not in moved:
                    break
                cur = moved[cur]
            self._problem(s, kind, f"holds record {t} (records {kind})", t)
        bad_slots = {r["seq"] for r in bad}
        referenced = {r["prev_hash"] for r in genuine.values()} | set(self.anchors.values())
        for r in bad:
            s = r["seq"]
            if s in genuine:
                self._problem(
                    s, "inserted", f"not part of the chain (record {s} is stored at seq {genuine[s]['seq']})"
                )
            elif r["hash"] in referenced or s <= top:
                self._problem(s, "changed", "its content does not match its hash")
            else:
                self._problem(
                    s,
                    "changed",
                    "its content does not match its hash (changed, or appended without the secret)",
                )
        for t in range(start, top + 1):
            if t not in genuine and t not in bad_slots:
                self._problem(t, "deleted", f"record {t} is missing")
        # Links between genuine neighbours: a break means a second chain was spliced in.
        prev_of = {t: r["hash"] for t, r in genuine.items()}
        for t in sorted(genuine):
            want = prev_of.get(t - 1, start_prev if t == start else None)
            if want is not None and genuine[t]["prev_hash"] != want:
                self._problem(genuine[t]["seq"], "unlinked", f"record {t} does not follow record {t - 1}")
            anchored = self.anchors.pop(t, None)
            if anchored is not None and anchored != genuine[t]["hash"]:
                self._problem(t, "anchor", "its hash differs from the anchor recorded for this position")
        # Carry on after the region: from the last position anyone holds.
        end = max([top, *bad_slots]) if bad_slots else top
        holder = genuine.get(end) or next((r for r in reversed(bad) if r["seq"] == end), None)
        if holder is not None:
            self.prev = holder["hash"]
        self.expected = end + 1
        self._recent.clear()
        self._recent.extend(r for r in region if known[id(r)] is not None)


def _shift(p: Problem) -> int | None:
    return None if p.true_seq is None else p.true_seq - p.seq


def summarize(problems: list[Problem]) -> list[str]:
    """Human lines, with runs of the same kind of problem on consecutive seqs folded into one."""
    out: list[str] = []
    i = 0
    ps = sorted(problems, key=lambda p: (p.gateway_id, p.seq, p.kind))
    while i < len(ps):
        p = ps[i]
        j = i
        while (
            j + 1 < len(ps)
            and ps[j + 1].gateway_id == p.gateway_id
            and ps[j + 1].kind == p.kind
            and ps[j + 1].seq == ps[j].seq + 1
            and _shift(ps[j + 1]) == _shift(p)
        ):
            j += 1
        if j - i >= 2:
            last = ps[j]
            if p.true_seq is not None and last.true_seq is not None:
                what = f"hold records {p.true_seq}-{last.true_seq} ({p.kind} by {p.seq - p.true_seq:+d})"
            else:
                what = p.detail if p.kind != "deleted" else f"records {p.seq}-{last.seq} are missing"
            out.append(f"{p.gateway_id} seq {p.seq}-{last.seq}: {p.kind}: {what} ({j - i + 1} records)")
        else:
            out.extend(str(q) for q in ps[i : j + 1])
        i = j + 1
    return out
