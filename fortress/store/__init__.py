"""The database: engine from ``database.url``, tables, Alembic migrations run on start."""
