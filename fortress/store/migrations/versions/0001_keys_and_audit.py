"""API keys, audit records, audit anchors, shipper offsets.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("hash", sa.Text, nullable=False, unique=True),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("prev_hash", sa.Text, nullable=True),
        sa.Column("prev_prefix", sa.Text, nullable=True),
        sa.Column("prev_expires_at", sa.Float, nullable=True),
    )
    op.create_index("ix_api_keys_updated_at", "api_keys", ["updated_at"])
    op.create_table(
        "audit_records",
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("gateway_id", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("key_id", sa.Text, nullable=True),
        sa.Column("key_name", sa.Text, nullable=True),
        sa.Column("source", sa.Text),
        sa.Column("user", sa.Text),
        sa.Column("request_type", sa.Text),
        sa.Column("client", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("replica", sa.Text),
        sa.Column("tier", sa.Text),
        sa.Column("stream", sa.Boolean),
        sa.Column("status", sa.Integer),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("latency_ms", sa.Float),
        sa.Column("ttft_ms", sa.Float, nullable=True),
        sa.Column("input_tokens", sa.Integer),
        sa.Column("output_tokens", sa.Integer),
        sa.Column("cached_tokens", sa.Integer),
        sa.Column("bytes_in", sa.Integer),
        sa.Column("bytes_out", sa.Integer),
        sa.Column("retries", sa.Integer),
        sa.Column("body", sa.JSON, nullable=True),
        sa.Column("prev_hash", sa.Text),
        sa.Column("hash", sa.Text),
        sa.PrimaryKeyConstraint("gateway_id", "seq"),
    )
    op.create_table(
        "audit_anchors",
        sa.Column("gateway_id", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.Text, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("gateway_id", "seq"),
    )
    op.create_table(
        "shipper_offsets",
        sa.Column("gateway_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("shipper_offsets")
    op.drop_table("audit_anchors")
    op.drop_table("audit_records")
    op.drop_index("ix_api_keys_updated_at", table_name="api_keys")
    op.drop_table("api_keys")
