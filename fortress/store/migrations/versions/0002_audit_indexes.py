"""Secondary indexes on audit_records, for ``fortress audit query`` / ``export``.

Revision ID: 0002
Revises: 0001

Which filters get an index (``fortress.audit.query.Filters``):

- ``ts``: ``--since`` / ``--until``, and the ``ORDER BY ts`` of every query: a time window alone
  is a range read, and the newest ``--limit`` records come off the end of the index.
- ``request_id``: ``--request-id`` looks up one request; not unique (clients choose it, and
  several gateways may see the same one).
- ``(key_id, ts)`` and ``(key_name, ts)``: ``--key`` matches ``key_id = k OR key_name = k``.
  An OR can only use indexes when each side has one (SQLite's multi-index OR, PostgreSQL's
  BitmapOr); with ``key_id`` alone the whole OR falls back to a scan. ``ts`` second serves a
  key plus a time window with one range read per side.
- ``(user, ts)``: ``--user`` is the ``x-llm-user`` column (every request sends it) with many
  distinct values; "what did alice do this week" is the query the docs lead with.

Not indexed: ``source``, ``model`` and ``status`` have few distinct values (a few services,
a few models, a handful of codes), so an index on them picks out a large share of the table
and costs a write per record; combined with a time window or a key they are filtered on the
rows the indexes above find. ``gateway_id`` (``--gateway``) and ``fortress audit verify``
(``WHERE gateway_id = ? ORDER BY seq``, and the distinct gateway ids) are served by the
primary key (gateway_id, seq) already.

On PostgreSQL ``CREATE INDEX`` (not ``CONCURRENTLY``: Alembic runs this in a transaction)
blocks inserts into audit_records while it builds; shippers retry and their journals keep
the records meanwhile.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# name -> columns; the same names are declared on ``fortress.store.tables.audit_records``.
INDEXES: dict[str, list[str]] = {
    "ix_audit_records_ts": ["ts"],
    "ix_audit_records_request_id": ["request_id"],
    "ix_audit_records_key_id_ts": ["key_id", "ts"],
    "ix_audit_records_key_name_ts": ["key_name", "ts"],
    "ix_audit_records_user_ts": ["user", "ts"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "audit_records", columns)


def downgrade() -> None:
    for name in reversed(INDEXES):
        op.drop_index(name, table_name="audit_records")
