"""Hostile input and a hostile environment: oversized audit headers, a journal disk running out
of space, and the store (PostgreSQL or SQLite) down at start and through traffic.

In process first (the audit layer, the journal's disk guard, the shipper's backoff, the key
cache's snapshot), then real gateway processes in front of a simulated replica, with a store of
their own that the test stops and starts.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import stat
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from audit_support import SECRET, fill, sqlite_url
from conftest import Cluster
from helpers import assert_schema, fortress_argv, free_port, http_get, wait_for
from services import _stop, _wait_port, postgres_bin

from fortress.access.keys import KeyCache, KeyStore, digest
from fortress.access.layer import build_access
from fortress.audit.journal import Journal
from fortress.audit.layer import AuditTrail, build_audit
from fortress.audit.shipper import Shipper
from fortress.audit.sql import SqlSink
from fortress.config import parse_config
from fortress.core.context import RequestContext
from fortress.core.errors import GatewayError
from fortress.store.db import dispose_engines, get_engine, migrate

AUDIT = {"x-llm-source": "tests", "x-llm-user": "alice", "x-llm-request-type": "chat"}
HEADERS = {k.encode(): v.encode() for k, v in AUDIT.items()}
MIB = 1 << 20
KEY_RE = re.compile(r"fk_[a-z0-9]{8}_[A-Za-z0-9]{32}")


def dead_pg_url() -> str:
    """A PostgreSQL URL nothing listens on: connections are refused at once."""
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/fortress"


def ctx_with(headers: dict[bytes, bytes], **over: Any) -> RequestContext:
    ctx = RequestContext("req-1", "/v1/chat/completions", time.perf_counter(), "10.0.0.7")
    ctx.headers = dict(headers)
    for k, v in over.items():
        setattr(ctx, k, v)
    return ctx


def audit_config(tmp_path: Path, audit: str = "{}", database: str | None = None) -> Any:
    db = f"database: {{url: '{database}'}}\n" if database else ""
    return parse_config(
        f"state_dir: {tmp_path / 'state'}\n{db}auth: {{enabled: false}}\naudit: {audit}\n", env={}
    )


# -- audit input bounds (in process) ---------------------------------------------------------


def test_audit_headers_are_bounded(tmp_path: Path) -> None:
    assert audit_config(tmp_path).audit.max_header_bytes == 256  # the default
    layer = build_audit(audit_config(tmp_path, "{max_header_bytes: 64}"))
    layer.check_headers(ctx_with({**HEADERS, b"x-llm-user": b"u" * 64, b"x-request-id": b"r" * 64}))
    for name in ("x-llm-source", "x-llm-user", "x-llm-request-type", "x-request-id"):
        with pytest.raises(GatewayError) as exc:
            layer.check_headers(ctx_with({**HEADERS, name.encode(): b"v" * 65}))
        err = exc.value
        assert (err.status, err.code, err.param, err.type) == (
            400,
            "header_too_long",
            name,
            "invalid_request_error",
        )
        assert name in err.message and "64" in err.message and "v" * 20 not in err.message


def test_a_record_is_bounded_whatever_the_request_carries(tmp_path: Path) -> None:
    """A request answered before the header check (a 401) still has its oversized headers in
    the context: the record keeps the first ``max_header_bytes`` of each, and bounds the error,
    the model name and the captured body."""
    from fortress.audit.records import RecordBuilder

    cfg = audit_config(
        tmp_path,
        "{body_capture: metadata, required_headers: [x-llm-source, x-llm-user, x-llm-request-type, x-team]}",
    )
    huge = b"u" * MIB
    body = {
        "model": "m",
        "messages": [{"role": f"role-{i}-" + "r" * 200, "content": "x"} for i in range(2000)],
        **{f"p{i}": i for i in range(2000)},
        "k" * 10_000: 1,
    }
    ctx = ctx_with(
        {**HEADERS, b"x-llm-user": huge, b"x-llm-source": huge, b"x-team": huge},
        status=404,
        error="The model '" + "m" * MIB + "' does not exist or is not served here.",
        model="m" * MIB,
        body=body,
        bytes_in=len(orjson.dumps(body)),
    )
    rec = RecordBuilder(cfg.audit).build(ctx)
    size = len(orjson.dumps(rec))
    assert size < 8 * 1024, size
    assert rec["user"].startswith("u" * 256) and f"truncated: {MIB} bytes" in rec["user"]
    assert not rec["user"].startswith("u" * 257)
    assert rec["body"]["headers"]["x-team"].startswith("u" * 256)
    assert len(rec["error"]) < 1200 and len(rec["model"]) < 400
    assert len(rec["body"]["roles"]) <= 9 and rec["body"]["messages"] == 2000
    assert len(rec["body"]["params"]) <= 32 and rec["body"]["params_truncated"] is True

    full = audit_config(tmp_path, "{body_capture: full, redact_fields: [], max_body_capture_bytes: 4096}")
    rec = RecordBuilder(full.audit).build(ctx)
    assert len(orjson.dumps(rec)) < 8 * 1024
    assert "over the 4096-byte bound" in rec["body"]["truncated"] and rec["body"]["messages"] == 2000
    small = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    ctx = ctx_with(HEADERS, body=small, bytes_in=len(orjson.dumps(small)), model="m", status=200)
    assert RecordBuilder(full.audit).build(ctx)["body"] == small  # under the bound: kept whole


# -- the journal's disk guard (in process) ---------------------------------------------------


class Disk:
    """A ``DiskUsage`` whose free space the test sets."""

    def __init__(self, free: int, total: int = 100 << 30) -> None:
        self.free, self.total = free, total

    def __call__(self, _path: Path) -> tuple[int, int]:
        return self.free, self.total


async def until(pred: Any, seconds: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_journal_below_its_free_space_floor_refuses_new_requests(tmp_path: Path) -> None:
    disk = Disk(free=10 << 30)
    layer = AuditTrail(audit_config(tmp_path), disk_usage=disk)
    assert layer.config.audit.min_free_bytes == 256 * MIB  # the default
    await layer.start()
    try:
        stats = layer.stats()
        assert stats["journal_disk_free_bytes"] == 10 << 30 and stats["journal_disk_total_bytes"] == 100 << 30
        assert stats["journal_refused_total"] == 0
        admitted = ctx_with(HEADERS)
        layer.check_headers(admitted)

        disk.free = 100 * MIB  # the disk fills up; the journal notices within about a second
        await until(lambda: layer.stats()["journal_disk_free_bytes"] == 100 * MIB, what="the low reading")
        refused = ctx_with(HEADERS, request_id="req-refused")
        with pytest.raises(GatewayError) as exc:
            layer.check_headers(refused)
        err = exc.value
        assert (err.status, err.code, err.type) == (503, "audit_journal_full", "service_unavailable")
        assert set(err.as_dict()["error"]) == {"message", "type", "param", "code"}
        assert (b"retry-after", b"10") in err.headers
        assert layer.stats()["journal_refused_total"] == 1

        # The request admitted before still gets its record (the reserve is for it) ...
        admitted.attempts, admitted.status = 1, 200
        await layer.record(admitted)
        assert layer.stats()["journal_seq"] == 1
        # ... the refused one (and a 401 meanwhile) are answered without one.
        refused.status, refused.error = err.status, err.message
        await layer.record(refused)
        await layer.record(ctx_with({}, status=401, error="no key"))
        stats = layer.stats()
        assert stats["journal_seq"] == 1 and stats["journal_unrecorded_total"] == 2

        disk.free = 10 << 30  # space is freed: new requests are taken again
        await until(lambda: not layer.stats()["journal_low_space"], what="the journal to take requests")
        layer.check_headers(ctx_with(HEADERS))
        await layer.record(ctx_with(HEADERS, status=400, error="bad"))
        assert layer.stats()["journal_seq"] == 2
    finally:
        await layer.stop()


# -- the shipper through an outage (in process) ----------------------------------------------


async def test_shipper_backs_off_through_an_outage_and_logs_it_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Commits keep arriving while the store is down: the backoff still doubles (one attempt at
    0, 0.5, 1.5, 3.5 s ...), one WARNING says shipping stopped and one INFO that it is back."""
    down = True

    def fault(point: str) -> None:
        if down and point == "inserted":
            raise ConnectionError("connection refused: the database is down")

    caplog.set_level(logging.DEBUG, logger="fortress.audit.shipper")
    j = Journal(tmp_path / "j", "gw-a", SECRET, group_commit_ms=0)
    j.open()
    sh = Shipper(j, SqlSink(sqlite_url(tmp_path / "f.db"), "gw-a", fault=fault), batch=100)
    sh.start()
    try:
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 3.0:  # ~hundreds of commits, each one a wake-up before
            n += len(await fill(j, 1, start=n))
            await asyncio.sleep(0.005)
        assert n > 100
        assert not sh.healthy and sh.last_error and "database is down" in sh.last_error
        assert 2 <= sh.failures <= 4, sh.failures  # 0, 0.5, 1.5 s (3.5 s is past the window)
        assert sh.backoff >= 1.0
        down = False
        await until(lambda: sh.store_pos >= n, 30, "the backlog in the store")
        assert sh.healthy and sh.last_error is None and sh.backoff == 0.0
    finally:
        j.close()
        sh.stop()
    records = [r for r in caplog.records if r.name == "fortress.audit.shipper"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    infos = [r for r in records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and "database is down" in warnings[0].getMessage()
    assert len(infos) == 1, [r.getMessage() for r in infos]
    waited = int(re.search(r"(\d+) records were waiting", infos[0].getMessage()).group(1))  # type: ignore[union-attr]
    assert 0 < waited <= n
    assert sh.outages == 1


async def test_shipper_stopping_during_an_outage_gives_up_at_its_deadline(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", "gw-a", SECRET)
    j.open()
    sh = Shipper(j, SqlSink(dead_pg_url(), "gw-a"), backoff_max=30)
    sh.start()
    await fill(j, 3)
    await until(lambda: sh.failures >= 1, what="a first failure")
    j.close()
    t0 = time.monotonic()
    await asyncio.to_thread(sh.stop, 2.0)
    assert time.monotonic() - t0 < 10
    assert sh.failures < 10, sh.failures  # spaced by the backoff, not a tight loop to the deadline
    assert not sh.alive


# -- the key cache's snapshot (in process) ---------------------------------------------------


async def test_key_cache_snapshot_serves_known_keys_while_the_store_is_down(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    snap = tmp_path / "state" / "key-cache.json"
    store = KeyStore(migrate(url), SECRET)
    key, rec = store.create("bot", "default", ["m"])
    cache = KeyCache(store, 0.1, snapshot=snap, source=url)
    await cache.start()
    await cache.stop()
    assert cache.reachable and cache.size == 1
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600
    text = snap.read_text()
    assert key not in text and digest(SECRET, key.encode()).hex() in text  # hashes, never keys
    assert [p.name for p in snap.parent.iterdir()] == ["key-cache.json"]  # no temp file left

    def cache_over_a_dead_store(secret: bytes = SECRET, source: str = url) -> KeyCache:
        dead = dead_pg_url()
        return KeyCache(
            KeyStore(get_engine(dead), secret),
            0.1,
            snapshot=snap,
            prepare=lambda: migrate(dead),
            source=source,
        )

    offline = cache_over_a_dead_store()
    await offline.start()
    try:
        assert not offline.reachable and offline.last_error
        ident = offline.lookup(key.encode())
        assert ident is not None and (ident.key_id, ident.models) == (rec["id"], frozenset({"m"}))
        assert offline.lookup(b"fk_00000000_" + b"x" * 32) is None
        assert offline.age is not None and offline.age < 60
    finally:
        await offline.stop()
    # Another store's snapshot, another secret's, or an edited one is not loaded.
    for other in (cache_over_a_dead_store(source="sqlite:///elsewhere.db"), cache_over_a_dead_store(b"x")):
        await other.start()
        await other.stop()
        assert other.size == 0 and other.age is None
    doc = json.loads(snap.read_text())
    doc["data"]["rows"][0]["plan"] = "premium"
    snap.write_text(json.dumps(doc))
    edited = cache_over_a_dead_store()
    await edited.start()
    await edited.stop()
    assert edited.size == 0
    dispose_engines()


async def test_access_layer_starts_with_the_store_down_and_answers_503_for_unknown_keys(
    tmp_path: Path,
) -> None:
    cfg = parse_config(
        f"state_dir: {tmp_path / 'state'}\ndatabase: {{url: '{dead_pg_url()}'}}\naudit: {{enabled: false}}\n",
        env={},
    )
    access = build_access(cfg)
    await access.start()  # not fatal
    try:
        stats = access.stats()
        assert stats["key_store_reachable"] is False and stats["keys_cached"] == 0
        assert stats["key_cache_age_seconds"] is None and stats["key_store_error"]
        assert stats["limiter_state"] == "ok"  # the limiter's own stats, merged in
        ctx = ctx_with({b"authorization": b"Bearer fk_00000000_" + b"y" * 32})
        with pytest.raises(GatewayError) as exc:
            access.authenticate(ctx)
        err = exc.value
        assert (err.status, err.code, err.type) == (503, "key_store_unavailable", "service_unavailable")
        assert (b"retry-after", b"5") in err.headers
        with pytest.raises(GatewayError) as exc:
            access.authenticate(ctx_with({}))
        assert exc.value.status == 401  # no key at all is still the client's mistake
    finally:
        await access.stop()
        dispose_engines()


# -- real gateways ---------------------------------------------------------------------------

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def post(
    url: str, headers: dict[str, str], body: dict[str, Any] | None = None
) -> tuple[int, dict[str, str], Any]:
    """POST a chat completion; (status, lower-case headers, parsed JSON body)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body or CHAT),
            {"content-type": "application/json", **headers},
        )
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw)
    finally:
        conn.close()


def gateway_yaml(
    tmp_path: Path, sim_url: str, audit: str = "{}", rest: str = "auth: {enabled: false}\n"
) -> str:
    return (
        f"state_dir: {tmp_path / 'state'}\n{rest}audit: {audit}\n"
        "pools:\n  - model: m\n    health_check: {interval: 1, timeout: 0.5, healthy_threshold: 1}\n"
        f"    replicas: [{{url: '{sim_url}'}}]\n"
    )


def stored_records(db: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute("SELECT status, user, length(user) FROM audit_records ORDER BY seq").fetchall()
    finally:
        con.close()


def journal_bytes(state: Path) -> int:
    """Bytes of records in the journal (the active segment is zero-filled ahead of them)."""
    return sum(len(p.read_bytes().rstrip(b"\0")) for p in (state / "journal").glob("seg-*.log"))


def test_an_oversized_audit_header_gets_400_and_stays_out_of_the_journal(
    cluster: Cluster, tmp_path: Path
) -> None:
    sim_url, _ = cluster.sim("m")
    url, gw = cluster.gateway(gateway_yaml(tmp_path, sim_url))
    status, _, body = post(url, {**AUDIT, "x-llm-user": "a" * 256})  # as long as allowed
    assert status == 200, body
    before = journal_bytes(tmp_path / "state")
    # 16 KiB: within what the HTTP server takes, far over the audit bound.
    status, headers, body = post(url, {**AUDIT, "x-llm-user": "u" * (16 * 1024)})
    assert status == 400
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["code"], err["param"]) == ("header_too_long", "x-llm-user")
    assert err["type"] == "invalid_request_error"
    assert "x-llm-user" in err["message"] and "256" in err["message"]
    assert "x-request-id" in headers
    # 1 MiB: refused too, by the audit bound or, first, by the server's own limit on headers.
    try:
        status, _, body = post(url, {**AUDIT, "x-llm-user": "u" * MIB})
    except ConnectionError:  # the server closed the connection while the header was uploading
        status, body = 431, {"error": {"code": "request_header_fields_too_large"}}
    assert (status, body["error"]["code"]) in (
        (400, "header_too_long"),
        (431, "request_header_fields_too_large"),
    ), body
    status, _, body = post(url, {**AUDIT, "x-llm-user": "a" * 257})
    assert status == 400 and body["error"]["param"] == "x-llm-user"
    status, _, body = post(url, {**AUDIT, "x-request-id": "r" * 300})
    assert status == 400 and body["error"]["param"] == "x-request-id"
    # The 1 MiB header did not reach the disk: the journal grew by a few small records.
    wait_for(lambda: journal_bytes(tmp_path / "state") > before, what="the 400s' records")
    assert journal_bytes(tmp_path / "state") - before < 16 * 1024
    gw.stop()  # a clean stop ships everything
    rows = stored_records(tmp_path / "state" / "fortress.db")
    assert rows[0] == (200, "a" * 256, 256)
    assert [r[0] for r in rows[1:]].count(400) >= 3 and {r[0] for r in rows[1:]} <= {400, 431}
    assert all(r[2] < 400 for r in rows)  # every stored user is bounded (and marked truncated)
    assert rows[1][1].startswith("u" * 256) and "truncated" in rows[1][1]


def test_a_journal_below_its_free_space_floor_answers_503(cluster: Cluster, tmp_path: Path) -> None:
    sim_url, _ = cluster.sim("m")
    # A floor above any disk's free space: the journal is "full" from the start.
    url, gw = cluster.gateway(gateway_yaml(tmp_path, sim_url, "{min_free_bytes: 1152921504606846976}"))
    for _ in range(3):
        status, headers, body = post(url, AUDIT)
        assert status == 503, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert (err["code"], err["type"]) == ("audit_journal_full", "service_unavailable")
        assert int(headers["retry-after"]) >= 1
    assert "below audit.min_free_bytes" in gw.output()
    gw.stop()
    assert journal_bytes(tmp_path / "state") == 0  # refused requests wrote nothing
    db = tmp_path / "state" / "fortress.db"
    assert not db.exists() or stored_records(db) == []


# -- the store down at start, then back --------------------------------------------------------


class Store:
    """A database of the test's own that it can take down and bring back, data kept."""

    url: str

    def down(self) -> None:
        raise NotImplementedError

    def up(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PostgresStore(Store):
    """A PostgreSQL cluster on a free port; ``down`` is a fast shutdown (clients cut off)."""

    def __init__(self) -> None:
        self.bindir = postgres_bin()
        self.dir = Path(tempfile_dir("fortress-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        initdb = [*self.run_as, str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres"]
        out = subprocess.run(
            [*initdb, "-A", "trust", "-E", "UTF8", "--no-sync"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.up()
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE fortress")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/fortress"

    def up(self) -> None:
        log = self.dir / "postgres.log"
        cmd = [*self.run_as, str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        cmd += ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}"]
        cmd += ["-c", "fsync=off"]
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, log)
        deadline = time.monotonic() + 60
        while True:  # the port opens before the server takes queries ("starting up")
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=self.port, user="postgres", dbname="postgres"
                ) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "PostgreSQL did not take queries within 60 s"
                time.sleep(0.1)

    def down(self) -> None:
        ctl = [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]
        subprocess.run(ctl, capture_output=True, timeout=60)
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def count(self) -> int:
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="fortress") as conn:
            return int(conn.execute("SELECT count(*) FROM audit_records").fetchone()[0])  # type: ignore[index]

    def close(self) -> None:
        dispose_engines()
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)


class SqliteStore(Store):
    """A SQLite file whose directory ``down`` replaces with a plain file (an unmounted volume)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "db"
        self.dir.mkdir()
        self.moved = tmp / "db.away"
        self.url = f"sqlite:///{self.dir / 'fortress.db'}"

    def down(self) -> None:
        self.dir.rename(self.moved)
        self.dir.write_text("not a directory")

    def up(self) -> None:
        self.dir.unlink()
        self.moved.rename(self.dir)

    def count(self) -> int:
        con = sqlite3.connect(self.dir / "fortress.db", timeout=10)
        try:
            return int(con.execute("SELECT count(*) FROM audit_records").fetchone()[0])
        finally:
            con.close()

    def close(self) -> None:
        dispose_engines()


def tempfile_dir(prefix: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=prefix)


@pytest.fixture(params=["postgresql", "sqlite"])
def own_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store: Store = PostgresStore() if request.param == "postgresql" else SqliteStore(tmp_path)
    yield store
    store.close()


def create_key(config: Path, name: str) -> str:
    out = subprocess.run(
        fortress_argv("keys", "create", "--name", name, "-c", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr + out.stdout
    found = KEY_RE.search(out.stdout)
    assert found, out.stdout
    return found.group(0)


def lines(proc: Any, level: str, logger: str) -> list[str]:
    return [x for x in proc.output().splitlines() if f" {level} {logger}: " in x]


def test_a_gateway_starts_and_serves_with_its_store_down(
    own_store: Store, cluster: Cluster, tmp_path: Path
) -> None:
    store = own_store
    sim_url, _ = cluster.sim("m")
    text = gateway_yaml(
        tmp_path,
        sim_url,
        "{group_commit_ms: 2, ship_interval: 0.1}",
        f"database: {{url: '{store.url}'}}\nauth: {{cache_refresh: 1}}\n"
        # No bucket: the 4 s loop below sends back to back, faster than any fixed rate on a quiet
        # machine (a bucket of 1000/s ran dry there and answered 429).
        "plans: {default: {rate: null, burst: null, requests: {}}}\n",
    )
    config = tmp_path / "fortress.yaml"
    config.write_text(text)
    known = create_key(config, "known")
    answered = 0

    def call(key: str) -> tuple[int, dict[str, str], Any]:
        nonlocal answered
        out = post(url, {**AUDIT, "authorization": f"Bearer {key}"})
        answered += 1  # every answer has a record, whatever its status
        return out

    # An earlier run knew the key: its key cache left a snapshot in the state dir.
    url, first = cluster.gateway(text)
    assert call(known)[0] == 200
    first.stop()
    snapshot = tmp_path / "state" / "key-cache.json"
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600 and known not in snapshot.read_text()
    assert store.count() == answered

    store.down()
    url, gw = cluster.gateway(text)  # starts although its database is down
    assert call(known)[0] == 200
    stranger = "fk_" + secrets.token_hex(4) + "_" + secrets.token_hex(16)
    status, headers, body = call(stranger)
    assert status == 503, body
    assert (body["error"]["code"], body["error"]["type"]) == ("key_store_unavailable", "service_unavailable")
    assert int(headers["retry-after"]) >= 1 and stranger not in json.dumps(body)
    # Traffic through a few seconds of outage: several retries of the shipper, each commit a
    # wake-up it must not act on.
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.0:
        assert call(known)[0] == 200
    shipper = "fortress.audit.shipper"
    assert len(lines(gw, "WARNING", shipper)) == 1, gw.output()[-3000:]
    assert lines(gw, "INFO", shipper) == []
    cache_warnings = [x for x in lines(gw, "WARNING", "fortress.access") if "key cache:" in x]
    assert len(cache_warnings) == 2, cache_warnings  # the store unreachable; started from the snapshot

    store.up()
    wait_for(lambda: store.count() == answered, timeout=60, what="every answered request in the store")
    assert len(lines(gw, "WARNING", shipper)) == 1
    back = lines(gw, "INFO", shipper)
    assert len(back) == 1 and "records were waiting" in back[0], gw.output()[-3000:]
    waited = int(re.search(r"(\d+) records were waiting", back[0]).group(1))  # type: ignore[union-attr]
    assert waited >= 20
    assert [x for x in lines(gw, "INFO", "fortress.access") if "reachable again" in x]

    # The store is back: a brand-new key works once the cache has read it; a stranger is 401.
    fresh = create_key(config, "fresh")

    def fresh_works() -> bool:
        return call(fresh)[0] == 200

    wait_for(fresh_works, timeout=30, interval=0.2, what="the new key")
    wait_for(lambda: call(stranger)[0] == 401, timeout=30, interval=0.2, what="401 for an unknown key")
    wait_for(lambda: store.count() == answered, timeout=60, what="every record in the store")
    gw.stop()
    assert store.count() == answered


def test_a_journal_that_cannot_write_answers_nothing_it_cannot_record(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The journal's disk "fills" for real (a file size limit on the gateway process, so its
    writes fail with EFBIG): every request answered 200 has its record, every other one gets a
    503 audit_journal_unavailable, or a stream that had started ends with that error event and
    no [DONE]; none is told it is recorded."""
    import resource
    import signal as sig

    sim_url, _ = cluster.sim("m")
    config = tmp_path / "fortress.yaml"
    config.write_text(gateway_yaml(tmp_path, sim_url, "{group_commit_ms: 2}"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    limit = 150_000

    def small_files() -> None:  # in the child: writes past `limit` bytes fail (EFBIG), no signal
        sig.signal(sig.SIGXFSZ, sig.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    log = open(tmp_path / "gw.log", "wb")
    gw = subprocess.Popen(
        fortress_argv("serve", "-c", str(config), "--port", str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=small_files,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _ready(url), timeout=60, what="the gateway")
        answered: list[int] = []
        while len(answered) < 2000 and (not answered or answered[-1] == 200):
            status, headers, body = post(
                url, AUDIT, {**CHAT, "messages": [{"role": "user", "content": "x" * 300}]}
            )
            answered.append(status)
        assert answered[-1] == 503, f"the journal never filled: {len(answered)} requests"
        assert set(answered) == {200, 503}
        assert_schema(body, "ErrorResponse")
        assert body["error"]["code"] == "audit_journal_unavailable" and "recorded as" not in json.dumps(body)
        assert headers["retry-after"] == "10"
        # More of them: each refused, none half-answered.
        for _ in range(5):
            status, _, body = post(url, AUDIT)
            assert status == 503 and body["error"]["code"] == "audit_journal_unavailable"
        # A stream that has started ends with the error event, without [DONE].
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({**CHAT, "stream": True}),
            {"content-type": "application/json", **AUDIT},
        )
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        assert resp.status == 200 and "audit_journal_unavailable" in text and "[DONE]" not in text, text
        # Every 200 has its record in the journal, and nothing else does.
        lines = sum(p.read_bytes().count(b"\n") for p in (tmp_path / "state" / "journal").glob("seg-*.log"))
        assert lines == answered.count(200)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        failures = re.search(r"^fortress_audit_journal_write_failures_total (\S+)$", metrics, re.M)
        assert failures and float(failures.group(1)) == answered.count(503) + 5 + 1, metrics[-500:]
    finally:
        os.killpg(gw.pid, sig.SIGTERM)
        gw.wait(20)
        log.close()


def _ready(url: str) -> bool:
    try:
        return http_get(url + "/ready")[0] == 200
    except OSError:
        return False
