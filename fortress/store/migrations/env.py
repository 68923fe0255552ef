"""Alembic environment: the connection is handed in by ``fortress.store.db.migrate``."""

from __future__ import annotations

from alembic import context

from fortress.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - fortress always passes its own connection
    raise RuntimeError("run migrations through fortress.store.db.migrate(url)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
