"""WebSocket connection registry: ws_connections, written by ``fortress.store.connections``.

Revision ID: 0004
Revises: 0003

One row per open WebSocket connection of any gateway sharing the database, so that an operator
(``fortress status``, ``GET /admin/connections``) sees which gateway holds which connection.

- Primary key ``id``: the gateway draws it at random (``ws-`` + 16 hex digits), so ids of
  gateways sharing a database do not collide, and a close deletes by it.
- Index ``gateway``: a gateway that starts deletes the rows its previous run left (a run that
  was killed could not delete its own), and listings may be narrowed to one gateway.
- No history: a row is deleted when its connection closes (the audit trail keeps what each
  request on it did), so the table stays as small as the number of open connections.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ws_connections",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("gateway", sa.Text, nullable=False),
        sa.Column("client", sa.Text, nullable=True),
        sa.Column("key_id", sa.Text, nullable=True),
        sa.Column("key_name", sa.Text, nullable=True),
        sa.Column("source", sa.Text, nullable=True),
        sa.Column("user", sa.Text, nullable=True),
        sa.Column("opened_at", sa.Float, nullable=False),
    )
    op.create_index("ix_ws_connections_gateway", "ws_connections", ["gateway"])


def downgrade() -> None:
    op.drop_index("ix_ws_connections_gateway", table_name="ws_connections")
    op.drop_table("ws_connections")
