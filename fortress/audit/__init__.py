"""The audit trail: one hash-chained record per request, journaled before the response completes
and shipped to the store (SQLite / PostgreSQL) and to archive files (local or S3)."""
