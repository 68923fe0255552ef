"""The hash chain: verify names changed, deleted, inserted and reordered records."""

from __future__ import annotations

import hashlib
import hmac
import random
from pathlib import Path

import orjson
import pytest
from audit_support import SECRET, fill, renumber, sample, ship_all, sql, sqlite_url

from fortress.audit import chain
from fortress.audit.chain import GENESIS, ChainVerifier, Problem, canonical, chain_hash, seal, summarize
from fortress.audit.journal import Journal
from fortress.audit.query import verify
from fortress.audit.sql import SqlSink
from fortress.config import parse_config
from fortress.core.secret import SecretMissing, load_secret

N = 30


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    """A store holding one gateway's chain of N records (seq 1..N), plus an anchor at N."""
    path = tmp_path / "fortress.db"
    j = Journal(tmp_path / "journal", "gw-a", SECRET)
    j.open()
    await fill(j, N)
    j.close()
    store = SqlSink(sqlite_url(path), "gw-a")
    ship_all(j, store)
    return path


def problems(db: Path, **kw) -> list[tuple[int, str]]:
    store = SqlSink(sqlite_url(db), "gw-a")
    report = verify(store.connect(), SECRET, **kw)
    return [(p.seq, p.kind) for p in report.problems]


def test_intact_chain_verifies(db: Path) -> None:
    store = SqlSink(sqlite_url(db), "gw-a")
    report = verify(store.connect(), SECRET)
    assert report.ok and report.records == {"gw-a": N}


def test_wrong_secret_fails_everything(db: Path) -> None:
    store = SqlSink(sqlite_url(db), "gw-a")
    report = verify(store.connect(), b"another secret")
    assert not report.ok


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_records SET status = 500 WHERE seq = 7",
        "UPDATE audit_records SET user = 'mallory' WHERE seq = 7",
        "UPDATE audit_records SET output_tokens = output_tokens + 1 WHERE seq = 7",
        "UPDATE audit_records SET ts = ts - 3600 WHERE seq = 7",
        "UPDATE audit_records SET body = '{\"messages\": 2}' WHERE seq = 7",
        "UPDATE audit_records SET hash = '" + "0" * 64 + "' WHERE seq = 7",
    ],
)
def test_changed_record_is_named(db: Path, statement: str) -> None:
    sql(db, statement)
    found = problems(db)
    assert (7, "changed") in found
    assert all(seq in (7, 8) for seq, _ in found), found


def test_changed_last_record_is_named(db: Path) -> None:
    sql(db, "UPDATE audit_records SET status = 404 WHERE seq = ?", N)
    assert problems(db) == [(N, "changed")]


def test_deleted_record_is_named(db: Path) -> None:
    sql(db, "DELETE FROM audit_records WHERE seq = 12")
    assert problems(db) == [(12, "deleted")]


def test_deleted_run_is_named(db: Path) -> None:
    sql(db, "DELETE FROM audit_records WHERE seq BETWEEN 3 AND 5")
    assert problems(db) == [(3, "deleted"), (4, "deleted"), (5, "deleted")]


def test_deleted_first_record_is_named(db: Path) -> None:
    sql(db, "DELETE FROM audit_records WHERE seq = 1")
    assert problems(db) == [(1, "deleted")]


def test_deletion_hidden_by_renumbering_is_named(db: Path) -> None:
    sql(db, "DELETE FROM audit_records WHERE seq = 10")
    renumber(db, 11, -1)
    found = problems(db)
    assert (10, "deleted") in found
    assert {(s, k) for s, k in found if k == "renumbered"} == {(s, "renumbered") for s in range(10, N)}


def test_inserted_record_is_named(db: Path) -> None:
    renumber(db, 9, +1)  # make room at seq 9
    prev = sql(db, "SELECT hash FROM audit_records WHERE seq = 8")[0][0]
    forged = {**sample(999), "gateway_id": "gw-a", "seq": 9}
    seal(b"the attacker's guess", forged, prev)
    cols = ", ".join(f'"{c}"' for c in forged)
    marks = ", ".join("?" for _ in forged)
    values = [orjson.dumps(v).decode() if k == "body" and v is not None else v for k, v in forged.items()]
    sql(db, f"INSERT INTO audit_records ({cols}) VALUES ({marks})", *values)
    found = problems(db)
    assert (9, "inserted") in found
    assert {k for s, k in found if s != 9} == {"renumbered"}


def test_appended_record_is_named(db: Path) -> None:
    sql(
        db,
        "INSERT INTO audit_records (gateway_id, seq, request_id, ts, status, prev_hash, hash) "
        "SELECT gateway_id, seq + 1, 'forged', ts, 200, hash, ? FROM audit_records WHERE seq = ?",
        "f" * 64,
        N,
    )
    found = problems(db)
    assert found == [(N + 1, "changed")]


def test_reordered_records_are_named(db: Path) -> None:
    sql(db, "UPDATE audit_records SET seq = -1 WHERE seq = 15")
    sql(db, "UPDATE audit_records SET seq = 15 WHERE seq = 16")
    sql(db, "UPDATE audit_records SET seq = 16 WHERE seq = -1")
    assert problems(db) == [(15, "reordered"), (16, "reordered")]


def test_swapped_contents_are_named(db: Path) -> None:
    # Swap every column but seq between two rows: the same as moving them.
    cols = [c for c in ("request_id", "ts", "status", "latency_ms", "prev_hash", "hash", "stream", "body")]
    a = sql(db, f"SELECT {', '.join(cols)} FROM audit_records WHERE seq = 20")[0]
    b = sql(db, f"SELECT {', '.join(cols)} FROM audit_records WHERE seq = 21")[0]
    sets = ", ".join(f"{c} = ?" for c in cols)
    sql(db, f"UPDATE audit_records SET {sets} WHERE seq = 20", *b)
    sql(db, f"UPDATE audit_records SET {sets} WHERE seq = 21", *a)
    assert problems(db) == [(20, "reordered"), (21, "reordered")]


def test_truncated_tail_caught_by_anchor(db: Path) -> None:
    head = sql(db, "SELECT hash FROM audit_records WHERE seq = ?", N)[0][0]
    sql(db, "INSERT INTO audit_anchors VALUES ('gw-a', ?, ?, 0)", N, head)
    assert problems(db) == []
    sql(db, "DELETE FROM audit_records WHERE seq > ?", N - 3)
    found = problems(db)
    assert found and found[0] == (N - 2, "truncated")


def test_local_anchor_file_catches_truncation_of_store_and_anchors(db: Path, tmp_path: Path) -> None:
    head = sql(db, "SELECT hash FROM audit_records WHERE seq = ?", N)[0][0]
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_bytes(orjson.dumps({"gateway_id": "gw-a", "seq": N, "hash": head, "ts": 0}) + b"\n{torn")
    sql(db, "DELETE FROM audit_records WHERE seq = ?", N)
    assert problems(db) == []  # the store alone cannot tell
    assert problems(db, anchors_file=anchors) == [(N, "truncated")]


def test_verifier_handles_long_renumbered_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "_MAX_REGION", 50)  # force several diagnosis windows
    rows = build_chain(400)
    del rows[100]
    for r in rows[100:]:
        r["seq"] -= 1
    found = ChainVerifier(SECRET, "gw-x").feed_all(rows)
    assert [(p.seq, p.kind) for p in found if p.kind != "renumbered"] == [(101, "deleted")]
    assert sum(p.kind == "renumbered" for p in found) == 299
    lines = summarize(found)
    assert lines == [
        "gw-x seq 101: deleted: record 101 is missing",
        "gw-x seq 101-399: renumbered: hold records 102-400 (renumbered by -1) (299 records)",
    ]


def test_verifier_random_tampering_always_detected() -> None:
    rng = random.Random(7)
    for _ in range(40):
        rows = build_chain(60)
        action = rng.choice(["change", "delete", "swap"])
        # Deleting the very last record is what anchors are for (tested above).
        i = rng.randrange(59 if action == "delete" else 60)
        if action == "change":
            rows[i]["status"] = 418
        elif action == "delete":
            del rows[i]
        else:
            j = min(i + 1, 59) if i < 59 else i - 1
            rows[i]["seq"], rows[j]["seq"] = rows[j]["seq"], rows[i]["seq"]
            rows.sort(key=lambda r: r["seq"])
        found = ChainVerifier(SECRET, "gw-x").feed_all(rows)
        assert found, (action, i)


def test_hash_is_hmac_of_prev_and_canonical_bytes() -> None:
    rec = {**sample(1), "gateway_id": "gw-x", "seq": 1}
    line = seal(SECRET, rec, GENESIS)
    assert orjson.loads(line) == rec
    assert rec["hash"] == chain_hash(SECRET, GENESIS, canonical(rec))
    assert b'"hash"' not in canonical(rec)


def test_secret_shared_with_access_layer(tmp_path: Path) -> None:
    cfg = parse_config(f"state_dir: {tmp_path}", env={})
    with pytest.raises(SecretMissing):
        load_secret(cfg, create=False)
    from fortress.core.secret import load_secret as access_secret

    first = access_secret(cfg)
    assert load_secret(cfg) == first == load_secret(cfg, create=False)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    other = parse_config(f"state_dir: {tmp_path / 'a'}", env={})
    created = load_secret(other)  # the audit layer first this time
    assert access_secret(other) == created
    assert not [p for p in (tmp_path / "a").iterdir() if p.name != "secret"]  # no temp left
    cfg2 = parse_config(f"state_dir: {tmp_path / 'b'}\nauth: {{secret: s3cr3t}}", env={})
    assert load_secret(cfg2) == b"s3cr3t"


def test_secret_created_once_under_concurrency(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cfg = parse_config(f"state_dir: {tmp_path}", env={})
    with ThreadPoolExecutor(8) as pool:
        values = set(pool.map(lambda _: load_secret(cfg), range(16)))
    assert len(values) == 1 and len(values.pop()) == 64


def test_problem_text() -> None:
    p = Problem("gw-a", 7, "changed", "its content does not match its hash")
    assert str(p) == "gw-a seq 7: changed: its content does not match its hash"


def build_chain(n: int) -> list[dict]:
    rows, prev = [], GENESIS
    for i in range(n):
        rec = {**sample(i, ts=1_700_000_000.0 + i), "gateway_id": "gw-x", "seq": i + 1}
        seal(SECRET, rec, prev)
        prev = rec["hash"]
        rows.append(rec)
    return rows


def test_hash_is_hmac_sha256_of_prev_and_canonical_under_any_secret() -> None:
    """The pre-keyed HMAC gives the documented hash, for many secrets in turn (more than it keeps
    keyed) and back again: a record is never hashed under another secret's pads."""
    secrets_ = [bytes([i]) * (16 + i) for i in range(40)]
    for secret in secrets_ + secrets_[::-1]:
        rec = sample(len(secret))
        body = seal(secret, rec, "ab" * 32)
        canon = canonical(rec)
        want = hmac.new(secret, b"ab" * 32 + canon, hashlib.sha256).hexdigest()
        assert rec["hash"] == want == chain_hash(secret, "ab" * 32, canon)
        assert orjson.loads(body)["hash"] == want
        assert chain.is_sealed(secret, rec) and not chain.is_sealed(secrets_[0] + b"x", rec)
