"""Every table Fortress keeps in its database (SQLAlchemy Core).

The Alembic migrations in ``migrations/versions`` create these; keep the two in step (a test
compares them). Timestamps are epoch seconds as DOUBLE, except ``api_keys.updated_at``, which
is an integer of milliseconds so that the key cache can fingerprint the table exactly with
``count``/``max``/``sum``.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)

metadata = MetaData()

# API keys: only an HMAC-SHA-256 of each key is stored (``hash``); ``prefix`` is the visible
# start of the key shown in listings. After a rotation the previous hash keeps working until
# ``prev_expires_at``.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("prefix", Text, nullable=False),
    Column("hash", Text, nullable=False, unique=True),
    Column("plan", Text, nullable=False),
    Column("models", JSON, nullable=False),  # list of model names; empty = every model
    Column("created_at", Float, nullable=False),
    Column("updated_at", BigInteger, nullable=False, index=True),  # ms, strictly increasing per row
    Column("revoked_at", Float, nullable=True),
    Column("prev_hash", Text, nullable=True),
    Column("prev_prefix", Text, nullable=True),
    Column("prev_expires_at", Float, nullable=True),
)

# The audit trail (written by fortress.audit): one row per request, hash-chained per gateway.
# The indexes serve ``fortress audit query`` filters (migration 0002 says why these); the
# primary key serves ``--gateway`` and ``fortress audit verify``.
audit_records = Table(
    "audit_records",
    metadata,
    Column("seq", BigInteger, nullable=False),  # journal sequence number, unique per gateway
    Column("gateway_id", Text, nullable=False),
    Column("request_id", Text, nullable=False),
    Column("ts", Float, nullable=False),
    Column("key_id", Text, nullable=True),
    Column("key_name", Text, nullable=True),
    Column("source", Text),
    Column("user", Text),
    Column("request_type", Text),
    Column("client", Text),
    Column("model", Text),
    Column("replica", Text),
    Column("tier", Text),
    Column("stream", Boolean),
    Column("status", Integer),
    Column("error", Text, nullable=True),
    Column("latency_ms", Float),
    Column("ttft_ms", Float, nullable=True),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("cached_tokens", Integer),
    Column("bytes_in", Integer),
    Column("bytes_out", Integer),
    Column("retries", Integer),
    Column("body", JSON, nullable=True),
    Column("prev_hash", Text),
    Column("hash", Text),
    PrimaryKeyConstraint("gateway_id", "seq"),
    Index("ix_audit_records_ts", "ts"),
    Index("ix_audit_records_request_id", "request_id"),
    Index("ix_audit_records_key_id_ts", "key_id", "ts"),
    Index("ix_audit_records_key_name_ts", "key_name", "ts"),
    Index("ix_audit_records_user_ts", "user", "ts"),
)

# Chain heads recorded every ``audit.anchor_every`` seconds, to detect truncation.
audit_anchors = Table(
    "audit_anchors",
    metadata,
    Column("gateway_id", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", Text, nullable=False),
    Column("ts", Float, nullable=False),
    PrimaryKeyConstraint("gateway_id", "seq"),
)

# How far each gateway's journal has been shipped to this database.
shipper_offsets = Table(
    "shipper_offsets",
    metadata,
    Column("gateway_id", Text, primary_key=True),
    Column("seq", BigInteger, nullable=False),
)

# The fleet's instances (written by fortress.fleet.instances): one row per instance, whatever
# its provider, with the states it went through. Migration 0003 says why these keys.
fleet_instances = Table(
    "fleet_instances",
    metadata,
    Column("provider", Text, nullable=False),  # local | aws
    Column("id", Text, nullable=False),  # an EC2 instance id; local: <gateway>/<slot>/<incarnation>
    Column("pool", Text, nullable=False),
    Column("gateway", Text, nullable=False),  # the gateway (host) that manages it
    Column("capacity", Text, nullable=False),  # local | spot | on-demand
    Column("state", Text, nullable=False),  # the current state (fortress.fleet.providers.base)
    Column("version", Text, nullable=True),  # what it runs: model/engine/flags fingerprint
    Column("url", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("history", JSON, nullable=False),  # [[ts, state, detail], ...], oldest first
    PrimaryKeyConstraint("provider", "id"),
    Index("ix_fleet_instances_pool_state", "pool", "state"),
)

# Every change of a pool's desired replica count, as the controller decided it.
fleet_decisions = Table(
    "fleet_decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # insertion order
    Column("ts", Float, nullable=False),
    Column("pool", Text, nullable=False),
    Column("gateway", Text, nullable=False),
    Column("before", Integer, nullable=False),  # desired count before the decision
    Column("after", Integer, nullable=False),  # and after it
    Column("kind", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Index("ix_fleet_decisions_pool_ts", "pool", "ts"),
)

# Open WebSocket connections (written by fortress.store.connections for the gateway's /v1/ws):
# which gateway holds which connection, and who opened it. A row lives while its connection
# does; migration 0004 says why these keys.
ws_connections = Table(
    "ws_connections",
    metadata,
    Column("id", Text, primary_key=True),  # "ws-" + random hex, chosen by the gateway
    Column("gateway", Text, nullable=False),  # the gateway that holds it: host:port
    Column("client", Text, nullable=True),  # the client's address as the gateway saw it
    Column("key_id", Text, nullable=True),
    Column("key_name", Text, nullable=True),
    Column("source", Text, nullable=True),  # x-llm-source
    Column("user", Text, nullable=True),  # x-llm-user
    Column("opened_at", Float, nullable=False),
    Index("ix_ws_connections_gateway", "gateway"),
)
