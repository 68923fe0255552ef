"""The database: engine from ``database.url``, tables, Alembic migrations run on start."""

import logging

# Alembic logs each plugin (when imported) and "Context impl" (on every run) at INFO; only its
# warnings matter here, and ``db.migrate`` logs an applied revision itself.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)
