"""Fleet state: fleet_instances and fleet_decisions, written by ``fortress.fleet.instances``.

Revision ID: 0003
Revises: 0002

``fleet_instances``: one row per instance of a fleet, its current state and its history.

- Primary key ``(provider, id)``: an id is unique only within its provider. EC2 instance ids are
  unique on their own; a local instance is one process of one slot, and its id
  ``<gateway>/<slot>/<n>`` names the host first so that gateways sharing a database never
  collide, and the process number last so that each process has its own row (a slot's name
  outlives its processes). A gateway's writes to a row are upserts on this key.
- Index ``(pool, state)``: what a restarted gateway asks (a pool's instances not terminated,
  failed or preempted, to adopt or to close) and what the status listings ask (a pool's
  instances). ``gateway`` is not in it: a pool's rows come from one or a few gateways, filtered
  on the rows the index finds; a pool's terminated rows pile up, its live ones stay few, so the
  state second keeps those reads short as the table grows.
- ``history`` is a JSON list of ``[ts, state, detail]`` in the row rather than a table of its
  own: it is always read with its row, written by one gateway, and bounded (the writer keeps
  the newest entries), so a row holds all that is known of one instance.
- ``version`` (nullable) is what the instance runs (model, engine, flags), for rolling updates;
  ``url`` (nullable) is where it answers while it runs. Times are epoch seconds as DOUBLE, like
  every other table's.

``fleet_decisions``: every change of a pool's desired count.

- ``id`` is an INTEGER primary key that the database numbers: SERIAL on PostgreSQL, the rowid
  on SQLite (only a column declared ``INTEGER PRIMARY KEY`` is numbered there: a BIGINT would
  not be). It gives the order of decisions made within the same second; 2^31 decisions (one
  per change of a count) is not a limit a fleet reaches.
- ``before`` / ``after`` are the counts; not ``from`` / ``to``, which are SQL keywords.
- Index ``(pool, ts)``: the reads are "a pool's latest decisions" (status, CLI); the time
  second serves them, and a time window, with one range read.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet_instances",
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("pool", sa.Text, nullable=False),
        sa.Column("gateway", sa.Text, nullable=False),
        sa.Column("capacity", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=True),
        sa.Column("url", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("history", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("provider", "id"),
    )
    op.create_index("ix_fleet_instances_pool_state", "fleet_instances", ["pool", "state"])
    op.create_table(
        "fleet_decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("pool", sa.Text, nullable=False),
        sa.Column("gateway", sa.Text, nullable=False),
        sa.Column("before", sa.Integer, nullable=False),
        sa.Column("after", sa.Integer, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_fleet_decisions_pool_ts", "fleet_decisions", ["pool", "ts"])


def downgrade() -> None:
    op.drop_index("ix_fleet_decisions_pool_ts", table_name="fleet_decisions")
    op.drop_table("fleet_decisions")
    op.drop_index("ix_fleet_instances_pool_state", table_name="fleet_instances")
    op.drop_table("fleet_instances")
